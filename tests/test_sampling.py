"""The rollout sampler: greedy decoding equals transformers' generate token for token; EOS and stop
sequences end rows independently; sampler log-probs equal a teacher-forced recomputation; the
first-token distribution under temperature / top-k / top-p matches the reference probabilities;
sharded sampling gives the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import lgrpo_jax
from lgrpo_jax import sharding
from lgrpo_jax.models.qwen2_5_vl import get_rope_index
from lgrpo_jax.sampling import SamplingConfig
from hf_tiny import (CASES, PAD, assert_same_samples, build_hf, config_dict, hf_generate, hf_logits, make_batch,
                     our_generate, ours_inputs)

N = 10
GEN_CASES = ["one_image_windows", "two_images_sizes", "left_padded_batch", "two_rows_two_images", "long_300"]


@pytest.fixture(scope="module", params=["a", "b"])
def pair(request, tmp_path_factory):
  hf = build_hf(config_dict(request.param), seed=5)
  path = tmp_path_factory.mktemp(f"gen_{request.param}")
  hf.save_pretrained(path)
  return hf, lgrpo_jax.load_hf(path, dtype="float32"), path


@pytest.mark.parametrize("case", GEN_CASES)
def test_greedy_equals_transformers_generate(pair, case):
  hf, ours, _ = pair
  batch = make_batch(CASES[case], seed=11)
  ref = hf_generate(hf, batch, N)
  out = our_generate(ours, batch, max_new_tokens=N)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  assert np.asarray(out.mask).all() and int(out.steps) == N


def test_eos_and_stop_sequences_end_rows_independently(pair):
  hf, ours, _ = pair
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  free = hf_generate(hf, batch, N)
  # EOS: the first token that row 0 writes for the first time at step ≥ 2; transformers pads
  # finished rows the same way (and trims the columns after every row has finished).
  j = next(j for j in range(2, N) if free[0, j] not in free[0, :j])
  eos = int(free[0, j])
  ref = hf_generate(hf, batch, N, eos=eos)
  out = our_generate(ours, batch, max_new_tokens=N, eos_token_id=eos)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :ref.shape[1]], ref)
  assert (np.asarray(out.tokens)[:, ref.shape[1]:] == PAD).all()
  for r in range(2):
    hits = np.flatnonzero(free[r] == eos)
    length = hits[0] + 1 if len(hits) else N
    assert int(out.lengths[r]) == length
    assert bool(out.ended[r]) == bool(len(hits))  # else truncated at N
    np.testing.assert_array_equal(np.asarray(out.mask[r]), np.arange(N) < length)
  # A two-token stop sequence taken from row 1 stops row 1 there and leaves row 0 alone.
  seq = (int(free[1, 4]), int(free[1, 5]))
  out = our_generate(ours, batch, max_new_tokens=N, stop_sequences=[seq])
  for r in range(2):
    ends = [j for j in range(1, N) if (free[r, j - 1], free[r, j]) == seq]
    length = ends[0] + 1 if ends else N
    assert int(out.lengths[r]) == length and bool(out.ended[r]) == bool(ends)
    np.testing.assert_array_equal(np.asarray(out.tokens[r, :length]), free[r, :length])
    assert (np.asarray(out.tokens[r, length:]) == PAD).all()
  # Early exit: once every row has stopped the loop ends.
  out = our_generate(ours, batch, max_new_tokens=N, eos_token_id=[int(free[0, 2]), int(free[1, 2])])
  assert int(out.steps) <= 3 and np.asarray(out.lengths).max() <= 3 and np.asarray(out.ended).all()


def test_default_end_ids_are_generation_config_json_s_as_in_transformers(pair, tmp_path):
  """Without `eos_token_id`, `generate` stops where transformers' `generate` does: on the ids of
  generation_config.json (Qwen2.5-VL-Instruct lists two; config.json names one); and an export
  writes them back."""
  import json
  import shutil

  from transformers import Qwen2_5_VLForConditionalGeneration
  hf, _, path = pair
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  free = hf_generate(hf, batch, N)
  second = int(free[0, 3])  # a token row 0 writes: the second end id
  d = tmp_path / "two_ends"
  shutil.copytree(path, d)
  json.dump({"bos_token_id": 1, "eos_token_id": [2, second], "pad_token_id": PAD}, open(d / "generation_config.json", "w"))
  with torch.no_grad():
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval().generate(
        **{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=N, do_sample=False)
  ref = ref[:, batch["input_ids"].shape[1]:].numpy()
  ours = lgrpo_jax.load_hf(d, dtype="float32")
  assert ours.config.generation_eos_token_id == (2, second)
  out = lgrpo_jax.generate(ours, **ours_inputs(batch), max_new_tokens=N, pad_token_id=PAD)
  assert int(out.lengths[0]) == list(free[0]).index(second) + 1 < N  # it stopped there
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :ref.shape[1]], ref)
  lgrpo_jax.save_hf(ours, tmp_path / "exported")
  assert json.load(open(tmp_path / "exported" / "generation_config.json"))["eos_token_id"] == [2, second]


def test_sampler_logprobs_equal_teacher_forced_recomputation(pair):
  _, ours, _ = pair
  batch = make_batch(CASES["left_padded_batch"], seed=2)
  g, t = 3, 0.7
  out = our_generate(ours, batch, max_new_tokens=N, temperature=t, top_k=20, top_p=0.9, num_samples=g, seed=4)
  tokens, logp = np.asarray(out.tokens), np.asarray(out.logprobs)
  # Teacher forcing: one causal forward over [prompt | completion] (no cache). Completion tokens
  # are text even when the model wrote an <|image_pad|> id, so embed the two parts separately.
  rep = lambda x: np.repeat(x, g, axis=0)
  ids, mask = rep(batch["input_ids"]), rep(batch["attention_mask"])
  grids = batch["image_grid_thw"]
  per_img = np.split(batch["pixel_values"], np.cumsum([int(np.prod(x)) for x in grids])[:-1])
  rows_per_prompt = len(grids) // len(batch["input_ids"])  # one image per prompt in this case
  order = [b * rows_per_prompt + i for b in range(len(batch["input_ids"])) for _ in range(g)
           for i in range(rows_per_prompt)]
  grid_rep = tuple(tuple(int(v) for v in grids[i]) for i in order)

  @nnx.jit  # one program (op by op it compiled ~300)
  def teacher_forced(m, ids, mask, pixels, tokens):
    feats = m.image_features(pixels, grid_rep)
    pos, _ = get_rope_index(ids, mask, grid_rep, m.config)
    comp_pos = jnp.max(pos, axis=(0, 2))[:, None] + 1 + jnp.arange(tokens.shape[1])
    x = jnp.concatenate([m.embed(ids, feats), m.embed(tokens)], 1)
    positions = jnp.concatenate([pos, jnp.broadcast_to(comp_pos, (3, *comp_pos.shape))], 2)
    return m.logits(m.decode(x, positions, jnp.concatenate([mask, jnp.ones_like(tokens)], 1)))

  logits = np.asarray(teacher_forced(ours, jnp.asarray(ids), jnp.asarray(mask),
                                     jnp.concatenate([per_img[i] for i in order]), jnp.asarray(tokens)), np.float64)
  p = batch["input_ids"].shape[1]
  scaled = logits[:, p - 1:-1] / t
  ref = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - scaled.max(-1, keepdims=True)
  ref_tok = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, ref_tok, atol=1e-5, rtol=1e-5)
  # Samples of one prompt differ (they are not G copies of one draw).
  assert len({tuple(r) for r in tokens[:g]}) > 1


def reference_first_token_probs(hf, batch, t, top_k, top_p):
  """An independent numpy implementation of temperature → top-k → top-p on transformers' logits."""
  logits = hf_logits(hf, batch)[0, -1].astype(np.float64) / t
  keep = np.ones_like(logits, bool)
  if top_k:
    keep &= logits >= np.sort(logits)[-top_k]
  probs = np.exp(logits - logits.max()) * keep
  probs /= probs.sum()
  if top_p < 1:
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    keep2 = np.zeros_like(keep)
    keep2[order[before < top_p]] = True
    probs = probs * keep2
    probs /= probs.sum()
  return probs


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, 0, 1.0), (0.6, 12, 1.0), (1.3, 0, 0.7), (0.8, 30, 0.8)])
def test_first_token_distribution_matches_reference(pair, t, top_k, top_p):
  hf, ours, _ = pair
  batch = make_batch(CASES["one_image_windows"], seed=8)
  probs = reference_first_token_probs(hf, batch, t, top_k, top_p)
  n = 6000
  out = our_generate(ours, batch, max_new_tokens=1, temperature=t, top_k=top_k, top_p=top_p,
                     num_samples=n, seed=1)
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=len(probs))
  assert counts[probs == 0].sum() == 0  # filtered tokens never drawn
  support = probs > 0
  expected = n * probs[support]
  chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
  df = int(support.sum()) - 1
  assert chi2 < df + 6 * np.sqrt(2 * df) + 10, (chi2, df)


def test_sampling_config_rejects_bad_values():
  for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0),
              dict(stop_sequences=((),))):
    with pytest.raises(ValueError, match="SamplingConfig"):
      SamplingConfig(**bad)


def test_sharded_sampling_gives_the_same_tokens(pair):
  hf, ours, path = pair
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  ref = our_generate(ours, batch, max_new_tokens=N, num_samples=4, temperature=0.9, seed=3)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  model = lgrpo_jax.load_hf(path, mesh=mesh, dtype="float32")
  with jax.set_mesh(mesh):
    got = our_generate(model, batch, max_new_tokens=N, num_samples=4, temperature=0.9, seed=3)
    greedy = our_generate(model, batch, max_new_tokens=N)
  assert_same_samples(got, ref)
  np.testing.assert_array_equal(np.asarray(greedy.tokens), hf_generate(hf, batch, N))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_weights_give_the_layer_outputs(pair, dtype):
  """The decode loop's fused q/k/v and gate/up kernels compute what the layer's own projections do."""
  _, _, path = pair
  model = lgrpo_jax.load_hf(path, dtype=dtype)
  layer = model.unstacked_layers()[1]
  w = layer.decode_weights()
  assert w.qkv.dtype == jnp.dtype(dtype) and w.gate_up.shape[1] == 2
  rng = np.random.default_rng(0)
  b, g, e = 2, 3, model.config.text.hidden_size
  x = jnp.asarray(rng.standard_normal((b, g, e)), dtype)
  ang = jnp.asarray(rng.standard_normal((b, g, layer.head_dim)), jnp.float32)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  q, k, v = layer.qkv(x, cos, sin)
  fq, fk, fv = layer.decode_qkv(x, cos, sin, w)
  tol = 1e-6 if dtype == "float32" else 1e-2
  for got, ref in ((fq, q), (fk, k), (fv, v)):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(layer.decode_finish(x, q, w), np.float32),
                             np.asarray(layer.finish(x, q), np.float32), atol=tol, rtol=tol)


def test_cpu_cache_layout_with_transposed_keys_gives_the_same_rollout(pair, monkeypatch):
  """On CPU the XLA decode path stores keys (…, D, slots) (cache.KEYS_TRANSPOSED_BACKENDS); the
  (…, slots, D) layout that GPUs use gives the same tokens and log-probs."""
  from lgrpo_jax.models.qwen2_5_vl import model as model_module
  _, ours, _ = pair
  batch = make_batch(CASES["left_padded_batch"], seed=11)
  shapes = lambda m: jax.eval_shape(lambda: m.new_cache(
      jnp.zeros((2, 2, 7, 2, 16)), jnp.zeros((2, 2, 7, 2, 16)), jnp.ones((2, 7), bool), 3, 5))
  kw = dict(max_new_tokens=N, num_samples=4, temperature=0.9, seed=3)
  assert ours.decode_keys_transposed()
  c = shapes(ours)
  assert c.prefix_k[0].shape == (2, 2, 16, 7) and c.suffix_k[0].shape == (2, 2, 3, 16, 5)
  assert c.prefix_v[0].shape == (2, 2, 7, 16) and c.suffix_v[0].shape == (2, 2, 3, 5, 16)
  transposed = our_generate(ours, batch, **kw)
  monkeypatch.setattr(model_module, "KEYS_TRANSPOSED_BACKENDS", ())
  jax.clear_caches()  # the layout is read at trace time: trace the rollout again
  assert not ours.decode_keys_transposed() and shapes(ours).suffix_k[0].shape == (2, 2, 3, 5, 16)
  plain = our_generate(ours, batch, **kw)
  monkeypatch.undo()
  jax.clear_caches()  # later tests trace this backend's own layout again
  assert_same_samples(transposed, plain)
