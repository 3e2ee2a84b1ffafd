"""A decode step's weight matmuls as Pallas (Triton) kernels, with the layer's small work folded in.

At a few dozen rows a decode step is a pass over the weights, and the XLA path spends a third of it
outside the weight matmuls (H200 trace, 3B config, 32 rows: per layer the four matmuls take 53 µs —
q/k/v and o at 1.7 TB/s, gate/up 3.5, down 2.9, as XLA's autotuned Triton GEMM fusions — and ~14
small fusions of 1.3–2.3 µs each: the two RMSNorms, the bias add, SwiGLU, the residual adds among
them; docs/PERFORMANCE.md). Here each matmul is one kernel that also does its neighbours' work:

    qkv  = RMSNorm(x; w_in) · W_qkvᵀ + b                                 norm prologue, bias epilogue
    x    = x + o · W_oᵀ                                                   residual epilogue
    hid  = silu(n · W_gateᵀ) ⊙ (n · W_upᵀ),   n = RMSNorm(x; w_post)      norm prologue, SwiGLU epilogue
    x    = x + hid · W_downᵀ                                              residual epilogue

so a layer is four of these and the attention kernel (`decode_attention`): five launches, not ~24.

Weights are (N, K) — "K-major": each output column's weights contiguous — made once per rollout
(`DecoderLayer.decode_weights`). Program (i, j, s) computes rows i·bm…, columns j·bn… over the s-th
of `split` ranges of K:

    if norm:   r = rsqrt(Σ_k x² / K + eps) for the row block, Σ_k x² from one of:
               - the producer: the kernel that wrote x (o, down: `return_ss`) also wrote each row's
                 Σ y² over each of its column blocks, (N / bn, M) fp32; this kernel adds them up
                 (`norm_ss`) — no pass over x, no extra launch. The decode step threads them:
                 down → the next layer's q/k/v, o → gate/up.
               - else a first pass over the row block's whole K (x is small; from L2), or one XLA
                 reduction before the kernel (`Tuning.prenorm`).
    for each (bm, bk) tile of x and (bn, bk) tile of W in the range:
      x̂ = w_norm · bf(x · r)   (if norm: exactly `layers.RMSNorm`'s rounding)
      acc += x̂ · Wᵀ            (fp32 accumulation; IEEE fp32 products for fp32 weights)
    split == 1: the epilogue (bias / residual / SwiGLU, `epilogue`) and the store, in the kernel
    split > 1:  fp32 partial sums stored; XLA adds them and runs the same `epilogue` (and Σ y²: one
                partial) — more programs for a narrow N: o and down have N = 2,048 at 3B

Equal to the XLA path (`DecoderLayer.decode_proj` / `decode_finish`) up to the order of fp32 sums
(tests/test_decode_matmul.py, under Pallas' interpreter on CPU). Status: opt-in
(`Qwen25VLConfig.decode_matmul = "pallas"`), not yet timed on a GPU: `bench/gpu.py --decode-matmul
xla,pallas` sweeps the tunings per matmul and times the decode with it. Pallas' Triton backend, as
`decode_attention` (deprecated by jax from 0.11 in favour of Mosaic GPU: a warning; docs/model.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

log = logging.getLogger(__name__)
_WARNED: list[bool] = []
MIN_BLOCK = 16  # Triton's MMA needs M, N, K ≥ 16
MAX_BLOCK_M = 64  # rows per program: a decode step has B·G rows (32 in the benchmarks)
KINDS = ("qkv", "o", "gate_up", "down")


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Launch parameters of one matmul: `block_n` output columns and `block_k` of the contraction per
  program step, `split` programs along K (fp32 partials summed by XLA when > 1), Triton's
  `num_warps` and `num_stages` (software pipelining of the weight loads). `prenorm` (the RMSNorm
  forms, when no `norm_ss` is handed in: layer 0's q/k/v in the decode step): the rows' Σx² from one
  small XLA reduction before the kernel instead of a first pass over x in every program — that pass
  reads x from L2 once more per program, which for q/k/v at block_n 16 is twice the weights' bytes.
  First guesses, not measured:
  `bench/gpu.py --decode-matmul …,pallas` sweeps them per matmul on its GPU."""
  block_n: int = 32
  block_k: int = 256
  split: int = 1
  num_warps: int = 4
  num_stages: int = 3
  prenorm: bool = False


# 3B shapes at 32 rows on a 132-SM GPU: ~128–172 programs per matmul (one wave). Shared memory per
# program ≈ num_stages × (32 + block_n · (2 if gate_up else 1)) × block_k × 2 bytes: 120 KB for gate_up
# here (block_k 256 would be 240 KB, over an H100's 227 KB).
TUNING: dict[str, Tuning] = {
    "qkv": Tuning(block_n=16),  # N = 2,560: 160 programs
    "o": Tuning(block_n=16),  # N = 2,048: 128
    "gate_up": Tuning(block_n=64, block_k=128),  # N = 11,008 (gate and up each): 172
    "down": Tuning(block_n=16),  # N = 2,048, K = 11,008: 128
}


def check_tuning(t: Tuning) -> str | None:
  """Why the Triton kernel cannot take this tuning, or None."""
  for name in ("block_n", "block_k"):
    v = getattr(t, name)
    if v < MIN_BLOCK or v & (v - 1):
      return f"{name}={v} must be a power of two ≥ {MIN_BLOCK}"
  if t.split < 1 or t.num_warps < 1 or t.num_stages < 1:
    return f"split, num_warps and num_stages must be ≥ 1: {t}"
  return None


def set_tuning(kind: str, tuning: Tuning) -> Tuning:
  """Use `tuning` for the `kind` matmul (one of KINDS) in kernels traced from now on; returns the
  previous one."""
  if kind not in TUNING:
    raise ValueError(f"pallas decode matmul: kind={kind!r} must be one of {KINDS}")
  why = check_tuning(tuning)
  if why:
    raise ValueError(f"pallas decode matmul: {why}")
  previous, TUNING[kind] = TUNING[kind], tuning
  return previous


def epilogue(acc, acc_up, bias, residual, dt):
  """fp32 accumulator(s) → the XLA path's result in the compute dtype `dt`, rounded where it rounds:
  the matmul output, then + bias, or residual +, or silu(gate) ⊙ up (op by op as `jax.nn.silu`).
  Shared by the kernel (split 1) and the XLA sum of partials (split > 1)."""
  f32 = jnp.float32
  r = lambda v: v.astype(dt).astype(f32)  # one op's rounding to the compute dtype
  y = acc.astype(dt)
  if acc_up is not None:  # jax.nn.silu(g) · u is g · (1 / (1 + e^(−g))) · u, each op rounded
    g = y.astype(f32)
    y = (r(g * r(1.0 / r(1.0 + r(jnp.exp(-g))))) * r(acc_up)).astype(dt)
  if bias is not None:
    y = (y.astype(f32) + bias.astype(f32)).astype(dt)
  if residual is not None:
    y = (residual.astype(f32) + y.astype(f32)).astype(dt)
  return y


def _and(a, b):
  return a if b is None else b if a is None else a & b


def _load(ref, mask):
  return plt.load(ref) if mask is None else plt.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)


def _full(mask, shape):
  return None if mask is None else jnp.broadcast_to(mask, shape)


def _kernel(*refs, m, k, n, bm, bn, bk, steps, k_mask, norm, parts, eps, bias, residual, gated, split, emit_ss,
            prec, dt):
  refs = list(refs)
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  nw_ref = refs.pop(0) if norm else None
  ss_ref = refs.pop(0) if norm and parts else None  # (parts, M) fp32: Σx² over disjoint column sets
  b_ref = refs.pop(0) if bias and split == 1 else None
  r_ref = refs.pop(0) if residual and split == 1 else None
  out_ref = refs.pop(0)
  ss_out_ref = refs.pop(0) if emit_ss and split == 1 else None
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  f32 = jnp.float32
  # Masks only where a tile can reach past the array (None: every tile is inside). A mask along K,
  # the contiguous axis, would cost Triton its vector loads, and every K of the 3B config is tiled
  # exactly at bk ≤ 256.
  row_ok = (i * bm + jnp.arange(bm) < m)[:, None] if m % bm else None
  col_ok = (j * bn + jnp.arange(bn) < n)[:, None] if n % bn else None
  lanes = jnp.arange(bk)

  def x_tile(k0):
    k_ok = (k0 + lanes < k)[None, :] if k_mask else None
    return _load(x_ref.at[pl.ds(i * bm, bm), pl.ds(k0, bk)], _and(row_ok, k_ok)), k_ok

  if norm and parts:
    rows = pl.next_power_of_2(parts)  # a Triton block is a power of two: mask the rows past `parts`
    part_ok = (jnp.arange(rows) < parts)[:, None] if rows != parts else None
    ss = jnp.sum(_load(ss_ref.at[pl.ds(0, rows), pl.ds(i * bm, bm)], _and(part_ok, None if row_ok is None else row_ok.T)),
                 axis=0)
    inv = jax.lax.rsqrt(ss / k + eps)
  elif norm:
    def sum_sq(c, acc):
      x = x_tile(c * bk)[0].astype(f32)
      return acc + jnp.sum(x * x, axis=1)
    ss = jax.lax.fori_loop(0, pl.cdiv(k, bk), sum_sq, jnp.zeros((bm,), f32))
    inv = jax.lax.rsqrt(ss / k + eps)

  def prod(x, w_at, wmask):
    w = _load(w_at, wmask)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=f32)

  def body(c, accs):
    k0 = (s * steps + c) * bk
    x, k_ok = x_tile(k0)
    if norm:
      nw = _load(nw_ref.at[pl.ds(k0, bk)], None if k_ok is None else k_ok[0])
      x = (nw.astype(dt).astype(f32)[None, :] * (x.astype(f32) * inv[:, None]).astype(dt).astype(f32)).astype(dt)
    x = x.astype(w_ref.dtype)
    wmask = _and(col_ok, k_ok)
    if gated:
      return (accs[0] + prod(x, w_ref.at[pl.ds(j * bn, bn), pl.ds(k0, bk)], wmask),  # gate rows 0…N−1
              accs[1] + prod(x, w_ref.at[pl.ds(n + j * bn, bn), pl.ds(k0, bk)], wmask))  # up rows N…2N−1
    return (accs[0] + prod(x, w_ref.at[pl.ds(j * bn, bn), pl.ds(k0, bk)], wmask),)

  zeros = jnp.zeros((bm, bn), f32)
  accs = jax.lax.fori_loop(0, steps, body, (zeros, zeros) if gated else (zeros,))
  out_mask = _and(row_ok, None if col_ok is None else col_ok.T)
  if split > 1:  # fp32 partials: (split · A, M, N), A = 2 (gate, up) or 1
    for a, acc in enumerate(accs):
      plt.store(out_ref.at[s * len(accs) + a, pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc, mask=_full(out_mask, (bm, bn)))
    return
  b = _load(b_ref.at[pl.ds(j * bn, bn)], None if col_ok is None else col_ok[:, 0])[None, :] if bias else None
  r = _load(r_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], out_mask) if residual else None
  y = epilogue(accs[0], accs[1] if gated else None, b, r, dt)
  plt.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], y, mask=_full(out_mask, (bm, bn)))
  if emit_ss:  # Σ y² over this block's columns, of y as stored: the next RMSNorm's input
    y32 = y.astype(f32)
    sq = y32 * y32 if col_ok is None else jnp.where(col_ok.T, y32 * y32, 0.0)
    plt.store(ss_out_ref.at[j, pl.ds(i * bm, bm)], jnp.sum(sq, axis=1), mask=None if row_ok is None else row_ok[:, 0])


def decode_matmul(x_mk, w, *, norm_weight=None, eps: float = 1e-6, norm_ss=None, bias=None, residual=None,
                  return_ss: bool = False, kind: str | None = None, tuning: Tuning | None = None,
                  interpret: bool | None = None, debug: bool = False):
  """→ (M, N) in x's dtype: `epilogue(RMSNorm(x; norm_weight) · Wᵀ)` as described above.

  x (M, K) in the compute dtype; w (N, K), or (2, N, K) for gate and up (→ silu(gate) ⊙ up);
  norm_weight (K,): RMSNorm x first (eps); norm_ss (P, M) fp32: Σ x² of each row over P disjoint
  column sets covering K (another call's `return_ss`), instead of a pass over x; bias (N,); residual
  (M, N): added last. `return_ss` (not gated): → (y, ss), ss (P, M) fp32 the Σ y² of each row over P
  column sets (P = N / block_n, or 1 when split > 1), y as returned. `kind` (one of KINDS) picks
  `TUNING[kind]` when `tuning` is None. `interpret`: None runs Triton on GPUs and Pallas'
  interpreter elsewhere. `debug`: print the kernel's jaxpr and Triton IR when lowered."""
  gated = w.ndim == 3
  m, k = x_mk.shape
  n = w.shape[-2]
  if w.shape[-1] != k or (gated and w.shape[0] != 2):
    raise ValueError(f"pallas decode matmul: weight {w.shape} does not take x {x_mk.shape} (want (N, {k}) "
                     f"or (2, N, {k}))")
  for name, a, want in (("norm_weight", norm_weight, (k,)), ("bias", bias, (n,)), ("residual", residual, (m, n))):
    if a is not None and a.shape != want:
      raise ValueError(f"pallas decode matmul: {name} {a.shape}, want {want}")
  if gated and (bias is not None or residual is not None or return_ss):
    raise ValueError("pallas decode matmul: the gated (gate/up) form takes no bias or residual and returns no Σy²")
  # The module adds them in the compute dtype (Dense casts its bias; the residual stream is in it):
  # an fp32 bias or residual given here is rounded first, as there.
  bias = None if bias is None else bias.astype(x_mk.dtype)
  residual = None if residual is None else residual.astype(x_mk.dtype)
  if norm_ss is not None and (norm_weight is None or norm_ss.ndim != 2 or norm_ss.shape[1] != m
                              or norm_ss.dtype != jnp.float32):
    raise ValueError(f"pallas decode matmul: norm_ss {norm_ss.shape} {norm_ss.dtype} wants norm_weight and "
                     f"shape (P, {m}) float32")
  tuning = tuning or TUNING[kind or ("gate_up" if gated else "qkv")]
  why = check_tuning(tuning)
  if why:
    raise ValueError(f"pallas decode matmul: {why}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
    if interpret and not _WARNED:
      _WARNED.append(True)
      log.warning("decode_matmul='pallas' on %s runs under Pallas' interpreter (for checking; slow): "
                  "the kernel is Triton, for GPUs", jax.default_backend())
  dt = x_mk.dtype
  bm = min(max(MIN_BLOCK, pl.next_power_of_2(m)), MAX_BLOCK_M)
  bn, bk, split = tuning.block_n, tuning.block_k, tuning.split
  steps = pl.cdiv(pl.cdiv(k, bk), split)  # bk-steps per K range (the last range may be short: masked)
  prec = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  k_mask = k % bk != 0 or pl.cdiv(k, bk) % split != 0  # else no tile reaches past K
  if norm_weight is not None and norm_ss is None and tuning.prenorm:  # Σx² by XLA, as `layers.RMSNorm` sums
    x32 = x_mk.astype(jnp.float32)
    norm_ss = jnp.sum(x32 * x32, axis=-1)[None]
  parts = 0 if norm_ss is None else norm_ss.shape[0]
  emit_ss = return_ss and split == 1
  kernel = functools.partial(_kernel, m=m, k=k, n=n, bm=bm, bn=bn, bk=bk, steps=steps, k_mask=k_mask, norm=norm_weight is not None,
                             parts=parts, eps=eps, bias=bias is not None, residual=residual is not None, gated=gated, split=split,
                             emit_ss=emit_ss, prec=prec, dt=dt)
  args = [x_mk, w.reshape(2 * n, k) if gated else w] + [a for a in (norm_weight, norm_ss) if a is not None]
  if split == 1:
    args += [a for a in (bias, residual) if a is not None]
    out_shape = [jax.ShapeDtypeStruct((m, n), dt)] + [jax.ShapeDtypeStruct((pl.cdiv(n, bn), m), jnp.float32)] * emit_ss
  else:
    out_shape = [jax.ShapeDtypeStruct((split * (2 if gated else 1), m, n), jnp.float32)]
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), split),
      compiler_params=plt.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret, debug=debug, name=f"decode_matmul_{kind or 'any'}")(*args)
  if split == 1:
    return tuple(out) if emit_ss else out[0]
  if gated:
    acc = out[0].reshape(split, 2, m, n).sum(axis=0)
    return epilogue(acc[0], acc[1], None, None, dt)
  y = epilogue(out[0].sum(axis=0), None, bias, residual, dt)
  if not return_ss:
    return y
  y32 = y.astype(jnp.float32)
  return y, jnp.sum(y32 * y32, axis=-1)[None]
