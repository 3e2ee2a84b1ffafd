"""lgrpo_jax: listener-rewarded GRPO for vision-language reward models, in JAX / Flax NNX."""

from lgrpo_jax.models.qwen2_5_vl import (ConfigError, Qwen25VL, Qwen25VLConfig, forward,
                                         from_config, get_rope_index, load_hf, save_hf)
from lgrpo_jax.safetensors_io import CheckpointError
from lgrpo_jax.sampling import generate

__all__ = ["CheckpointError", "ConfigError", "Qwen25VL", "Qwen25VLConfig", "forward", "from_config",
           "generate", "get_rope_index", "load_hf", "save_hf"]
__version__ = "0.1.0"
