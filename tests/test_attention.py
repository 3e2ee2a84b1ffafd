"""Both attention paths (direct and blocked) against an independent float64 NumPy reference, and the
whole model with the blocked path forced, against transformers."""

import numpy as np
import pytest
from flax import nnx

import jax.numpy as jnp
import lgrpo_jax
from lgrpo_jax.models.qwen2_5_vl import layers
from hf_tiny import CASES, build_hf, config_dict, hf_logits, make_batch, rel_err, traced_forward


def reference(q, k, v, mask, scale):
  """Plain softmax attention with grouped query heads, float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, kh, g, d = q.shape
  s = np.einsum("btkgd,bskd->bkgts", q, k) * scale
  if mask is not None:
    s = np.where(np.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None], s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkgts,bskd->btkgd", p, v)


@pytest.mark.parametrize("path", ["direct", "blocked"])
@pytest.mark.parametrize("shape", [(2, 37, 2, 3, 8), (1, 64, 3, 1, 16), (3, 5, 1, 2, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_paths_match_reference(monkeypatch, path, shape, masked):
  if path == "blocked":
    monkeypatch.setattr(layers, "DIRECT_MAX", 0)
    monkeypatch.setattr(layers, "BLOCK_ROWS", 16)  # several blocks, last one padded
  else:
    monkeypatch.setattr(layers, "DIRECT_MAX", 1 << 40)
  rng = np.random.default_rng(sum(shape))
  b, t, kh, g, d = shape
  q = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  v = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  mask = None
  if masked:  # causal + left padding of a different length per row (rows fully masked included)
    valid = np.arange(t)[None, :] >= rng.integers(0, t, b)[:, None]
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  got = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    None if mask is None else jnp.asarray(mask), d**-0.5))
  ref = reference(q, k, v, mask, d**-0.5)
  assert got.shape == ref.shape
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_blocked_path_only_on_cpu(monkeypatch):
  """Large problems take the blocked path (a lax.map over blocks) on CPU only; on an accelerator the
  same call is one direct program with no loop."""
  import jax
  q = jnp.ones((1, 64, 1, 2, 8))
  k = v = jnp.ones((1, 64, 1, 8))
  monkeypatch.setattr(layers, "DIRECT_MAX", 0)
  loops = lambda: str(jax.make_jaxpr(lambda *a: layers.attention(*a, None, 0.3))(q, k, v)).count("scan")
  assert loops() >= 1  # CPU: blocked
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert loops() == 0


def test_model_with_blocked_attention_matches_transformers(monkeypatch, tmp_path):
  hf = build_hf(config_dict("a"), seed=8)
  hf.save_pretrained(tmp_path)
  ours = lgrpo_jax.load_hf(tmp_path)
  monkeypatch.setattr(layers, "DIRECT_MAX", 0)
  monkeypatch.setattr(layers, "BLOCK_ROWS", 24)
  for case in ("left_padded_batch", "two_images_sizes", "long_300"):
    batch = make_batch(CASES[case], seed=3)
    got = np.asarray(traced_forward(ours, batch))  # traced afresh: the patched block sizes are read
    assert rel_err(got, hf_logits(hf, batch), batch["attention_mask"]) <= 1e-5, case


@pytest.mark.parametrize("shape", [(2, 37, 2, 3, 8), (3, 5, 1, 2, 16)])
def test_cudnn_path_layout_matches_reference(monkeypatch, shape):
  """The cuDNN path's conventions (K·G query heads grouped as jax/transformers do, the mask as a
  (B, 1, T, S) argument, the scale) against the float64 reference. cuDNN needs a GPU, so here
  `jax.nn.dot_product_attention` runs its XLA implementation with the same arguments."""
  import jax
  real = jax.nn.dot_product_attention
  seen = []

  def xla_instead(*a, implementation=None, **kw):
    seen.append(implementation)
    return real(*a, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
  rng = np.random.default_rng(sum(shape))
  b, t, kh, g, d = shape
  q = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  v = rng.standard_normal((b, t, kh, d)).astype(np.float32)
  valid = np.arange(t)[None, :] >= rng.integers(0, t // 2, b)[:, None]  # left padding, no empty row
  mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  for m in (mask, valid[:, None, :], None):  # full, key-only (vision) and no mask
    got = np.asarray(layers._attention_cudnn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                             None if m is None else jnp.asarray(m), d**-0.5))
    ref = reference(q, k, v, m, d**-0.5)
    rows = valid[:, :, None, None, None] if m is not None else np.ones_like(ref, bool)
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, ref, 0), rtol=1e-5, atol=1e-5)
  assert seen == ["cudnn"] * 3


def test_attention_impl_choice_and_errors(monkeypatch):
  """auto is XLA off GPUs (and for fp32 on one); cudnn where it cannot run is a clear error."""
  import jax
  from lgrpo_jax.config import ModelConfig
  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  q = jnp.ones((1, 4, 1, 2, 8))
  k = v = jnp.ones((1, 4, 1, 8))
  np.testing.assert_array_equal(np.asarray(layers.attention(q, k, v, None, 0.3, "auto")),
                                np.asarray(layers.attention(q, k, v, None, 0.3, "xla")))
  with pytest.raises(ValueError, match="backend is cpu"):
    layers.attention(q, k, v, None, 0.3, "cudnn")
  with pytest.raises(ValueError, match="choose one of"):
    layers.attention(q, k, v, None, 0.3, "flash")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "bfloat16/float16" in layers.cudnn_supported(jnp.float32, 128)
  assert "head_dim=80" not in (layers.cudnn_supported(jnp.float32, 80) or "")  # dtype is checked first
  with pytest.raises(ConfigError, match="model.attention"):
    ModelConfig(attention="flash")
  cfg = lgrpo_jax.from_config(config_dict("a")).config
  with pytest.raises(ConfigError, match="attention"):
    cfg.replace(attention="flash")


def test_extend_attention_equals_attention_over_the_concatenation():
  """`attention_extend` (the G samples' queries stacked against one prefix) equals plain attention
  over [prefix repeated per sample | own tokens], values and gradients, with a left-padded prefix
  and holes in the samples' own tokens (rows whose own tokens are all holes included)."""
  import jax
  rng = np.random.default_rng(5)
  b, g, t, p, kh, h, d = 2, 3, 6, 7, 2, 2, 8
  r = b * g
  q = jnp.asarray(rng.standard_normal((r, t, kh, h, d)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((r, t, kh, d)), jnp.float32) for _ in range(2))
  pk, pv = (jnp.asarray(rng.standard_normal((b, p, kh, d)), jnp.float32) for _ in range(2))
  prefix_mask = jnp.asarray(np.arange(p)[None] >= np.array([[0], [3]]))  # pair 1 left-padded
  valid = rng.random((r, t)) > 0.3
  valid[1, :] = False  # a sample with every own slot a hole
  own_mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])

  def plain(q, k, v, pk, pv):
    rep = lambda a: jnp.repeat(a, g, axis=0)
    mask = jnp.concatenate([jnp.broadcast_to(rep(prefix_mask)[:, None], (r, t, p)), own_mask], 2)
    return layers.attention(q, jnp.concatenate([rep(pk), k], 1), jnp.concatenate([rep(pv), v], 1), mask, 0.3,
                            "xla")

  split = lambda q, k, v, pk, pv: layers.attention_extend(q, k, v, pk, pv, prefix_mask, own_mask, 0.3)
  split, plain = jax.jit(split), jax.jit(plain)  # one program each (op by op: ~200 small ones)
  args = (q, k, v, pk, pv)
  np.testing.assert_allclose(np.asarray(split(*args)), np.asarray(plain(*args)), rtol=1e-5, atol=1e-5)
  rep = lambda a: np.repeat(np.asarray(a), g, axis=0)
  ref_mask = np.concatenate([np.broadcast_to(rep(prefix_mask)[:, None], (r, t, p)), np.asarray(own_mask)], 2)
  ref = reference(q, np.concatenate([rep(pk), k], 1), np.concatenate([rep(pv), v], 1), ref_mask, 0.3)
  np.testing.assert_allclose(np.asarray(split(*args)), ref, rtol=1e-5, atol=1e-5)
  w = jnp.asarray(rng.standard_normal((r, t, kh, h, d)), jnp.float32)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3, 4)))(*args)
  for got, want in zip(grads(split), grads(plain)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_extend_uses_the_split_path_except_with_cudnn(monkeypatch):
  """Where cuDNN's fused kernel runs, `extend` keeps one flash-attention call over the repeated
  prefix (its scores never reach memory); elsewhere it takes `attention_extend`."""
  from lgrpo_jax.models.qwen2_5_vl import model as model_mod
  m = lgrpo_jax.from_config(config_dict("a"), seed=0)
  cfg = m.config
  b, g, t, p = 1, 2, 3, 4
  e = cfg.text.hidden_size
  _, pk, pv = nnx.jit(lambda m: m.prefill(jnp.ones((b, p, e)), jnp.broadcast_to(jnp.arange(p), (3, b, p)),
                                           jnp.ones((b, p), bool)))(m)
  # A new jit each call: traced afresh, so the patched functions below are what it calls.
  run = lambda: nnx.jit(lambda m: m.extend(jnp.ones((b, g, t, e)), jnp.broadcast_to(p + jnp.arange(t), (b, g, t)),
                                           jnp.ones((b, g, t), bool), pk, pv, jnp.ones((b, p), bool)))(m)
  calls = []
  real_split, real_attention = model_mod.attention_extend, model_mod.attention
  monkeypatch.setattr(model_mod, "attention_extend", lambda *a: calls.append("split") or real_split(*a))
  monkeypatch.setattr(model_mod, "attention", lambda *a: calls.append("concat") or real_attention(*a[:5], "xla"))
  split = np.asarray(run())
  assert set(calls) == {"split"}
  calls.clear()
  monkeypatch.setattr(model_mod, "uses_cudnn", lambda *a: True)
  concat = np.asarray(run())
  assert set(calls) == {"concat"}
  np.testing.assert_allclose(split, concat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated_activation_backward(monkeypatch, act):
  """The gated activation's custom backward (materialised on CPU) gives autodiff's gradients, and
  only CPU takes it."""
  import jax
  rng = np.random.default_rng(2)
  gate, up, w = (jnp.asarray(rng.standard_normal((5, 7)), jnp.float32) for _ in range(3))
  f = layers.activation(act)
  loss = lambda fn: lambda a, b: jnp.sum(fn(a, b) * w)
  ours = jax.grad(loss(lambda a, b: layers.gated_activation(f, a, b)), argnums=(0, 1))
  plain = jax.grad(loss(lambda a, b: f(a) * b), argnums=(0, 1))
  for got, want in zip(ours(gate, up), plain(gate, up)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(layers.gated_activation(f, gate, up)), np.asarray(f(gate) * up))
  barrier = lambda: "optimization_barrier" in str(jax.make_jaxpr(  # a new function each time: no trace cache
      jax.grad(loss(lambda a, b: layers.gated_activation(f, a, b)), argnums=(0, 1)))(gate, up))
  assert barrier()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not barrier()


@pytest.mark.parametrize("in_shape,out_shape", [((6,), (4, 3)), ((4, 3), (5,))])
def test_dense_weight_gradient_backward(monkeypatch, in_shape, out_shape):
  """Dense's CPU backward (`layers.WEIGHT_GRAD_BACKENDS`: dW = xᵀ·g with x on the left) gives
  autodiff's values and gradients for one- and two-axis contractions over 4-D inputs; only CPU
  takes it, and only with at most `WEIGHT_GRAD_MAX_DEVICES` devices."""
  import jax
  from flax import nnx
  dense = layers.Dense(in_shape, out_shape, in_names=(None,) * len(in_shape), out_names=(None,) * len(out_shape),
                       use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  dense.bias.set_value(jnp.asarray(rng.standard_normal(out_shape), jnp.float32))
  x = jnp.asarray(rng.standard_normal((2, 7, *in_shape)), jnp.float32)
  w_out = jnp.asarray(rng.standard_normal((2, 7, *out_shape)), jnp.float32)  # a non-uniform cotangent
  graphdef, params = nnx.split(dense)

  monkeypatch.setattr(layers, "WEIGHT_GRAD_MAX_DEVICES", jax.device_count())  # the tests' 8 CPU devices
  def run(backends):
    monkeypatch.setattr(layers, "WEIGHT_GRAD_BACKENDS", backends)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * w_out)
    custom = "custom_vjp" in str(jax.make_jaxpr(loss)(params, x))
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    return custom, value, jax.tree.leaves(grads)

  custom, value, grads = run(("cpu",))
  plain, want_value, want = run(())
  assert custom and not plain
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  assert len(grads) == 3  # bias, kernel, x
  for got, ref in zip(grads, want):
    assert np.abs(np.asarray(ref)).max() > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
  monkeypatch.setattr(layers, "WEIGHT_GRAD_BACKENDS", ("cpu",))
  traced = lambda: str(jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, x))
  assert "custom_vjp" in traced()
  monkeypatch.setattr(layers, "WEIGHT_GRAD_MAX_DEVICES", jax.device_count() - 1)  # several devices: JAX's rule
  assert "custom_vjp" not in traced()
  monkeypatch.setattr(layers, "WEIGHT_GRAD_MAX_DEVICES", jax.device_count())
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "custom_vjp" not in traced()
