"""Qwen2.5-VL for conditional generation in Flax NNX: vision tower + Qwen2 decoder with M-RoPE.

    logits = model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...)

takes exactly what a transformers processor returns (numpy) and gives (B, T, vocab) fp32 logits.
Decoder layers are stacked on a 'layers' axis and run as one `lax.scan`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lgrpo_jax.models.qwen2_5_vl.cache import KEYS_TRANSPOSED_BACKENDS, SUFFIX_NAMES, KVCache
from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, validate
from lgrpo_jax.models.qwen2_5_vl.layers import (INIT_STD, Dense, GatedMLP, RMSNorm, apply_rotary,
                                                attention, attention_decode, attention_extend, is_concrete,
                                                param, precision_for, scan_layers, scan_layers_xs,
                                                stack_modules, static_grid, uses_cudnn)
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index, text_rotary
from lgrpo_jax.models.qwen2_5_vl.vision import VisionTower
from lgrpo_jax.sharding import active_spec, constrain

ACT_BTD = ("batch", "length", None)  # decoder activations between blocks


class DecodeWeights(NamedTuple):
  """One decoder layer's matmul weights for the decode loop, prepared once per rollout in the compute
  dtype: q, k and v as one (E, K, h+2, D) kernel (kv head k's h query heads, then its key, then its
  value) and gate, up as one (E, 2, I) kernel. A decode step multiplies a few dozen rows, so each
  matmul costs a kernel launch and a pass over its weights: one matmul instead of three, and one
  instead of two."""
  qkv: jax.Array
  qkv_bias: jax.Array
  o: jax.Array
  gate_up: jax.Array
  down: jax.Array


class DecodeWeightsKMajor(NamedTuple):
  """`DecodeWeights` for the Pallas decode matmuls (`Qwen25VLConfig.decode_matmul = "pallas"`,
  kernels/decode_matmul.py): every kernel (N, K), each output column's weights contiguous, replicated
  on the mesh (gathered once per rollout, not per step). qkv (K·(h+2)·D, E) in `DecodeWeights.qkv`'s
  column order, its bias (K·(h+2)·D,), o (E, H·D), gate_up (2, I, E), down (E, I), and the two
  RMSNorm weights (E,) that the q/k/v and gate/up kernels fold in."""
  qkv: jax.Array
  qkv_bias: jax.Array
  o: jax.Array
  gate_up: jax.Array
  down: jax.Array
  input_norm: jax.Array
  post_norm: jax.Array


def _pallas_matmul(x_bgk, w, *, kind: str, norm=None, eps: float = 1e-6, norm_ss=None, bias=None, residual=None,
                   return_ss: bool = False):
  """`kernels.decode_matmul` on (B, G, K) rows → (B, G, N), or with `return_ss` (y, the Σy²
  partials (P, B, G) fp32). `norm` (K,): the RMSNorm weight to fold in (with `eps`); `norm_ss`
  (P, B, G): the input's Σx² partials from the kernel that wrote it; `residual` (B, G, N). Under a
  mesh it runs per device on its rows (`shard_map`) with the weights replicated: data/fsdp meshes
  only — a tensor-parallel mesh would need each matmul split by columns or rows with a sum across
  devices, which this path does not do (decode_matmul="xla" does)."""
  from lgrpo_jax.kernels.decode_matmul import decode_matmul  # imports Pallas: only when used
  named = {"w": w, "norm_weight": norm, "norm_ss": norm_ss, "bias": bias, "residual": residual}
  named = {k: v for k, v in named.items() if v is not None}

  def call(x, **kw):
    b, g = x.shape[:2]
    if "residual" in kw:
      kw["residual"] = kw["residual"].reshape(b * g, -1)
    if "norm_ss" in kw:
      kw["norm_ss"] = kw["norm_ss"].reshape(-1, b * g)
    out = decode_matmul(x.reshape(b * g, -1), kw.pop("w"), eps=eps, kind=kind, return_ss=return_ss, **kw)
    y, ss = out if return_ss else (out, None)
    y = y.reshape(b, g, -1)
    return (y, ss.reshape(-1, b, g)) if return_ss else y

  spec = active_spec(("batch", None, None), x_bgk.shape)
  if spec is None:
    return call(x_bgk, **named)
  tensor = jax.sharding.get_abstract_mesh().shape.get("tensor", 1)
  if tensor > 1:
    raise ValueError(f"decode_matmul='pallas' runs on data/fsdp meshes only; this mesh has tensor={tensor} "
                     "(use decode_matmul='xla' with tensor parallelism)")
  rows, ss_rows = P(spec[0]), P(None, spec[0])  # (B, G, …) and (P, B, G): split by rows
  specs = {k: rows if k == "residual" else ss_rows if k == "norm_ss" else P() for k in named}
  sharded = jax.shard_map(lambda x, kw: call(x, **kw), in_specs=(rows, specs),
                          out_specs=(rows, ss_rows) if return_ss else rows, check_vma=False)
  return sharded(x_bgk, named)


def _mm(x, w, n_in: int = 1):
  """x · w contracting x's last n_in axes with w's first n_in (the Dense arithmetic)."""
  return jax.lax.dot_general(x.astype(w.dtype), w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                                    ((), ())), precision=precision_for(w.dtype))


def _pallas_decode_attention(qkv_bgkjd, cos_bgd, sin_bgd, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v,
                             step, scale):
  """`kernels.decode_attention` on the mesh that is set: a Pallas kernel has no partitioning rule,
  so under a mesh it runs per device on the cache's own shards (`shard_map`; every (b, g, k) is
  independent) instead of on gathered copies."""
  from lgrpo_jax.kernels.decode_attention import decode_attention  # imports Pallas: only when used
  call = functools.partial(decode_attention, scale=scale)
  args = (qkv_bgkjd, cos_bgd, sin_bgd, prefix_k, prefix_v, prefix_mask, suffix_k, suffix_v, step)
  spec = active_spec(SUFFIX_NAMES, suffix_k.shape)
  if spec is None:
    return call(*args)
  sb, sk, sg = tuple(spec)[:3]  # (B, K, G) of the (B, K, G, N, D) cache
  q_spec, rot_spec, prefix_spec, cache_spec = P(sb, sg, sk), P(sb, sg), P(sb, sk), P(sb, sk, sg)
  sharded = jax.shard_map(call, in_specs=(q_spec, rot_spec, rot_spec, prefix_spec, prefix_spec, P(sb),
                                          cache_spec, cache_spec, P()),
                          out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)
  return sharded(*args)


class DecoderLayer(nnx.Module):
  """Qwen2 block: pre-RMSNorm GQA attention (q/k/v bias, o without) and a bias-free SwiGLU MLP."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.kv_heads, self.groups, self.head_dim = k, h // k, d
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(e, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.q_proj = Dense((e,), (h, d), in_names=("embed",), out_names=("heads", "head_dim"),
                        use_bias=True, **kw)
    self.k_proj = Dense((e,), (k, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                        use_bias=True, **kw)
    self.v_proj = Dense((e,), (k, d), in_names=("embed",), out_names=("kv_heads", "head_dim"),
                        use_bias=True, **kw)
    self.o_proj = Dense((h, d), (e,), in_names=("heads", "head_dim"), out_names=("embed",),
                        use_bias=False, **kw)
    self.post_attention_layernorm = RMSNorm(e, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = GatedMLP(e, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False, **kw)

  def qkv(self, x_btd, cos_btd, sin_btd):
    """Rotated q (B, T, K, h, D) and k (B, T, K, D), and v (B, T, K, D) of the normed input."""
    h = self.input_layernorm(x_btd)
    q = apply_rotary(self.q_proj(h), cos_btd[:, :, None], sin_btd[:, :, None])  # (B, T, H, D)
    k = apply_rotary(self.k_proj(h), cos_btd[:, :, None], sin_btd[:, :, None])  # (B, T, K, D)
    v = constrain(self.v_proj(h), ("batch", "length", "kv_heads", None))
    q = constrain(q, ("batch", "length", "heads", None))
    k = constrain(k, ("batch", "length", "kv_heads", None))
    b, t = q.shape[:2]
    return q.reshape(b, t, self.kv_heads, self.groups, self.head_dim), k, v

  def finish(self, x_btd, o_btkhd):
    """Output projection and residual, then the MLP block."""
    b, t = o_btkhd.shape[:2]
    x_btd = x_btd + self.o_proj(o_btkhd.reshape(b, t, -1, self.head_dim))
    return x_btd + self.mlp(self.post_attention_layernorm(x_btd))

  def decode_weights(self, k_major: bool = False) -> DecodeWeights | DecodeWeightsKMajor:
    """The fused decode weights; `k_major`: their (N, K) layout for the Pallas matmuls."""
    k, h, d = self.kv_heads, self.groups, self.head_dim
    dt = self.q_proj.dtype
    q = self.q_proj.kernel[...]
    qkv = jnp.concatenate([q.reshape(q.shape[0], k, h, d), self.k_proj.kernel[...][:, :, None],
                           self.v_proj.kernel[...][:, :, None]], axis=2).astype(dt)
    bias = jnp.concatenate([self.q_proj.bias[...].reshape(k, h, d), self.k_proj.bias[...][:, None],
                            self.v_proj.bias[...][:, None]], axis=1).astype(dt)
    mlp = self.mlp
    if k_major:  # transposed once per rollout; replicated (None names) so no step gathers them
      e = qkv.shape[0]
      rep = lambda a: constrain(a, (None,) * a.ndim)
      return DecodeWeightsKMajor(
          rep(qkv.reshape(e, -1).T), rep(bias.reshape(-1)), rep(self.o_proj.kernel[...].astype(dt).reshape(-1, e).T),
          rep(jnp.stack([mlp.gate_proj.kernel[...].T, mlp.up_proj.kernel[...].T]).astype(dt)),
          rep(mlp.down_proj.kernel[...].T.astype(dt)), rep(self.input_layernorm.weight[...]),
          rep(self.post_attention_layernorm.weight[...]))
    gate_up = jnp.stack([mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=1).astype(dt)
    return DecodeWeights(constrain(qkv, ("embed", "kv_heads", None, "head_dim")), bias,
                         self.o_proj.kernel[...].astype(dt), constrain(gate_up, ("embed", None, "mlp")),
                         mlp.down_proj.kernel[...].astype(dt))

  def decode_proj(self, x_bgd, w: DecodeWeights, norm_ss=None):
    """The fused q/k/v projection of one new token per sample, before rotary: (B, G, K, h+2, D).
    `norm_ss` (the Pallas matmuls only): x's Σx² partials from the previous layer's down kernel."""
    if isinstance(w, DecodeWeightsKMajor):  # one kernel: norm, matmul, bias
      y = _pallas_matmul(x_bgd, w.qkv, kind="qkv", norm=w.input_norm, eps=self.input_layernorm.eps, norm_ss=norm_ss,
                         bias=w.qkv_bias)
      return y.reshape(*y.shape[:2], self.kv_heads, self.groups + 2, self.head_dim)
    return _mm(self.input_layernorm(x_bgd), w.qkv) + w.qkv_bias

  def decode_qkv(self, x_bgd, cos_bgd, sin_bgd, w: DecodeWeights, norm_ss=None):
    """`qkv` of one new token per sample with the fused kernel: q (B, G, K, h, D), k, v (B, G, K, D)."""
    h = self.groups
    y = self.decode_proj(x_bgd, w, norm_ss)  # (B, G, K, h+2, D)
    c, s = cos_bgd[:, :, None], sin_bgd[:, :, None]
    q = apply_rotary(y[..., :h, :], c[..., None, :], s[..., None, :])
    return q, apply_rotary(y[..., h, :], c, s), y[..., h + 1, :]

  def decode_finish(self, x_bgd, o_bgkhd, w: DecodeWeights, return_ss: bool = False):
    """`finish` with the fused gate/up kernel. `return_ss`: → (x, its Σx² partials for the next
    layer's `decode_proj`: (P, B, G) fp32 from the Pallas down kernel, None on the XLA path)."""
    b, g = o_bgkhd.shape[:2]
    if isinstance(w, DecodeWeightsKMajor):  # three kernels: o + residual, norm + gate/up + SwiGLU, down + residual
      # o and down also return Σx² of the x they write, so the norm after each needs no pass over x
      x_bgd, ss = _pallas_matmul(o_bgkhd.reshape(b, g, -1), w.o, kind="o", residual=x_bgd, return_ss=True)
      hid = _pallas_matmul(x_bgd, w.gate_up, kind="gate_up", norm=w.post_norm, eps=self.post_attention_layernorm.eps,
                           norm_ss=ss)
      return _pallas_matmul(hid, w.down, kind="down", residual=x_bgd, return_ss=return_ss)
    x_bgd = x_bgd + _mm(o_bgkhd.reshape(b, g, -1, self.head_dim), w.o, 2)
    gu = _mm(self.post_attention_layernorm(x_bgd), w.gate_up)  # (B, G, 2, I)
    hid = constrain(self.mlp.act(gu[..., 0, :]) * gu[..., 1, :], ("batch", None, "mlp"))
    x_bgd = x_bgd + _mm(hid, w.down)
    return (x_bgd, None) if return_ss else x_bgd

  def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, return_kv: bool = False, impl: str = "auto"):
    q, k, v = self.qkv(x_btd, cos_btd, sin_btd)
    out = self.finish(x_btd, attention(q, k, v, mask_bts, self.head_dim**-0.5, impl))
    return (out, (k, v)) if return_kv else out


class Qwen25VL(nnx.Module):

  def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
    validate(config)
    self.config = config
    t = config.text
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.dtype = dtype
    self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = param(
        INIT_STD * jax.random.normal(rngs.params(), (t.vocab_size, t.hidden_size), param_dtype),
        ("vocab", "embed"))
    self.layers = stack_modules(
        lambda r: DecoderLayer(t, dtype=dtype, param_dtype=param_dtype, rngs=r),
        t.num_hidden_layers, rngs)
    self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if config.tie_word_embeddings else Dense(
        (t.hidden_size,), (t.vocab_size,), in_names=("embed",), out_names=("vocab",),
        use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def set_remat(self, policy: str) -> "Qwen25VL":
    """Rematerialise each decoder / vision layer in the backward pass (`Qwen25VLConfig.remat`:
    "none" | "full" | "dots"); values and gradients are unchanged, memory and time are not."""
    self.config = self.config.replace(remat=policy)
    return self

  def set_decode_attention(self, impl: str) -> "Qwen25VL":
    """The decode loop's attention (`Qwen25VLConfig.decode_attention`: "xla" | "pallas"); the same
    values up to the order of fp32 sums."""
    self.config = self.config.replace(decode_attention=impl)
    return self

  def set_decode_matmul(self, impl: str) -> "Qwen25VL":
    """The decode loop's weight matmuls (`Qwen25VLConfig.decode_matmul`: "xla" | "pallas"); the
    same values up to the order of fp32 sums."""
    self.config = self.config.replace(decode_matmul=impl)
    return self

  def set_attention(self, impl: str) -> "Qwen25VL":
    """The attention kernel of the decoder and the vision tower (`Qwen25VLConfig.attention`:
    "auto" | "xla" | "cudnn"); the same values up to rounding, different speed and memory."""
    self.config = self.config.replace(attention=impl)
    return self

  # ---- pieces (used separately by the sampler, the listener and the loss) -------------------
  def image_features(self, pixel_values, image_grid_thw):
    """(N patches, C·T·P·P) → (N/m², hidden) merged image embeddings, images in order."""
    return self.visual(pixel_values, static_grid(image_grid_thw), remat=self.config.remat,
                       attention=self.config.attention)

  def repeat_image_features(self, feats, grid, groups: int, repeats: int):
    """`image_features` of `groups` equal groups of images in order (e.g. the pairs: `grid` lists
    their images) → each group's rows `repeats` times in a row: the features of the images
    repeated per completion, as the plain (no prefix sharing) layout lays them out, without
    running the tower again."""
    m2 = self.config.vision.spatial_merge_size ** 2
    per = len(grid) // groups
    sizes = [sum(t * h * w for t, h, w in grid[i * per:(i + 1) * per]) // m2 for i in range(groups)]
    parts = jnp.split(feats, np.cumsum(sizes)[:-1].tolist())
    return jnp.concatenate([part for part in parts for _ in range(repeats)])

  def embed(self, input_ids, image_embeds=None):
    """Token embeddings with `<|image_pad|>` positions replaced, in order, by image embeddings."""
    x = self.embed_tokens[...][input_ids].astype(self.dtype)
    if image_embeds is None:
      return x
    is_img = input_ids == self.config.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, image_embeds.shape[0] - 1)
    img = image_embeds.astype(self.dtype)[idx].reshape(x.shape)
    return jnp.where(is_img[..., None], img, x)

  def decode(self, x_btd, position_ids, attention_mask):
    """Decoder stack + final norm over input embeddings → hidden states (B, T, hidden)."""
    b, t = x_btd.shape[:2]
    valid = (jnp.ones((b, t), bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    cos, sin = text_rotary(position_ids, self.config)
    x_btd = scan_layers(self.layers, constrain(x_btd, ACT_BTD),
                        lambda layer, x: constrain(layer(x, cos, sin, mask_bts, impl=self.config.attention),
                                                   ACT_BTD),
                        remat=self.config.remat)
    return self.norm(x_btd)

  def prefill(self, x_btd, position_ids, attention_mask):
    """`decode` that also returns every layer's keys and values: (hidden (B, T, E) after the final
    norm, k (L, B, T, K, D), v (L, B, T, K, D)) — the prompt's KV cache."""
    b, t = x_btd.shape[:2]
    valid = jnp.asarray(attention_mask).astype(bool)
    mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    cos, sin = text_rotary(position_ids, self.config)

    def layer_fn(layer, x, _):
      x, kv = layer(x, cos, sin, mask_bts, return_kv=True, impl=self.config.attention)
      return constrain(x, ACT_BTD), kv

    x_btd, (k, v) = scan_layers_xs(self.layers, constrain(x_btd, ACT_BTD), None, layer_fn, self.config.remat)
    return self.norm(x_btd), k, v

  def unstacked_layers(self) -> list[DecoderLayer]:
    """The decoder layers as L separate modules (their parameters sliced out once). For loops that
    run the layers unrolled: slicing a stacked parameter inside a loop copies it every iteration
    (measured: ~15 ms per decode step, a quarter of it, on the 74M benchmark model on CPU)."""
    graphdef, state = nnx.split(self.layers)
    n = self.config.text.num_hidden_layers
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]

  def decode_layers(self) -> list[tuple[DecoderLayer, DecodeWeights]]:
    """`unstacked_layers()` with each layer's fused decode weights: computed once, outside the decode
    loop. The loop reads only the fused q/k/v and gate/up kernels, so the per-layer slices of those
    weights are not needed there (whether XLA frees them early was not measured)."""
    k_major = self.config.decode_matmul == "pallas"
    return [(layer, layer.decode_weights(k_major)) for layer in self.unstacked_layers()]

  def new_cache(self, k_lbpkd, v_lbpkd, attention_mask_bp, num_samples: int, max_new_tokens: int) -> KVCache:
    """The decode loop's cache from `prefill`'s keys/values, in the layout `decode_step` reads on
    this backend (keys transposed on CPU's XLA path)."""
    return KVCache.from_prefill(k_lbpkd, v_lbpkd, attention_mask_bp, num_samples, max_new_tokens,
                                keys_transposed=self.decode_keys_transposed())

  def decode_keys_transposed(self) -> bool:
    """Whether this backend's decode cache stores keys transposed (`cache.KEYS_TRANSPOSED_BACKENDS`;
    the XLA decode path only: the Pallas kernel reads (…, slots, D) keys)."""
    return self.config.decode_attention == "xla" and jax.default_backend() in KEYS_TRANSPOSED_BACKENDS

  def decode_step(self, x_bgd, positions_bg, cache, step, layers=None):
    """One new token for each of G samples per prompt → (hidden (B, G, E) after the final norm,
    the cache with the token's keys/values written at suffix slot `step`). The token attends to
    the prefix, its sample's slots before `step`, and itself. Text positions only (all three M-RoPE
    axes equal). `cache`: from `new_cache` (its key layout is the backend's). `layers`:
    `decode_layers()`, computed once outside the loop.

    Each layer writes its slot *before* reading the cache: the update-then-read pattern lets XLA
    update the loop-carried cache in place (writing after the read made it copy the whole cache
    every step: ~10 ms per step at 128 slots on the benchmark model)."""
    layers = self.decode_layers() if layers is None else layers
    cos, sin = text_rotary(jnp.broadcast_to(positions_bg, (3, *positions_bg.shape)), self.config)
    if self.config.decode_attention == "pallas":
      return self._decode_step_pallas(x_bgd, cos, sin, cache, step, layers)
    own_mask_n = jnp.arange(cache.suffix_v[0].shape[3]) <= step
    kt = self.decode_keys_transposed()
    to_bk = lambda a: jnp.swapaxes(a, 1, 2)  # (B, G, K, ...) <-> (B, K, G, ...): tiny, per token
    new_k, new_v, ss = [], [], None  # ss: x's Σx² partials from the Pallas down kernel (else None)
    for i, (layer, w) in enumerate(layers):
      q, k, v = layer.decode_qkv(x_bgd, cos, sin, w, ss)  # (B, G, K, h, D), (B, G, K, D)
      start = (0, 0, 0, step, 0)
      k_slot = to_bk(k)[..., None] if kt else to_bk(k)[:, :, :, None]  # (B, K, G, D, 1) | (B, K, G, 1, D)
      sk = jax.lax.dynamic_update_slice(cache.suffix_k[i], k_slot, (0, 0, 0, 0, step) if kt else start)
      sv = jax.lax.dynamic_update_slice(cache.suffix_v[i], to_bk(v)[:, :, :, None], start)
      o = attention_decode(to_bk(q), cache.prefix_k[i], cache.prefix_v[i], cache.prefix_mask, sk, sv,
                           own_mask_n, layer.head_dim**-0.5, keys_transposed=kt)
      x_bgd, ss = layer.decode_finish(x_bgd, to_bk(o), w, return_ss=True)
      new_k.append(sk)
      new_v.append(sv)
    return self.norm(x_bgd), cache._replace(suffix_k=tuple(new_k), suffix_v=tuple(new_v))

  def _decode_step_pallas(self, x_bgd, cos, sin, cache, step, layers):
    """`decode_step` with `kernels.decode_attention`: per layer one kernel takes the fused q/k/v
    projection as it comes (unrotated, unsplit), rotates, writes the slot and attends, in the
    projections' (B, G, K, …) layout (no rotary, split, swap or cache-write kernels around it)."""
    prefix_mask = cache.prefix_mask.astype(jnp.int32)  # Triton loads no bools; loop-invariant
    new_k, new_v, ss = [], [], None
    for i, (layer, w) in enumerate(layers):
      qkv = layer.decode_proj(x_bgd, w, ss)  # (B, G, K, h+2, D)
      o, sk, sv = _pallas_decode_attention(qkv, cos, sin, cache.prefix_k[i], cache.prefix_v[i], prefix_mask,
                                           cache.suffix_k[i], cache.suffix_v[i], step, layer.head_dim**-0.5)
      x_bgd, ss = layer.decode_finish(x_bgd, o, w, return_ss=True)
      new_k.append(sk)
      new_v.append(sv)
    return self.norm(x_bgd), cache._replace(suffix_k=tuple(new_k), suffix_v=tuple(new_v))

  def extend(self, x_bgtd, positions_bgt, valid_bgt, prefix_k, prefix_v, prefix_mask):
    """G continuations of T tokens per prompt, each attending to its prompt's cached prefix (from
    `prefill`: k, v (L, B, P, K, D), mask (B, P)) and causally to its own valid tokens → hidden
    (B, G, T, E) after the final norm. Text positions only (all three M-RoPE axes equal). Slots
    with valid = 0 are holes: no token attends to them (their own outputs are meaningless)."""
    b, g, t, e = x_bgtd.shape
    p = prefix_mask.shape[1]
    x = x_bgtd.reshape(b * g, t, e)
    pos = positions_bgt.reshape(b * g, t)
    cos, sin = text_rotary(jnp.broadcast_to(pos, (3, *pos.shape)), self.config)
    valid = valid_bgt.reshape(b * g, t).astype(bool)
    own_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    prefix_mask = prefix_mask.astype(bool)
    fused = uses_cudnn(self.config.attention, self.dtype, self.config.text.head_dim)
    rep = lambda a: jnp.repeat(a, g, axis=0)  # per-sample view of the prompt (keys, mask)
    if fused:  # one flash-attention call over [repeated prefix | own]: the scores never reach memory
      mask_bts = jnp.concatenate([jnp.broadcast_to(rep(prefix_mask)[:, None, :], (b * g, t, p)), own_mask], 2)

    def layer_fn(layer, x, kv):
      pk, pv = kv
      q, k, v = layer.qkv(x, cos, sin)
      if fused:
        o = attention(q, jnp.concatenate([rep(pk), k], axis=1), jnp.concatenate([rep(pv), v], axis=1),
                      mask_bts, layer.head_dim**-0.5, self.config.attention)
      else:  # the prefix read once per prompt, not once per sample
        o = attention_extend(q, k, v, pk, pv, prefix_mask, own_mask, layer.head_dim**-0.5)
      return constrain(layer.finish(x, o), ACT_BTD), None

    x, _ = scan_layers_xs(self.layers, constrain(x, ACT_BTD), (prefix_k, prefix_v), layer_fn, self.config.remat)
    return self.norm(x).reshape(b, g, t, e)

  def head_matrix(self):
    """The output head as a (V, E) matrix (no gather: the tied embedding itself, or the kernel's
    transpose), for passes over the whole vocabulary such as chunked log-probs."""
    return self.embed_tokens[...] if self.lm_head is None else self.lm_head.kernel[...].T

  def head_weights(self, token_ids):
    """(len(ids), E) rows of the output head for a few token ids (e.g. the two choices)."""
    if self.lm_head is None:
      return self.embed_tokens[...][jnp.asarray(token_ids)]
    return self.lm_head.kernel[...][:, jnp.asarray(token_ids)].T

  def logits(self, h_btd):
    """fp32 logits: the head in the compute dtype, accumulated and returned in fp32 as the log-prob
    pass computes it (`grpo.logprobs.token_logprobs`), so that in bf16 the sampler's log-probs are
    the update's up to summation order, not a bf16 rounding of every logit away from them."""
    if self.lm_head is not None and self.dtype == jnp.float32:
      out = self.lm_head(h_btd)  # fp32: the Dense layer itself (its CPU weight-gradient form)
    else:
      out = jnp.einsum("bte,ve->btv", h_btd.astype(self.dtype), self.head_matrix().astype(self.dtype),
                       precision=precision_for(self.dtype), preferred_element_type=jnp.float32)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                    position_ids=None):
    check_inputs(input_ids, attention_mask, self.config)
    input_ids = jnp.asarray(input_ids)
    grid = () if image_grid_thw is None else static_grid(image_grid_thw)
    image_embeds = None
    if pixel_values is not None:
      if not grid:
        raise ValueError("pixel_values given without image_grid_thw")
      check_image_tokens(input_ids, grid, self.config)
      image_embeds = self.visual(pixel_values, grid, remat=self.config.remat, attention=self.config.attention)
    if position_ids is None:
      position_ids, _ = get_rope_index(input_ids, attention_mask, grid, self.config)
    x = self.embed(input_ids, image_embeds)
    return self.decode(x, jnp.asarray(position_ids), attention_mask)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               position_ids=None):
    """(B, T, vocab) fp32 logits. `image_grid_thw` must be concrete (numpy/tuple)."""
    return self.logits(self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                          position_ids))


def check_inputs(input_ids, attention_mask, cfg: Qwen25VLConfig) -> None:
  """Shapes always; token ids against the vocabulary when they are concrete (a gather would clamp
  an id out of range to the last row without a word)."""
  shape = tuple(np.shape(input_ids))
  if len(shape) != 2:
    raise ValueError(f"input_ids has shape {shape}; expected (batch, length)")
  if attention_mask is not None and tuple(np.shape(attention_mask)) != shape:
    raise ValueError(f"attention_mask has shape {tuple(np.shape(attention_mask))}, input_ids {shape}: "
                     "they must be equal")
  if is_concrete(input_ids) and shape[1]:
    ids = np.asarray(input_ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.text.vocab_size:
      raise ValueError(f"input_ids holds token ids in [{lo}, {hi}], outside the vocabulary [0, "
                       f"{cfg.text.vocab_size}) of this model (another tokenizer's ids?)")
    if (ids == cfg.video_token_id).any():  # they would run as plain text, not video
      raise ValueError(f"input_ids holds <|video_pad|> tokens (id {cfg.video_token_id}): video inputs "
                       "are not supported, only images")


def check_image_tokens(input_ids, grid, cfg: Qwen25VLConfig) -> None:
  """The number of `<|image_pad|>` tokens must equal the merged patches of all images."""
  if not is_concrete(input_ids):
    return  # under jit the host pipeline has checked; the count is data, not shape
  m2 = cfg.vision.spatial_merge_size**2
  n_features = sum(t * h * w for t, h, w in grid) // m2
  n_tokens = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
  if n_tokens != n_features:
    raise ValueError(
        f"image tokens and image features do not match: input_ids holds {n_tokens} "
        f"<|image_pad|> tokens (id {cfg.image_token_id}) but image_grid_thw "
        f"{[list(g) for g in grid]} gives {n_features} merged patches")


@functools.partial(nnx.jit, static_argnames=("grid",))
def _forward_jit(model, input_ids, attention_mask, pixel_values, grid):
  return model(input_ids, attention_mask, pixel_values, grid or None)


def forward(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
  """Compiled `model(...)`: one XLA program per distinct (shapes, image grids)."""
  grid = None if image_grid_thw is None else static_grid(image_grid_thw)
  check_inputs(input_ids, attention_mask, model.config)
  if pixel_values is not None:
    check_image_tokens(input_ids, grid or (), model.config)
  return _forward_jit(model, jnp.asarray(input_ids),
                      None if attention_mask is None else jnp.asarray(attention_mask),
                      None if pixel_values is None else jnp.asarray(pixel_values), grid)
