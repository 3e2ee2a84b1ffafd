"""The GRPO objective as small pure functions with registries (formulas in the docstrings).

Shapes: B pairs (groups) × G completions × N completion tokens. `mask` (B, G, N) is 1 on
generated tokens (up to and including the stop token); every sum below is over masked tokens only.

    advantages      A_bg = (r_bg − mean_g r) / (std_g r + ε)         ("grpo")
                    A_bg =  r_bg − mean_g r                           ("dr_grpo": no std)
    ratio           ρ = exp(logp − logp_old)
    token loss      ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL(logp, logp_ref)
    aggregation     loss = Σ w·ℓ with per-token weights w from the whole batch's mask m:
                    "grpo":    w = m / Σ_t m / num_seqs                (sequence-mean of token-means)
                    "dapo":    w = m / Σ m                             (token-mean over the batch)
                    "dr_grpo": w = m / (num_seqs · max_len)            (token-sum / max length)

A researcher registers a new loss or KL estimator with `@register_loss("name")` /
`@register_kl("name")` and picks it by name in the config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS: dict[str, Callable] = {}
LOSSES: dict[str, Callable] = {}
ADVANTAGES: dict[str, Callable] = {}


def _register(table: dict, kind: str):
  def register(name: str, *, replace: bool = False):
    def wrap(fn):
      if name in table and not replace:  # replace=True: re-running a notebook cell
        raise ValueError(f"{kind} {name!r} is already registered (pass replace=True to override)")
      table[name] = fn
      return fn
    return wrap
  return register


register_kl = _register(KL_ESTIMATORS, "KL estimator")
register_loss = _register(LOSSES, "loss")
register_advantage = _register(ADVANTAGES, "advantage")


def lookup(table: dict, name: str, field: str):
  if name not in table:
    raise ValueError(f"{field}={name!r}: choose one of {sorted(table)}")
  return table[name]


# ---- advantages ---------------------------------------------------------------------------------
def centered(rewards_bg):
  """r − mean_g r, and exactly 0 in a group whose G rewards are all equal: in fp32 the mean of G
  equal values can miss them in the last bit (8 × 0.7), and a division by that group's ~1e-7 std
  would turn the rounding into advantages of ±0.1 — a push on a collapsed policy's own samples."""
  flat = jnp.all(rewards_bg == rewards_bg[..., :1], axis=-1, keepdims=True)
  return jnp.where(flat, 0.0, rewards_bg - rewards_bg.mean(axis=-1, keepdims=True))


@register_advantage("grpo")
def grpo_advantages(rewards_bg, eps: float = 1e-6):
  """A = (r − mean_g r) / (std_g r + ε), std with ddof 1 over the G completions of a pair (as TRL
  and tunix); 0 where the group's rewards are all equal."""
  c = centered(rewards_bg)
  std = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / (rewards_bg.shape[-1] - 1))
  return c / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards_bg, eps: float = 1e-6):
  """A = r − mean_g r (Dr. GRPO: no division by the group's std; TRL's scale_rewards="none")."""
  del eps
  return centered(rewards_bg)


def zero_variance_groups(rewards_bg, valid_b=None):
  """Number of (valid) groups whose G rewards are all equal: they give zero advantage, no signal."""
  flat = jnp.all(rewards_bg == rewards_bg[..., :1], axis=-1)
  return jnp.sum(flat if valid_b is None else flat & (valid_b > 0))


# ---- KL estimators on d = logp_ref − logp (per token) -------------------------------------------
@register_kl("k1")
def kl_k1(logp, logp_ref):
  """k1 = −d = logp − logp_ref."""
  return logp - logp_ref


@register_kl("k2")
def kl_k2(logp, logp_ref):
  """k2 = d² / 2."""
  return 0.5 * (logp_ref - logp) ** 2


@register_kl("k3")
def kl_k3(logp, logp_ref):
  """k3 = exp(d) − d − 1 (Schulman's unbiased, non-negative estimator; GRPO's default)."""
  d = logp_ref - logp
  return jnp.exp(d) - d - 1


# ---- per-token objective and aggregation --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossConfig:
  loss: str = "grpo"  # aggregation: grpo | dapo | dr_grpo (or a registered name)
  advantage: str = "grpo"  # grpo | dr_grpo
  eps_low: float = 0.2  # clip ratio below: 1 − eps_low
  eps_high: float = 0.2  # DAPO's clip-higher uses e.g. 0.28
  beta: float = 0.04  # KL coefficient; 0 skips the reference model entirely
  kl: str = "k3"  # KL estimator: k1 | k2 | k3
  adv_eps: float = 1e-6  # added to the group std
  # TRL's option: completions cut at max_new_tokens (no EOS) get no loss (their rewards still count
  # in their group's advantages)
  mask_truncated_completions: bool = False

  def __post_init__(self):
    lookup(LOSSES, self.loss, "LossConfig.loss")
    lookup(ADVANTAGES, self.advantage, "LossConfig.advantage")
    lookup(KL_ESTIMATORS, self.kl, "LossConfig.kl")
    for name in ("eps_low", "eps_high", "beta", "adv_eps"):
      if getattr(self, name) < 0:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be ≥ 0")


class TokenTerms(NamedTuple):
  loss: jax.Array  # (B, G, N) per-token loss (before masking)
  clipped: jax.Array  # (B, G, N) bool: the clipped branch was taken (no gradient flows)
  kl: jax.Array  # (B, G, N) per-token KL estimate (0 when β = 0)
  ratio: jax.Array  # (B, G, N)


def token_terms(logp, logp_old, advantages_bg, cfg: LossConfig, logp_ref=None) -> TokenTerms:
  """ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL, per token."""
  ratio = jnp.exp(logp - logp_old)
  adv = advantages_bg[..., None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv
  pg = -jnp.minimum(unclipped, clipped)
  if cfg.beta > 0:
    if logp_ref is None:
      raise ValueError("LossConfig.beta > 0 needs reference log-probs")
    kl = lookup(KL_ESTIMATORS, cfg.kl, "LossConfig.kl")(logp, logp_ref)
  else:
    kl = jnp.zeros_like(logp)
  return TokenTerms(pg + cfg.beta * kl, clipped < unclipped, kl, ratio)


# A loss mode is the per-token weight w (B, G, N) with loss = Σ w·ℓ, computed from the masks of the
# *whole* batch: micro-batches then sum to exactly the whole batch's loss and gradient.
@register_loss("grpo")
def weights_grpo(mask):
  """Sequence-mean of token-means: w = m / (Σ_t m of its sequence) / (number of non-empty sequences)."""
  per_seq = mask.sum(-1, keepdims=True)
  n_seq = jnp.maximum(jnp.sum(per_seq > 0), 1)
  return mask / jnp.maximum(per_seq, 1) / n_seq


@register_loss("dapo")
def weights_dapo(mask):
  """Token-mean over the whole batch: w = m / Σ m."""
  return mask / jnp.maximum(mask.sum(), 1)


@register_loss("dr_grpo")
def weights_dr_grpo(mask):
  """Token-sum / (number of non-empty sequences × max completion length N): no length bias."""
  n_seq = jnp.maximum(jnp.sum(mask.sum(-1) > 0), 1)
  return mask / (n_seq * mask.shape[-1])


def token_weights(mask, cfg: LossConfig, valid_b=None):
  """Per-token loss weights of the batch; padding pairs (pipeline `valid` = 0) weigh nothing."""
  mask = mask.astype(jnp.float32)
  if valid_b is not None:
    mask = mask * valid_b[:, None, None].astype(jnp.float32)
  return lookup(LOSSES, cfg.loss, "LossConfig.loss")(mask)


def advantages(rewards_bg, cfg: LossConfig):
  return jax.lax.stop_gradient(lookup(ADVANTAGES, cfg.advantage, "LossConfig.advantage")(rewards_bg, cfg.adv_eps))


def grpo_loss(logp, logp_old, advantages_bg, weights, cfg: LossConfig, logp_ref=None, entropy=None):
  """(Σ w·ℓ, metrics) for per-token log-probs (B, G, N) of the policy being optimised, the
  sampler's (`logp_old`) and the reference's; `weights` from `token_weights` (whole batch).

  Metrics (over the tokens with weight > 0): KL, clip fractions (low: A < 0 and ρ < 1 − ε_low;
  high: A > 0 and ρ > 1 + ε_high), ratio mean/max, entropy (if given), and the log-prob drift
  mean |logp − logp_old| (on the first pass: trainer vs sampler numerics); `loss_tokens`, their
  number, by which micro-batches' means are weighted."""
  logp_old = jax.lax.stop_gradient(logp_old)
  adv = jax.lax.stop_gradient(advantages_bg)
  terms = token_terms(logp, logp_old, adv, cfg, None if logp_ref is None else jax.lax.stop_gradient(logp_ref))
  loss = jnp.sum(terms.loss * weights)
  on = (weights > 0).astype(jnp.float32)
  n_tok = jnp.maximum(on.sum(), 1)
  mean = lambda x: (x * on).sum() / n_tok
  a = adv[..., None]
  metrics = {
      "kl": mean(terms.kl),
      "clip_fraction_low": mean(((a < 0) & (terms.ratio < 1 - cfg.eps_low)).astype(jnp.float32)),
      "clip_fraction_high": mean(((a > 0) & (terms.ratio > 1 + cfg.eps_high)).astype(jnp.float32)),
      "ratio_mean": mean(terms.ratio),
      "ratio_max": jnp.max(jnp.where(on > 0, terms.ratio, -jnp.inf)),
      "logprob_drift": mean(jnp.abs(jax.lax.stop_gradient(logp) - logp_old)),
      "loss_tokens": on.sum(),
  }
  if entropy is not None:
    metrics["entropy"] = mean(entropy)
  return loss, metrics


def advantage_metrics(rewards_bg, advantages_bg, valid_b=None) -> dict:
  """Advantage statistics over the valid groups (`valid_b`: 1 for a real pair, 0 for a padding
  row) and the number of groups with zero reward variance (no signal)."""
  w = jnp.ones(advantages_bg.shape, jnp.float32) if valid_b is None else \
      jnp.broadcast_to(valid_b[:, None], advantages_bg.shape).astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1)
  mean = jnp.sum(advantages_bg * w) / n
  return {"advantage_mean": mean, "advantage_std": jnp.sqrt(jnp.sum(w * (advantages_bg - mean) ** 2) / n),
          "advantage_abs_max": jnp.max(jnp.where(w > 0, jnp.abs(advantages_bg), 0)),
          "zero_variance_groups": zero_variance_groups(rewards_bg, valid_b)}
