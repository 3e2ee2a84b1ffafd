"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks, patch merger.

The variable-length parts (windows, images of different sizes) are turned into a static layout on
the host from `image_grid_thw` (shape metadata, so it is known at trace time): a permutation into
window order and, for each attention kind, a padded (groups, length) gather. Attention then runs as
a dense batched op over groups — windows of up to 64 tokens, or whole frames — never over the full
N×N sequence with a mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lgrpo_jax.models.qwen2_5_vl.config import VisionConfig
from lgrpo_jax.sharding import constrain
from lgrpo_jax.models.qwen2_5_vl.layers import (Dense, GatedMLP, RMSNorm, activation, apply_rotary,
                                                attention, scan_layers, stack_modules)

Grid = tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Groups:
  """A partition of the (window-ordered) sequence into attention groups, padded to one length."""
  index_gl: np.ndarray | None  # (G, L) positions in the sequence; None = plain reshape (no padding)
  valid_gl: np.ndarray | None  # (G, L) bool
  inverse_n: np.ndarray | None  # (N,) position of each token in the flattened (G·L) layout
  num_groups: int
  length: int

  @classmethod
  def from_lengths(cls, lengths: list[int]) -> "Groups":
    lengths = [n for n in lengths if n > 0]
    g, length = len(lengths), max(lengths)
    if all(n == length for n in lengths):  # contiguous, equal groups: a reshape
      return cls(None, None, None, g, length)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ar = np.arange(length)
    valid = ar[None, :] < np.asarray(lengths)[:, None]
    index = np.where(valid, starts[:, None] + ar[None, :], 0)
    inverse = np.concatenate([gi * length + np.arange(n) for gi, n in enumerate(lengths)])
    return cls(index, valid, inverse, g, length)

  def gather(self, x_n):
    if self.index_gl is None:
      return x_n.reshape(self.num_groups, self.length, *x_n.shape[1:])
    return x_n[self.index_gl]

  def scatter(self, x_gl):
    flat = x_gl.reshape(self.num_groups * self.length, *x_gl.shape[2:])
    return flat if self.inverse_n is None else flat[self.inverse_n]

  def key_mask(self):
    if self.valid_gl is None:
      return None
    return jnp.asarray(self.valid_gl)[:, None, :]


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
  """Everything the tower needs that depends only on the image grids (computed once per grid)."""
  num_patches: int
  window_perm: np.ndarray  # (N,) original patch index at each window-ordered position
  merged_unperm: np.ndarray  # (N/m²,) restores original merged-token order after the merger
  pos_hw: np.ndarray  # (N, 2) patch (row, col) in window order, for the 2-D rotary
  windows: Groups
  frames: Groups


@functools.lru_cache(maxsize=64)
def vision_layout(grid: Grid, cfg: VisionConfig) -> VisionLayout:
  """Window order, rotary positions and attention groups for images/videos with these grids.

  Follows transformers' `get_vision_window_index`: merged tokens are tiled into windows of
  `window_size / patch_size / merge` per side (edge windows partial), per temporal frame.
  """
  m = cfg.spatial_merge_size
  unit = m * m
  ws = cfg.window_size // m // cfg.patch_size
  window_index, window_lens, pos, frame_lens = [], [], [], []
  offset = 0
  for t, h, w in grid:
    if h % m or w % m:
      raise ValueError(f"image grid {(t, h, w)} is not divisible by spatial_merge_size={m}")
    lh, lw = h // m, w // m
    idx = np.arange(t * lh * lw).reshape(t, lh, lw)
    nh, nw = -(-lh // ws), -(-lw // ws)
    padded = np.full((t, nh * ws, nw * ws), -1)
    padded[:, :lh, :lw] = idx
    tiles = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
    for tile in tiles.reshape(-1, ws * ws):
      members = tile[tile >= 0]
      window_index.append(members + offset)
      window_lens.append(len(members) * unit)
    offset += t * lh * lw
    # 2-D positions of patches, in merge-group (block-major) order, repeated per frame.
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blk = (lh, m, lw, m)
    hw = np.stack([hh.reshape(blk).transpose(0, 2, 1, 3).ravel(),
                   ww.reshape(blk).transpose(0, 2, 1, 3).ravel()], -1)
    pos.append(np.tile(hw, (t, 1)))
    frame_lens += [h * w] * t
  win = np.concatenate(window_index)
  window_perm = (win[:, None] * unit + np.arange(unit)[None]).ravel()
  pos_hw = np.concatenate(pos)[window_perm]
  return VisionLayout(
      num_patches=len(window_perm), window_perm=window_perm, merged_unperm=np.argsort(win),
      pos_hw=pos_hw, windows=Groups.from_lengths(window_lens), frames=Groups.from_lengths(frame_lens))


def block_runs(cfg: VisionConfig) -> list[tuple[int, int, bool]]:
  """Consecutive blocks of the same attention kind: [(start, stop, full_attention)]."""
  full = set(cfg.fullatt_block_indexes)
  runs: list[tuple[int, int, bool]] = []
  for i in range(cfg.depth):
    if runs and runs[-1][2] == (i in full):
      runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
    else:
      runs.append((i, i + 1, i in full))
  return runs


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.num_heads
    self.num_heads, self.head_dim = h, cfg.head_dim
    self.norm1 = RMSNorm(d, eps=1e-6, param_dtype=param_dtype)
    self.norm2 = RMSNorm(d, eps=1e-6, param_dtype=param_dtype)
    # Fused qkv as in the checkpoint; output axes (3, heads, head_dim).
    self.qkv = Dense((d,), (3, h, cfg.head_dim), in_names=("embed",),
                     out_names=(None, "heads", "head_dim"), use_bias=True, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.proj = Dense((h, cfg.head_dim), (d,), in_names=("heads", "head_dim"), out_names=("embed",),
                      use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = GatedMLP(d, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_nd, cos_nd, sin_nd, groups: Groups, impl: str = "auto"):
    qkv = constrain(self.qkv(self.norm1(x_nd)), ("batch", None, "heads", None))  # (N, 3, H, Dh)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = apply_rotary(q, cos_nd[:, None], sin_nd[:, None])
    k = apply_rotary(k, cos_nd[:, None], sin_nd[:, None])
    q_glhd, k_glhd, v_glhd = groups.gather(q), groups.gather(k), groups.gather(v)
    o = attention(q_glhd[:, :, :, None], k_glhd, v_glhd, groups.key_mask(), self.head_dim**-0.5, impl)
    o_nhd = groups.scatter(o[:, :, :, 0])
    x_nd = x_nd + self.proj(o_nhd)
    return x_nd + self.mlp(self.norm2(x_nd))


class PatchMerger(nnx.Module):
  """RMSNorm, group each m×m block of tokens, Linear → exact GELU → Linear to the text width."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size * cfg.spatial_merge_size**2
    self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp0 = Dense((d,), (d,), in_names=("embed",), out_names=("mlp",), **kw)
    self.mlp2 = Dense((d,), (cfg.out_hidden_size,), in_names=("mlp",), out_names=("embed",), **kw)
    self.group = d

  def __call__(self, x_nd):
    x = self.ln_q(x_nd).reshape(-1, self.group)
    return self.mlp2(activation("gelu")(self.mlp0(x)))


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    # Conv3d with kernel = stride = (T, P, P) and no bias is a matmul on the flattened patch.
    self.patch_embed = Dense((cfg.patch_dim,), (cfg.hidden_size,), in_names=(None,),
                             out_names=("embed",), use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.blocks = stack_modules(
        lambda r: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth, rngs)
    self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def rotary(self, pos_hw):
    dh = self.cfg.head_dim
    inv_freq = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, dh // 2, 2, dtype=jnp.float32) / (dh // 2)))
    pos = jnp.asarray(pos_hw, jnp.float32)
    freqs = jnp.concatenate([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], -1)
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)

  def __call__(self, pixel_values, grid: Grid, remat: str = "none", attention: str = "auto"):
    """pixel_values: (N, C·T·P·P) patches as the processor returns them → (N/m², out_hidden_size)."""
    layout = vision_layout(grid, self.cfg)
    if pixel_values.shape != (layout.num_patches, self.cfg.patch_dim):
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw "
                       f"{[list(g) for g in grid]} needs ({layout.num_patches}, {self.cfg.patch_dim})")
    # Embed, then reorder into windows: the gather moves hidden_size, not C·T·P·P, values per patch.
    x = self.patch_embed(jnp.asarray(pixel_values))[layout.window_perm]
    cos, sin = self.rotary(layout.pos_hw)
    for start, stop, full in block_runs(self.cfg):
      groups = layout.frames if full else layout.windows
      x = scan_layers(self.blocks, constrain(x, ("batch", None)),
                      lambda blk, h, g=groups: constrain(blk(h, cos, sin, g, attention), ("batch", None)),
                      start, stop, remat)
    return self.merger(x)[layout.merged_unperm]
