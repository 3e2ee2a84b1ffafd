"""Data: image and text processing for preference pairs (sources and the Grain pipeline to come)."""

from lgrpo_jax.data.images import ImageConfig, ImageError, process_image, process_images, smart_resize

__all__ = ["ImageConfig", "ImageError", "process_image", "process_images", "smart_resize"]
