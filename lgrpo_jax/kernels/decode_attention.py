"""One decode step's attention for a layer as one Pallas (Triton) kernel, the cache write included.

The XLA path of a decode step (`layers.attention_decode` plus the two cache writes and the layout
swaps in `Qwen25VL.decode_step`) runs on a GPU as ~12 small kernels per layer, each a few µs of
latency at 32 rows (profiled on an H200, 3B config: the attention matmuls 0.51 ms and the small
fusions 0.95 ms of a 3.29 ms step; docs/PERFORMANCE.md). This kernel does the same work in one
launch per layer:

    for each (prompt b, sample g, kv head k) — one program:
      write the new token's k, v into the sample's cache at slot `step`         (in place: aliased)
      q ← (q · scale) in the compute dtype, its h query heads as rows (padded to ≥ 16 for the MMA)
      online softmax over [prefix slots p with prefix_mask[b, p] | own slots n < step | the new token]
          s = q·kᵀ (fp32), m ← max(m, max s), l ← l·e^(m_old−m) + Σ e^(s−m),
          acc ← acc·e^(m_old−m) + e^(s−m)·v   (probabilities in the compute dtype, fp32 sums)
      o = acc / l

Equal to `attention_decode` up to the order of fp32 sums (tested on CPU under Pallas' interpreter
against it and against a float64 reference). Layouts are the decode step's own: q, o (B, G, K, h,
D) and the new k, v (B, G, K, D) as the fused q/k/v projection leaves them, caches as `KVCache`
keeps them — so no transposes around it. The prefix is read once per sample (G programs read the
same (b, k) prefix; all but the first from L2).

Status: opt-in (`Qwen25VLConfig.decode_attention = "pallas"`), not yet timed on a GPU — the default
stays XLA until a GPU session measures it (`bench/gpu.py --decode-attention xla,pallas`). On a
backend other than GPU it runs under Pallas' interpreter (correct, slow: for checking only). It uses
Pallas' Triton backend, deprecated as of JAX 0.11 (still present in 0.11.x); a Mosaic GPU version is
the follow-up if that backend goes.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Same large negative as layers.MASK_VALUE: finite, so a fully masked chunk gives e^0 = 1 weights
# that the first real score's rescaling e^(MASK − m) = 0 wipes out.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
log = logging.getLogger(__name__)
_WARNED: list[bool] = []
MIN_ROWS = 16  # Triton's MMA needs M, N, K ≥ 16
BLOCK = 128  # cache slots per inner step: (128, D) keys and values per load


def _rows(h: int) -> int:
  return max(MIN_ROWS, pl.next_power_of_2(h))


def _kernel(step_ref, q_ref, kn_ref, vn_ref, pk_ref, pv_ref, pm_ref, sk_in, sv_in,
            o_ref, sk_ref, sv_ref, *, h, prefix_len, block, scale):
  b, g, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  step = step_ref[0]
  rows = _rows(h)
  f32 = jnp.float32
  row_ok = jnp.arange(rows) < h

  # The new token's key/value: written to the cache, and used from registers below (the own-slot
  # loop reads slots < step only, so no program reads what another writes).
  k_new = kn_ref[b, g, k, :]
  v_new = vn_ref[b, g, k, :]
  sk_ref[b, k, g, step, :] = k_new
  sv_ref[b, k, g, step, :] = v_new

  dt = k_new.dtype
  # fp32 caches: IEEE products (Triton's default for fp32 is TF32), as the XLA path's HIGHEST.
  prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else jax.lax.Precision.DEFAULT
  q = plt.load(q_ref.at[b, g, k, pl.ds(0, rows), :], mask=row_ok[:, None], other=0)
  q = (q.astype(f32) * scale).astype(dt)  # as attention_decode rounds it

  def attend(carry, keys, vals, valid):
    m, l, acc = carry
    s = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=f32)
    s = jnp.where(valid[None, :], s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + jax.lax.dot_general(
        p.astype(dt), vals, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=f32)
    return m_new, l, acc

  d = q.shape[-1]
  carry = (jnp.full((rows,), MASK_VALUE, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, d), f32))

  slots = jnp.arange(block)

  def prefix_chunk(c, carry):
    pos = c * block + slots
    inside = pos < prefix_len
    valid = inside & (plt.load(pm_ref.at[b, pl.ds(c * block, block)], mask=inside, other=0) != 0)
    keys = plt.load(pk_ref.at[b, k, pl.ds(c * block, block), :], mask=inside[:, None], other=0)
    vals = plt.load(pv_ref.at[b, k, pl.ds(c * block, block), :], mask=inside[:, None], other=0)
    return attend(carry, keys, vals, valid)

  carry = jax.lax.fori_loop(0, pl.cdiv(prefix_len, block), prefix_chunk, carry)

  def own_chunk(c, carry):
    pos = c * block + slots
    valid = pos < step
    keys = plt.load(sk_in.at[b, k, g, pl.ds(c * block, block), :], mask=valid[:, None], other=0)
    vals = plt.load(sv_in.at[b, k, g, pl.ds(c * block, block), :], mask=valid[:, None], other=0)
    return attend(carry, keys, vals, valid)

  carry = jax.lax.fori_loop(0, (step + block - 1) // block, own_chunk, carry)

  # The new token itself: one more key, as a (rows,) score column.
  m, l, acc = carry
  s_new = jnp.sum(q.astype(f32) * k_new.astype(f32)[None, :], axis=1)
  m_new = jnp.maximum(m, s_new)
  alpha, p_new = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
  l = l * alpha + p_new
  p_new = p_new.astype(dt).astype(f32)  # the PV product takes probabilities in the compute dtype
  acc = acc * alpha[:, None] + p_new[:, None] * v_new.astype(f32)[None, :]
  plt.store(o_ref.at[b, g, k, pl.ds(0, rows), :], (acc / l[:, None]).astype(o_ref.dtype),
            mask=row_ok[:, None])


def check_shapes(head_dim: int, block: int = BLOCK) -> str | None:
  """Why the Triton kernel cannot take these shapes, or None."""
  if head_dim < MIN_ROWS or head_dim & (head_dim - 1):
    return f"head_dim={head_dim} must be a power of two ≥ {MIN_ROWS}"
  if block < MIN_ROWS or block & (block - 1):
    return f"block={block} must be a power of two ≥ {MIN_ROWS}"
  return None


def decode_attention(q_bgkhd, k_new_bgkd, v_new_bgkd, prefix_k_bkpd, prefix_v_bkpd, prefix_mask_bp,
                     suffix_k_bkgnd, suffix_v_bkgnd, step, *, scale: float, block: int = BLOCK,
                     interpret: bool | None = None, debug: bool = False):
  """→ (o (B, G, K, h, D), suffix_k, suffix_v with slot `step` written; the caches are updated in
  place when the caller's buffers can be). prefix_mask (B, P): nonzero = a real prompt slot, in an
  integer dtype (Triton loads no bools; convert once per step, not per layer). `interpret`: None
  runs the Triton kernel on GPUs and Pallas' interpreter elsewhere. `debug`: print the kernel's
  jaxpr and Triton IR when it is lowered."""
  b, g, kh, h, d = q_bgkhd.shape
  p = prefix_k_bkpd.shape[2]
  why = check_shapes(d, block)
  if why:
    raise ValueError(f"pallas decode attention: {why}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
    if interpret and not _WARNED:  # once per process, not once per layer
      _WARNED.append(True)
      log.warning("decode_attention='pallas' on %s runs under Pallas' interpreter (for checking; slow): "
                  "the kernel is Triton, for GPUs", jax.default_backend())
  kernel = functools.partial(_kernel, h=h, prefix_len=p, block=block, scale=scale)
  step_1 = jnp.reshape(jnp.asarray(step, jnp.int32), (1,))
  o, sk, sv = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(q_bgkhd.shape, q_bgkhd.dtype),
                 jax.ShapeDtypeStruct(suffix_k_bkgnd.shape, suffix_k_bkgnd.dtype),
                 jax.ShapeDtypeStruct(suffix_v_bkgnd.shape, suffix_v_bkgnd.dtype)),
      grid=(b, g, kh),
      input_output_aliases={7: 1, 8: 2},
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      debug=debug,
      name="decode_attention",
  )(step_1, q_bgkhd, k_new_bgkd, v_new_bgkd, prefix_k_bkpd, prefix_v_bkpd, prefix_mask_bp,
    suffix_k_bkgnd, suffix_v_bkgnd)
  return o, sk, sv
