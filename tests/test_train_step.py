"""The GRPO step: one compiled program that samples, scores with the listener, rewards and updates;
a second batch of the same shapes does not recompile; the reference and listener never change."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.rewards import ByteTable
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import Batch, StepConfig, Tables, init_state, make_train_step
from lgrpo_jax.train.step import clear_compiled_steps


def device_batch(b):
  n = b["input_ids"].shape[0]
  return Batch(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
               jnp.asarray(b["pixel_values"]).reshape(n, -1, b["pixel_values"].shape[-1]),
               jnp.asarray(b["labels"]), jnp.asarray(b["valid"]), jnp.asarray(b["listener_input_ids"]),
               jnp.asarray(b["listener_attention_mask"]))


def test_one_program_per_shape_and_frozen_reference_and_listener(tmp_path):
  clear_compiled_steps()  # its program count is this test's own
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  graphdef, params = nnx.split(model, nnx.Param)
  ref = jax.tree.map(jnp.copy, params)
  listener = jax.tree.map(jnp.copy, params)
  frozen = jax.tree.map(np.asarray, params)

  pipe = PipelineConfig(global_batch=2, seed=0, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256, 512))
  batches = make_batches(list(synthetic(8, seed=0, image_size=64)), tok, pipe)
  first = next(batches)
  pair_grid = tuple(map(tuple, first["image_grid_thw"][:2].tolist()))
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=10, num_samples=4, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.04), optim=OptimConfig(learning_rate=1e-3, micro_batches=2))
  tx = make_optimizer(cfg.optim, params)
  spec = ListenerSpec.from_tokenizer(tok)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  step = make_train_step(graphdef, graphdef, tx, cfg, spec, pair_grid)
  state = init_state(params, tx, seed=0)

  state, m1 = step(state, ref, listener, device_batch(first), tables)
  state, m2 = step(state, ref, listener, device_batch(next(batches)), tables)
  assert step._cache_size() == 1  # the second batch (same shapes) reused the compiled program
  assert int(state.step) == 2
  for m in (m1, m2):
    # every metric finite, but the contradiction rate of a step without a well-formed completion: NaN
    assert all(np.isfinite(np.asarray(v)).all() for k, v in m.items()
               if not (k == "contradiction_rate" and float(m["format_rate"]) == 0)), m
    assert float(m["format_rate"]) > 0 or np.isnan(float(m["contradiction_rate"]))
    assert 0 <= float(m["listener_confidence"]) <= 1 and float(m["kl"]) >= 0
  # The policy moved; the reference and the listener did not.
  moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state.params),
                                                                 jax.tree.leaves(frozen))]
  assert any(moved)
  for tree in (ref, listener):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(frozen)):
      np.testing.assert_array_equal(np.asarray(a), b)


def tiny_step(tmp_path, temperature=1.0, eos_ids=None, loss=LossConfig(beta=0.04), dtype="float32", passes=1,
              **step_kw):
  """A compiled GRPO step of the tiny model on 2-pair batches: (step, params, tx, batches, tables)."""
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  graphdef, params = nnx.split(lgrpo_jax.from_config(tiny_model_config(tok_dir), dtype=dtype), nnx.Param)
  pipe = PipelineConfig(global_batch=2, seed=0, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  batches = make_batches(list(synthetic(8, seed=0, image_size=64)), tok, pipe)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=10, num_samples=4, temperature=temperature,
                                           eos_ids=eos_ids or (end,)),
                   loss=loss, optim=OptimConfig(learning_rate=1e-3, passes=passes), **step_kw)
  tx = make_optimizer(cfg.optim, params)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  grid = ((1, 4, 4), (1, 4, 4))  # 56×56 pixels: 4×4 patches of 14
  step = make_train_step(graphdef, graphdef, tx, cfg, ListenerSpec.from_tokenizer(tok), grid)
  return step, params, tx, batches, tables


def test_the_step_reads_the_reference_and_the_listener_it_is_given(tmp_path):
  # The reference only enters the KL term and the listener only the listener reward: a step given a
  # different reference changes the KL and not the listener reward, and the other way round. The
  # same state and key each time, so the same completions are sampled.
  step, params, tx, batches, tables = tiny_step(tmp_path)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  perturbed = lambda tree: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), tree)
  other_ref, other_listener = perturbed(params), perturbed(params)
  batch = device_batch(next(batches))
  state = init_state(params, tx, seed=0)

  def metrics(ref, listener):
    _, m = step(jax.tree.map(jnp.copy, state), ref, listener, batch, tables)  # the state is donated
    return float(m["kl"]), float(m["reward/listener"])

  kl_own, listener_own = metrics(params, params)
  kl_ref, listener_ref = metrics(other_ref, params)
  kl_lis, listener_lis = metrics(params, other_listener)
  assert abs(kl_own) < 1e-6  # the reference is the sampling policy itself
  assert kl_ref > 1e-4 and listener_ref == pytest.approx(listener_own, rel=1e-6, abs=1e-7)
  assert kl_lis == pytest.approx(kl_own, abs=1e-7) and abs(listener_lis - listener_own) > 1e-4


def test_the_policy_is_scored_at_the_sampling_temperature(tmp_path, temperature=0.5):
  # The sampler's log-probs (the `sampler` old log-probs, and what `logprob_drift` reads) are of softmax(logits / T); the update must
  # score the same distribution, as TRL and tunix do: on the first pass the ratio is 1 and nothing is
  # clipped. Scored at T = 1 instead, T = 0.5 clipped ~30% of the tokens before any update.
  step, params, tx, batches, tables = tiny_step(tmp_path, temperature)
  state = init_state(params, tx, seed=0)
  _, m = step(jax.tree.map(jnp.copy, state), params, params, device_batch(next(batches)), tables)  # donated
  assert float(m["logprob_drift"]) < 1e-5 and float(m["ratio_max"]) == pytest.approx(1.0, abs=1e-4)
  assert float(m["clip_fraction_low"]) == 0 == float(m["clip_fraction_high"])
  assert abs(float(m["kl"])) < 1e-6  # the reference is the policy


def test_the_first_pass_ratio_is_exactly_one_with_the_updates_own_old_logprobs(tmp_path):
  """TRL (no vLLM, one iteration) takes the update's own log-probs, detached, as the old ones: the
  first pass's ratio is exactly 1. The sampler's differ from the update's by the numerics' drift
  (bf16: XLA keeps other intermediates in the differentiated program), which with GSPO's tight clip
  (ε ≈ 3e-4) clipped sequences of an unchanged policy (`old_logprobs="recompute"`, also a separate
  program, did not help). With `old_logprobs="current"` (the default) nothing is clipped, the drift
  against the sampler is still reported, and a second pass reads the first pass's log-probs (its
  loss then differs from the first's; read against its own, it would equal it)."""
  gspo = LossConfig(beta=0.0, importance_sampling_level="sequence", eps_low=3e-4, eps_high=4e-4)
  out = {}
  for old, passes in (("sampler", 1), ("current", 1), ("current", 2)):
    step, params, tx, batches, tables = tiny_step(tmp_path / f"{old}{passes}", loss=gspo, dtype="bfloat16",
                                                  passes=passes, old_logprobs=old)
    state = init_state(jax.tree.map(jnp.copy, params), tx, seed=0)  # donated: not the frozen copies' arrays
    _, m = step(state, params, params, device_batch(next(batches)), tables)
    out[old, passes] = {k: float(v) for k, v in m.items()}
  cur, smp, two = out["current", 1], out["sampler", 1], out["current", 2]
  assert cur["ratio_max"] == 1.0 and cur["ratio_mean"] == 1.0
  assert cur["clip_fraction_low"] == 0 == cur["clip_fraction_high"]
  assert cur["logprob_drift"] == smp["logprob_drift"] > 0  # the same rollout: the sampler's drift, reported
  assert smp["ratio_max"] != 1.0  # the control: the sampler's old log-probs are off by that drift
  assert two["loss_last_pass"] != two["loss"]
  # Two passes: the ratio's metrics are the passes' mean (the first pass's are exactly 1 and 0, so
  # reporting it alone, as before, always read 1 and 0); the rest are the first pass's.
  assert two["ratio_mean"] != 1.0 and two["ratio_max"] >= 1.0
  assert two["loss"] == pytest.approx(cur["loss"], rel=1e-6) and "kl" not in two  # β = 0: no KL logged
  assert two["logprob_drift"] == cur["logprob_drift"]  # the first pass's


def test_truncated_completions_are_masked_from_the_loss_when_asked(tmp_path):
  # TRL's mask_truncated_completions: completions cut at max_new_tokens without an end id are
  # sampled and rewarded but carry no loss. Twenty end ids make some of the tiny model's rows end.
  step, params, tx, batches, tables = tiny_step(
      tmp_path, eos_ids=tuple(range(100, 120)), loss=LossConfig(beta=0.04, mask_truncated_completions=True))
  state = jax.tree.map(jnp.copy, init_state(params, tx, seed=0))  # donated; params are read too
  _, m = step(state, params, params, device_batch(next(batches)), tables)
  m = {k: float(v) for k, v in m.items()}
  assert 0 < m["truncated_rate"] < 1
  # The loss counts only the tokens of completions that ended (unmasked it counts all generated
  # tokens: the default's loss_tokens == generated_tokens is checked with the invalid-row test).
  n, g = 10, 2 * 4
  truncated_tokens = m["truncated_rate"] * g * n  # every truncated completion has all N tokens
  assert m["loss_tokens"] == pytest.approx(m["generated_tokens"] - truncated_tokens)


def test_an_invalid_row_changes_nothing(tmp_path):
  # A row with valid = 0 (a padding row, or a record whose image failed under bad_records=skip) is
  # sampled like the others but weighs nothing: whatever it holds, the update and the metrics are
  # those of the valid rows.
  step, params, tx, batches, tables = tiny_step(tmp_path)
  first, other = next(batches), next(batches)
  first["valid"] = np.asarray([1, 0], np.int32)
  swapped = {k: v.copy() for k, v in first.items()}
  for k in ("input_ids", "attention_mask", "pixel_values", "labels", "listener_input_ids",
            "listener_attention_mask"):  # row 1 becomes another pair (pixels: rows are whole images)
    rows = swapped[k].shape[0] // 2
    swapped[k][rows:] = other[k][rows:]
  swapped["labels"][1] = 1 - first["labels"][1]
  assert not np.array_equal(swapped["pixel_values"], first["pixel_values"])
  state = init_state(params, tx, seed=0)
  (s1, m1), (s2, m2) = (step(jax.tree.map(jnp.copy, state), params, params, device_batch(b), tables)
                        for b in (first, swapped))
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  assert not np.array_equal(np.asarray(jax.tree.leaves(s1.params)[0]), np.asarray(jax.tree.leaves(params)[0]))
  assert float(m1["loss_tokens"]) == float(m1["generated_tokens"])  # nothing masked by default
  for k in m1:
    if k != "decode_steps":  # the loop runs until every row (valid or not) has ended
      assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5, abs=1e-7, nan_ok=True), k


def test_step_config_rejects_single_sample():
  with pytest.raises(ValueError, match="G ≥ 2"):
    StepConfig(sampling=SamplingConfig(num_samples=1))


@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(top_k=1)])
def test_step_config_rejects_greedy_sampling(greedy):
  # G identical completions: equal rewards, zero advantages, nothing learned (transformers refuses
  # temperature 0 with sampling, so TRL cannot be set so either)
  with pytest.raises(ValueError, match="samples greedily: the 8 completions of a pair would be the same"):
    StepConfig(sampling=SamplingConfig(num_samples=8, **greedy))


def test_the_step_function_is_kept_for_the_same_arguments_and_rebuilt_when_a_registry_changes(tmp_path):
  """A Trainer built again in the same process (a notebook cell run twice, an in-process resume)
  gets the same jitted step, so nothing is traced or compiled again; a reward, KL or loss replaced
  under the same name, or other sharding rules, give a new one (the old program would run the old
  code)."""
  from lgrpo_jax import sharding
  from lgrpo_jax.grpo import register_kl
  from lgrpo_jax.grpo.core import KL_ESTIMATORS
  from lgrpo_jax.rewards import RewardConfig, register_reward
  from lgrpo_jax.rewards.core import REWARDS
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  graphdef, params = nnx.split(lgrpo_jax.from_config(tiny_model_config(tok_dir)), nnx.Param)
  grid = ((1, 4, 4), (1, 4, 4))
  try:
    register_reward("test_kept", lambda inputs: inputs.lengths * 0.0, replace=True)
    cfg = StepConfig(rewards=RewardConfig(weights=(("format", 1.0), ("test_kept", 1.0))))
    tx = make_optimizer(cfg.optim, params)
    build = lambda c=cfg, g=grid: make_train_step(graphdef, graphdef, tx, c, None, g)
    step = build()
    assert build() is step and make_train_step(graphdef, graphdef, make_optimizer(cfg.optim, params), cfg, None,
                                               [list(g) for g in grid]) is step
    assert build(g=((1, 4, 8), (1, 4, 4))) is not step  # another image grid: another program
    assert build(StepConfig()) is not step
    register_reward("test_kept", lambda inputs: inputs.lengths * 1.0, replace=True)
    replaced = build()
    assert replaced is not step and build() is replaced
    try:
      register_kl("test_kept_kl", replace=True)(lambda logp, logp_ref: logp - logp_ref)
      with_kl = build()
      assert with_kl is not replaced and build() is with_kl
      register_kl("test_kept_kl", lambda logp, logp_ref: logp_ref - logp, replace=True)
      assert build() is not with_kl
    finally:
      KL_ESTIMATORS.pop("test_kept_kl", None)
    assert build() is replaced
    with sharding.use_rules({**sharding.RULES, "embed": None}):
      assert build() is not replaced
    clear_compiled_steps()
    assert build() is not replaced
    # An unhashable callable object (a dataclass with __call__) is taken, by identity.

    @dataclasses.dataclass
    class Scaled:  # eq=True: unhashable
      scale: float = 1.0

      def __call__(self, inputs):
        return inputs.lengths * self.scale

    scaled = Scaled()
    register_reward("test_kept", scaled, replace=True)
    by_object = build()
    assert build() is by_object
    register_reward("test_kept", Scaled(3.0), replace=True)  # registered again: traced again
    assert build() is not by_object
  finally:
    REWARDS.pop("test_kept", None)
