"""Image features computed once and handed on instead of re-running the vision tower:

- the listener and the reference model are, by default, the same frozen weights (the initial
  policy): the Trainer keeps one copy and the step runs their tower once for both passes;
- recomputed old log-probs use the rollout's features (the same parameters);
- a frozen policy tower (`optim.freeze=("vision",)`) is run once per update, not differentiated,
  and in the training step not at all (the rollout's features).

Checked: the features handed in give the values the passes compute themselves (with and without
prefix sharing, where they are repeated per completion); the step gives the same rewards, loss and
parameters as with two separate copies; the frozen-tower update gives the parameters of
differentiating the tower and throwing its gradient away; and the number of tower passes a step
traces, per configuration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig, make_optimizer, policy_logprobs, update
from lgrpo_jax.listener import ListenerSpec, listener_probs
from lgrpo_jax.models.qwen2_5_vl.model import Qwen25VL
from lgrpo_jax.rewards.text import ByteTable
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import StepConfig, Tables, init_state, make_train_step
from lgrpo_jax.train.loop import pair_grid_of, to_device
from hf_tiny import assert_same_adam_step
from test_grpo import policy_batch, rollout  # noqa: F401  (a tiny model's rollout of two prompts)
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

  @jax.jit
  def run(image_embeds):
    logp = policy_logprobs(model, batch.input_ids, batch.attention_mask, batch.pixel_values, pair_grid, tokens, mask,
                           chunk=128, prefix_sharing=prefix_sharing, image_embeds=image_embeds)
    probs = listener_probs(model, batch.listener_input_ids, batch.listener_attention_mask, pixels, grid, tokens,
                           lengths, spec, prefix_sharing, image_embeds)
    return logp, probs

  passes = lambda image_embeds: tuple(map(np.asarray, run(image_embeds)))
  (logp_own, probs_own), (logp_given, probs_given) = passes(None), passes(feats)
  m = np.asarray(mask) > 0
  np.testing.assert_allclose(logp_given[m], logp_own[m], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(probs_given, probs_own, atol=1e-6)
  # The features are used: other features give other values.
  logp_other, probs_other = passes(feats[::-1])
  assert np.abs(logp_other[m] - logp_own[m]).max() > 1e-3 and np.abs(probs_other - probs_own).max() > 1e-4


def test_step_with_one_frozen_copy_equals_two(setup):  # noqa: F811
  tok, model, host, _, _ = setup
  batch, grid = to_device(host), pair_grid_of(host)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=6, num_samples=2, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.04), optim=OptimConfig(learning_rate=1e-3))
  graphdef, params = nnx.split(model, nnx.Param)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  spec = ListenerSpec.from_tokenizer(tok)
  out = {}
  for shared in (True, False):
    tx = make_optimizer(cfg.optim, params)
    step = make_train_step(graphdef, graphdef, tx, cfg, spec, grid, listener_is_reference=shared)
    frozen = jax.tree.map(jnp.copy, params)
    listener = None if shared else jax.tree.map(jnp.copy, params)  # ignored when shared
    state, metrics = step(init_state(jax.tree.map(jnp.copy, params), tx, seed=0), frozen, listener, batch, tables)
    out[shared] = (jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()})
  (p1, m1), (p2, m2) = out[True], out[False]
  assert m1["generated_tokens"] == m2["generated_tokens"] and m1["accuracy"] == m2["accuracy"]
  for k in ("reward/total", "reward/listener", "loss", "grad_norm", "kl"):
    assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
  assert m1["kl"] != 0 or m1["reward/listener"] != 0  # the listener and reference passes ran
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2))])
  assert diffs.max() <= 2e-3 and np.mean(diffs < 1e-6) > 0.99  # Adam: last-bit gradient noise can flip ~lr


# (listener is reference, β, old log-probs, frozen tower) → vision passes the step traces: the rollout,
# then the listener, the reference, recomputed old log-probs and the update, less what is shared.
PASSES = [((False, 0.04, "sampler", False), 4), ((True, 0.04, "sampler", False), 3),
          ((True, 0.0, "sampler", False), 3), ((True, 0.04, "recompute", False), 3),
          ((False, 0.04, "recompute", True), 3), ((True, 0.04, "sampler", True), 2)]


@pytest.mark.parametrize("case,passes", PASSES)
def test_vision_passes_per_step(setup, monkeypatch, case, passes):  # noqa: F811
  shared, beta, old, frozen = case
  tok, model, host, _, _ = setup
  batch, grid = to_device(host), pair_grid_of(host)
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=4, num_samples=2, temperature=1.0),
                   loss=LossConfig(beta=beta), old_logprobs=old,
                   optim=OptimConfig(learning_rate=1e-3, freeze=("vision",) if frozen else ()))
  graphdef, params = nnx.split(model, nnx.Param)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  tx = make_optimizer(cfg.optim, params)
  traced = []
  encode = Qwen25VL.image_features
  monkeypatch.setattr(Qwen25VL, "image_features", lambda self, *a: traced.append(1) or encode(self, *a))
  step = make_train_step(graphdef, graphdef, tx, cfg, ListenerSpec.from_tokenizer(tok), grid,
                         listener_is_reference=shared)
  step.trace(init_state(params, tx, seed=0), params, None if shared else params, batch, tables)  # no compile
  assert len(traced) == passes


def test_frozen_tower_update_equals_differentiating_and_dropping_its_gradient(rollout):  # noqa: F811
  """`update` with a frozen tower reads its features as constants (run once, before the passes, in
  2 micro-batches): the parameters of the plain way — the optimiser zeroing the tower's gradient
  — while the reported gradient norm no longer counts that gradient."""
  model, batch, pair_grid, out = rollout
  loss_cfg = LossConfig(beta=0.0)
  pb = policy_batch(batch, out, np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]]), loss_cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  frozen = OptimConfig(learning_rate=1e-2, freeze=("vision",), micro_batches=2, passes=2)
  tx = make_optimizer(frozen, params)  # set_to_zero for the tower in both runs

  def run(optim_cfg):
    fn = jax.jit(lambda p, s, b: update(p, s, graphdef, tx, b, pair_grid, loss_cfg, optim_cfg))
    p, _, m = fn(params, tx.init(params), pb)
    return jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, p)), {k: float(v) for k, v in m.items()}

  (p_new, m_new), (p_old, m_old) = run(frozen), run(dataclasses.replace(frozen, freeze=()))
  for (k, a), (_, b), (_, c) in zip(p_new, p_old, jax.tree_util.tree_leaves_with_path(params)):
    assert_same_adam_step(a, b, jax.tree_util.keystr(k))
    if "visual" in jax.tree_util.keystr(k):
      np.testing.assert_array_equal(a, np.asarray(c))
  # On-policy, the first pass's loss is −mean(A·1) ≈ 0: fp32 cancellation noise (~1e-7) at the
  # scale of its O(1) terms, so compared absolutely.
  assert m_new["loss"] == pytest.approx(m_old["loss"], rel=1e-6, abs=1e-6)
  assert m_new["grad_norm"] < m_old["grad_norm"]  # the tower's gradient: computed only the plain way
