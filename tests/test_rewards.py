"""Rewards: format/answer parsing on a table of good and bad completions (on device, from token
ids), the registry and weights, host text rewards, and the per-step metrics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
from lgrpo_jax.grpo import LossConfig, advantages
from lgrpo_jax.rewards import (ByteTable, RewardConfig, RewardInputs, compute_rewards, parse,
                               register_reward, reward_metrics, text_reward)

# (completion text, well-formed?, parsed answer)
TABLE = [
    ("<think>red is right</think><answer>Image 1</answer><|im_end|>", True, 1),
    (" <think>the second is sharper</think>\n<answer> Image 2 </answer>\n", True, 2),
    ("<think>x</think>\n\n<answer>\nImage 1\n</answer><|im_end|><|endoftext|>", True, 1),
    ("<think>a</think><answer>Image 3</answer>", False, 0),
    ("<think></think><answer>Image 1</answer>", False, 1),  # empty think
    ("<think>   </think><answer>Image 1</answer>", False, 1),  # blank think
    ("<think>x<answer>Image 1</answer></think>", False, 1),  # answer inside think
    ("<think>x</think><answer>Image 1</answer> trailing", False, 1),  # trailing text
    ("<think>x</think><answer>Image 1</answer><answer>Image 2</answer>", False, 1),  # two answers
    ("<think>x</think><think>y</think><answer>Image 2</answer>", False, 2),  # two thinks
    ("<answer>Image 2</answer>", False, 2),  # no think
    ("<think>x</think>", False, 0),  # no answer
    ("<think>x</think><answer>Image 1", False, 0),  # unclosed answer
    ("<think>x</think><answer>Image 12</answer>", False, 0),
    ("<think>x</think><answer>image 1</answer>", False, 0),  # case matters
    ("preamble <think>x</think><answer>Image 1</answer>", False, 1),  # text before think
    ("no tags at all", False, 0),
    ("", False, 0),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def encode(tok, texts, width=None):
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  width = width or max(1, max(map(len, ids)))
  arr = np.zeros((len(ids), width), np.int32)
  mask = np.zeros_like(arr)
  for i, x in enumerate(ids):
    arr[i, :len(x)], mask[i, :len(x)] = x, 1
  return arr, mask


def test_format_and_answer_parsing_table(tok):
  table = ByteTable.from_tokenizer(tok)
  assert table.truncated == 0
  arr, mask = encode(tok, [t for t, _, _ in TABLE], width=48)
  # Garbage after the mask must be ignored (it is what a stopped row's slots may hold).
  arr = np.where(mask > 0, arr, tok.convert_tokens_to_ids("x"))
  p = parse(jnp.asarray(arr)[None], jnp.asarray(mask)[None], jnp.asarray(table.table),
            jnp.asarray(table.lengths))
  for (text, ok, answer), got_ok, got_answer in zip(TABLE, np.asarray(p.format_ok)[0],
                                                    np.asarray(p.answer)[0]):
    assert (bool(got_ok), int(got_answer)) == (ok, answer), text


def inputs_for(tok, texts, labels, g, listener=None):
  table = ByteTable.from_tokenizer(tok)
  arr, mask = encode(tok, texts, width=40)
  b = len(texts) // g
  arr, mask = arr.reshape(b, g, -1), mask.reshape(b, g, -1)
  parsed = parse(jnp.asarray(arr), jnp.asarray(mask), jnp.asarray(table.table), jnp.asarray(table.lengths))
  return RewardInputs(jnp.asarray(arr), jnp.asarray(mask), jnp.asarray(mask.sum(-1)),
                      jnp.asarray(labels, jnp.int32), parsed,
                      None if listener is None else jnp.asarray(listener, jnp.float32))


def test_rewards_weights_and_metrics(tok):
  texts = ["<think>a</think><answer>Image 1</answer>", "<think>b</think><answer>Image 2</answer>",
           "<think>c</think><answer>Image 2</answer>", "junk"]
  listener = [[[0.9, 0.1], [0.3, 0.7]], [[0.6, 0.4], [0.2, 0.8]]]
  inputs = inputs_for(tok, texts, [0, 1], g=2, listener=listener)
  total, parts = compute_rewards(inputs, RewardConfig())
  np.testing.assert_allclose(parts["format"], [[1, 1], [1, 0]])
  np.testing.assert_allclose(parts["accuracy"], [[1, 0], [1, 0]])  # labels: pair 0 → Image 1, pair 1 → Image 2
  np.testing.assert_allclose(parts["listener"], [[0.9, 0.3], [0.4, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(total, parts["format"] + 0.5 * parts["accuracy"] + 0.5 * parts["listener"], rtol=1e-6)
  m = reward_metrics(inputs, total, parts)
  # well-formed: (0,0) answers 1, listener 1; (0,1) answers 2, listener 2; (1,0) answers 2, listener 1
  assert float(m["contradiction_rate"]) == pytest.approx(1 / 3)
  assert float(m["format_rate"]) == pytest.approx(0.75) and float(m["accuracy"]) == pytest.approx(0.5)
  assert float(m["listener_confidence"]) == pytest.approx(np.mean([0.9, 0.3, 0.4, 0.8]))


def test_registry_and_host_text_reward(tok):
  texts = ["<think>a</think><answer>Image 1</answer>", "<think>longer thought</think><answer>Image 2</answer>"]
  inputs = inputs_for(tok, texts, [0], g=2)
  register_reward("chars", text_reward(lambda ts, labels: [len(t) / 100 for t in ts], tok), replace=True)
  total, parts = compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), ("chars", 2.0))))
  np.testing.assert_allclose(parts["chars"], [[len(t) / 100 for t in texts]], rtol=1e-6)
  np.testing.assert_allclose(total, 1.0 + 2 * parts["chars"], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    RewardConfig(weights=(("nope", 1.0),))
  with pytest.raises(ValueError, match="already registered"):
    register_reward("chars", lambda i: i.lengths)
  with pytest.raises(ValueError, match="'format' is built in"):  # config.json names it: one meaning
    register_reward("format", lambda i: i.lengths, replace=True)
  with pytest.raises(ValueError, match="needs listener probabilities"):
    compute_rewards(inputs, RewardConfig())


def test_a_registered_listener_reward_runs_the_listener_and_a_run_config_reads_unknown_names(tok, tmp_path):
  import json

  from lgrpo_jax import runs
  from lgrpo_jax.config import ExperimentConfig, from_record, to_record
  from lgrpo_jax.grpo.core import LossConfig
  # A reward of the user's that reads the listener: the step runs the listener for it (declared),
  # and a reward that reads it undeclared fails with what to do, not a NoneType error.
  register_reward("my_listener", lambda i: i.listener_probs[..., 0], replace=True, uses_listener=True)
  register_reward("undeclared", lambda i: i.listener_probs[..., 0], replace=True)
  assert RewardConfig(weights=(("format", 1.0), ("my_listener", 0.5))).needs_listener
  assert not RewardConfig(weights=(("format", 1.0), ("undeclared", 0.5))).needs_listener
  assert not RewardConfig(weights=(("format", 1.0), ("my_listener", 0.0))).needs_listener
  inputs = inputs_for(tok, ["<think>a</think><answer>Image 1</answer>"] * 2, [0], g=2)
  with pytest.raises(ValueError, match="reward 'undeclared' failed: .*uses_listener=True"):
    compute_rewards(inputs, RewardConfig(weights=(("undeclared", 1.0),)))
  # A run trained with names registered in its own process: another process reads its config.json.
  record = to_record(ExperimentConfig())
  record["step"]["rewards"]["weights"] = [["format", 1.0], ["only_in_that_notebook", 0.5]]
  record["step"]["loss"]["loss"] = "seq_sum_of_that_notebook"
  (tmp_path / "config.json").write_text(json.dumps(record))
  cfg = runs.run_config(tmp_path)
  assert cfg.step.loss.loss == "seq_sum_of_that_notebook" and cfg.step.rewards.weights[1][0] == "only_in_that_notebook"
  with pytest.raises(ValueError, match="seq_sum_of_that_notebook"):  # elsewhere still an error before compiling
    from_record(record)
  with pytest.raises(ValueError, match="LossConfig.loss='nope'"):
    LossConfig(loss="nope")


def test_a_weight_of_zero_turns_a_reward_off(tok):
  """Weight 0 is how a reward is ablated: it used to crash the first step for the listener (whose
  pass `needs_listener` then skips), and a weight-0 reward still entered the total (∞ skipped every
  update) and decided which completions were scored. It is logged where it can be computed."""
  inputs = inputs_for(tok, ["<think>a</think><answer>Image 1</answer>", "junk"], [0], g=2)
  total, parts = compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), ("accuracy", 0.5),
                                                               ("listener", 0.0))))
  assert "listener" not in parts
  np.testing.assert_allclose(total, [[1.5, 0.0]])
  register_reward("broken", lambda i: jnp.full(i.lengths.shape, jnp.inf), replace=True)
  register_reward("judge", lambda i: jnp.asarray([[jnp.nan, 1.0]]), replace=True)
  total, parts = compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), ("broken", 0.0))))
  np.testing.assert_allclose(total, [[1.0, 0.0]])
  assert np.isinf(np.asarray(parts["broken"])).all()  # still there for its metric
  total, _ = compute_rewards(inputs, RewardConfig(weights=(("judge", 1.0), ("format", 0.0))))
  assert np.isnan(np.asarray(total)[0, 0]) and float(total[0, 1]) == 1.0  # not scored: format is off
  with pytest.raises(ValueError, match="every weight is 0"):
    RewardConfig(weights=(("format", 0.0), ("accuracy", 0)))


def test_a_reward_that_fails_is_named_with_what_a_reward_is(tok):
  """A device reward's own error (the built-in's comparison copied without [:, None], an exception)
  was a bare error deep in JAX; now it names the reward and says what it takes. A host list with
  TRL's None reads as NaN ("does not apply"), as a text reward's does. `check_rewards` (the Trainer's start, the launcher's checks, `--dry-run`) finds it
  on abstract inputs before anything is loaded or compiled."""
  from lgrpo_jax.rewards import check_rewards
  inputs = inputs_for(tok, ["<think>a</think><answer>Image 1</answer>"] * 6, [0, 1], g=3)
  cases = {"labels_flat": (lambda i: (i.parsed.answer == i.labels + 1).astype(float),
                           r"reward 'labels_flat' failed: .*Incompatible shapes.*labels\[:, None\]"),
           "raises": (lambda i: {}["x"], r"reward 'raises' failed: KeyError: 'x'")}
  for name, (fn, match) in cases.items():
    register_reward(name, fn, replace=True)
    with pytest.raises(ValueError, match=match):
      compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), (name, 1.0))))
  with pytest.raises(ValueError, match=r"reward 'labels_flat' failed"):
    check_rewards(RewardConfig(weights=(("labels_flat", 1.0),)), 2, 3, 16)
  register_reward("per_pair", lambda i: jnp.ones(i.labels.shape), replace=True)
  with pytest.raises(ValueError, match=r"reward 'per_pair' returned shape \(4,\); .* \(B, G\) = \(4, 8\)"):
    check_rewards(RewardConfig(weights=(("per_pair", 1.0),)), 4, 8, 16)
  check_rewards(RewardConfig(), 4, 8, 16)  # the defaults: the listener's probabilities are given
  register_reward("none", lambda i: [[1.0, None, 0.0]] * 2, replace=True)
  total, _ = compute_rewards(inputs, RewardConfig(weights=(("none", 1.0),)))
  assert np.isnan(np.asarray(total)[:, 1]).all() and float(total[0, 0]) == 1.0
  register_reward("big", lambda i: np.full((2, 3), 2**40, np.int64), replace=True)  # JAX would wrap it at int32
  assert float(compute_rewards(inputs, RewardConfig(weights=(("big", 1.0),)))[1]["big"][0, 0]) == 2.0**40


def test_reward_registration_and_weights_are_checked(tok):
  with pytest.raises(ValueError, match="not callable"):
    register_reward("x", 3.0)
  with pytest.raises(ValueError, match="a non-empty string, not 3"):
    register_reward(3, lambda i: i.lengths)
  for bad in ({"format": 1.0}, ("format", 1.0), (("format", None),)):
    with pytest.raises(ValueError, match=r"RewardConfig.weights\[0\] = .*: each entry is a \(reward name, weight\)"):
      RewardConfig(weights=bad)
  with pytest.raises(ValueError, match=r"names \['format'\] more than once"):
    RewardConfig(weights=(("format", 1.0), ("accuracy", 1.0), ("format", 0.5)))


def test_a_text_reward_that_fails_names_the_reward_it_was_registered_as(tok):
  import jax
  inputs = inputs_for(tok, ["<think>a</think><answer>Image 1</answer>"] * 2, [0], g=2)
  register_reward("too_short", text_reward(lambda texts, labels: [1.0], tok), replace=True)
  register_reward("raises", text_reward(lambda texts, labels: 1 / 0, tok), replace=True)
  from lgrpo_jax.rewards import RewardError
  from lgrpo_jax.rewards.core import take_host_errors
  for name, match in (("too_short", r"text reward 'too_short' returned shape \(1,\), expected \(2,\)"),
                      ("raises", "text reward 'raises' failed: ZeroDivisionError")):
    # Not an error of the program (it would lose a training step's donated state): ∞ (the update
    # is skipped), and the error kept for the training loop to raise after the step.
    total, _ = jax.block_until_ready(jax.jit(lambda x: compute_rewards(x, RewardConfig(weights=((name, 1.0),))))(inputs))
    assert np.isinf(np.asarray(total)).all()
    (error,) = take_host_errors()
    assert isinstance(error, RewardError) and re.search(match, str(error)), error
  assert take_host_errors() == []


def test_a_reward_or_advantage_of_the_wrong_shape_is_an_error_naming_it(tok):
  """A per-pair (B,) reward broadcast onto the completion axis when B = G (training silently on the
  wrong advantages), and a (B, G, 1) one made the total (B, G, G); a constant is every completion's."""
  import jax.numpy as jnp
  from lgrpo_jax.grpo import LossConfig, advantages, register_advantage
  ids, mask = encode(tok, ["<think>x</think><answer>Image 1</answer>"] * 4)
  tokens, mask = jnp.asarray(ids).reshape(2, 2, -1), jnp.asarray(mask).reshape(2, 2, -1)
  bt = ByteTable.from_tokenizer(tok)
  parsed = parse(tokens, mask, jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  inputs = RewardInputs(tokens, mask, mask.sum(-1), jnp.asarray([0, 1]), parsed, None)
  for name, fn in (("per_pair", lambda i: jnp.ones(2)), ("extra_axis", lambda i: jnp.ones((2, 2, 1)))):
    register_reward(name, replace=True)(fn)
    with pytest.raises(ValueError, match=rf"reward '{name}' returned shape .*: \(B, G\) = \(2, 2\)"):
      compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), (name, 1.0))))
  register_reward("constant", replace=True)(lambda i: 0.5)
  total, parts = compute_rewards(inputs, RewardConfig(weights=(("format", 1.0), ("constant", 1.0))))
  assert parts["constant"].shape == (2, 2) and float(total[0, 0]) == 1.5
  register_advantage("per_pair_adv", replace=True)(lambda r, eps, valid: r.mean(-1))
  with pytest.raises(ValueError, match=r"LossConfig.advantage='per_pair_adv' returned shape \(2,\)"):
    advantages(total, LossConfig(advantage="per_pair_adv"))


def trl_advantages_numpy(rewards_per_func, weights, g, scale_rewards):
  """TRL 1.16's advantages (GRPOTrainer._generate_and_score_completions, sum_then_normalize; its
  `nanstd`), transcribed in float64 NumPy (checked against TRL's own code in test_trl_parity.py): a
  reward function's None is NaN; the weighted nansum over functions; a completion that no
  function scored is NaN, left out of the nan-aware mean and std, and gets advantage 0."""
  import warnings
  rpf = np.asarray(rewards_per_func, np.float64)
  rewards = np.nansum(rpf * np.asarray(weights, np.float64)[None], axis=1)
  rewards[np.isnan(rpf).all(axis=1)] = np.nan

  def nanstd(x, axis):  # TRL's: Bessel-corrected over the non-NaN values, NaN below two of them
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=True)) ** 2, axis=axis, keepdims=True)
    return np.sqrt(np.where(count > 1, var * count / np.maximum(count - 1, 1), np.nan))

  with warnings.catch_warnings():  # an all-NaN group: NaN, as torch.nanmean gives
    warnings.simplefilter("ignore", RuntimeWarning)
    grouped = rewards.reshape(-1, g)
    mean = np.repeat(np.nanmean(grouped, axis=1), g)
    std = np.repeat(nanstd(grouped, 1)[:, 0], g) if scale_rewards == "group" else nanstd(rewards, 0)
    adv = (rewards - mean) / (std + 1e-4)
  return np.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("advantage,scale_rewards", [("grpo", "group"), ("batch", "batch")])
def test_rewards_that_do_not_apply_are_trls_none(advantage, scale_rewards):
  """A reward's NaN (a text reward's None) means "does not apply", as in TRL: the total is the sum
  over the rewards that apply; a completion no reward scored is left out of its group's statistics
  and gets advantage 0. One NaN used to make its group's (or the batch's) advantages NaN, and the
  step was skipped."""
  from lgrpo_jax.grpo.core import advantage_metrics
  from lgrpo_jax.rewards.core import REWARDS
  from lgrpo_jax.rewards.text import Parsed
  rng = np.random.default_rng(3)
  b, g = 3, 5
  parts = rng.normal(size=(3, b, g))
  parts[0, 0, 1] = np.nan                      # one reward does not apply: the others count
  parts[:, 1, 2] = np.nan                      # no reward applies: not scored
  parts[:, 2, :] = np.nan
  parts[0, 2, 0] = 0.5                         # a group with one scored completion
  weights = (1.0, 0.5, 2.0)
  names = ("nan_a", "nan_b", "nan_c")
  for k, name in enumerate(names):
    register_reward(name, lambda inp, k=k: jnp.asarray(parts[k]), replace=True)
  try:
    inputs = RewardInputs(jnp.zeros((b, g, 4), jnp.int32), jnp.ones((b, g, 4)), jnp.full((b, g), 4),
                          jnp.zeros((b,), jnp.int32), Parsed(jnp.zeros((b, g), bool), jnp.zeros((b, g), jnp.int32),
                                                             jnp.zeros((b, g), jnp.int32)))
    with jax.enable_x64(True):
      total, _ = compute_rewards(inputs, RewardConfig(weights=tuple(zip(names, weights))))
      adv = np.asarray(advantages(total, LossConfig(advantage=advantage, adv_eps=1e-4)))
      metrics = advantage_metrics(total, jnp.asarray(adv))
  finally:
    for name in names:
      REWARDS.pop(name)
  want = trl_advantages_numpy(parts.reshape(3, -1).T, weights, g, scale_rewards).reshape(b, g)
  np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)  # rewards are float32
  assert np.isfinite(adv).all() and adv[1, 2] == 0 and (adv[2] == 0).all()
  assert int(metrics["unscored_completions"]) == 1 + 4


def test_a_total_that_is_nan_for_another_reason_skips_the_step_not_the_completion():
  """∞ − ∞ across two rewards is a broken reward, not "does not apply": the total is ∞, so the loss
  is not finite and the update is skipped (said) — not one completion quietly left out. Each
  reward's unscored completions are counted."""
  from lgrpo_jax.rewards.core import REWARDS, reward_metrics
  from lgrpo_jax.rewards.text import Parsed
  b, g = 1, 3
  a = np.array([[np.inf, 1.0, np.nan]])
  c = np.array([[-np.inf, 1.0, 0.5]])
  register_reward("inf_a", lambda inp: jnp.asarray(a), replace=True)
  register_reward("inf_c", lambda inp: jnp.asarray(c), replace=True)
  try:
    inputs = RewardInputs(jnp.zeros((b, g, 4), jnp.int32), jnp.ones((b, g, 4)), jnp.full((b, g), 4),
                          jnp.zeros((b,), jnp.int32), Parsed(jnp.zeros((b, g), bool), jnp.zeros((b, g), jnp.int32),
                                                             jnp.zeros((b, g), jnp.int32)))
    total, parts = compute_rewards(inputs, RewardConfig(weights=(("inf_a", 1.0), ("inf_c", 1.0))))
    metrics = reward_metrics(inputs, total, parts)
  finally:
    REWARDS.pop("inf_a")
    REWARDS.pop("inf_c")
  assert np.asarray(total)[0, 0] == np.inf and np.asarray(total)[0, 2] == 0.5
  assert not np.isfinite(np.asarray(advantages(total, LossConfig()))).all()
  assert int(metrics["reward_unscored/inf_a"]) == 1 and int(metrics["reward_unscored/inf_c"]) == 0


def test_a_reward_that_scored_no_completion_logs_nan_as_trls_nanmean():
  """TRL logs a reward's mean with nanmean: NaN when it scored none of the step's completions. Ours
  logged 0, a real-looking mean reward; the other rewards' means are over what each scored."""
  from lgrpo_jax.rewards.core import REWARDS, reward_metrics
  from lgrpo_jax.rewards.text import Parsed
  b, g = 1, 3
  register_reward("never", lambda inp: jnp.full((b, g), jnp.nan), replace=True)
  register_reward("some", lambda inp: jnp.asarray([[0.5, np.nan, 1.0]]), replace=True)
  try:
    inputs = RewardInputs(jnp.zeros((b, g, 4), jnp.int32), jnp.ones((b, g, 4)), jnp.full((b, g), 4),
                          jnp.zeros((b,), jnp.int32), Parsed(jnp.zeros((b, g), bool), jnp.zeros((b, g), jnp.int32),
                                                             jnp.zeros((b, g), jnp.int32)))
    m = reward_metrics(inputs, *compute_rewards(inputs, RewardConfig(weights=(("never", 1.0), ("some", 2.0)))))
    alone = reward_metrics(inputs, *compute_rewards(inputs, RewardConfig(weights=(("never", 1.0),))))
  finally:
    REWARDS.pop("never")
    REWARDS.pop("some")
  assert np.isnan(float(m["reward/never"])) and float(m["reward/some"]) == pytest.approx(0.75)
  assert float(m["reward/total"]) == pytest.approx(1.5)  # 2 × the mean of what "some" scored
  assert np.isnan(float(alone["reward/total"])) and int(alone["reward_unscored/never"]) == 3
