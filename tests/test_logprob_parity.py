"""Completion log-probs — what GRPO's ratio and KL are made of — against transformers' log-softmax
of the contiguous [prompt | completion], teacher-forced one completion at a time.

fp32: the policy pass (prompt shared by the group, and the plain copies path) to 1e-5.
bf16: the policy pass and the sampler's own log-probs within 1.5× of transformers' bf16 error
against the fp32 truth, on a prompt past 300 positions (rotary angle errors grow with position)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import lgrpo_jax
from lgrpo_jax.grpo.update import policy_logprobs
from hf_tiny import IMG, PAD, VID, build_hf, config_dict, hf_logits, make_batch, ours_inputs

G, N = 2, 7
# Two pairs, two images each (a pair's images share one grid across rows, as in training batches).
ROWS = [{"text": [2, 3, 1], "images": [(84, 140), (56, 56)]},
        {"text": [6, 1, 4], "images": [(84, 140), (56, 56)]}]
LONG_ROWS = [{"text": [300, 2, 1], "images": [(84, 140), (56, 56)]},
             {"text": [6, 1, 4], "images": [(84, 140), (56, 56)]}]


def completions(seed=0):
  """(B, G, N) random completions of random lengths 3..N, right-padded, and their mask."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, 100, (2, G, N)).astype(np.int32)
  mask = (np.arange(N) < rng.integers(3, N + 1, (2, G))[..., None]).astype(np.int32)
  return np.where(mask > 0, toks, PAD), mask


def hf_completion_logprobs(hf, batch, toks, mask):
  """(B, G, N) float64 log-probs of each completion token, transformers on the contiguous text."""
  b, p = batch["input_ids"].shape
  n_img = len(batch["image_grid_thw"]) // b
  n_patch = [int(np.prod(g)) for g in batch["image_grid_thw"]]
  starts = np.cumsum([0] + n_patch)
  out = np.zeros(toks.shape)
  for i in range(b):
    for g in range(toks.shape[1]):
      n = int(mask[i, g].sum())
      ids = np.concatenate([batch["input_ids"][i], toks[i, g, :n]])[None].astype(np.int64)
      row = {"input_ids": ids,
             "attention_mask": np.concatenate([batch["attention_mask"][i], np.ones(n, np.int64)])[None],
             "mm_token_type_ids": (ids == IMG).astype(np.int64),
             "pixel_values": batch["pixel_values"][starts[i * n_img]:starts[(i + 1) * n_img]],
             "image_grid_thw": batch["image_grid_thw"][i * n_img:(i + 1) * n_img]}
      lg = hf_logits(hf, row)[0, p - 1:p + n - 1].astype(np.float64)
      lg -= lg.max(-1, keepdims=True)
      lg -= np.log(np.exp(lg).sum(-1, keepdims=True))
      out[i, g, :n] = lg[np.arange(n), toks[i, g, :n]]
  return out


def ours_policy(model, batch, toks, mask, prefix_sharing=True):
  b = batch["input_ids"].shape[0]
  n_img = len(batch["image_grid_thw"]) // b
  pair_grid = tuple(map(tuple, batch["image_grid_thw"][:n_img].tolist()))
  pixels = jnp.asarray(batch["pixel_values"]).reshape(b, -1, batch["pixel_values"].shape[-1])
  fn = nnx.jit(lambda m, *a: policy_logprobs(m, *a[:3], pair_grid, *a[3:], chunk=50, prefix_sharing=prefix_sharing))
  return np.asarray(fn(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), pixels,
                       jnp.asarray(toks), jnp.asarray(mask)))


@pytest.mark.parametrize("variant", ["a", "b"])  # untied / tied head
def test_policy_logprobs_equal_transformers_fp32(variant, tmp_path):
  hf = build_hf(config_dict(variant), seed=3)
  hf.save_pretrained(tmp_path)
  model = lgrpo_jax.load_hf(tmp_path, dtype="float32")
  batch = make_batch(ROWS, seed=2)
  toks, mask = completions()
  ref = hf_completion_logprobs(hf, batch, toks, mask)
  for sharing in (True, False):
    got = ours_policy(model, batch, toks, mask, prefix_sharing=sharing)
    np.testing.assert_allclose(got * mask, ref, atol=1e-5, err_msg=f"prefix_sharing={sharing}")


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
  """transformers in fp32 (the truth) and bf16, and ours loaded from the bf16 checkpoint."""
  cfg = config_dict("a")
  hf32, hf16 = build_hf(cfg, seed=5), build_hf(cfg, seed=5, dtype=torch.bfloat16)
  path = tmp_path_factory.mktemp("bf16")
  hf16.save_pretrained(path)
  return hf32, hf16, lgrpo_jax.load_hf(path, dtype="bfloat16")


def assert_bf16_error_like_transformers(got, hf32, hf16, batch, toks, mask, what):
  truth = hf_completion_logprobs(hf32, batch, toks, mask)
  hf_err = np.abs(hf_completion_logprobs(hf16, batch, toks, mask) - truth)[mask > 0].max()
  our_err = np.abs(np.asarray(got, np.float64) - truth)[mask > 0].max()
  assert our_err <= 1.5 * hf_err, f"{what}: ours {our_err:.3e}, transformers bf16 {hf_err:.3e}"


def test_bf16_policy_logprobs_err_like_transformers_bf16(bf16_models):
  hf32, hf16, model = bf16_models
  batch = make_batch(LONG_ROWS, seed=2)
  toks, mask = completions(1)
  assert_bf16_error_like_transformers(ours_policy(model, batch, toks, mask), hf32, hf16, batch, toks, mask,
                                      "policy pass")


def test_bf16_sampler_logprobs_err_like_transformers_bf16(bf16_models):
  """The decode path in bf16 (cache, decode attention, fused weights): the log-probs it reports for
  the tokens it sampled."""
  hf32, hf16, model = bf16_models
  batch = make_batch(LONG_ROWS, seed=3)
  out = lgrpo_jax.generate(model, **ours_inputs(batch), max_new_tokens=N, temperature=1.0, num_samples=G,
                           seed=4, eos_token_id=[], pad_token_id=PAD)
  toks = np.asarray(out.tokens).reshape(2, G, N)
  mask = np.asarray(out.mask).reshape(2, G, N).astype(np.int32)
  assert mask.all()
  # A random model samples image-placeholder ids too; transformers would look for their image, so
  # compare each completion up to its first one.
  mask *= np.cumsum(np.isin(toks, [IMG, VID]), axis=-1) == 0
  assert mask.sum() >= mask.size // 2, mask
  assert_bf16_error_like_transformers(np.asarray(out.logprobs).reshape(2, G, N), hf32, hf16, batch, toks, mask,
                                      "sampler")
