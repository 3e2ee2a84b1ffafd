"""Qwen2.5-VL configuration, read from (and written back to) a checkpoint's `config.json`.

Accepts every layout transformers has used: nested `text_config`/`vision_config` (transformers 5) or
text fields at the top level (the Hub's original 3B/7B files), `rope_scaling` (old) or
`rope_parameters` (new), `in_chans` or `in_channels`, `tie_word_embeddings` at the top or inside
`text_config`. Size fields are required (no silent 7B defaults); the rest default as transformers does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

MODEL_TYPE = "qwen2_5_vl"

SUPPORTED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")  # layers.REMAT_POLICIES
ATTENTION = ("auto", "xla", "cudnn")  # layers.ATTENTION_IMPLS
DECODE_ATTENTION = ("xla", "pallas")  # kernels.decode_attention
DECODE_MATMUL = ("xla", "pallas")  # kernels.decode_matmul


class ConfigError(ValueError):
  """A checkpoint's config.json cannot describe a model we can build."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  out_hidden_size: int
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  hidden_act: str = "silu"
  tokens_per_second: int = 4
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch in `pixel_values`: C·T·P·P (3·2·14·14 = 1176)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  hidden_act: str = "silu"
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  text: TextConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False
  # Ours, not HF's: parameter storage and matmul compute dtypes ("float32" | "bfloat16").
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Ours: activation rematerialisation of each scanned layer in the backward pass ("none" | "full" |
  # "dots"; see layers.REMAT_POLICIES). Changes memory and time, never values.
  remat: str = "none"
  # Ours: the attention kernel ("auto" | "xla" | "cudnn"; see layers.attention). auto: cuDNN's fused
  # flash attention on GPUs in bf16/fp16, XLA's softmax(QK^T)V elsewhere.
  attention: str = "auto"
  # Ours: the decode loop's attention ("xla" | "pallas"). pallas: one Pallas (Triton) kernel per layer
  # that also applies rotary and writes the cache (kernels/decode_attention.py); on GPUs only — elsewhere it runs under
  # Pallas' interpreter (slow, for checking). Not yet timed on a GPU, so not the default.
  decode_attention: str = "xla"
  # Ours: the decode loop's weight matmuls ("xla" | "pallas"). pallas: one Pallas (Triton) kernel per
  # matmul with the RMSNorm, bias, SwiGLU and residual adds folded in (kernels/decode_matmul.py); GPUs
  # only (interpreted elsewhere), data/fsdp meshes. Not yet timed on a GPU, so not the default.
  decode_matmul: str = "xla"
  # From generation_config.json beside config.json (not written to config.json): its end ids, which
  # transformers' `generate` stops on (Qwen2.5-VL-Instruct: <|im_end|> and <|endoftext|>, where
  # config.json names one); `sampling.generate`'s default. None: there is no such file or field.
  generation_eos_token_id: tuple[int, ...] | None = None

  def replace(self, **kw) -> "Qwen25VLConfig":
    out = dataclasses.replace(self, **kw)
    validate(out)
    return out

  # ---- HF <-> ours -------------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "Qwen25VLConfig":
    return from_hf_dict(raw, source=source)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"{path}: no such config file")
    from lgrpo_jax.safetensors_io import read_json
    cfg = from_hf_dict(read_json(path, ConfigError), source=path)
    gen_path = os.path.join(os.path.dirname(path), "generation_config.json")
    if os.path.isfile(gen_path):
      gen = read_json(gen_path, ConfigError)
      if not isinstance(gen, dict):
        raise ConfigError(f"{gen_path}: expected a JSON object")
      eos = gen.get("eos_token_id")
      if eos is not None:
        eos = eos if isinstance(eos, list) else [eos]
        cfg = dataclasses.replace(cfg, generation_eos_token_id=tuple(
            _as_int(e, gen_path, "eos_token_id") for e in eos))
    return cfg

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested transformers-5 layout, loadable by `Qwen2_5_VLConfig`."""
    t, v = self.text, self.vision
    text = {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
        },
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    vision = {
        "model_type": "qwen2_5_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "hidden_act": v.hidden_act,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": v.tokens_per_second,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "dtype": self.param_dtype,
    }


# ---- parsing -------------------------------------------------------------------------------
_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
_VISION_REQUIRED = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")


_HF_KV_HEADS, _HF_BOS, _HF_EOS = 8, 151643, 151645  # Qwen2_5_VLTextConfig's class defaults


def _pick(d: dict, source: str, where: str, key: str, required: bool, default=None, aliases=()):
  for k in (key, *aliases):
    if k in d and d[k] is not None:
      return d[k]
  if required:
    raise ConfigError(f"{source}: missing required field '{where}{key}'")
  return default


def _as_int(value, source: str, field: str) -> int:
  """A size or id from config.json: an integer (an integral float such as 2.0 too), never 2.5 or true."""
  if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
    raise ConfigError(f"{source}: '{field}'={value!r} must be an integer")
  return int(value)


def _as_float(value, source: str, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{source}: '{field}'={value!r} must be a number")
  return float(value)


def _as_bool(value, source: str, field: str) -> bool:
  if not isinstance(value, bool):  # "false" is a truthy string
    raise ConfigError(f"{source}: '{field}'={value!r} must be true or false")
  return value


def _as_ints(value, source: str, field: str) -> tuple[int, ...]:
  if not isinstance(value, (list, tuple)):
    raise ConfigError(f"{source}: '{field}'={value!r} must be a list of integers")
  return tuple(_as_int(v, source, field) for v in value)


def _as_token_id(value, source: str, field: str):
  """An id, a list of ids (EOS), or null."""
  if value is None:
    return None
  if isinstance(value, (list, tuple)):
    return _as_ints(value, source, field)
  return _as_int(value, source, field)


def _pick_int(d: dict, source: str, where: str, key: str, required: bool, default=None, aliases=()) -> int:
  return _as_int(_pick(d, source, where, key, required, default, aliases), source, where + key)


def _rope_params(d: dict, source: str, where: str) -> dict:
  rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if not isinstance(rp, dict):
    raise ConfigError(f"{source}: '{where}rope_parameters' must be an object, got {rp!r}")
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type not in ("default", "mrope", "axial"):
    raise ConfigError(f"{source}: '{where}rope_parameters.rope_type'={rope_type!r} is not supported "
                      "(supported: 'default', 'mrope')")
  return rp


def from_hf_dict(raw: dict[str, Any], *, source: str = "config") -> Qwen25VLConfig:
  if not isinstance(raw, dict):
    raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
  model_type = raw.get("model_type")
  if model_type != MODEL_TYPE:
    raise ConfigError(f"{source}: model_type={model_type!r} is not supported; lgrpo_jax reads "
                      f"'{MODEL_TYPE}' checkpoints (Qwen2.5-VL)")

  # Text fields: nested (transformers 5) or flat at the top level (original Hub files).
  text_raw = raw.get("text_config")
  tw = "text_config."
  if not isinstance(text_raw, dict):
    text_raw, tw = raw, ""
  vision_raw = raw.get("vision_config")
  if not isinstance(vision_raw, dict):
    raise ConfigError(f"{source}: missing required field 'vision_config'")
  vw = "vision_config."

  tp = {k: _pick(text_raw, source, tw, k, True) for k in _TEXT_REQUIRED}
  rp = _rope_params(text_raw, source, tw)
  if not rp and tw:  # rope fields may sit at the top level beside a nested text_config
    rp = _rope_params(raw, source, "")
  rope_theta = rp.get("rope_theta", _pick(text_raw, source, tw, "rope_theta", False, None))
  if rope_theta is None:
    rope_theta = raw.get("rope_theta", 1000000.0)
  mrope = _as_ints(rp.get("mrope_section", (16, 24, 24)), source, tw + "rope_parameters.mrope_section")
  # transformers' defaults where a field is absent: 8 KV heads (an explicit null means one KV head
  # per query head), and Qwen's <|endoftext|> / <|im_end|> as BOS / EOS.
  def token_id(key, hf_default):  # an explicit null stays None, as in transformers
    return text_raw[key] if key in text_raw else raw.get(key, hf_default)
  eos = token_id("eos_token_id", _HF_EOS)
  kv_heads = (_HF_KV_HEADS if "num_key_value_heads" not in text_raw
              else _pick(text_raw, source, tw, "num_key_value_heads", False, tp["num_attention_heads"]))
  text = TextConfig(
      **{k: _as_int(v, source, tw + k) for k, v in tp.items()},
      num_key_value_heads=_as_int(kv_heads, source, tw + "num_key_value_heads"),
      rms_norm_eps=_as_float(_pick(text_raw, source, tw, "rms_norm_eps", False, 1e-5), source, tw + "rms_norm_eps"),
      rope_theta=_as_float(rope_theta, source, tw + "rope_theta"),
      mrope_section=mrope,  # type: ignore[arg-type]
      hidden_act=str(_pick(text_raw, source, tw, "hidden_act", False, "silu")),
      max_position_embeddings=_pick_int(text_raw, source, tw, "max_position_embeddings", False, 32768),
      bos_token_id=_as_token_id(token_id("bos_token_id", _HF_BOS), source, tw + "bos_token_id"),
      eos_token_id=_as_token_id(eos, source, tw + "eos_token_id"),
      pad_token_id=_as_token_id(token_id("pad_token_id", None), source, tw + "pad_token_id"),
  )
  if text_raw.get("use_sliding_window"):
    raise ConfigError(f"{source}: '{tw}use_sliding_window'=true is not supported (Qwen2.5-VL "
                      "checkpoints ship with it off)")

  vp = {k: _pick_int(vision_raw, source, vw, k, True) for k in _VISION_REQUIRED}
  vrp = vision_raw.get("rope_parameters") or {}
  vision = VisionConfig(
      **vp,
      patch_size=_pick_int(vision_raw, source, vw, "patch_size", False, 14),
      temporal_patch_size=_pick_int(vision_raw, source, vw, "temporal_patch_size", False, 2),
      spatial_merge_size=_pick_int(vision_raw, source, vw, "spatial_merge_size", False, 2),
      window_size=_pick_int(vision_raw, source, vw, "window_size", False, 112),
      # absent: transformers' default, whose blocks past `depth` do not exist (all-window when depth ≤ 7)
      fullatt_block_indexes=_as_ints(_pick(
          vision_raw, source, vw, "fullatt_block_indexes", False, tuple(i for i in (7, 15, 23, 31)
                                                                         if i < vp["depth"])), source,
          vw + "fullatt_block_indexes"),
      in_channels=_pick_int(vision_raw, source, vw, "in_channels", False, 3, aliases=("in_chans",)),
      hidden_act=str(_pick(vision_raw, source, vw, "hidden_act", False, "silu")),
      tokens_per_second=_pick_int(vision_raw, source, vw, "tokens_per_second", False, 4),
      # (transformers moves a plain vision rope_theta into rope_parameters)
      rope_theta=_as_float((vrp if isinstance(vrp, dict) else {}).get(
          "rope_theta", vision_raw.get("rope_theta", 10000.0)), source, vw + "rope_theta"),
  )
  tie = _as_bool(raw.get("tie_word_embeddings", False), source, "tie_word_embeddings") or (
      _as_bool(raw["text_config"].get("tie_word_embeddings", False), source, "text_config.tie_word_embeddings")
      if isinstance(raw.get("text_config"), dict) else False)
  cfg = Qwen25VLConfig(
      text=text,
      vision=vision,
      image_token_id=_pick_int(raw, source, "", "image_token_id", False, 151655),
      video_token_id=_pick_int(raw, source, "", "video_token_id", False, 151656),
      vision_start_token_id=_pick_int(raw, source, "", "vision_start_token_id", False, 151652),
      vision_end_token_id=_pick_int(raw, source, "", "vision_end_token_id", False, 151653),
      tie_word_embeddings=tie,
  )
  validate(cfg, source)
  return cfg


def validate(cfg: Qwen25VLConfig, source: str = "config") -> None:
  t, v = cfg.text, cfg.vision
  # Sizes before anything divides by them (a 0 was a bare ZeroDivisionError; a negative layer count a
  # JAX shape error at the first forward)
  for where, c, names in (("text_config", t, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings")),
                          ("vision_config", v, ("depth", "hidden_size", "num_heads", "intermediate_size",
                                                "out_hidden_size", "patch_size", "temporal_patch_size",
                                                "spatial_merge_size", "window_size", "in_channels",
                                                "tokens_per_second"))):
    for name in names:
      if getattr(c, name) < 1:
        raise ConfigError(f"{source}: {where}.{name}={getattr(c, name)} must be at least 1")
  for where, value in (("text_config.rms_norm_eps", t.rms_norm_eps), ("text_config.rope_theta", t.rope_theta),
                       ("vision_config.rope_theta", v.rope_theta)):
    if not 0 < value < float("inf"):
      raise ConfigError(f"{source}: {where}={value} must be a positive number")
  if t.hidden_size % t.num_attention_heads:
    raise ConfigError(f"{source}: text hidden_size={t.hidden_size} is not divisible by "
                      f"num_attention_heads={t.num_attention_heads}")
  if t.num_attention_heads % t.num_key_value_heads:
    raise ConfigError(f"{source}: num_attention_heads={t.num_attention_heads} is not divisible by "
                      f"num_key_value_heads={t.num_key_value_heads}")
  if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2 or len(t.mrope_section) != 3:
    raise ConfigError(f"{source}: rope mrope_section={list(t.mrope_section)} must be 3 numbers "
                      f"summing to head_dim/2={t.head_dim // 2}")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    raise ConfigError(f"{source}: vision hidden_size={v.hidden_size} / num_heads={v.num_heads} "
                      "must give a head_dim divisible by 4 (2-D rotary)")
  if v.window_size % (v.patch_size * v.spatial_merge_size):
    raise ConfigError(f"{source}: vision window_size={v.window_size} must be a multiple of "
                      f"patch_size*spatial_merge_size={v.patch_size * v.spatial_merge_size}")
  bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
  if bad:
    raise ConfigError(f"{source}: vision fullatt_block_indexes {bad} outside 0..{v.depth - 1}")
  for where, act in (("text_config.hidden_act", t.hidden_act), ("vision_config.hidden_act", v.hidden_act)):
    if act not in SUPPORTED_ACTS:
      raise ConfigError(f"{source}: {where}={act!r} is not supported (supported: {SUPPORTED_ACTS})")
  if cfg.remat not in REMAT:
    raise ConfigError(f"{source}: remat={cfg.remat!r} must be one of {REMAT}")
  if cfg.attention not in ATTENTION:
    raise ConfigError(f"{source}: attention={cfg.attention!r} must be one of {ATTENTION}")
  if cfg.decode_attention not in DECODE_ATTENTION:
    raise ConfigError(f"{source}: decode_attention={cfg.decode_attention!r} must be one of {DECODE_ATTENTION}")
  if cfg.decode_attention == "pallas":
    from lgrpo_jax.kernels.decode_attention import check_shapes  # imports Pallas: only when asked for
    why = check_shapes(t.head_dim)
    if why:
      raise ConfigError(f"{source}: decode_attention='pallas' cannot run this model: {why}")
  if cfg.decode_matmul not in DECODE_MATMUL:
    raise ConfigError(f"{source}: decode_matmul={cfg.decode_matmul!r} must be one of {DECODE_MATMUL}")
  if cfg.decode_matmul == "pallas" and t.hidden_act != "silu":
    raise ConfigError(f"{source}: decode_matmul='pallas' folds in SwiGLU with silu; this model's "
                      f"text_config.hidden_act is {t.hidden_act!r}")
  for where, dt in (("param_dtype", cfg.param_dtype), ("dtype", cfg.dtype)):
    if dt not in DTYPES:
      raise ConfigError(f"{source}: {where}={dt!r} must be one of {DTYPES}")
