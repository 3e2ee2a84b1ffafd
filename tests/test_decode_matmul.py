"""The Pallas decode matmuls (`kernels.decode_matmul`): on CPU they run under Pallas' interpreter, so
these tests check their arithmetic (RMSNorm prologue, bias / residual / SwiGLU epilogues, split-K
partials, ragged tiles) against the XLA path's, that they pass Pallas' Triton lowering for CUDA at
the 3B shapes without masks on the weight loads (no GPU needed to lower), and that the sampler with
`decode_matmul="pallas"` gives transformers' greedy tokens and the XLA path's sampled tokens, alone
and with the Pallas attention kernel, on one device and on a data × fsdp mesh."""

import re
import zlib

import jax
import jax.numpy as jnp

import numpy as np
import pytest

import lgrpo_jax
from lgrpo_jax import sharding
from lgrpo_jax.kernels.decode_matmul import KINDS, TUNING, Tuning, decode_matmul, set_tuning
from lgrpo_jax.kernels import lower_for_cuda
from lgrpo_jax.models.qwen2_5_vl.config import ConfigError, from_hf_dict
from lgrpo_jax.models.qwen2_5_vl.layers import RMSNorm
from hf_tiny import CASES, assert_same_samples, build_hf, config_dict, hf_generate, make_batch, our_generate

HIGHEST = jax.lax.Precision.HIGHEST


def xla_path(x, w, norm_weight=None, bias=None, residual=None, eps=1e-6):
  """What `DecoderLayer.decode_proj` / `decode_finish` compute with XLA ops, on (M, K) rows."""
  if norm_weight is not None:
    norm = RMSNorm(x.shape[1], eps=eps, param_dtype=norm_weight.dtype)
    norm.weight[...] = norm_weight
    x = norm(x)
  if w.ndim == 3:
    return jax.nn.silu(jnp.dot(x, w[0].T, precision=HIGHEST)) * jnp.dot(x, w[1].T, precision=HIGHEST)
  y = jnp.dot(x, w.T, precision=HIGHEST)
  y = y if bias is None else y + bias
  return y if residual is None else residual + y


FORMS = {  # (gated, norm, bias, residual): the four matmuls of a decoder layer, and a bare one
    "qkv": (False, True, True, False), "o": (False, False, False, True), "gate_up": (True, True, False, False),
    "down": (False, False, False, True), "bare": (False, False, False, False),
    "qkv_prenorm": (False, True, True, False), "gate_up_prenorm": (True, True, False, False),  # Σx² by XLA
    "qkv_ss": (False, True, True, False), "gate_up_ss": (True, True, False, False)}  # Σx² partials handed in


def ss_parts(x, cuts):
  """Σ x² of each row over the column sets cut at `cuts` → (P, M) fp32, as a producer's `return_ss`."""
  x32 = np.asarray(x, np.float32)
  return jnp.asarray(np.stack([np.sum(c * c, axis=1) for c in np.split(x32, cuts, axis=1)]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("m,k,n,split", [(5, 40, 24, 1), (5, 40, 24, 3), (16, 64, 32, 1), (16, 64, 32, 2)])
def test_kernel_equals_xla_path(dtype, form, m, k, n, split):
  """Ragged (5 rows, K 40 and N 24 against 16-wide tiles: masked loads, a split range past K) and
  exact tilings (no masks), split 1 (epilogue in the kernel) and > 1 (fp32 partials summed by XLA)."""
  gated, norm, bias, residual = FORMS[form]
  rng = np.random.default_rng(zlib.crc32(f"{form} {m} {split}".encode()))  # (hash() of a str varies per process)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  x, w = f(m, k), f(2, n, k) if gated else f(n, k)
  kw = dict(norm_weight=f(k) if norm else None, bias=f(n) if bias else None, residual=f(m, n) if residual else None)
  ss = ss_parts(x, [7, 9, 30]) if form.endswith("_ss") else None  # 4 uneven parts: masked to 4 of a block
  got = decode_matmul(x, w, **kw, norm_ss=ss, tuning=Tuning(block_n=16, block_k=16, split=split, prenorm="prenorm" in form))
  want = xla_path(x, w, **kw)
  assert got.shape == (m, n) and got.dtype == jnp.dtype(dtype)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = np.abs(want).max()
  if dtype == "float32":  # the order of fp32 sums
    np.testing.assert_allclose(got, want, atol=2e-6 * scale, rtol=0)
  else:  # bf16 results: equal, or a rounding step apart (2⁻⁷ of the value) where a sum's order tips
    # it (SwiGLU: two, as gate and up may each tip)
    # With a residual the rounding step is the matmul's (x·w is rounded to bf16 before the add), so
    # where the sum cancels to near 0 it is a step of the residual's size (seen: 0.0195 against 0.0156).
    res = np.abs(np.asarray(kw["residual"], np.float32)) if residual else 0.0
    np.testing.assert_array_less(np.abs(got - want), (2**-6 if gated else 2**-7) * (np.abs(want) + res)
                                 + 1e-6 * scale + 1e-30)
    assert np.mean(got == want) > 0.9, np.mean(got == want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n,split", [(5, 40, 24, 1), (5, 40, 24, 3), (16, 64, 48, 1)])
def test_return_ss_gives_each_rows_squares_by_column_block(dtype, m, k, n, split):
  """`return_ss`: y as without it, and Σ y² per row over each block_n-wide column block of y as
  returned (ragged: the last block's columns past N count nothing), or over all of N when split > 1
  (the epilogue runs in XLA). Their sum is what the next RMSNorm needs."""
  rng = np.random.default_rng(m + split)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  x, w, r = f(m, k), f(n, k), f(m, n)
  tuning = Tuning(block_n=16, block_k=16, split=split)
  y, ss = decode_matmul(x, w, residual=r, return_ss=True, tuning=tuning)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(decode_matmul(x, w, residual=r, tuning=tuning), np.float32))
  y32 = np.asarray(y, np.float32)
  want = ss_parts(y, list(range(16, n, 16)) if split == 1 else [])
  assert ss.shape == want.shape == ((n + 15) // 16 if split == 1 else 1, m) and ss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ss), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ss).sum(0), np.sum(y32 * y32, axis=1), rtol=1e-6)


def test_bad_shapes_and_tunings_are_refused():
  x = jnp.zeros((4, 32))
  with pytest.raises(ValueError, match=r"weight \(16, 24\) does not take x \(4, 32\)"):
    decode_matmul(x, jnp.zeros((16, 24)))
  with pytest.raises(ValueError, match=r"bias \(8,\), want \(16,\)"):
    decode_matmul(x, jnp.zeros((16, 32)), bias=jnp.zeros(8))
  with pytest.raises(ValueError, match="gated .* takes no bias or residual"):
    decode_matmul(x, jnp.zeros((2, 16, 32)), residual=jnp.zeros((4, 16)))
  with pytest.raises(ValueError, match="gated .* returns no"):
    decode_matmul(x, jnp.zeros((2, 16, 32)), return_ss=True)
  with pytest.raises(ValueError, match=r"norm_ss \(3, 5\) float32 wants norm_weight and shape \(P, 4\)"):
    decode_matmul(x, jnp.zeros((16, 32)), norm_weight=jnp.ones(32), norm_ss=jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="wants norm_weight"):
    decode_matmul(x, jnp.zeros((16, 32)), norm_ss=jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="block_k=48 must be a power of two"):
    decode_matmul(x, jnp.zeros((16, 32)), tuning=Tuning(block_k=48))
  with pytest.raises(ValueError, match="kind='mlp' must be one of"):
    set_tuning("mlp", Tuning())


E, I, N_QKV = 2048, 11008, 2560  # the 3B decoder: hidden, MLP width, q/k/v columns (2 kv heads × 10 × 128)


def lower_3b(kind, tuning=None, debug=False, ss=0, ret_ss=False):
  """The `kind` matmul of the 3B decode step at 32 rows, lowered for CUDA → StableHLO text. `ss`: hand
  in that many Σx² partials; `ret_ss`: ask for the Σy² partials."""
  sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  x_k, w, extra = {"qkv": (E, (N_QKV, E), dict(norm_weight=(E,), bias=(N_QKV,))),
                   "o": (E, (E, E), dict(residual=(32, E))),
                   "gate_up": (E, (2, I, E), dict(norm_weight=(E,))),
                   "down": (I, (E, I), dict(residual=(32, E)))}[kind]
  dtypes = {"norm_ss": jnp.float32}
  if ss:
    extra["norm_ss"] = (ss, 32)
  names = list(extra)
  fn = lambda x, w, *a: decode_matmul(x, w, **dict(zip(names, a)), kind=kind, tuning=tuning, interpret=False,
                                      return_ss=ret_ss, debug=debug)
  args = (sds((32, x_k), bf), sds(w, bf), *(sds(s, dtypes.get(nm, bf)) for nm, s in extra.items()))
  return lower_for_cuda(fn, *args).as_text()


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_lower_to_triton_at_3b_shapes_without_masked_weight_loads(kind, capsys):
  """One Triton call per matmul, grid (row blocks, N / block_n, split) from the kind's tuning; with
  every 3B dimension a multiple of the tiles the weight loads carry no mask (a mask along K would
  cost Triton its vector loads: the difference between streaming the weights and not)."""
  text = lower_3b(kind, debug=True)
  assert re.findall(r"custom_call @(\S+?)\(", text) == ["__gpu$xla.gpu.triton"]
  t = TUNING[kind]
  n = {"qkv": N_QKV, "gate_up": I}.get(kind, E)
  assert re.findall(r"grid_[xyz] = (\d+)", text) == ["1", str(n // t.block_n), str(t.split)]
  ir = capsys.readouterr().out
  weight_loads = [line for line in ir.splitlines() if re.search(rf"tt.load .*tensor<{t.block_n}x{t.block_k}x", line)]
  assert len(weight_loads) == (2 if kind == "gate_up" else 1), weight_loads
  norm_pass = [line for line in ir.splitlines() if "scf.for" in line and "-> (tensor<32xf32>)" in line]
  assert len(norm_pass) == (1 if kind in ("qkv", "gate_up") else 0), norm_pass  # the Σx² loop
  for line in weight_loads:
    assert re.search(r"tt.load %\w+ :", line), line  # the pointer alone: no mask, no fill value
  dots = [line for line in ir.splitlines() if "tt.dot " in line]
  assert len(dots) == len(weight_loads) and all("xbf16> * tensor<" in d and "xf32>" in d for d in dots)


def test_prenorm_and_norm_ss_replace_the_pass_in_the_kernel(capsys):
  """`Tuning.prenorm`: no Σx² loop in the kernel; one XLA reduction before it, its (1, M) fp32 result an
  operand of the Triton call. `norm_ss` (a producer's partials): no loop and no reduction either."""
  norm_pass = lambda ir: [line for line in ir.splitlines() if "scf.for" in line and "-> (tensor<32xf32>)" in line]
  text = lower_3b("qkv", Tuning(block_n=16, prenorm=True), debug=True)
  assert not norm_pass(capsys.readouterr().out)
  assert re.search(r"stablehlo.reduce.*\n?.*tensor<32xf32>", text) and "tensor<1x32xf32>, tensor<2560xbf16>" in text
  text = lower_3b("gate_up", ss=128, debug=True)
  ir = capsys.readouterr().out
  assert not norm_pass(ir) and "stablehlo.reduce" not in text and "tensor<128x32xf32>" in text
  assert re.search(r"tt.load .*tensor<128x32x", ir), "the partials are loaded as one (P, rows) block"


def test_return_ss_is_a_second_output_of_the_triton_call(capsys):
  """The producer's Σy² partials come out of the same Triton call (no XLA reduction), (N / block_n, M)."""
  text = lower_3b("down", ret_ss=True, debug=True)
  ir = capsys.readouterr().out
  assert re.findall(r"custom_call @(\S+?)\(", text) == ["__gpu$xla.gpu.triton"] and "stablehlo.reduce" not in text
  assert re.search(r"-> \(tensor<32x2048xbf16>, tensor<%dx32xf32>\)" % (E // TUNING["down"].block_n), text), text[-600:]
  assert len([line for line in ir.splitlines() if "tt.store" in line]) == 2


def test_tuning_reaches_the_triton_call():
  previous = set_tuning("down", Tuning(block_n=32, block_k=128, split=4, num_warps=8, num_stages=4))
  try:
    text = lower_3b("down")
    assert re.findall(r"grid_[xyz] = (\d+)", text) == ["1", "64", "4"]
    assert "num_warps = 8 " in text and "num_stages = 4 " in text
  finally:
    set_tuning("down", previous)
  assert f"num_warps = {previous.num_warps} " in lower_3b("down")


def test_fp32_weights_multiply_in_ieee_fp32(capsys):
  """fp32 models multiply in IEEE fp32 as the XLA path does (HIGHEST), not Triton's default TF32."""
  sds = jax.ShapeDtypeStruct
  fn = lambda x, w: decode_matmul(x, w, tuning=Tuning(), interpret=False, debug=True)
  lower_for_cuda(fn, sds((8, 64), jnp.float32), sds((64, 64), jnp.float32))
  dots = [line for line in capsys.readouterr().out.splitlines() if "tt.dot " in line]
  assert len(dots) == 1 and "xf32> * tensor<" in dots[0] and "tf32" not in dots[0], dots


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = build_hf(config_dict("a"), seed=7)
  path = tmp_path_factory.mktemp("pallas_matmul")
  hf.save_pretrained(path)
  return hf, path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_with_k_major_weights_equals_xla_weights(tiny, dtype):
  """`decode_proj` / `decode_finish` with the (N, K) weights and the kernels = with the XLA weights; the
  next layer's q/k/v from `decode_finish`'s Σx² partials = from its own norm."""
  _, path = tiny
  layer = lgrpo_jax.load_hf(path, dtype=dtype).unstacked_layers()[1]
  w, wk = layer.decode_weights(), layer.decode_weights(k_major=True)
  rng = np.random.default_rng(0)
  b, g, e = 2, 3, w.qkv.shape[0]
  x = jnp.asarray(rng.standard_normal((b, g, e)), dtype)
  tol = 2e-6 if dtype == "float32" else 2e-2
  y, yk = layer.decode_proj(x, w), layer.decode_proj(x, wk)
  assert yk.shape == y.shape and yk.dtype == y.dtype
  np.testing.assert_allclose(np.asarray(yk, np.float32), np.asarray(y, np.float32), atol=tol, rtol=tol)
  o = y[..., :layer.groups, :]  # any (B, G, K, h, D) input will do for the output half
  out, ss = layer.decode_finish(x, o, wk, return_ss=True)
  assert layer.decode_finish(x, o, w, return_ss=True)[1] is None  # the XLA path has no partials
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(layer.decode_finish(x, o, w), np.float32),
                             atol=tol, rtol=tol)
  assert ss.shape[1:] == (b, g) and ss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(layer.decode_proj(out, wk, ss), np.float32),
                             np.asarray(layer.decode_proj(out, w), np.float32), atol=tol, rtol=tol)


def generate(model, batch, **kw):
  return our_generate(model, batch, max_new_tokens=8, **kw)


def test_sampler_with_kernels_equals_transformers_and_xla_path(tiny):
  hf, path = tiny
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  ref = hf_generate(hf, batch, 8)
  xla = lgrpo_jax.load_hf(path, dtype="float32")
  want = generate(xla, batch, num_samples=4, temperature=0.9, seed=3)
  for attention in ("xla", "pallas"):  # the matmul kernels alone, and the whole Pallas decode layer
    pallas = lgrpo_jax.load_hf(path, dtype="float32").set_decode_matmul("pallas").set_decode_attention(attention)
    np.testing.assert_array_equal(np.asarray(generate(pallas, batch).tokens), ref)
    got = generate(pallas, batch, num_samples=4, temperature=0.9, seed=3)
    assert_same_samples(got, want)
  # data × fsdp mesh: each device runs the kernels on its rows (shard_map), weights replicated.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
  sharded = lgrpo_jax.load_hf(path, mesh=mesh, dtype="float32").set_decode_matmul("pallas")
  with jax.set_mesh(mesh):
    got_mesh = generate(sharded, batch, num_samples=4, temperature=0.9, seed=3)
  assert_same_samples(got_mesh, want)
  # A tensor-parallel mesh is refused with the reason, not run wrongly.
  mesh_tp = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  tp = lgrpo_jax.load_hf(path, mesh=mesh_tp, dtype="float32").set_decode_matmul("pallas")
  with jax.set_mesh(mesh_tp), pytest.raises(ValueError, match="data/fsdp meshes only; this mesh has tensor=2"):
    generate(tp, batch, num_samples=4, temperature=0.9, seed=3)


def test_config_rejects_bad_decode_matmul(tiny):
  _, path = tiny
  with pytest.raises(ConfigError, match="decode_matmul='cublas' must be one of"):
    lgrpo_jax.load_hf(path, dtype="float32").set_decode_matmul("cublas")
  gelu = from_hf_dict(config_dict("a", text_config={"hidden_act": "gelu"}))
  with pytest.raises(ConfigError, match="folds in SwiGLU with silu; .*hidden_act is 'gelu'"):
    gelu.replace(decode_matmul="pallas")
  from lgrpo_jax.config import ModelConfig
  with pytest.raises(ConfigError, match="model.decode_matmul='triton'"):
    ModelConfig(decode_matmul="triton")
