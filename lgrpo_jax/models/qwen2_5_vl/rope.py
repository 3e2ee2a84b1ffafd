"""M-RoPE: the 3-D (temporal, height, width) positions of Qwen2.5-VL and their rotary tables.

`get_rope_index` gives the same positions and rope deltas as transformers'
`Qwen2_5_VLModel.get_rope_index` (5.x), but vectorised: no Python loop over rows or images, so it
runs on the host (numpy in, numpy-able out) and inside jit on traced token ids alike. Only the image
grids must be concrete (they are shape metadata).

Rule (per row, over the tokens where attention_mask == 1; padding gets position 0):
  * a text token takes the running position p on all three axes, then p += 1;
  * an image of llm grid (t, h, w) (patch grid / spatial_merge_size) takes (p + ti, p + hi, p + wi)
    for its tokens in (t, h, w) raster order, then p += max(h, w);
  * rope_delta = max position + 1 − number of attended tokens (decode continues at
    cache_position + rope_delta).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

Grid = tuple[tuple[int, int, int], ...]


def get_rope_index(input_ids, attention_mask, grid: Grid, cfg: Qwen25VLConfig):
  """Returns (position_ids (3, B, T) int32, rope_deltas (B, 1) int32). `grid`: concrete (a tuple or
  the processor's numpy `image_grid_thw`), as everywhere."""
  from lgrpo_jax.models.qwen2_5_vl.layers import static_grid
  grid = static_grid(grid) if grid is not None and len(grid) else ()
  input_ids = jnp.asarray(input_ids)
  b, t_len = input_ids.shape
  valid = (jnp.ones((b, t_len), bool) if attention_mask is None
           else jnp.asarray(attention_mask).astype(bool))
  is_img = (input_ids == cfg.image_token_id) & valid
  m = cfg.vision.spatial_merge_size

  if grid:
    g = np.asarray(grid, np.int32)
    lt, lh, lw = g[:, 0], g[:, 1] // m, g[:, 2] // m
    n_tok = lt * lh * lw
    ends = np.cumsum(n_tok)
    starts = ends - n_tok
    advance = np.maximum(lh, lw)
    # Global (row-major over the batch) index of each image token, then its image and offset.
    gidx = jnp.cumsum(is_img.reshape(-1)).reshape(b, t_len) - 1
    gidx = jnp.clip(gidx, 0, int(ends[-1]) - 1)
    img = jnp.searchsorted(jnp.asarray(ends), gidx, side="right")
    img = jnp.clip(img, 0, len(ends) - 1)
    k = gidx - jnp.asarray(starts)[img]
    hw = jnp.asarray(lh * lw)[img]
    w_i = jnp.asarray(lw)[img]
    ti, rem = k // hw, k % hw
    hi, wi = rem // w_i, rem % w_i
    last = k == jnp.asarray(n_tok)[img] - 1
    inc = jnp.where(is_img, jnp.where(last, jnp.asarray(advance)[img], 0), valid.astype(jnp.int32))
  else:
    ti = hi = wi = jnp.zeros((b, t_len), jnp.int32)
    inc = valid.astype(jnp.int32)

  base = jnp.cumsum(inc, axis=1) - inc  # running position before each token
  pos = jnp.stack([base + jnp.where(is_img, ti, 0), base + jnp.where(is_img, hi, 0),
                   base + jnp.where(is_img, wi, 0)])
  pos = jnp.where(valid[None], pos, 0)
  n_valid = valid.sum(axis=1)
  deltas = jnp.max(pos, axis=(0, 2)) + 1 - n_valid
  return pos.astype(jnp.int32), deltas[:, None].astype(jnp.int32)


def text_rotary(position_ids_3bt, cfg: Qwen25VLConfig):
  """cos, sin of shape (B, T, head_dim), fp32: rotary half i uses axis (t, h, w) per mrope_section."""
  dh = cfg.text.head_dim
  inv_freq = 1.0 / (cfg.text.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  freqs = position_ids_3bt.astype(jnp.float32)[..., None] * inv_freq  # (3, B, T, dh/2)
  bounds = np.cumsum((0, *cfg.text.mrope_section))
  freqs = jnp.concatenate([freqs[i, ..., bounds[i]:bounds[i + 1]] for i in range(3)], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)
