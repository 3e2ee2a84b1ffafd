"""Counted matmul FLOPs of a Qwen2.5-VL forward (2·m·n·k per matmul), for benchmarks and MFU.

Attention is counted as computed: each vision group (window or frame) attends densely within itself,
and the decoder computes the full T×T score matrix (the causal mask does not skip work). Element-wise
ops (norms, rotary, softmax, activations) are not counted; they are a few percent at these sizes.
"""

from __future__ import annotations

from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from lgrpo_jax.models.qwen2_5_vl.vision import block_runs, vision_layout

Grid = tuple[tuple[int, int, int], ...]


def vision_flops(cfg: Qwen25VLConfig, grid: Grid) -> int:
  if not grid:
    return 0
  v = cfg.vision
  layout = vision_layout(tuple(map(tuple, grid)), v)
  n, d = layout.num_patches, v.hidden_size
  total = 2 * n * v.patch_dim * d
  dense_per_block = 2 * n * d * 3 * d + 2 * n * d * d + 3 * 2 * n * d * v.intermediate_size
  for start, stop, full in block_runs(v):
    g = layout.frames if full else layout.windows
    attn = 2 * 2 * g.num_groups * g.length**2 * d  # QK^T and PV over padded groups
    total += (stop - start) * (dense_per_block + attn)
  m = n // v.spatial_merge_size**2
  dm = d * v.spatial_merge_size**2
  return total + 2 * m * dm * dm + 2 * m * dm * v.out_hidden_size


def text_flops(cfg: Qwen25VLConfig, batch: int, seq_len: int, *, lm_head: bool = True) -> int:
  t = cfg.text
  e, hd = t.hidden_size, t.head_dim
  q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
  tok = batch * seq_len
  per_layer = (2 * tok * e * (2 * q_out + 2 * kv_out)  # q, o and k, v projections
               + 3 * 2 * tok * e * t.intermediate_size  # gate, up, down
               + 2 * 2 * batch * seq_len * seq_len * q_out)  # scores and weighted sum
  head = 2 * tok * e * t.vocab_size if lm_head else 0
  return t.num_hidden_layers * per_layer + head


def forward_flops(cfg: Qwen25VLConfig, batch: int, seq_len: int, grid: Grid = ()) -> int:
  """One forward of `batch` sequences of `seq_len` tokens holding the images of `grid`."""
  return vision_flops(cfg, grid) + text_flops(cfg, batch, seq_len)
