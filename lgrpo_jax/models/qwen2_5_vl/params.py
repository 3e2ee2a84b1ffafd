"""HF checkpoint <-> our parameter tree: one declarative table, read one way to import, the other to export.

Each rule maps a Hub-layout key (with `{i}` for the layer index) to a path in our NNX state and
names the transform between the two layouts:

  same    identical arrays (embeddings, norms)
  vector  a bias whose output axes we keep split, e.g. q bias (H·D,) <-> (H, D)
  linear  torch `Linear.weight` (out, in) <-> our kernel (*in_axes, *out_axes)
  conv    the Conv3d patch embedding (D, C, T, P, P) <-> our (C·T·P·P, D) matmul kernel

Stacked layers: a rule whose path starts with a stacked module ('layers', 'visual.blocks') is
applied for every layer index and fills one slice of the stacked array.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  hf: str
  kind: str  # same | vector | linear | conv
  n_in: int = 1  # linear: how many leading axes of our kernel are input axes


def _linear(ours: str, hf: str, bias: bool, n_in: int = 1, bias_kind: str = "vector") -> list[Rule]:
  rules = [Rule(f"{ours}.kernel", f"{hf}.weight", "linear", n_in)]
  if bias:
    rules.append(Rule(f"{ours}.bias", f"{hf}.bias", bias_kind))
  return rules


RULES: list[Rule] = [
    # ---- vision tower ----
    Rule("visual.patch_embed.kernel", "visual.patch_embed.proj.weight", "conv"),
    Rule("visual.blocks.norm1.weight", "visual.blocks.{i}.norm1.weight", "same"),
    Rule("visual.blocks.norm2.weight", "visual.blocks.{i}.norm2.weight", "same"),
    *_linear("visual.blocks.qkv", "visual.blocks.{i}.attn.qkv", bias=True),
    *_linear("visual.blocks.proj", "visual.blocks.{i}.attn.proj", bias=True, n_in=2, bias_kind="same"),
    *_linear("visual.blocks.mlp.gate_proj", "visual.blocks.{i}.mlp.gate_proj", True, bias_kind="same"),
    *_linear("visual.blocks.mlp.up_proj", "visual.blocks.{i}.mlp.up_proj", True, bias_kind="same"),
    *_linear("visual.blocks.mlp.down_proj", "visual.blocks.{i}.mlp.down_proj", True, bias_kind="same"),
    Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.weight", "same"),
    *_linear("visual.merger.mlp0", "visual.merger.mlp.0", True, bias_kind="same"),
    *_linear("visual.merger.mlp2", "visual.merger.mlp.2", True, bias_kind="same"),
    # ---- decoder ----
    Rule("embed_tokens", "model.embed_tokens.weight", "same"),
    Rule("layers.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "same"),
    *_linear("layers.q_proj", "model.layers.{i}.self_attn.q_proj", bias=True),
    *_linear("layers.k_proj", "model.layers.{i}.self_attn.k_proj", bias=True),
    *_linear("layers.v_proj", "model.layers.{i}.self_attn.v_proj", bias=True),
    *_linear("layers.o_proj", "model.layers.{i}.self_attn.o_proj", bias=False, n_in=2),
    Rule("layers.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
         "same"),
    *_linear("layers.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj", bias=False),
    *_linear("layers.mlp.up_proj", "model.layers.{i}.mlp.up_proj", bias=False),
    *_linear("layers.mlp.down_proj", "model.layers.{i}.mlp.down_proj", bias=False),
    Rule("norm.weight", "model.norm.weight", "same"),
    Rule("lm_head.kernel", "lm_head.weight", "linear"),
]

TIED_ONLY_ABSENT = "lm_head.kernel"


def rules_for(cfg: Qwen25VLConfig) -> list[Rule]:
  return [r for r in RULES if not (cfg.tie_word_embeddings and r.ours == TIED_ONLY_ABSENT)]


def num_layers(rule: Rule, cfg: Qwen25VLConfig) -> int | None:
  """Stack depth for per-layer rules, None for single tensors."""
  if "{i}" not in rule.hf:
    return None
  return cfg.vision.depth if rule.ours.startswith("visual.blocks.") else cfg.text.num_hidden_layers


def hf_keys(rule: Rule, cfg: Qwen25VLConfig) -> list[str]:
  n = num_layers(rule, cfg)
  return [rule.hf] if n is None else [rule.hf.format(i=i) for i in range(n)]


def hf_shape(rule: Rule, ours_shape: tuple[int, ...], cfg: Qwen25VLConfig) -> tuple[int, ...]:
  """The HF tensor's shape for one layer slice of our array of shape `ours_shape`."""
  if rule.kind == "same":
    return tuple(ours_shape)
  if rule.kind == "vector":
    return (math.prod(ours_shape),)
  if rule.kind == "linear":
    return (math.prod(ours_shape[rule.n_in:]), math.prod(ours_shape[:rule.n_in]))
  if rule.kind == "conv":
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  raise ValueError(rule.kind)


def to_ours(rule: Rule, hf: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
  if rule.kind in ("same", "vector"):
    return hf.reshape(ours_shape)
  # linear (out, in) and conv (D, C, T, P, P): flatten to (out, in), transpose, split axes.
  return np.ascontiguousarray(hf.reshape(hf.shape[0], -1).T).reshape(ours_shape)


def to_hf(rule: Rule, ours: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if rule.kind in ("same", "vector"):
    return ours.reshape(shape)
  n_in = rule.n_in if rule.kind == "linear" else 1
  flat = ours.reshape(math.prod(ours.shape[:n_in]), -1)
  return np.ascontiguousarray(flat.T).reshape(shape)


