"""The listener and the reference model are, by default, the same frozen weights (the initial
policy): the Trainer keeps one copy of them and the training step runs their vision tower once for
both passes. Checked: the features handed in give the values the passes compute themselves (with and
without prefix sharing, where they are repeated per completion), the step gives the same rewards,
loss and parameters as with two separate copies, and the tower is traced once fewer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig, make_optimizer, policy_logprobs
from lgrpo_jax.listener import ListenerSpec, listener_probs
from lgrpo_jax.models.qwen2_5_vl.model import Qwen25VL
from lgrpo_jax.rewards.text import ByteTable
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import StepConfig, Tables, init_state, make_train_step
from lgrpo_jax.train.loop import pair_grid_of, to_device
from test_prefix_sharing import setup  # noqa: F401  (the module fixture: two pairs, windows, left padding)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_given_image_features_equal_the_passes_own(setup, prefix_sharing):  # noqa: F811
  tok, model, host, tokens, mask = setup
  batch, pair_grid = to_device(host), pair_grid_of(host)
  grid = tuple(map(tuple, host["image_grid_thw"].tolist()))
  pixels = batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1])
  spec = ListenerSpec.from_tokenizer(tok)
  feats = model.image_features(pixels, grid)
  lengths = mask.sum(-1)

  def passes(image_embeds):
    logp = policy_logprobs(model, batch.input_ids, batch.attention_mask, batch.pixel_values, pair_grid, tokens, mask,
                           chunk=128, prefix_sharing=prefix_sharing, image_embeds=image_embeds)
    probs = listener_probs(model, batch.listener_input_ids, batch.listener_attention_mask, pixels, grid, tokens,
                           lengths, spec, prefix_sharing, image_embeds)
    return np.asarray(logp), np.asarray(probs)

  (logp_own, probs_own), (logp_given, probs_given) = passes(None), passes(feats)
  m = np.asarray(mask) > 0
  np.testing.assert_allclose(logp_given[m], logp_own[m], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(probs_given, probs_own, atol=1e-6)
  # The features are used: other features give other values.
  logp_other, probs_other = passes(feats[::-1])
  assert np.abs(logp_other[m] - logp_own[m]).max() > 1e-3 and np.abs(probs_other - probs_own).max() > 1e-4


def test_step_with_one_frozen_copy_equals_two_and_encodes_once_fewer(setup, monkeypatch):  # noqa: F811
  tok, model, host, _, _ = setup
  batch, grid = to_device(host), pair_grid_of(host)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=8, num_samples=3, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.04), optim=OptimConfig(learning_rate=1e-3))
  graphdef, params = nnx.split(model, nnx.Param)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  spec = ListenerSpec.from_tokenizer(tok)
  traced = []
  encode = Qwen25VL.image_features
  monkeypatch.setattr(Qwen25VL, "image_features", lambda self, *a: traced.append(1) or encode(self, *a))
  out = {}
  for shared in (True, False):
    c = dataclasses.replace(cfg)
    tx = make_optimizer(c.optim, params)
    step = make_train_step(graphdef, graphdef, tx, c, spec, grid, listener_is_reference=shared)
    frozen = jax.tree.map(jnp.copy, params)
    listener = None if shared else jax.tree.map(jnp.copy, params)  # ignored when shared
    traced.clear()
    state, metrics = step(init_state(jax.tree.map(jnp.copy, params), tx, seed=0), frozen, listener, batch, tables)
    out[shared] = (len(traced), jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()})
  (n1, p1, m1), (n2, p2, m2) = out[True], out[False]
  # rollout + (listener and reference together) + the update's loss, against one more.
  assert (n1, n2) == (3, 4)
  assert m1["generated_tokens"] == m2["generated_tokens"] and m1["accuracy"] == m2["accuracy"]
  for k in ("reward/total", "reward/listener", "loss", "grad_norm", "kl"):
    assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
  assert m1["kl"] != 0 or m1["reward/listener"] != 0  # the listener and reference passes ran
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2))])
  assert diffs.max() <= 2e-3 and np.mean(diffs < 1e-6) > 0.99  # Adam: last-bit gradient noise can flip ~lr
