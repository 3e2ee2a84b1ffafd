"""One decode step's attention for a layer as one Pallas (Triton) kernel, the cache write included.

The XLA path of a decode step (rotary, `layers.attention_decode` plus the two cache writes and the
layout swaps in `Qwen25VL.decode_step`) runs on a GPU as ~12 small kernels per layer, each a few µs of
latency at 32 rows (profiled on an H200, 3B config: the attention matmuls 0.51 ms and the small
fusions 0.95 ms of a 3.29 ms step; docs/PERFORMANCE.md). This kernel does the same work in one
launch per layer:

    for each (prompt b, sample g, kv head k) — one program:
      rotate the new token's key (rotary, as `layers.apply_rotary`), write it and its value into the
          sample's cache at slot `step`                                          (in place: aliased)
      q ← rotary(q), then (q · scale) in the compute dtype, its h query heads as rows (padded to ≥ 16
          for the MMA)
      online softmax over [prefix slots p with prefix_mask[b, p] | own slots n < step | the new token]
          s = q·kᵀ (fp32), m ← max(m, max s), l ← l·e^(m_old−m) + Σ e^(s−m),
          acc ← acc·e^(m_old−m) + e^(s−m)·v   (probabilities in the compute dtype, fp32 sums)
      o = acc / l

Equal to rotary + cache writes + `attention_decode` up to the order of fp32 sums (tested on CPU
under Pallas' interpreter against them and against a float64 reference). It reads the fused q/k/v
projection's output (B, G, K, h+2, D) as it is — unrotated, not split — and writes o (B, G, K, h, D)
as the output projection reads it; caches as `KVCache` keeps them. So nothing runs between the
q/k/v matmul and the kernel, or between the kernel and the o matmul. The prefix is read once per
sample (G programs read the same (b, k) prefix; all but the first from L2).

Status: opt-in (`Qwen25VLConfig.decode_attention = "pallas"`), not yet timed on a GPU — the default
stays XLA until a GPU session measures it (`bench/gpu.py --decode-attention xla,pallas`). On a
backend other than GPU it runs under Pallas' interpreter (correct, slow: for checking only). It uses
Pallas' Triton backend, deprecated as of JAX 0.11 (still present in 0.11.x); a Mosaic GPU version is
the follow-up if that backend goes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# A large finite negative (as layers.MASK_VALUE is, though not the same number): a fully masked
# chunk gives e^0 = 1 weights that the first real score's rescaling e^(MASK − m) = 0 wipes out.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
log = logging.getLogger(__name__)
_WARNED: list[bool] = []
MIN_ROWS = 16  # Triton's MMA needs M, N, K ≥ 16
BLOCK = 128  # cache slots per inner step: (128, D) keys and values per load


def _rows(h: int) -> int:
  return max(MIN_ROWS, pl.next_power_of_2(h))


def _kernel(step_ref, qkv_ref, cos_ref, sin_ref, pk_ref, pv_ref, pm_ref, sk_in, sv_in,
            o_ref, sk_ref, sv_ref, *, h, prefix_len, block, scale):
  b, g, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  step = step_ref[0]
  rows = _rows(h)
  f32 = jnp.float32
  row_ok = jnp.arange(rows) < h
  d = qkv_ref.shape[-1]

  # Rotary as `layers.apply_rotary` computes it (fp32, then the compute dtype): x·cos + rotate_half(x)·sin
  # with rotate_half(x) = [−x₂, x₁], read from memory with the halves swapped (a permuted load, no
  # data movement in registers). cos/sin repeat their halves, so this is the same IEEE arithmetic.
  cols = jnp.arange(d)
  swapped = (cols + d // 2) % d
  cos = cos_ref[b, g, :]
  sin = jnp.where(cols < d // 2, -sin_ref[b, g, :], sin_ref[b, g, :])
  rotate = lambda x, x_swapped: x.astype(f32) * cos + x_swapped.astype(f32) * sin

  # The new token's key (row h of the fused projection, rotated) and value (row h + 1): written to
  # the cache, and used from registers below (the own-slot loop reads slots < step only, so no
  # program reads what another writes).
  v_new = qkv_ref[b, g, k, h + 1, :]
  dt = v_new.dtype
  k_new = rotate(qkv_ref[b, g, k, h, :], plt.load(qkv_ref.at[b, g, k, h, swapped])).astype(dt)
  sk_ref[b, k, g, step, :] = k_new
  sv_ref[b, k, g, step, :] = v_new

  # fp32 caches: IEEE products (Triton's default for fp32 is TF32), as the XLA path's HIGHEST.
  prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else jax.lax.Precision.DEFAULT
  r = jnp.arange(rows)[:, None]
  q = rotate(plt.load(qkv_ref.at[b, g, k, pl.ds(0, rows), :], mask=row_ok[:, None], other=0),
             plt.load(qkv_ref.at[b, g, k, r, swapped[None, :]], mask=row_ok[:, None], other=0)).astype(dt)
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


@dataclasses.dataclass(frozen=True)
class Tuning:
  """The kernel's launch parameters: `block` cache slots per inner step, Triton's `num_warps` per
  program and `num_stages` of software pipelining of the chunk loads. The defaults are a first guess,
  not measured; `bench/gpu.py --only decode` sweeps them per layer on the GPU it runs on
  (`decode_kernel` section) and prints the fastest."""
  block: int = BLOCK
  num_warps: int = 4
  num_stages: int = 2


TUNING = Tuning()  # what the model's decode step uses; `set_tuning` changes it


def set_tuning(tuning: Tuning) -> Tuning:
  """Use `tuning` for kernels traced from now on (a decode loop already compiled keeps its own);
  returns the previous one."""
  global TUNING
  why = check_shapes(MIN_ROWS, tuning.block)
  if why:
    raise ValueError(f"pallas decode attention: {why}")
  previous, TUNING = TUNING, tuning
  return previous


def check_shapes(head_dim: int, block: int = BLOCK) -> str | None:
  """Why the Triton kernel cannot take these shapes, or None."""
  if head_dim < MIN_ROWS or head_dim & (head_dim - 1):
    return f"head_dim={head_dim} must be a power of two ≥ {MIN_ROWS}"
  if block < MIN_ROWS or block & (block - 1):
    return f"block={block} must be a power of two ≥ {MIN_ROWS}"
  return None


def decode_attention(qkv_bgkjd, cos_bgd, sin_bgd, prefix_k_bkpd, prefix_v_bkpd, prefix_mask_bp,
                     suffix_k_bkgnd, suffix_v_bkgnd, step, *, scale: float, tuning: Tuning | None = None,
                     interpret: bool | None = None, debug: bool = False):
  """→ (o (B, G, K, h, D), suffix_k, suffix_v with slot `step` written; the caches are updated in
  place when the caller's buffers can be).

  qkv (B, G, K, h+2, D): the fused decode projection's output before rotary (`DecodeWeights.qkv`
  with its bias: each kv head's h query heads, then its key, then its value), in the compute dtype;
  cos, sin (B, G, D) fp32: each sample's rotary row for the new token (`rope.text_rotary`). The kernel
  rotates q and the new key itself, so no separate rotary or split kernels run before it.
  prefix_mask (B, P): nonzero = a real prompt slot, in an integer dtype (Triton loads no bools;
  convert once per step, not per layer). `tuning`: None uses `TUNING`. `interpret`: None runs the
  Triton kernel on GPUs and Pallas' interpreter elsewhere. `debug`: print the kernel's jaxpr and
  Triton IR when it is lowered."""
  b, g, kh, j, d = qkv_bgkjd.shape
  h = j - 2
  p = prefix_k_bkpd.shape[2]
  tuning = TUNING if tuning is None else tuning
  why = check_shapes(d, tuning.block)
  if why:
    raise ValueError(f"pallas decode attention: {why}")
  if cos_bgd.shape != (b, g, d) or sin_bgd.shape != (b, g, d):
    raise ValueError(f"pallas decode attention: cos/sin {cos_bgd.shape}/{sin_bgd.shape}, want {(b, g, d)}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
    if interpret and not _WARNED:  # once per process, not once per layer
      _WARNED.append(True)
      log.warning("decode_attention='pallas' on %s runs under Pallas' interpreter (for checking; slow): "
                  "the kernel is Triton, for GPUs", jax.default_backend())
  kernel = functools.partial(_kernel, h=h, prefix_len=p, block=tuning.block, scale=scale)
  step_1 = jnp.reshape(jnp.asarray(step, jnp.int32), (1,))
  f32 = jnp.float32
  o, sk, sv = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, g, kh, h, d), qkv_bgkjd.dtype),
                 jax.ShapeDtypeStruct(suffix_k_bkgnd.shape, suffix_k_bkgnd.dtype),
                 jax.ShapeDtypeStruct(suffix_v_bkgnd.shape, suffix_v_bkgnd.dtype)),
      grid=(b, g, kh),
      input_output_aliases={7: 1, 8: 2},
      compiler_params=plt.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      debug=debug,
      name="decode_attention",
  )(step_1, qkv_bgkjd, cos_bgd.astype(f32), sin_bgd.astype(f32), prefix_k_bkpd, prefix_v_bkpd, prefix_mask_bp,
    suffix_k_bkgnd, suffix_v_bkgnd)
  return o, sk, sv
