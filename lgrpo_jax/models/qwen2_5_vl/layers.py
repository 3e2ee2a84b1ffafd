"""Building blocks shared by the vision tower and the decoder.

Every parameter carries logical axis names in its `out_sharding` metadata (e.g. ("embed", "mlp"));
the sharding module maps them onto a mesh with one rules table. `eager_sharding=False` keeps model
construction mesh-agnostic: placement is decided where the model is created or loaded.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lgrpo_jax.sharding import constrain

INIT_STD = 0.02  # transformers' initializer_range for Qwen2.5-VL
MASK_VALUE = -1e30  # finite, so fully-masked (padding) rows give uniform weights instead of NaN


def precision_for(dtype):
  """fp32 mode means exact: TPUs and GPUs otherwise run fp32 matmuls with bf16/TF32 passes.
  bf16 mode keeps the default (native) precision."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def param(value, names: Sequence[str | None]) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return {
      "silu": jax.nn.silu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is exact
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  }[name]


class RMSNorm(nnx.Module):
  """Qwen RMSNorm: normalise in fp32, cast back, then multiply by the weight (`x·w`, no 1+w)."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.weight = param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Dense(nnx.Module):
  """y = x·W (+ b), W of shape `in_shape + out_shape`, contracting the last len(in_shape) axes of x.

  Multi-axis kernels (e.g. q: (embed, heads, head_dim)) keep heads as their own axis so tensor
  parallelism can shard them by name.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_names: Sequence[str | None],
               out_names: Sequence[str | None], use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.n_in = len(in_shape)
    self.dtype = dtype
    shape = (*in_shape, *out_shape)
    self.kernel = param(INIT_STD * jax.random.normal(rngs.params(), shape, param_dtype),
                        (*in_names, *out_names))
    self.bias = param(jnp.zeros(tuple(out_shape), param_dtype), out_names) if use_bias else None

  def __call__(self, x):
    n = self.n_in
    x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if jax.default_backend() in WEIGHT_GRAD_BACKENDS and jax.device_count() <= WEIGHT_GRAD_MAX_DEVICES:
      y = _dense(n, x, w)
    else:
      y = jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
                              precision=precision_for(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


# Backends on which Dense's weight gradient is contracted as x^T·g with x on the left (see `_dense`).
# Measured on CPU only; elsewhere JAX's own transpose rule. Only for single-device programs: with a
# CPU mesh (the sharded-training tests) GSPMD partitioned the reshaped products differently, and a
# two-process run no longer summed like one process (rewards after one step 2e-5 apart); JAX's
# rule keeps that partitioning as it was.
WEIGHT_GRAD_BACKENDS = ("cpu",)
WEIGHT_GRAD_MAX_DEVICES = 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(n_in, x, w):
  """x · w over x's last n_in axes, with a backward that computes dW = xᵀ·g with x as the left operand.

  JAX transposes a matmul y = x·W into dW = (gᵀ·x)ᵀ: the output gradient g is the left operand,
  contracted over its tokens, and XLA's CPU matmul wants a left operand whose contracted axis is
  minor, so every weight gradient began with a transposing copy of g — for the gated MLP g is the
  activation's backward (tokens × 1,536), evaluated inside that copy in the transposed order (the
  profile's `copy_bitcast_fusion f32[1536,1024]`, ~0.4 s of a one-pair update of the 74M benchmark
  model). With x on the left the copy is xᵀ: the layer's normed input, smaller, and shared by the
  q/k/v (and gate/up) weight gradients. Measured (2-core CPU, alternating processes): one-pair
  update 4.89 / 4.94 s vs 5.35 / 5.48; 4 pairs × 4 micro-batches 16.7 / 17.3 s vs 19.3 / 20.1.
  Both backward matmuls work on (tokens, features) views; the reshapes only merge leading axes."""
  return _dense_fwd(n_in, x, w)[0]


def _dense_fwd(n_in, x, w):
  k_in = int(np.prod(w.shape[:n_in]))
  y = jnp.dot(x.reshape(-1, k_in), w.reshape(k_in, -1), precision=precision_for(w.dtype))
  return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:]), (x, w)


def _dense_bwd(n_in, res, g):
  x, w = res
  k_in = int(np.prod(w.shape[:n_in]))
  x_mi, w_io = x.reshape(-1, k_in), w.reshape(k_in, -1)
  g_mo = g.reshape(x_mi.shape[0], w_io.shape[1])
  prec = precision_for(w.dtype)
  dx = jax.lax.dot_general(g_mo, w_io, (((1,), (1,)), ((), ())), precision=prec)
  dw = jax.lax.dot_general(x_mi, g_mo, (((0,), (0,)), ((), ())), precision=prec)  # x on the left: see above
  return dx.reshape(x.shape), dw.reshape(w.shape)


_dense.defvjp(_dense_fwd, _dense_bwd)


# Backends on which the gated activation's backward writes its two gradients out before the weight-gradient
# matmuls read them (see `gated_activation`). Measured on CPU only.
MATERIALISE_BACKENDS = ("cpu",)


def gated_activation(act, gate, up):
  """act(gate) · up, with a backward pass that materialises d gate and d up in their own layout.

  Left to itself, XLA's CPU backend fuses the activation's derivative into the transposing copy that
  writes d gate as (hidden, tokens) for the weight-gradient matmul, and that fused loop is slow
  (measured, 1024 × 1536 fp32: transpose alone 0.42 ms, derivative alone 0.59 ms, fused 5.2 ms). With
  an optimisation barrier after the elementwise backward a one-pair update of the 74M benchmark
  model took 5.6–5.8 s against 6.1–7.5 s (alternating runs). XLA still moves the transposed layout
  through the barrier, so the profile keeps a transposing write, cheaper (0.33 vs 0.52 s of that
  update). Values are unchanged."""
  if jax.default_backend() not in MATERIALISE_BACKENDS:
    return act(gate) * up
  return _gated(act, gate, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated(act, gate, up):
  return act(gate) * up


def _gated_fwd(act, gate, up):
  return act(gate) * up, (gate, up)


def _gated_bwd(act, res, dh):
  gate, up = res
  a, act_vjp = jax.vjp(act, gate)
  (d_gate,) = act_vjp(dh * up)
  return jax.lax.optimization_barrier((d_gate, dh * a))


_gated.defvjp(_gated_fwd, _gated_bwd)


class GatedMLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x)). Biases in the vision tower, none in the decoder."""

  def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, dtype, param_dtype, rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense((dim,), (hidden,), in_names=("embed",), out_names=("mlp",), **kw)
    self.up_proj = Dense((dim,), (hidden,), in_names=("embed",), out_names=("mlp",), **kw)
    self.down_proj = Dense((hidden,), (dim,), in_names=("mlp",), out_names=("embed",), **kw)
    self.act = activation(act)

  def __call__(self, x):
    h = gated_activation(self.act, self.gate_proj(x), self.up_proj(x))
    return self.down_proj(constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",)))


def apply_rotary(x, cos, sin):
  """Half-split rotary in fp32, cast back to x's dtype; cos/sin broadcast against x.

  Computes transformers' `x·cos + rotate_half(x)·sin` on the two halves directly (cos and sin
  repeat their first half, so each output half needs one half of each), which is the same IEEE
  arithmetic without materialising rotate_half(x).
  """
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  c, s = cos[..., :half], sin[..., :half]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# Score rows per block of the blocked path: a (512, S) fp32 block stays in cache for S up to a few
# thousand. Below DIRECT_MAX score elements per (batch, kv head) the plain batched path is used.
BLOCK_ROWS = 512
DIRECT_MAX = 1 << 19
# Backends on which large problems take the blocked path. Not on GPUs: the `lax.map` over blocks runs
# there as thousands of tiny sequential kernels (measured on an H100, 3B config: 87k kernels under
# 5 µs, 160 of the forward's 287 ms), while the direct path's score matrices fit easily in HBM.
BLOCKED_BACKENDS = ("cpu",)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cudnn_supported(dtype, head_dim: int) -> str | None:
  """None if cuDNN's fused (flash) attention can run these operands here, else the reason."""
  if jax.default_backend() != "gpu":
    return f"the backend is {jax.default_backend()}, not a GPU"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN attention needs bfloat16/float16 operands, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 128:
    return f"head_dim={head_dim} (cuDNN: a multiple of 8, at most 128)"
  cap = getattr(jax.devices()[0], "compute_capability", "0")
  if float(cap) < 8.0:
    return f"GPU compute capability {cap} (cuDNN flash attention: 8.0 or newer)"
  return None


def uses_cudnn(impl: str, dtype, head_dim: int) -> bool:
  """Whether attention `impl` ("auto" | "xla" | "cudnn") runs cuDNN's fused kernel for these
  operands here; "cudnn" where it cannot run is an error naming the reason."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r}: choose one of {ATTENTION_IMPLS}")
  if impl == "xla":
    return False
  why = cudnn_supported(dtype, head_dim)
  if why is not None and impl == "cudnn":
    raise ValueError(f"attention='cudnn' cannot run here: {why}; use 'auto' or 'xla'")
  return why is None


def attention(q_btkgd, k_bskd, v_bskd, mask_bts, scale: float, impl: str = "auto"):
  """Softmax attention with grouped query heads; scores and softmax statistics in fp32.

  q: (B, T, K, G, D) — K kv heads, G query heads per kv head; k, v: (B, S, K, D);
  mask: bool broadcastable to (B, T, S), or None when every key is visible. Returns (B, T, K, G, D).

  impl: "xla" (below), "cudnn" (cuDNN's fused flash attention: the (T, S) scores never reach memory;
  GPUs, bf16/fp16 only — an error elsewhere), "auto" (cudnn where it is supported, else xla).

  Writing the (T, S) score matrix to memory is what costs on CPU (measured: a batch of
  1024×1024 score blocks runs at ~55 GFLOP/s against ~150 for one cache-resident block), so on CPU
  (BLOCKED_BACKENDS) large problems are cut into blocks of ~BLOCK_ROWS query rows of one (batch, kv head), each computed
  end to end (scores, softmax, weighted sum) by one iteration of a `lax.map`. The scale is folded
  into q, and the softmax denominator divides the (T, D) output instead of the (T, S) weights.
  """
  b, t, kh, g, d = q_btkgd.shape
  s = k_bskd.shape[1]
  if uses_cudnn(impl, q_btkgd.dtype, d):
    return _attention_cudnn(q_btkgd, k_bskd, v_bskd, mask_bts, scale)
  q_btkgd = (q_btkgd.astype(jnp.float32) * scale).astype(q_btkgd.dtype)
  if g * t * s <= DIRECT_MAX or jax.default_backend() not in BLOCKED_BACKENDS:
    return _attention_direct(q_btkgd, k_bskd, v_bskd, mask_bts)
  return _attention_blocked(q_btkgd, k_bskd, v_bskd, mask_bts)


def _attention_cudnn(q_btkgd, k_bskd, v_bskd, mask_bts, scale: float):
  # (B, T, K·G, D) queries: head n = k·G + g is jax's (and transformers' repeat_kv) GQA grouping. The
  # mask becomes an additive (B, 1, T, S) bias (cuDNN needs T and S explicit); a fully masked
  # (left-padding) row gets a large finite negative everywhere, so uniform weights, as in `xla`.
  b, t, kh, g, d = q_btkgd.shape
  s = k_bskd.shape[1]
  mask = None if mask_bts is None else jnp.broadcast_to(jnp.asarray(mask_bts, bool), (b, t, s))[:, None]
  o = jax.nn.dot_product_attention(q_btkgd.reshape(b, t, kh * g, d), k_bskd, v_bskd, mask=mask, scale=scale,
                                   implementation="cudnn")
  return o.reshape(b, t, kh, g, d)


def _softmax_weighted_sum(s_f32, v, mask):
  if mask is not None:
    s_f32 = jnp.where(mask, s_f32, MASK_VALUE)
  p = jnp.exp(s_f32 - jnp.max(s_f32, axis=-1, keepdims=True))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p.astype(v.dtype), denom


def _attention_direct(q_btkgd, k_bskd, v_bskd, mask_bts):
  # Flattened (B·K, G·T, D) operands: a plain batched matmul is ~1.7x faster on CPU than the same
  # contraction with batch axes in the middle.
  b, t, kh, g, d = q_btkgd.shape
  s = k_bskd.shape[1]
  q_nrd = jnp.transpose(q_btkgd, (0, 2, 3, 1, 4)).reshape(b * kh, g * t, d)
  k_nsd = jnp.transpose(k_bskd, (0, 2, 1, 3)).reshape(b * kh, s, d)
  v_nsd = jnp.transpose(v_bskd, (0, 2, 1, 3)).reshape(b * kh, s, d)
  prec = precision_for(q_btkgd.dtype)
  s_nrs = jax.lax.dot_general(q_nrd, k_nsd, (((2,), (2,)), ((0,), (0,))), precision=prec,
                              preferred_element_type=jnp.float32)
  mask = None
  if mask_bts is not None:
    mask = jnp.broadcast_to(mask_bts[:, None, None], (b, kh, g, t, s)).reshape(b * kh, g * t, s)
  p_nrs, denom_nr1 = _softmax_weighted_sum(s_nrs, v_bskd, mask)
  o_nrd = jax.lax.dot_general(p_nrs, v_nsd, (((2,), (1,)), ((0,), (0,))), precision=prec,
                              preferred_element_type=jnp.float32) / denom_nr1
  o = jnp.transpose(o_nrd.reshape(b, kh, g, t, d), (0, 3, 1, 2, 4))
  return o.astype(v_bskd.dtype)


def _attention_blocked(q_btkgd, k_bskd, v_bskd, mask_bts):
  b, t, kh, g, d = q_btkgd.shape
  s = k_bskd.shape[1]
  nb = -(-t * g // BLOCK_ROWS)  # query blocks per (batch, kv head)
  c = -(-t // nb)  # queries per block
  pad = nb * c - t
  q = jnp.pad(q_btkgd, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  # items: (B·K·nb) blocks of (G·c) query rows against the S keys of their (batch, kv head)
  q_items = q.reshape(b, nb, c, kh, g, d).transpose(0, 3, 1, 4, 2, 5).reshape(b * kh * nb, g * c, d)
  k_bksd = jnp.transpose(k_bskd, (0, 2, 1, 3))
  v_bksd = jnp.transpose(v_bskd, (0, 2, 1, 3))
  prec = precision_for(q_btkgd.dtype)
  if mask_bts is not None:
    mask_bts = jnp.broadcast_to(mask_bts, (b, t, s))
    mask_bncs = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0)), constant_values=True).reshape(b, nb, c, s)

  def block(i):
    bi, ki, ni = i // (kh * nb), (i // nb) % kh, i % nb
    s_rs = jnp.dot(q_items[i], k_bksd[bi, ki].T, precision=prec, preferred_element_type=jnp.float32)
    mask = None if mask_bts is None else jnp.tile(mask_bncs[bi, ni], (g, 1))
    p_rs, denom_r1 = _softmax_weighted_sum(s_rs, v_bskd, mask)
    o_rd = jnp.dot(p_rs, v_bksd[bi, ki], precision=prec, preferred_element_type=jnp.float32)
    return (o_rd / denom_r1).astype(v_bskd.dtype)

  o = jax.lax.map(block, jnp.arange(b * kh * nb))  # (B·K·nb, G·c, D)
  o = o.reshape(b, kh, nb, g, c, d).transpose(0, 2, 4, 1, 3, 5).reshape(b, nb * c, kh, g, d)
  return o[:, :t]


def attention_decode(q_bkghd, prefix_k_bkpd, prefix_v_bkpd, prefix_mask_bp, own_k_bkgnd, own_v_bkgnd,
                     own_mask_n, scale: float, keys_transposed: bool = False):
  """One new token per sample attending to [shared prefix | its own tokens so far], exactly.

  G samples of a prompt share one prefix cache: their queries are stacked as G·h rows against the
  prefix keys, so the prefix is read once per prompt (not G times) and its product is a real matmul.
  The two parts' scores share one max and one denominator, so this equals softmax attention over
  the concatenation. Layouts put the batch-like axes first so no cache is transposed per step:
  q (B, K, G, h, D) (K kv heads, h query heads per kv head); prefix (B, K, P, D) with mask (B, P);
  own (B, K, G, N, D) — the sample's generated tokens, the new one already written — with mask (N,)
  (the slots written so far). Returns (B, K, G, h, D). keys_transposed: the keys are stored
  (B, K, D, P) and (B, K, G, D, N) instead (cache.KEYS_TRANSPOSED_BACKENDS).
  """
  b, kh, g, h, d = q_bkghd.shape
  prec = precision_for(q_bkghd.dtype)
  f32 = jnp.float32
  q = (q_bkghd.astype(f32) * scale).astype(q_bkghd.dtype)
  pre, own = ("bkrd,bkdp->bkrp", "bkghd,bkgdn->bkghn") if keys_transposed else ("bkrd,bkpd->bkrp",
                                                                               "bkghd,bkgnd->bkghn")
  s_pre = jnp.einsum(pre, q.reshape(b, kh, g * h, d), prefix_k_bkpd, precision=prec,
                     preferred_element_type=f32).reshape(b, kh, g, h, -1)
  s_pre = jnp.where(prefix_mask_bp[:, None, None, None, :], s_pre, MASK_VALUE)
  s_own = jnp.einsum(own, q, own_k_bkgnd, precision=prec, preferred_element_type=f32)
  s_own = jnp.where(own_mask_n, s_own, MASK_VALUE)
  m = jnp.maximum(s_pre.max(-1, keepdims=True), s_own.max(-1, keepdims=True))
  p_pre, p_own = jnp.exp(s_pre - m), jnp.exp(s_own - m)
  denom = p_pre.sum(-1, keepdims=True) + p_own.sum(-1, keepdims=True)
  dt = prefix_v_bkpd.dtype
  o_pre = jnp.einsum("bkrp,bkpd->bkrd", p_pre.astype(dt).reshape(b, kh, g * h, -1), prefix_v_bkpd,
                     precision=prec, preferred_element_type=f32).reshape(b, kh, g, h, d)
  o_own = jnp.einsum("bkghn,bkgnd->bkghd", p_own.astype(dt), own_v_bkgnd, precision=prec,
                     preferred_element_type=f32)
  return ((o_pre + o_own) / denom).astype(dt)


def attention_extend(q_rtkhd, k_rtkd, v_rtkd, prefix_k_bpkd, prefix_v_bpkd, prefix_mask_bp, own_mask_rtt,
                     scale: float):
  """T new tokens for each of G samples per prompt attending to [shared prefix | their own tokens],
  exactly, without repeating the prefix G times: the prefill/decode split of `attention_decode`
  applied to a chunk of tokens (the loss, reference and listener passes).

  Rows r = b·G + g. q (R, T, K, h, D); the samples' own keys/values k, v (R, T, K, D) with mask
  (R, T, T) (causal and valid); the prompt's prefix_k/v (B, P, K, D) with mask (B, P). The prefix
  scores are one (G·T·h, P) matmul per (prompt, kv head) — the G samples' queries stacked as rows
  — so the prefix is read once and, in the backward pass, its gradient is that matmul's own
  contraction instead of a sum over G repeated copies. The two parts share one max and one
  denominator, so this is softmax attention over the concatenation. Returns (R, T, K, h, D)."""
  r, t, kh, h, d = q_rtkhd.shape
  b, p = prefix_mask_bp.shape
  g = r // b
  prec = precision_for(q_rtkhd.dtype)
  f32, dt = jnp.float32, v_rtkd.dtype
  q = (q_rtkhd.astype(f32) * scale).astype(q_rtkhd.dtype)
  # Prefix part, rows (g, t, h) of each (prompt, kv head).
  q_pre = q.reshape(b, g, t, kh, h, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, kh, g * t * h, d)
  s_pre = jnp.einsum("bkrd,bpkd->bkrp", q_pre, prefix_k_bpkd, precision=prec, preferred_element_type=f32)
  s_pre = jnp.where(prefix_mask_bp[:, None, None, :], s_pre, MASK_VALUE).reshape(b, kh, g, t, h, p)
  # Own part, rows (t, h) of each (sample, kv head).
  s_own = jnp.einsum("rtkhd,rskd->rkths", q, k_rtkd, precision=prec, preferred_element_type=f32)
  s_own = jnp.where(own_mask_rtt[:, None, :, None, :], s_own, MASK_VALUE)
  to_pre = lambda a: a.reshape(b, g, kh, t, h).transpose(0, 2, 1, 3, 4)  # (R, K, T, h) → (B, K, G, T, h)
  to_own = lambda a: a.transpose(0, 2, 1, 3, 4).reshape(r, kh, t, h)
  m = jnp.maximum(s_pre.max(-1), to_pre(s_own.max(-1)))  # (B, K, G, T, h)
  p_pre = jnp.exp(s_pre - m[..., None])
  p_own = jnp.exp(s_own - to_own(m)[..., None])
  denom = p_pre.sum(-1) + to_pre(p_own.sum(-1))
  o_pre = jnp.einsum("bkrp,bpkd->bkrd", p_pre.astype(dt).reshape(b, kh, g * t * h, p), prefix_v_bpkd,
                     precision=prec, preferred_element_type=f32)
  o_pre = o_pre.reshape(b, kh, g, t, h, d) / denom[..., None]
  o_own = jnp.einsum("rkths,rskd->rtkhd", p_own.astype(dt), v_rtkd, precision=prec, preferred_element_type=f32)
  o_own = o_own / to_own(denom).transpose(0, 2, 1, 3)[..., None]
  return (o_pre.transpose(0, 2, 3, 1, 4, 5).reshape(r, t, kh, h, d) + o_own).astype(dt)


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """n independently initialised copies of a module with parameters stacked on a 'layers' axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  return create(rngs)


# What the backward pass keeps of each scanned layer's forward (the rest is recomputed):
#   none  everything the autodiff saves (fastest; activation memory grows with layers × tokens)
#   full  only the layer's input (the scan carry): the layer's forward runs again in the backward
#   dots  also the outputs of the weight matmuls (no batch dimensions): norms, activations and
#         attention are recomputed — most of the memory saving for a fraction of the recompute
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _remat(body, remat: str):
  if remat == "none":
    return body
  return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)  # in a scan: no CSE risk


def scan_layers(stack: nnx.Module, carry, fn, start: int = 0, stop: int | None = None, remat: str = "none"):
  """carry = fn(layer_i, carry) for the stacked layers [start, stop), as one lax.scan.

  One traced layer body, however deep the model: compile time does not grow with depth (except on
  UNROLL_BACKENDS, where the layers are a Python loop). `remat`: a key of REMAT_POLICIES, applied to
  the layer body.
  """
  graphdef, state = nnx.split(stack)
  if start != 0 or stop is not None:
    state = jax.tree.map(lambda a: a[start:stop], state)

  def body(c, layer_state):
    return fn(nnx.merge(graphdef, layer_state), c), None

  if _unrolled():
    for s in _per_layer(state):
      carry = _remat(body, remat)(carry, s)[0]
    return carry
  return jax.lax.scan(_remat(body, remat), carry, state)[0]


# Backends on which the layer stacks run as a Python loop of per-layer slices instead of one lax.scan.
# On CPU the scan's stacked residuals (zero-filled, then written one layer slice at a time) and its
# per-iteration weight slices cost ~8% of a GRPO update (measured: one pair of the 74M benchmark
# model, 5.3–5.5 s unrolled vs 5.6–6.3 s scanned, alternating runs); elsewhere the scan keeps compile
# time independent of depth.
UNROLL_BACKENDS = ("cpu",)


def _unrolled() -> bool:
  return jax.default_backend() in UNROLL_BACKENDS


def _per_layer(tree):
  """The layers of a stacked pytree as a list of pytrees (split: its transpose is a concatenate)."""
  leaves, treedef = jax.tree.flatten(tree)
  n = leaves[0].shape[0]
  parts = [jnp.split(a, n, axis=0) for a in leaves]
  return [jax.tree.unflatten(treedef, [p[i][0] for p in parts]) for i in range(n)]


def scan_layers_xs(stack: nnx.Module, carry, xs, fn, remat: str = "none"):
  """(carry, ys) of `carry, y = fn(layer_i, carry, xs_i)` over the stacked layers, as one lax.scan
  (a Python loop on UNROLL_BACKENDS); `xs` is a pytree with a leading layers axis (e.g. a per-layer
  KV cache)."""
  graphdef, state = nnx.split(stack)

  def body(c, layer_and_x):
    layer_state, x = layer_and_x
    return fn(nnx.merge(graphdef, layer_state), c, x)

  if _unrolled():
    ys = []
    for lx in _per_layer((state, xs)):
      carry, y = _remat(body, remat)(carry, lx)
      ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None
  return jax.lax.scan(_remat(body, remat), carry, (state, xs))


def is_concrete(x) -> bool:
  """Readable on this host: not traced, and not a global array spread over other processes."""
  if x is None or isinstance(x, jax.core.Tracer):
    return False
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def static_grid(image_grid_thw) -> tuple[tuple[int, int, int], ...]:
  """`image_grid_thw` is shape metadata: it must be concrete (numpy / list), never traced."""
  if isinstance(image_grid_thw, jax.core.Tracer):
    raise TypeError("image_grid_thw must be concrete (numpy or a tuple), not a traced array: it "
                    "decides shapes. Under jit pass it as a static argument (see "
                    "lgrpo_jax.models.qwen2_5_vl.forward).")
  grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  return tuple(tuple(int(v) for v in row) for row in grid)
