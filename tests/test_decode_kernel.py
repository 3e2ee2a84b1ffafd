"""The Pallas decode-attention kernel (`kernels.decode_attention`): on CPU it runs under Pallas'
interpreter, so these tests check its arithmetic and cache writes against the XLA path and a
float64 reference, that it passes Pallas' Triton lowering for CUDA at the 3B shapes (no GPU needed
to lower), and that the sampler with `decode_attention="pallas"` gives transformers' greedy tokens
and the XLA path's sampled tokens, on one device and on a data × fsdp × tensor mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgrpo_jax
from lgrpo_jax import sharding
from lgrpo_jax.kernels.decode_attention import Tuning, check_shapes, decode_attention, set_tuning
from lgrpo_jax.kernels import lower_for_cuda
from lgrpo_jax.models.qwen2_5_vl.config import ConfigError, from_hf_dict
from lgrpo_jax.models.qwen2_5_vl.layers import apply_rotary, attention_decode
from hf_tiny import CASES, assert_same_samples, build_hf, config_dict, hf_generate, make_batch, our_generate

to_bk = lambda a: jnp.swapaxes(a, 1, 2)


def random_inputs(b, g, kh, h, d, p, n, dtype, seed=0, pad=(5, 0)):
  """The kernel's inputs: the fused projection (B, G, K, h+2, D) before rotary, each sample's rotary
  row for the new token (real frequencies at random positions), the prefix and the suffix caches."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  prefix_mask = jnp.asarray(np.arange(p)[None, :] >= np.asarray(pad)[:b, None])  # left padding
  angle = rng.integers(0, 3000, (b, g, 1)) * (1e6 ** -(np.arange(0, d, 2) / d))
  angle = np.concatenate([angle, angle], -1)  # halves repeat, as rope.text_rotary builds them
  return dict(qkv=f(b, g, kh, h + 2, d), cos=jnp.asarray(np.cos(angle), jnp.float32),
              sin=jnp.asarray(np.sin(angle), jnp.float32), pk=f(b, kh, p, d), pv=f(b, kh, p, d),
              pm=prefix_mask, sk=f(b, kh, g, n, d), sv=f(b, kh, g, n, d))


def rotated(x):
  """What the XLA decode path makes of the projection: rotated q (B, G, K, h, D), k and v (B, G, K, D)."""
  y, c, s = x["qkv"], x["cos"][:, :, None], x["sin"][:, :, None]
  h = y.shape[3] - 2
  return apply_rotary(y[..., :h, :], c[..., None, :], s[..., None, :]), apply_rotary(y[..., h, :], c, s), y[..., h + 1, :]


def reference_f64(x, step, scale):
  """Rotary, then softmax over [real prefix slots | own slots < step | the new token], in float64."""
  a = {k: np.asarray(v, np.float64) for k, v in x.items()}
  b, g, kh, j, d = a["qkv"].shape
  h = j - 2
  half = d // 2
  rot = lambda y, c, s: y * c + np.concatenate([-y[..., half:], y[..., :half]], -1) * s
  out = np.zeros((b, g, kh, h, d))
  for bi in range(b):
    for gi in range(g):
      c, s = a["cos"][bi, gi], a["sin"][bi, gi]
      for ki in range(kh):
        y = a["qkv"][bi, gi, ki]
        q, k_new, v_new = rot(y[:h], c, s), rot(y[h], c, s), y[h + 1]
        keys = np.concatenate([a["pk"][bi, ki][np.asarray(x["pm"][bi])], a["sk"][bi, ki, gi, :step], k_new[None]])
        vals = np.concatenate([a["pv"][bi, ki][np.asarray(x["pm"][bi])], a["sv"][bi, ki, gi, :step], v_new[None]])
        sc = q @ keys.T * scale
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        out[bi, gi, ki] = (pr / pr.sum(-1, keepdims=True)) @ vals
  return out


def xla_path(x, step, scale):
  """What `decode_step` does without the kernel: rotary, write the slot, then `attention_decode`."""
  q, k, v = rotated(x)
  sk = x["sk"].at[:, :, :, step].set(to_bk(k))
  sv = x["sv"].at[:, :, :, step].set(to_bk(v))
  own = jnp.arange(x["sk"].shape[3]) <= step
  return to_bk(attention_decode(to_bk(q), x["pk"], x["pv"], x["pm"], sk, sv, own, scale)), sk, sv


def run_kernel(x, step, scale, block):
  return decode_attention(x["qkv"], x["cos"], x["sin"], x["pk"], x["pv"], x["pm"].astype(jnp.int32), x["sk"],
                          x["sv"], step, scale=scale, tuning=Tuning(block=block))


def assert_cache_write(got, want, before, step, rtol):
  """Slot `step` holds the rotated key (the rotary's two products may be fused differently than in
  XLA's fusion: 1 ulp), every other slot is untouched (bit for bit)."""
  got, want, before = (np.asarray(a, np.float32) for a in (got, want, before))
  np.testing.assert_allclose(got[:, :, :, step], want[:, :, :, step], rtol=rtol, atol=rtol)
  assert not np.allclose(got[:, :, :, step], before[:, :, :, step])
  keep = np.arange(got.shape[3]) != step
  np.testing.assert_array_equal(got[:, :, :, keep], before[:, :, :, keep])


# (P, N, step, block): P not a multiple of the block and a first prefix block that is all padding;
# step 0 (no own slots yet), a step on a block boundary, the last slot.
SHAPES = [(37, 40, 21, 16), (37, 40, 0, 16), (20, 48, 32, 16), (64, 33, 32, 32)]


@pytest.mark.parametrize("p,n,step,block", SHAPES)
def test_kernel_equals_reference_and_xla_path_fp32(p, n, step, block):
  x = random_inputs(2, 3, 2, 2, 16, p, n, jnp.float32, pad=(17, 0))
  scale = 16**-0.5
  o, sk, sv = run_kernel(x, step, scale, block)
  ref_o, ref_sk, ref_sv = xla_path(x, step, scale)
  np.testing.assert_allclose(np.asarray(o), reference_f64(x, step, scale), atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref_o), atol=2e-6, rtol=2e-6)
  assert_cache_write(sk, ref_sk, x["sk"], step, 1e-6)
  np.testing.assert_array_equal(np.asarray(sv), np.asarray(ref_sv))  # the value is not rotated: exact


def test_kernel_bf16_and_more_query_heads_than_rows():
  """bf16 with h = 32 query heads per kv head (more than the 16-row minimum) and D = 32."""
  x = random_inputs(1, 2, 1, 32, 32, 50, 24, jnp.bfloat16, seed=1, pad=(3,))
  scale = 32**-0.5
  o, sk, _ = run_kernel(x, 9, scale, 16)
  ref_o, ref_sk, _ = xla_path(x, 9, scale)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref_o, np.float32), atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(o, np.float32), reference_f64(x, 9, scale), atol=3e-2, rtol=3e-2)
  assert_cache_write(sk, ref_sk, x["sk"], 9, 1e-2)


def test_kernel_lowers_to_triton_for_cuda_at_3b_shapes():
  """Pallas' Triton lowering (block shapes, ops, the dynamic own-slot loop) at the 3B decode's
  shapes: 4 prompts × 8 samples, 2 kv heads × 8 query heads, D 128, prompt 644, 256 slots."""
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  f32 = jnp.float32
  args = (sds((4, 8, 2, 10, 128), bf), sds((4, 8, 128), f32), sds((4, 8, 128), f32),
          sds((4, 2, 644, 128), bf), sds((4, 2, 644, 128), bf), sds((4, 644), jnp.int32),
          sds((4, 2, 8, 256, 128), bf), sds((4, 2, 8, 256, 128), bf), sds((), jnp.int32))
  fn = lambda *a: decode_attention(*a, scale=128**-0.5, interpret=False)
  text = lower_for_cuda(fn, *args).as_text()
  calls = re.findall(r"custom_call @(\S+?)\(", text)
  assert calls == ["__gpu$xla.gpu.triton"], calls
  assert "grid_x = 4" in text and "grid_y = 8" in text and "grid_z = 2" in text


def test_tuning_reaches_the_triton_call_and_bad_blocks_are_refused():
  """`set_tuning` (what bench/gpu.py's sweep picks) is what the next traced kernel launches with."""
  sds, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  args = (sds((2, 2, 1, 6, 64), bf), sds((2, 2, 64), f32), sds((2, 2, 64), f32), sds((2, 1, 40, 64), bf),
          sds((2, 1, 40, 64), bf), sds((2, 40), jnp.int32), sds((2, 1, 2, 16, 64), bf), sds((2, 1, 2, 16, 64), bf),
          sds((), jnp.int32))
  lower = lambda: lower_for_cuda(lambda *a: decode_attention(*a, scale=0.125, interpret=False), *args).as_text()
  previous = set_tuning(Tuning(block=32, num_warps=8, num_stages=3))
  try:
    text = lower()
    assert "num_warps = 8 " in text and "num_stages = 3 " in text
  finally:
    assert set_tuning(previous) == Tuning(block=32, num_warps=8, num_stages=3)
  assert "num_warps = 4 " in lower() and "num_stages = 2 " in lower()
  with pytest.raises(ValueError, match="block=24 must be a power of two"):
    set_tuning(Tuning(block=24))


@pytest.mark.parametrize("dtype,want", [("float32", "ieee"), ("bfloat16", "bf16")])
def test_triton_products_keep_the_xla_paths_precision(dtype, want, capsys):
  """fp32 caches multiply in IEEE fp32 as the XLA path does (HIGHEST), not Triton's default TF32."""
  sds, dt = jax.ShapeDtypeStruct, jnp.dtype(dtype)
  f32 = jnp.float32
  args = (sds((1, 2, 1, 4, 16), dt), sds((1, 2, 16), f32), sds((1, 2, 16), f32), sds((1, 1, 20, 16), dt),
          sds((1, 1, 20, 16), dt), sds((1, 20), jnp.int32), sds((1, 1, 2, 8, 16), dt), sds((1, 1, 2, 8, 16), dt),
          sds((), jnp.int32))
  fn = lambda *a: decode_attention(*a, scale=0.25, tuning=Tuning(block=16), interpret=False, debug=True)
  lower_for_cuda(fn, *args)
  dots = [line for line in capsys.readouterr().out.splitlines() if "tt.dot " in line]
  assert len(dots) == 4, dots  # q·kᵀ and p·v, in the prefix and the own-slot loops
  for line in dots:
    operands = line.split(" -> ")[0]
    if want == "ieee":  # fp32 operands, no TF32 rounding (IEEE is tt.dot's default, so not printed)
      assert "tensor<16x16xf32> * tensor<16x16xf32>" in operands and "tf32" not in line
    else:  # bf16 operands into an fp32 accumulator (the precision attribute is moot for bf16)
      assert "xbf16> * tensor<16x16xbf16>" in operands and "-> tensor<16x16xf32>" in line


def test_shape_checks():
  assert check_shapes(128) is None and check_shapes(16) is None
  assert "power of two" in check_shapes(8) and "power of two" in check_shapes(96)
  assert "block" in check_shapes(64, block=8)
  with pytest.raises(ValueError, match="head_dim=8"):
    x = random_inputs(1, 1, 1, 2, 8, 16, 16, jnp.float32)
    run_kernel(x, 0, 1.0, 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = build_hf(config_dict("a"), seed=5)
  path = tmp_path_factory.mktemp("pallas_decode")
  hf.save_pretrained(path)
  return hf, path


def generate(model, batch, **kw):
  return our_generate(model, batch, max_new_tokens=10, **kw)


def test_sampler_with_kernel_equals_transformers_and_xla_path(tiny):
  hf, path = tiny
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  ref = hf_generate(hf, batch, 10)
  xla = lgrpo_jax.load_hf(path, dtype="float32")
  pallas = lgrpo_jax.load_hf(path, dtype="float32").set_decode_attention("pallas")
  np.testing.assert_array_equal(np.asarray(generate(pallas, batch).tokens), ref)
  want = generate(xla, batch, num_samples=4, temperature=0.9, seed=3)
  got = generate(pallas, batch, num_samples=4, temperature=0.9, seed=3)
  assert_same_samples(got, want)
  # On a mesh that splits the prompts (data), the samples (fsdp) and the kv heads (tensor), the
  # kernel runs per device on its shards (shard_map) and gives the same tokens.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = lgrpo_jax.load_hf(path, mesh=mesh, dtype="float32").set_decode_attention("pallas")
  with jax.set_mesh(mesh):
    spec = sharding.active_spec(("batch", "kv_heads", "batch", "length", "head_dim"), (2, 2, 4, 10, 16))
    assert tuple(spec)[:3] == ("data", "tensor", "fsdp"), spec
    got_mesh = generate(sharded, batch, num_samples=4, temperature=0.9, seed=3)
  assert_same_samples(got_mesh, want)


def test_config_rejects_bad_decode_attention(tiny):
  _, path = tiny
  model = lgrpo_jax.load_hf(path, dtype="float32")
  with pytest.raises(ConfigError, match="decode_attention='flash'"):
    model.set_decode_attention("flash")
  small = config_dict("a", text_config={"hidden_size": 32, "rope_parameters": {"mrope_section": [2, 1, 1]}})
  cfg = from_hf_dict(small)  # head_dim 8: valid for the model, too small for the MMA
  assert cfg.text.head_dim == 8
  with pytest.raises(ConfigError, match="head_dim=8 must be a power of two"):
    cfg.replace(decode_attention="pallas")
  from lgrpo_jax.config import ModelConfig
  with pytest.raises(ConfigError, match="model.decode_attention='triton'"):
    ModelConfig(decode_attention="triton")
