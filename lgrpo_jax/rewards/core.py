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
  def wrap(f):
    if name in REWARDS and not replace:
      raise ValueError(f"reward {name!r} is already registered (pass replace=True to override, e.g. "
                       "when a notebook cell or a config file runs again)")
    REWARDS[name] = f
    (USES_LISTENER.add if uses_listener else USES_LISTENER.discard)(name)
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


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  # (registered reward, weight) pairs; the total reward is the weighted sum of the rewards that apply
  # (NaN: does not apply; the paper: 1, 0.5, 0.5)
  weights: tuple[tuple[str, float], ...] = (("format", 1.0), ("accuracy", 0.5), ("listener", 0.5))

  def __post_init__(self):
    object.__setattr__(self, "weights", tuple((str(n), float(w)) for n, w in self.weights))
    if not self.weights:
      raise ValueError("RewardConfig.weights is empty: GRPO needs at least one (reward, weight) pair")
    from lgrpo_jax.grpo.core import reading_a_record
    for name, w in self.weights:
      if name not in REWARDS and not reading_a_record():
        raise ValueError(f"RewardConfig.weights: unknown reward {name!r} (registered: {sorted(REWARDS)})")
      if not math.isfinite(w):
        raise ValueError(f"RewardConfig.weights: the weight of {name!r} is {w}, not a finite number")

  @property
  def needs_listener(self) -> bool:
    return any(n in USES_LISTENER and w != 0 for n, w in self.weights)


def compute_rewards(inputs: RewardInputs, cfg: RewardConfig = RewardConfig()):
  """(total (B, G), {name: (B, G)})."""
  parts = {}
  for name, _ in cfg.weights:
    try:
      value = jnp.asarray(REWARDS[name](inputs)).astype(jnp.float32)
    except TypeError as e:  # mostly: a reward reading listener_probs that the step did not compute
      if inputs.listener_probs is None and name not in USES_LISTENER:
        raise ValueError(f"reward {name!r} failed ({e}); if it reads inputs.listener_probs, register it with "
                         "register_reward(..., uses_listener=True) so that the step runs the listener") from e
      raise
    want = inputs.lengths.shape
    if value.shape == ():  # a constant: every completion
      value = jnp.broadcast_to(value, want)
    if value.shape != want:  # (B,) or (B, G, 1) would broadcast into the wrong axes, silently or deep in JAX
      raise ValueError(f"reward {name!r} returned shape {value.shape}; a reward gives one value per "
                       f"completion: (B, G) = {want}")
    parts[name] = value
  # TRL's rule: a reward that does not apply to a completion gives NaN (a host reward's None); the
  # total is the weighted sum of those that do, and NaN ("not scored": advantage 0) where none does.
  total = sum(jnp.where(jnp.isnan(parts[name]), 0.0, w * parts[name]) for name, w in cfg.weights)
  unscored = functools.reduce(jnp.logical_and, [jnp.isnan(parts[name]) for name, _ in cfg.weights])
  # A total that is not a number for another reason (∞ − ∞, 0·∞) is a broken reward, not "does not
  # apply": it becomes ∞, which makes the loss non-finite, so the update is skipped and said.
  total = jnp.where(jnp.isnan(total), jnp.inf, total)
  return jnp.where(unscored, jnp.nan, total), parts


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
    out["contradiction_rate"] = jnp.sum(contra * formed) / jnp.maximum(formed.sum(), 1)
  return out


def decode_completions(tokenizer, tokens, lengths) -> list[str]:
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  flat_t = tokens.reshape(-1, tokens.shape[-1])
  return [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(flat_t, lengths.reshape(-1))]


def text_reward(fn: Callable, tokenizer) -> Callable:
  """A device reward from a host Python function fn(texts: list[str], labels: list[int]) ->
  list[float] (one per completion, labels repeated per completion; None where the reward does not
  apply, as in TRL: NaN, see `compute_rewards`). Runs through
  `jax.pure_callback`: the device waits for the host, so prefer a token-level reward when speed
  matters."""
  def host(tokens, lengths, labels):
    texts = decode_completions(tokenizer, tokens, lengths)
    g = tokens.shape[1]
    flat_labels = [int(l) for l in np.repeat(np.asarray(labels), g)]
    values = np.asarray(fn(texts, flat_labels), np.float32)
    if values.shape != (len(texts),):
      raise ValueError(f"text reward {getattr(fn, '__name__', fn)!r} returned shape {values.shape}, "
                       f"expected ({len(texts)},): one float per completion")
    return values.reshape(tokens.shape[:2])

  def reward(inputs: RewardInputs):
    shape = jax.ShapeDtypeStruct(inputs.lengths.shape, jnp.float32)
    return jax.pure_callback(host, shape, inputs.tokens, inputs.lengths, inputs.labels)

  return reward
