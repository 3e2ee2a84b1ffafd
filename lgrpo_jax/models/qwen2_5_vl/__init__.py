"""Qwen2.5-VL in Flax NNX: architecture (model, vision, rope), HF weight mapping (params, hf)."""

from lgrpo_jax.models.qwen2_5_vl.config import (ConfigError, Qwen25VLConfig, TextConfig,
                                                VisionConfig)
from lgrpo_jax.models.qwen2_5_vl.hf import from_config, load_hf, save_hf
from lgrpo_jax.models.qwen2_5_vl.model import Qwen25VL, forward
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index

__all__ = ["ConfigError", "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "forward",
           "from_config", "get_rope_index", "load_hf", "save_hf"]
