"""The GRPO objective as small pure functions with registries (formulas in the docstrings).

Shapes: B pairs (groups) × G completions × N completion tokens. `mask` (B, G, N) is 1 on
generated tokens (up to and including the stop token); every sum below is over masked tokens only.

    advantages      A_bg = (r_bg − mean_g r) / (std_g r + ε)         ("grpo")
                    A_bg =  r_bg − mean_g r                           ("dr_grpo": no std)
                    A_bg = (r_bg − mean_g r) / (std_batch r + ε)     ("batch": the batch's spread)
                    (a NaN reward: not scored, out of the means and stds, A = 0)
    ratio           ρ = exp(logp − logp_old)                          (importance_sampling_level "token")
                    ρ = exp(mean_t (logp − logp_old)) per sequence    ("sequence": GSPO)
    objective       o = −min(ρ'·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ' = min(ρ, δ)   ("clip")
                    o = −sg(min(ρ, 1 + ε_high))·A·logp                                ("cispo")
                    o = −(4/τ)·σ(τ·(ρ − 1))·A, τ = τ_pos if A > 0 else τ_neg           ("sapo")
                    o = −sg(φ(w))·A·logp, φ(w) = e^λ·w^k·e^(−λw), w = Π_t ρ_t           ("vespo")
    token loss      ℓ = keep·o + β·KL(logp, logp_ref)·(ρ if use_bias_correction_kl else 1)
                    keep: 0 on the tokens below the top_entropy_quantile of the entropy, and on the
                    sequences with A < 0 whose mean (logp_old − logp) > off_policy_mask_threshold
    aggregation     loss = Σ w·ℓ with per-token weights w from the whole batch's mask m:
                    "grpo":    w = m / Σ_t m / num_seqs                (sequence-mean of token-means)
                    "dapo":    w = m / Σ m                             (token-mean over the batch)
                    "dr_grpo": w = m / (num_seqs · max_len)            (token-sum / max length)
                    "luspo":   w = m / num_seqs                        (token-sum, mean over sequences)
    entropy bonus   loss −= entropy_coef · Σ m·H / Σ m                 (H differentiated; off at 0)

A researcher registers a new surrogate, aggregation, KL estimator or advantage with
`@register_objective` / `@register_loss` / `@register_kl` / `@register_advantage` and picks it by
name in the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS: dict[str, Callable] = {}
LOSSES: dict[str, Callable] = {}
ADVANTAGES: dict[str, Callable] = {}
OBJECTIVES: dict[str, Callable] = {}
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


# The built-in names of each table (filled at the end of this module): not replaceable, because a
# run's config.json records only the name, which must mean the same function in every process.
_BUILT_IN: dict[int, frozenset] = {}


def _register(table: dict, kind: str, api: str):
  def register(name: str, fn: Callable | None = None, *, replace: bool = False):
    """Register `fn` under `name`, as a decorator (`@register_kl("name")`) or called with the
    function (`register_kl("name", fn)`). replace=True: re-running a notebook cell or a config file.
    Built-in names cannot be replaced."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"{api} takes the name first: @{api}(\"my_name\") or {api}(\"my_name\", fn), "
                       f"not {name!r}")

    def wrap(f):
      if not callable(f):
        raise ValueError(f"{api}({name!r}, {f!r}): not callable")
      if name in _BUILT_IN.get(id(table), ()):
        raise ValueError(f"{kind} {name!r} is built in: register yours under another name (a run's config.json "
                         f"records only the name, so {name!r} must mean the same function in every process)")
      if name in table and not replace:  # replace=True: re-running a notebook cell
        raise ValueError(f"{kind} {name!r} is already registered (pass replace=True to override)")
      table[name] = f
      return f
    return wrap if fn is None else wrap(fn)
  return register


register_kl = _register(KL_ESTIMATORS, "KL estimator", "register_kl")
register_loss = _register(LOSSES, "loss", "register_loss")
register_advantage = _register(ADVANTAGES, "advantage", "register_advantage")
register_objective = _register(OBJECTIVES, "objective", "register_objective")


_READING_A_RECORD = contextvars.ContextVar("lgrpo_jax_reading_a_record", default=False)


@contextlib.contextmanager
def unregistered_names_allowed():
  """Within: configs accept loss, advantage, KL, objective and reward names this process has not
  registered. For reading a finished run's config.json back (`runs.run_config`): a run trained with
  a function registered in its notebook or config file is evaluated, converted and inspected by
  other processes, which never need that function. Everywhere else an unknown name is an error
  before anything compiles."""
  token = _READING_A_RECORD.set(True)
  try:
    yield
  finally:
    _READING_A_RECORD.reset(token)


def reading_a_record() -> bool:
  """Inside `unregistered_names_allowed()`: configs do not check registered names."""
  return _READING_A_RECORD.get()


def lookup(table: dict, name: str, field: str):
  if name not in table:
    if reading_a_record():
      return None
    raise ValueError(f"{field}={name!r}: choose one of {sorted(table)}")
  return table[name]


def _apply(table: dict, name: str, field: str, args: tuple, shape: tuple, takes: str, per_token: bool = False):
  """table[name](*args), checked to be an array of `shape`: a registered function that fails or
  returns another shape is an error naming it and saying what it takes (it used to be a bare JAX
  broadcasting error from inside the step, or, for (B, G, 1) weights, silently the wrong tokens).
  `per_token` (an objective, a KL estimator): a scalar or a (B, G, 1) value is every token's."""
  fn = lookup(table, name, field)
  if name in _BUILT_IN.get(id(table), ()):
    return fn(*args)  # ours: their own errors say what is wrong
  try:
    out = jnp.asarray(fn(*args))
  except Exception as e:  # noqa: BLE001 — re-raised, naming the function
    raise ValueError(f"{field}={name!r} failed: {type(e).__name__}: {e}. {takes}") from e
  b, g, *_ = tuple(shape) + (1,)
  if per_token and out.shape in ((), (b, g, 1)):
    out = jnp.broadcast_to(out, shape)
  if out.shape != tuple(shape):
    raise ValueError(f"{field}={name!r} returned shape {out.shape}; {takes}")
  return out


# ---- advantages ---------------------------------------------------------------------------------
# A NaN reward means "not scored" (TRL: every reward function returned None for the completion): the
# completion takes no part in its group's mean and spread, and its advantage is 0 (`advantages`).
def scored(rewards_bg):
  """(B, G) bool: the completions whose reward is a number (not NaN)."""
  return ~jnp.isnan(rewards_bg)


def _flat_groups(rewards_bg):
  """(B, 1) bool: the group's scored rewards are all equal (or it has none)."""
  m = scored(rewards_bg)
  first = jnp.take_along_axis(rewards_bg, jnp.argmax(m, axis=-1, keepdims=True), -1)
  return jnp.all(~m | (rewards_bg == first), axis=-1, keepdims=True)


def centered(rewards_bg):
  """r − mean_g r over the group's scored completions (0 for one not scored), and exactly 0 in a
  group whose scored rewards are all equal: in fp32 the mean of G equal values can miss them in the
  last bit (8 × 0.7), and a division by that group's ~1e-7 std would turn the rounding into
  advantages of ±0.06 (±0.1 at G = 16) — a push on a collapsed policy's own samples."""
  m = scored(rewards_bg)
  r = jnp.where(m, rewards_bg, 0.0)
  mean = r.sum(axis=-1, keepdims=True) / jnp.maximum(m.sum(axis=-1, keepdims=True), 1)
  return jnp.where(_flat_groups(rewards_bg) | ~m, 0.0, r - mean)


def pair_weights(valid_b, shape):
  """(B, G) float 1 for the completions of real pairs, 0 for padding rows (all 1 without `valid_b`)."""
  if valid_b is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(valid_b[:, None], shape).astype(jnp.float32)


# An advantage function: (rewards (B, G), ε, valid (B,): 1 for a real pair, 0 for a padding row) → (B, G).
@register_advantage("grpo")
def grpo_advantages(rewards_bg, eps: float = 1e-6, valid_b=None):
  """A = (r − mean_g r) / (std_g r + ε), std with ddof 1 over the G completions of a pair (as TRL
  and tunix); 0 where the group's rewards are all equal."""
  del valid_b  # each group on its own
  if rewards_bg.shape[-1] < 2:
    raise ValueError(f"grpo advantages of {rewards_bg.shape[-1]} completion per group: the group's std "
                     "needs G ≥ 2 (dr_grpo needs no std)")
  c = centered(rewards_bg)
  n = scored(rewards_bg).sum(axis=-1, keepdims=True)  # G, less the completions not scored
  std = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / jnp.maximum(n - 1, 1))
  return c / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards_bg, eps: float = 1e-6, valid_b=None):
  """A = r − mean_g r (Dr. GRPO: no division by the group's std; TRL's scale_rewards="none")."""
  del eps, valid_b
  return centered(rewards_bg)


@register_advantage("batch")
def batch_advantages(rewards_bg, eps: float = 1e-6, valid_b=None):
  """A = (r − mean_g r) / (std r + ε): the group's baseline, the spread of the whole batch's rewards
  (std with ddof 1 over the B·G rewards of the valid pairs; TRL's scale_rewards="batch", after PPO
  Lite). 0 where the group's rewards are all equal."""
  w = pair_weights(valid_b, rewards_bg.shape) * scored(rewards_bg)
  r = jnp.where(scored(rewards_bg), rewards_bg, 0.0)
  n = w.sum()
  mean = jnp.sum(r * w) / jnp.maximum(n, 1)
  std = jnp.sqrt(jnp.sum(w * (r - mean) ** 2) / jnp.maximum(n - 1, 1))
  return centered(rewards_bg) / (std + eps)


def zero_variance_groups(rewards_bg, valid_b=None):
  """Number of (valid) groups whose (scored) rewards are all equal: zero advantage, no signal."""
  flat = _flat_groups(rewards_bg)[..., 0]
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
  loss: str = "grpo"  # aggregation: grpo | dapo | dr_grpo | luspo (or a registered name)
  advantage: str = "grpo"  # grpo | dr_grpo | batch (TRL's scale_rewards group | none | batch)
  objective: str = "clip"  # surrogate: clip (PPO) | cispo | sapo | vespo (or a registered name)
  # token: one ratio per token; sequence: GSPO's, exp of the sequence's mean log-ratio on every token
  importance_sampling_level: str = "token"
  eps_low: float = 0.2  # clip ratio below: 1 − eps_low
  eps_high: float = 0.2  # above: 1 + eps_high (DAPO's clip-higher: 0.28; cispo's cap, e.g. 4 = TRL's 5.0)
  delta: float | None = None  # clip: also cap the unclipped ratio at δ > 1 (INTELLECT-2's two-sided clip)
  sapo_temperature_pos: float = 1.0  # sapo: gate temperature where A > 0
  sapo_temperature_neg: float = 1.05  # sapo: gate temperature where A ≤ 0
  vespo_k_pos: float = 2.0  # vespo: φ(w) = e^λ·w^k·e^(−λw); the power k where A ≥ 0
  vespo_lambda_pos: float = 3.0  # vespo: the decay λ where A ≥ 0
  vespo_k_neg: float = 3.0  # vespo: the power k where A < 0
  vespo_lambda_neg: float = 2.0  # vespo: the decay λ where A < 0
  beta: float = 0.04  # KL coefficient; 0: no reference pass and no reference copy (as TRL's ref_model=None)
  kl: str = "k3"  # KL estimator: k1 | k2 | k3
  use_bias_correction_kl: bool = False  # KL term × the importance ratio ρ (DeepSeek-V3.2; TRL's default)
  adv_eps: float = 1e-6  # added to the group std
  # TRL's option: completions cut at max_new_tokens (no EOS) get no loss (their rewards still count
  # in their group's advantages)
  mask_truncated_completions: bool = False
  # Policy term only on the tokens whose entropy is in this top fraction (1: all tokens; "Beyond the
  # 80/20 rule" uses 0.2); the quantile is over each micro-batch's loss tokens, as TRL's
  top_entropy_quantile: float = 1.0
  # Drop the policy term of sequences with A < 0 whose mean (logp_old − logp) exceeds this
  # (DeepSeek-V3.2's off-policy sequence mask); None: off
  off_policy_mask_threshold: float | None = None
  # Entropy bonus: loss − coef · (mean entropy over the batch's loss tokens); 0: off
  entropy_coef: float = 0.0

  def __post_init__(self):
    lookup(LOSSES, self.loss, "LossConfig.loss")
    lookup(ADVANTAGES, self.advantage, "LossConfig.advantage")
    lookup(KL_ESTIMATORS, self.kl, "LossConfig.kl")
    lookup(OBJECTIVES, self.objective, "LossConfig.objective")
    if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
      raise ValueError(f"LossConfig.importance_sampling_level={self.importance_sampling_level!r}: choose one of "
                       f"{IMPORTANCE_SAMPLING_LEVELS}")
    for name in ("eps_low", "eps_high", "beta", "adv_eps"):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be finite and ≥ 0")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
      if not 0 < getattr(self, name) < math.inf:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be finite and > 0")
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be finite and ≥ 0")
    if self.objective == "vespo" and self.importance_sampling_level != "token":
      raise ValueError("LossConfig.objective='vespo' forms its own sequence weight from the per-token ratios: "
                       "keep importance_sampling_level='token'")
    if self.delta is not None:
      if not 1 < self.delta < math.inf:
        raise ValueError(f"LossConfig.delta={self.delta} must be > 1 (it caps the ratio ρ, which is 1 on policy)")
      if self.objective != "clip":
        raise ValueError(f"LossConfig.delta caps the clip objective's ratio; objective={self.objective!r} "
                         "does not use it (set delta=None)")
    if not 0 <= self.top_entropy_quantile <= 1:
      raise ValueError(f"LossConfig.top_entropy_quantile={self.top_entropy_quantile} must be in [0, 1]")
    if not math.isfinite(self.entropy_coef):
      raise ValueError(f"LossConfig.entropy_coef={self.entropy_coef} must be finite")
    if self.entropy_coef != 0 and self.top_entropy_quantile < 1:
      raise ValueError(f"LossConfig.entropy_coef={self.entropy_coef} with top_entropy_quantile="
                       f"{self.top_entropy_quantile}: not supported (TRL then takes the bonus over the kept tokens "
                       "only, a per-micro-batch set); use one of them")
    if self.off_policy_mask_threshold is not None and not 0 <= self.off_policy_mask_threshold < math.inf:
      raise ValueError(f"LossConfig.off_policy_mask_threshold={self.off_policy_mask_threshold} must be finite "
                       "and ≥ 0 (or None: off)")


class TokenTerms(NamedTuple):
  loss: jax.Array  # (B, G, N) per-token loss (before the aggregation weights)
  keep: jax.Array  # (B, G, N) bool: the policy term counts (the entropy and off-policy masks)
  kl: jax.Array  # (B, G, N) per-token KL estimate (0 when β = 0)
  ratio: jax.Array  # (B, G, N) the importance ratio ρ (per sequence, broadcast: "sequence")


# An objective: (logp, ρ, A (B, G, 1), on (B, G, N): the loss tokens, cfg) → the per-token policy
# loss o (B, G, N), whose gradient with respect to logp is the policy gradient. ρ is already at the
# configured level (token/sequence).
@register_objective("clip")
def clip_objective(logp, ratio, adv, on, cfg: LossConfig):
  """o = −min(ρ'·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ' = min(ρ, δ) when `delta` is set (a
  negative advantage cannot push a token with a huge ratio without bound), else ρ."""
  del logp, on
  unclipped = (ratio if cfg.delta is None else jnp.minimum(ratio, cfg.delta)) * adv
  return -jnp.minimum(unclipped, jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv)


@register_objective("cispo")
def cispo_objective(logp, ratio, adv, on, cfg: LossConfig):
  """o = −sg(min(ρ, 1 + ε_high))·A·logp (CISPO, MiniMax-M1): the importance weight is capped and
  held constant, so every token keeps its gradient A·∇logp, scaled by at most 1 + ε_high."""
  del on
  return -jax.lax.stop_gradient(jnp.minimum(ratio, 1 + cfg.eps_high)) * adv * logp


@register_objective("sapo")
def sapo_objective(logp, ratio, adv, on, cfg: LossConfig):
  """o = −(4/τ)·σ(τ·(ρ − 1))·A with τ = τ_pos where A > 0, else τ_neg (SAPO): a smooth gate in
  place of the hard clip; its slope in ρ is 1 on policy and decays away from ρ = 1."""
  del logp, on
  tau = jnp.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
  return -jax.nn.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv


@register_objective("vespo")
def vespo_objective(logp, ratio, adv, on, cfg: LossConfig):
  """o = −sg(φ(w))·A·logp (VESPO): w = Π_t ρ_t over the sequence's tokens (log ρ_t clipped to ±20,
  log w to [log 1e-8, 20]), φ(w) = e^λ·w^k·e^(−λw) — 1 on policy, a smooth Gamma-shaped weight that
  vanishes for w → 0 and w → ∞; (k, λ) by the sign of A (A ≥ 0: the _pos pair)."""
  log_w = jnp.sum(jnp.clip(jnp.log(ratio), -20.0, 20.0) * on, -1, keepdims=True)
  log_w = jnp.clip(log_w, math.log(1e-8), 20.0)
  pos = adv >= 0
  k = jnp.where(pos, cfg.vespo_k_pos, cfg.vespo_k_neg)
  lam = jnp.maximum(jnp.where(pos, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg), 1e-4)
  phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
  phi = jnp.where(jnp.isfinite(phi), phi, 0.0)
  return -jax.lax.stop_gradient(phi) * adv * logp


def sequence_mean(x_bgn, on_bgn):
  """Each sequence's mean of x over its tokens `on`, broadcast back over them (0 for an empty one)."""
  n = on_bgn.sum(-1, keepdims=True)
  return jnp.broadcast_to(jnp.sum(x_bgn * on_bgn, -1, keepdims=True) / jnp.maximum(n, 1), x_bgn.shape)


def high_entropy_mask(entropy, on, quantile: float):
  """`on` tokens whose entropy is ≥ the `quantile` quantile of the `on` tokens' entropies (linear
  interpolation between order statistics, as np.quantile and torch.quantile)."""
  n = on.sum().astype(jnp.int32)
  ordered = jnp.sort(jnp.where(on, entropy, jnp.inf).reshape(-1))
  pos = quantile * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  threshold = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
  return on & (entropy >= threshold) & (n > 0)


def token_terms(logp, logp_old, advantages_bg, cfg: LossConfig, logp_ref=None, on=None, entropy=None) -> TokenTerms:
  """ℓ = keep·o(ρ, A) + β·KL·(ρ if use_bias_correction_kl else 1), per token. `on` (B, G, N): the
  tokens the loss counts, over which the sequence-level ratio, the off-policy mask's mean and the
  entropy quantile are taken (default: every token); `entropy`: needed for top_entropy_quantile < 1."""
  on = jnp.ones(logp.shape, bool) if on is None else on
  log_ratio = logp - logp_old
  if cfg.importance_sampling_level == "sequence":
    log_ratio = sequence_mean(log_ratio, on)
  ratio = jnp.exp(log_ratio)
  adv = advantages_bg[..., None]
  policy = _apply(OBJECTIVES, cfg.objective, "LossConfig.objective", (logp, ratio, adv, on, cfg), logp.shape,
                  f"An objective is fn(logp, ratio, adv (B, G, 1), on (B, G, N) bool, cfg) -> the per-token policy "
                  f"loss, shaped as logp: (B, G, N) = {logp.shape} (or (B, G, 1): each token of the sequence)",
                  per_token=True)
  keep = jnp.ones(logp.shape, bool)
  if cfg.off_policy_mask_threshold is not None:
    drift = sequence_mean(logp_old - jax.lax.stop_gradient(logp), on)
    keep = keep & ((adv >= 0) | (drift <= cfg.off_policy_mask_threshold))
  if cfg.top_entropy_quantile < 1:
    if entropy is None:
      raise ValueError("LossConfig.top_entropy_quantile < 1 needs the tokens' entropies")
    keep = keep & high_entropy_mask(jax.lax.stop_gradient(entropy), on, 1 - cfg.top_entropy_quantile)
  if cfg.beta > 0:
    if logp_ref is None:
      raise ValueError("LossConfig.beta > 0 needs reference log-probs")
    kl = _apply(KL_ESTIMATORS, cfg.kl, "LossConfig.kl", (logp, logp_ref), logp.shape,
                f"A KL estimator is fn(logp, logp_ref) -> the per-token KL, (B, G, N) = {logp.shape}", per_token=True)
    if cfg.use_bias_correction_kl:
      kl = kl * ratio
  else:
    kl = jnp.zeros_like(logp)
  # Only the loss tokens' policy terms: a custom objective may be NaN off them (an empty sequence's
  # 0/0), which the aggregation's weight 0 would not cancel (0·NaN).
  return TokenTerms(jnp.where(keep & on, policy, 0.0) + cfg.beta * kl, keep, kl, ratio)


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


@register_loss("luspo")
def weights_luspo(mask):
  """Token-sum of each sequence, mean over the non-empty sequences: w = m / num_seqs (LUSPO: with
  importance_sampling_level="sequence", GSPO's sequence loss scaled by the sequence's length)."""
  return mask / jnp.maximum(jnp.sum(mask.sum(-1) > 0), 1)


def token_weights(mask, cfg: LossConfig, valid_b=None):
  """Per-token loss weights of the batch; padding pairs (pipeline `valid` = 0) weigh nothing."""
  f = jnp.result_type(float)  # float32, or float64 under jax.enable_x64 (the reference tests)
  mask = mask.astype(f)
  if valid_b is not None:
    mask = mask * valid_b[:, None, None].astype(f)
  return _apply(LOSSES, cfg.loss, "LossConfig.loss", (mask,), mask.shape,
                f"A loss aggregation is fn(mask (B, G, N) float) -> per-token weights, (B, G, N) = {mask.shape}")


def advantages(rewards_bg, cfg: LossConfig, valid_b=None):
  """The (B, G) advantages of the configured mode; `valid_b` (B,): 1 for a real pair, 0 for a
  padding row (which then takes no part in a batch-wide statistic). A completion whose reward is
  NaN (not scored) gets advantage 0, whatever the mode; the built-in modes also leave it out of
  the means and spreads (TRL's rule for a completion every reward function returned None for)."""
  valid_b = jnp.ones(rewards_bg.shape[:1], jnp.float32) if valid_b is None else valid_b.astype(jnp.float32)
  adv = _apply(ADVANTAGES, cfg.advantage, "LossConfig.advantage", (rewards_bg, cfg.adv_eps, valid_b),
               rewards_bg.shape, f"An advantage function is fn(rewards (B, G), eps, valid (B,)) -> one advantage "
               f"per completion, as the rewards: (B, G) = {rewards_bg.shape}")
  return jax.lax.stop_gradient(jnp.where(scored(rewards_bg), adv, 0.0))


def grpo_loss(logp, logp_old, advantages_bg, weights, cfg: LossConfig, logp_ref=None, entropy=None,
              batch_tokens=None):
  """(Σ w·ℓ − c·Σ_on H / batch_tokens, metrics) for per-token log-probs (B, G, N) of the policy
  being optimised, the ratio's old ones (`logp_old`: by default the update's own, detached) and the
  reference's; `weights` from `token_weights`
  (whole batch). The entropy bonus (c = `entropy_coef`) needs `entropy`, differentiable; it is
  the mean over the whole batch's loss tokens (`batch_tokens`, default: these), so micro-batches
  add up to the batch's, as the rest of the loss does.

  Metrics (over the tokens with weight > 0): KL (when β > 0), clip fractions (low: A < 0 and
  ρ < 1 − ε_low; high: A > 0 and ρ > 1 + ε_high — for cispo, the positive-advantage tokens whose
  weight is capped, TRL's `cispo_clip_ratio`), ratio mean/max, entropy (if
  given), the log-prob drift mean |logp − logp_old| (the training step replaces it by the drift
  against the sampler), the fraction of tokens whose policy term the entropy / off-policy masks keep (when
  either is on), and `loss_tokens`, their number, by which micro-batches' means are weighted."""
  adv = jax.lax.stop_gradient(advantages_bg)
  on = weights > 0
  # Tokens off the loss read as 0: their terms are then finite, so 0·ℓ is 0 and not NaN (a padded
  # slot's exp(logp_ref − logp) can overflow) in the loss and in its gradient.
  off_as_zero = lambda x: jnp.where(on, x, 0.0)
  logp = off_as_zero(logp)
  logp_old = off_as_zero(jax.lax.stop_gradient(logp_old))
  logp_ref = None if logp_ref is None else off_as_zero(jax.lax.stop_gradient(logp_ref))
  entropy = None if entropy is None else off_as_zero(entropy)
  terms = token_terms(logp, logp_old, adv, cfg, logp_ref, on, entropy)
  loss = jnp.sum(terms.loss * weights)
  if cfg.entropy_coef != 0:
    if entropy is None:
      raise ValueError("LossConfig.entropy_coef needs the tokens' entropies")
    n = jnp.sum(on) if batch_tokens is None else batch_tokens
    loss = loss - cfg.entropy_coef * jnp.sum(jnp.where(on, entropy, 0.0)) / jnp.maximum(n, 1)
  on = on.astype(jnp.float32)
  n_tok = jnp.maximum(on.sum(), 1)
  mean = lambda x: (x * on).sum() / n_tok
  a = adv[..., None]
  metrics = {
      "clip_fraction_low": mean(((a < 0) & (terms.ratio < 1 - cfg.eps_low)).astype(jnp.float32)),
      "clip_fraction_high": mean(((a > 0) & (terms.ratio > 1 + cfg.eps_high)).astype(jnp.float32)),
      "ratio_mean": mean(terms.ratio),
      "ratio_max": jnp.max(jnp.where(on > 0, terms.ratio, 0.0)),  # 0 without loss tokens (ρ > 0)
      "logprob_drift": mean(jnp.abs(jax.lax.stop_gradient(logp) - logp_old)),
      "loss_tokens": on.sum(),
  }
  if cfg.top_entropy_quantile < 1 or cfg.off_policy_mask_threshold is not None:
    metrics["policy_kept_fraction"] = mean(terms.keep.astype(jnp.float32))
  if entropy is not None:
    metrics["entropy"] = mean(entropy)
  if cfg.beta > 0:  # with β = 0 no KL is computed (TRL logs none either)
    metrics["kl"] = mean(terms.kl)
  return loss, metrics


def advantage_metrics(rewards_bg, advantages_bg, valid_b=None) -> dict:
  """Advantage statistics over the valid groups (`valid_b`: 1 for a real pair, 0 for a padding
  row) and the number of groups with zero reward variance (no signal)."""
  w = pair_weights(valid_b, advantages_bg.shape)
  n = jnp.maximum(w.sum(), 1)
  mean = jnp.sum(advantages_bg * w) / n
  return {"advantage_mean": mean, "advantage_std": jnp.sqrt(jnp.sum(w * (advantages_bg - mean) ** 2) / n),
          "advantage_abs_max": jnp.max(jnp.where(w > 0, jnp.abs(advantages_bg), 0)),
          "zero_variance_groups": zero_variance_groups(rewards_bg, valid_b),
          "unscored_completions": jnp.sum(w * ~scored(rewards_bg))}


def check_loss(cfg: LossConfig, b: int, g: int, n: int) -> str | None:
  """Trace the configured advantage, aggregation, objective and KL estimator — the loss and its
  gradient in the log-probs — on abstract inputs of the step's shapes (B pairs, G samples, N new
  tokens): one that fails or returns the wrong shape is an error naming it before anything is
  loaded or compiled. Returns a warning for settings that have no effect (a KL estimator with β = 0),
  once per process (the launcher's checks and then its Trainer would say it twice)."""
  f32 = jax.ShapeDtypeStruct((b, g, n), jnp.float32)
  needs_entropy = cfg.top_entropy_quantile < 1 or cfg.entropy_coef != 0

  def loss(logp, rewards, mask, entropy):
    valid = jnp.ones((b,), jnp.float32)
    adv = advantages(rewards, cfg, valid)
    weights = token_weights(mask, cfg, valid)
    return grpo_loss(logp, logp, adv, weights, cfg, logp_ref=logp if cfg.beta > 0 else None,
                     entropy=entropy if needs_entropy else None)

  jax.eval_shape(jax.value_and_grad(loss, has_aux=True), f32, jax.ShapeDtypeStruct((b, g), jnp.float32),
                 jax.ShapeDtypeStruct((b, g, n), jnp.bool_), f32)
  if cfg.beta == 0 and (cfg.kl != LossConfig.kl or cfg.use_bias_correction_kl):
    what = f"kl={cfg.kl!r}" if cfg.kl != LossConfig.kl else "use_bias_correction_kl=True"
    warning = f"step.loss.{what} has no effect: step.loss.beta=0 turns the KL term off"
    if warning not in _WARNED:
      _WARNED.add(warning)
      return warning
  return None


_WARNED: set = set()


_BUILT_IN.update({id(t): frozenset(t) for t in (KL_ESTIMATORS, LOSSES, ADVANTAGES, OBJECTIVES)})
