"""Rewards: named functions in a registry, weighted into the total (docs/grpo.md).

    total = Σ_name weight_name · reward_name(inputs)      default: format 1.0, accuracy 0.5, listener 0.5

over the rewards that apply: a NaN reward (a text reward's None) does not apply to that completion,
as TRL's None; where none applies the total is NaN ("not scored": advantage 0, left out of its
group's statistics); a total NaN for another reason (∞ − ∞) is made ∞, so the update is skipped.

A reward is `fn(inputs: RewardInputs) -> (B, G) float32`, traced on device. Register one in a
notebook with

    @register_reward("short")
    def short(inputs):
        return 1.0 - inputs.lengths / inputs.tokens.shape[-1]

and select it with `RewardConfig(weights=(("format", 1.0), ("short", 0.1)))`. A reward over decoded
text (plain Python, run on the host through `jax.pure_callback`; slower, the device waits) is made
with `text_reward(fn, tokenizer)`, where fn(texts, labels) returns one float per text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lgrpo_jax.rewards.text import Parsed

REWARDS: dict[str, Callable] = {}
_BUILT_IN: frozenset = frozenset()  # the built-in names (set below them): not replaceable
USES_LISTENER: set[str] = set()  # rewards that read `listener_probs`: the step runs the listener for them


class RewardInputs(NamedTuple):
  tokens: jax.Array  # (B, G, N) int32 completions
  mask: jax.Array  # (B, G, N)
  lengths: jax.Array  # (B, G)
  labels: jax.Array  # (B,) int32: 0 if the first image shown is preferred, 1 if the second
  parsed: Parsed  # format_ok (B, G), answer (B, G) in {0, 1, 2}
  listener_probs: jax.Array | None = None  # (B, G, 2): P(Image 1), P(Image 2)


def register_reward(name: str, fn: Callable | None = None, *, replace: bool = False, uses_listener: bool = False):
  """Register `fn(inputs) -> (B, G)` under `name` (usable as a decorator). `uses_listener`: it reads
  `inputs.listener_probs`, so the step runs the listener whenever it has a non-zero weight (else
  `listener_probs` is None unless another reward needs the listener)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_reward: a reward's name is a non-empty string, not {name!r}")

  def wrap(f):
    if not callable(f):
      raise ValueError(f"register_reward({name!r}, {f!r}): not callable; a reward is fn(inputs: RewardInputs) "
                       "-> (B, G) floats")
    if name in _BUILT_IN:
      raise ValueError(f"reward {name!r} is built in: register yours under another name (a run's config.json "
                       f"records only the name, so {name!r} must mean the same reward in every process)")
    if name in REWARDS and not replace:
      raise ValueError(f"reward {name!r} is already registered (pass replace=True to override, e.g. "
                       "when a notebook cell or a config file runs again)")
    REWARDS[name] = f
    (USES_LISTENER.add if uses_listener else USES_LISTENER.discard)(name)
    if hasattr(f, "reward_name"):  # a text_reward: its host errors name what it was registered as
      f.reward_name = name
    return f
  return wrap if fn is None else wrap(fn)


@register_reward("format")
def format_reward(inputs: RewardInputs):
  """1 if the completion is `<think>…</think><answer>Image k</answer>` (text.parse), else 0."""
  return inputs.parsed.format_ok.astype(jnp.float32)


@register_reward("accuracy")
def accuracy_reward(inputs: RewardInputs):
  """1 if the parsed answer is the human-preferred image, else 0 (no answer: 0)."""
  return (inputs.parsed.answer == inputs.labels[:, None] + 1).astype(jnp.float32)


@register_reward("listener", uses_listener=True)
def listener_reward(inputs: RewardInputs):
  """The listener's probability of the preferred image, from the reasoning with the answer masked."""
  if inputs.listener_probs is None:
    raise ValueError("the 'listener' reward needs listener probabilities (a listener model)")
  probs = inputs.listener_probs
  idx = jnp.broadcast_to(inputs.labels[:, None, None].astype(jnp.int32), probs.shape[:2] + (1,))
  return jnp.take_along_axis(probs, idx, -1)[..., 0]


_BUILT_IN = frozenset(REWARDS)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  # (registered reward, weight) pairs; the total reward is the weighted sum of the rewards that apply
  # (NaN: does not apply; weight 0: off, logged only; the paper: 1, 0.5, 0.5)
  weights: tuple[tuple[str, float], ...] = (("format", 1.0), ("accuracy", 0.5), ("listener", 0.5))

  def __post_init__(self):
    pairs = []
    for i, entry in enumerate(self.weights if isinstance(self.weights, (tuple, list)) else [self.weights]):
      try:
        name, w = entry
        pairs.append((str(name), float(w)))
      except (TypeError, ValueError):
        raise ValueError(f"RewardConfig.weights[{i}] = {entry!r}: each entry is a (reward name, weight) pair, "
                         "e.g. weights=(('format', 1.0), ('accuracy', 0.5))") from None
    object.__setattr__(self, "weights", tuple(pairs))
    if not self.weights:
      raise ValueError("RewardConfig.weights is empty: GRPO needs at least one (reward, weight) pair")
    names = [n for n, _ in self.weights]
    if len(set(names)) < len(names):
      raise ValueError(f"RewardConfig.weights names {sorted({n for n in names if names.count(n) > 1})} more "
                       "than once: give each reward one weight")
    if all(w == 0 for _, w in self.weights):
      raise ValueError("RewardConfig.weights: every weight is 0, so every completion's reward would be 0 and "
                       "nothing would be learnt")
    from lgrpo_jax.grpo.core import reading_a_record
    for name, w in self.weights:
      if name not in REWARDS and not reading_a_record():
        raise ValueError(f"RewardConfig.weights: unknown reward {name!r} (registered: {sorted(REWARDS)})")
      if not math.isfinite(w):
        raise ValueError(f"RewardConfig.weights: the weight of {name!r} is {w}, not a finite number")

  @property
  def needs_listener(self) -> bool:
    return any(n in USES_LISTENER and w != 0 for n, w in self.weights)


def _reward_value(name: str, inputs: RewardInputs):
  """REWARDS[name](inputs) as (B, G) float32; any failure is an error naming the reward."""
  try:
    value = REWARDS[name](inputs)
    if not any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(value)):
      value = np.asarray(value, np.float32)  # host values (None → NaN); JAX would wrap numpy's int64 at int32
    value = jnp.asarray(value).astype(jnp.float32)
  except Exception as e:  # noqa: BLE001 — re-raised, naming the reward (it was a bare error deep in JAX)
    hint = ""
    if inputs.listener_probs is None and name not in USES_LISTENER:
      try:  # does it work once it has listener probabilities?
        REWARDS[name](inputs._replace(listener_probs=jnp.full(inputs.lengths.shape + (2,), 0.5, jnp.float32)))
        hint = ("; it reads inputs.listener_probs: register it with register_reward(..., uses_listener=True) "
                "so that the step runs the listener")
      except Exception:  # noqa: BLE001 — it fails for its own reason
        pass
    raise ValueError(f"reward {name!r} failed: {type(e).__name__}: {e}{hint}. A reward is fn(inputs: "
                     f"RewardInputs) -> (B, G) floats, with tokens/mask (B, G, N), lengths (B, G), labels (B,) "
                     f"(compare with labels[:, None]), parsed, listener_probs (B, G, 2)") from e
  want = inputs.lengths.shape
  if value.shape == ():  # a constant: every completion
    value = jnp.broadcast_to(value, want)
  if value.shape != want:  # (B,) or (B, G, 1) would broadcast into the wrong axes, silently or deep in JAX
    raise ValueError(f"reward {name!r} returned shape {value.shape}; a reward gives one value per "
                     f"completion: (B, G) = {want}")
  return value


def compute_rewards(inputs: RewardInputs, cfg: RewardConfig = RewardConfig()):
  """(total (B, G), {name: (B, G)}). A reward of weight 0 is off: it is computed for its metric
  (except a listener reward when the step ran no listener) and neither enters the total nor
  decides which completions are scored."""
  parts = {}
  for name, w in cfg.weights:
    if w == 0 and name in USES_LISTENER and inputs.listener_probs is None:
      continue  # off, and the step ran no listener for it (`needs_listener`)
    parts[name] = _reward_value(name, inputs)
  on = [(name, w) for name, w in cfg.weights if w != 0]
  # TRL's rule: a reward that does not apply to a completion gives NaN (a host reward's None); the
  # total is the weighted sum of those that do, and NaN ("not scored": advantage 0) where none does.
  total = sum(jnp.where(jnp.isnan(parts[name]), 0.0, w * parts[name]) for name, w in on)
  unscored = functools.reduce(jnp.logical_and, [jnp.isnan(parts[name]) for name, _ in on])
  # A total that is not a number for another reason (∞ − ∞, 0·∞) is a broken reward, not "does not
  # apply": it becomes ∞, which makes the loss non-finite, so the update is skipped and said.
  total = jnp.where(jnp.isnan(total), jnp.inf, total)
  return jnp.where(unscored, jnp.nan, total), parts


def compute_rewards_and_failures(inputs: RewardInputs, cfg: RewardConfig = RewardConfig()):
  """`compute_rewards`, and a () bool: whether the Python function of a text reward called in them
  (of any weight, configured or called by another reward) raised — the step then skips its update
  and the training loop raises the error."""
  del _TRACED_FAILURES[:]
  try:
    total, parts = compute_rewards(inputs, cfg)
    failed = functools.reduce(jnp.logical_or, _TRACED_FAILURES, jnp.bool_(False))
  finally:
    del _TRACED_FAILURES[:]
  return total, parts, failed


def check_rewards(cfg: RewardConfig, b: int, g: int, n: int) -> None:
  """Trace the configured rewards on abstract inputs of the step's shapes (B pairs, G samples, N
  new tokens), with listener probabilities exactly when the step will compute them: a reward that
  fails, or returns the wrong shape, is an error naming it before anything is loaded or compiled.
  (A text reward's Python function runs only in the step.)"""
  from lgrpo_jax.rewards.text import Parsed
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  inputs = RewardInputs(i32(b, g, n), i32(b, g, n), i32(b, g), i32(b),
                        Parsed(jax.ShapeDtypeStruct((b, g), jnp.bool_), i32(b, g), i32(b, g)),
                        jax.ShapeDtypeStruct((b, g, 2), jnp.float32) if cfg.needs_listener else None)
  jax.eval_shape(lambda x: compute_rewards(x, cfg), inputs)


def reward_metrics(inputs: RewardInputs, total, parts, valid_b=None) -> dict:
  """Per-step means: each reward, the total, format rate, accuracy, listener confidence, and the
  contradiction rate — among well-formed completions, how often the listener's argmax differs from
  the reasoner's answer (the paper's "reasoning contradiction", arXiv 2506.22832)."""
  w = jnp.ones(total.shape, jnp.float32) if valid_b is None else \
      jnp.broadcast_to(valid_b[:, None], total.shape).astype(jnp.float32)
  mean = lambda x: jnp.sum(x * w) / jnp.maximum(w.sum(), 1)
  # over the completions each reward scored (NaN: not scored), as TRL's nanmean: NaN when none was
  # (0 would read as a real mean reward of 0)
  def nanmean(x):
    n = jnp.sum(w * ~jnp.isnan(x))
    return jnp.sum(jnp.where(jnp.isnan(x), 0.0, x) * w) / jnp.where(n > 0, n, jnp.nan)
  out = {f"reward/{k}": nanmean(v) for k, v in parts.items()}
  # how many completions each reward did not score (NaN): a reward that starts returning NaN shows
  out.update({f"reward_unscored/{k}": jnp.sum(w * jnp.isnan(v)) for k, v in parts.items()})
  out["reward/total"] = nanmean(total)
  out["format_rate"] = mean(inputs.parsed.format_ok.astype(jnp.float32))
  out["accuracy"] = mean((inputs.parsed.answer == inputs.labels[:, None] + 1).astype(jnp.float32))
  if inputs.listener_probs is not None:
    correct = jnp.take_along_axis(inputs.listener_probs, jnp.broadcast_to(
        inputs.labels[:, None, None], total.shape + (1,)).astype(jnp.int32), -1)[..., 0]
    out["listener_confidence"] = mean(correct)
    listener_choice = jnp.argmax(inputs.listener_probs, -1) + 1
    formed = inputs.parsed.format_ok.astype(jnp.float32) * w
    contra = (listener_choice != inputs.parsed.answer).astype(jnp.float32)
    # NaN without a well-formed completion (0 would read as "never contradicts", the paper's metric)
    out["contradiction_rate"] = jnp.sum(contra * formed) / jnp.where(formed.sum() > 0, formed.sum(), jnp.nan)
  return out


def decode_completions(tokenizer, tokens, lengths) -> list[str]:
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  flat_t = tokens.reshape(-1, tokens.shape[-1])
  return [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(flat_t, lengths.reshape(-1))]


class RewardError(ValueError):
  """A text reward's Python function raised, or returned the wrong number of values, in a step."""


# What text rewards' host functions raised in the step running (the callback thread appends): the
# training loop takes them after every step (`take_host_errors`).
_HOST_ERRORS: list = []
# While rewards are traced (`compute_rewards_and_failures`): each text reward's traced "its function
# raised" flag, wherever it was called from (configured, or inside another reward).
_TRACED_FAILURES: list = []


def take_host_errors() -> list:
  """The `RewardError`s text rewards raised since the last call (and forget them)."""
  out = _HOST_ERRORS[:]
  del _HOST_ERRORS[:len(out)]
  return out


def text_reward(fn: Callable, tokenizer) -> Callable:
  """A device reward from a host Python function fn(texts: list[str], labels: list[int]) ->
  list[float] (one per completion, labels repeated per completion; None where the reward does not
  apply, as in TRL: NaN, see `compute_rewards`). Runs through
  `jax.pure_callback`: the device waits for the host, so prefer a token-level reward when speed
  matters.

  fn raising (or returning the wrong number of values) does not fail the step's program — that
  would lose the state it was given (donated): the reward is ∞ instead and a traced flag makes the
  step skip its update (`compute_rewards_and_failures`), so the state is kept; the training loop
  then raises the error (a `RewardError`, fn's own exception as its cause) after the step, saving
  the steps trained before it. Called outside a
  Trainer (a notebook's own `compute_rewards`), an ∞ means that: `take_host_errors()` gives the
  errors."""
  def host(tokens, lengths, labels):
    texts = decode_completions(tokenizer, tokens, lengths)
    g = tokens.shape[1]
    flat_labels = [int(l) for l in np.repeat(np.asarray(labels), g)]
    error = None
    try:
      out = fn(texts, flat_labels)
      values = np.asarray(out, np.float32)  # None → NaN
    except Exception as e:  # noqa: BLE001 — said after the step, by the loop
      error = RewardError(f"text reward {reward.reward_name!r} failed: {type(e).__name__}: {e}")
      error.__cause__ = e
    else:
      if values.shape != (len(texts),):
        error = RewardError(f"text reward {reward.reward_name!r} returned shape {values.shape}, "
                            f"expected ({len(texts)},): one float (or None) per completion")
    if error is not None:
      _HOST_ERRORS.append(error)
      return np.full(tokens.shape[:2], np.inf, np.float32), np.bool_(True)
    return values.reshape(tokens.shape[:2]), np.bool_(False)

  def reward(inputs: RewardInputs):
    shapes = (jax.ShapeDtypeStruct(inputs.lengths.shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.bool_))
    values, failed = jax.pure_callback(host, shapes, inputs.tokens, inputs.lengths, inputs.labels)
    _TRACED_FAILURES.append(failed)  # the step skips its update on it (`compute_rewards_and_failures`)
    return values

  reward.reward_name = getattr(fn, "__name__", repr(fn))  # register_reward renames it
  return reward
