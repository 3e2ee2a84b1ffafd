"""The optimizer step of GRPO: optax AdamW with a schedule and global-norm clipping, gradient
accumulation over micro-batches (`lax.scan`: memory bounded by one micro-batch), μ passes over the
same rollouts, frozen parts by optax partitioning, and non-finite updates skipped.

Functional on purpose: the trainable state is (params, opt_state) pytrees, so the training step is
one pure function that jit can donate and Orbax can save; `nnx.update(model, params)` puts the
parameters back into the module.

    for pass in 1..μ:                                   # same rollouts, old log-probs fixed (given, or pass 1's own)
        g = Σ_micro ∇ Σ w·ℓ(micro)                      # weights w from the whole batch: exact
        if loss and g are finite: params, opt = adamw(clip(g))
        else: params, opt unchanged; skipped += 1
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lgrpo_jax.grpo.core import LossConfig, grpo_loss
from lgrpo_jax.grpo.logprobs import completion_logprobs, completion_logprobs_copies
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index

FREEZABLE = {"vision": ("visual",), "embeddings": ("embed_tokens",)}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-6  # community GRPO default (the paper's is not public)
  schedule: str = "constant"  # or "cosine" (to 0 at total_steps)
  warmup_steps: int = 0  # linear warm-up steps
  total_steps: int = 1000  # schedule length (cosine), in GRPO steps (loop steps) whatever `passes`
  b1: float = 0.9  # AdamW
  b2: float = 0.999  # AdamW
  eps: float = 1e-8  # AdamW
  weight_decay: float = 0.0  # AdamW (decoupled)
  max_grad_norm: float = 1.0  # 0: no clipping
  freeze: tuple[str, ...] = ()  # any of "vision", "embeddings"
  micro_batches: int = 1  # pairs per micro-batch = pairs / micro_batches
  passes: int = 1  # μ: optimisation passes over the same rollouts

  def __post_init__(self):
    object.__setattr__(self, "freeze", tuple(self.freeze))
    bad = [f for f in self.freeze if f not in FREEZABLE]
    if bad:
      raise ValueError(f"OptimConfig.freeze: unknown part(s) {bad}; choose from {sorted(FREEZABLE)}")
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"OptimConfig.schedule={self.schedule!r}: choose 'constant' or 'cosine'")
    for name in ("micro_batches", "passes", "total_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"OptimConfig.{name}={getattr(self, name)} must be ≥ 1")
    for name, ok in (("b1", 0 <= self.b1 < 1), ("b2", 0 <= self.b2 < 1), ("eps", 0 < self.eps < math.inf),
                     ("weight_decay", 0 <= self.weight_decay < math.inf)):
      if not ok:
        raise ValueError(f"OptimConfig.{name}={getattr(self, name)} is out of range (AdamW: 0 ≤ b1, b2 < 1; "
                         "eps > 0; weight_decay ≥ 0)")
    if not (0 < self.learning_rate < math.inf) or self.warmup_steps < 0 or not 0 <= self.max_grad_norm < math.inf:
      raise ValueError(f"OptimConfig: learning_rate must be finite and > 0 (got {self.learning_rate}), "
                       f"warmup_steps ≥ 0 (got {self.warmup_steps}), max_grad_norm finite and ≥ 0 "
                       f"(got {self.max_grad_norm})")


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """The learning rate at an optimizer update count. Warm-up and length count GRPO steps: with μ =
  `passes` updates per step the count is divided by μ, so `total_steps = loop.steps` spans the run
  (TRL counts optimizer steps: there a cosine over μ·steps updates)."""
  if cfg.schedule == "cosine":
    base = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(cfg.total_steps, cfg.warmup_steps + 1))
  elif cfg.warmup_steps:
    base = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                                 optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  else:
    return optax.constant_schedule(cfg.learning_rate)
  return base if cfg.passes == 1 else (lambda count: base(count // cfg.passes))


def param_labels(params, cfg: OptimConfig):
  """'frozen' or 'train' for every parameter, from its path in the model."""
  frozen = tuple(p for part in cfg.freeze for p in FREEZABLE[part])

  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "frozen" if any(n in frozen for n in names) else "train"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW(schedule); frozen parts get `set_to_zero` (and no Adam moments).

  The same config and parameter labels give the same (stateless) transformation object, so that
  programs keyed on it — the initial state's (`train.step.init_state`) — compile once per process."""
  labels = param_labels(params, cfg) if cfg.freeze else None
  return _optimizer(cfg, None if labels is None else (jax.tree.structure(labels), tuple(jax.tree.leaves(labels))))


@functools.lru_cache(maxsize=32)
def _optimizer(cfg: OptimConfig, labels) -> optax.GradientTransformation:
  tx = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
  if labels is not None:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, jax.tree.unflatten(*labels))
  return tx


class PolicyBatch(NamedTuple):
  """The rollouts of B pairs, as the loss needs them. Every pair has the same image grids (the
  grouped pipeline guarantees it), so pixels are (B, patches per pair, C·T·P·P) and micro-batches
  are equal slices."""
  input_ids: jax.Array  # (B, P)
  attention_mask: jax.Array  # (B, P)
  pixel_values: jax.Array | None  # (B, n, d)
  tokens: jax.Array  # (B, G, N)
  mask: jax.Array  # (B, G, N)
  # (B, G, N) the ratio's old log-probs; None: the update's own, detached (TRL's when they are the
  # sampling policy's): the first pass's ratio is exactly 1, and later passes take the first pass's
  logp_old: jax.Array | None
  advantages: jax.Array  # (B, G)
  weights: jax.Array  # (B, G, N) from grpo.token_weights over the whole batch
  logp_ref: jax.Array | None = None  # (B, G, N), needed when β > 0
  # (B, image tokens per pair, E): the pairs' image features, given when the vision tower is frozen
  # (no gradient flows into it; `update` fills it in, the training step passes the rollout's).
  image_embeds: jax.Array | None = None
  # (B, G, N) the sampler's log-probs when `logp_old` is not them: `logprob_drift` is measured against them
  logp_sampler: jax.Array | None = None


def policy_logprobs(model, input_ids, attention_mask, pixel_values, pair_grid, tokens, mask, chunk=8192,
                    with_entropy=False, prefix_sharing: bool = True, image_embeds=None, temperature: float = 1.0,
                    entropy_grad: bool = False):
  """Completion log-probs with the prompt (and its images) computed once per pair (also the
  reference pass, and "recomputed" old log-probs: call it under `jax.lax.stop_gradient`).

  `prefix_sharing=False`: the same values the plain way — the prompt and its images G times, each
  copy with one completion (`completion_logprobs_copies`). `image_embeds`: the pairs' image
  features (`model.image_features` of `pixel_values`) when the caller already has them — the
  reference pass, when the listener is the same frozen model — instead of running the tower.
  `temperature`: the log-probs (and entropy) of the tempered distribution softmax(logits / T), the
  one the rollout was sampled from (`SamplingConfig.logprob_temperature`)."""
  b, g = tokens.shape[:2]
  if image_embeds is not None and not prefix_sharing:
    image_embeds = model.repeat_image_features(image_embeds, tuple(pair_grid) * b, b, g)
  if not prefix_sharing:
    rep = lambda a: jnp.repeat(a, g, axis=0)  # row b·G + g: pair b's prompt, for its completion g
    input_ids, attention_mask = rep(input_ids), rep(attention_mask)
    pixel_values = None if pixel_values is None else rep(pixel_values)
  rows = input_ids.shape[0]
  grid = tuple(pair_grid) * rows
  feats = image_embeds
  if feats is None and pixel_values is not None:
    feats = model.image_features(pixel_values.reshape(-1, pixel_values.shape[-1]), grid)
  pos, _ = get_rope_index(input_ids, attention_mask, grid, model.config)
  x = model.embed(input_ids, feats)
  if not prefix_sharing:
    return completion_logprobs_copies(model, x, pos, attention_mask, tokens, mask, chunk, temperature,
                                      with_entropy=with_entropy, entropy_grad=entropy_grad)
  return completion_logprobs(model, x, pos, attention_mask, tokens, mask, chunk, temperature,
                             with_entropy=with_entropy, entropy_grad=entropy_grad)


def loss_fn(params, graphdef, batch: PolicyBatch, pair_grid, cfg: LossConfig, chunk: int,
            prefix_sharing: bool = True, temperature: float = 1.0, batch_tokens=None):
  """The loss of (a micro-batch of) `batch`; `batch_tokens`: the whole batch's loss tokens, over
  which an entropy bonus is averaged (so micro-batches add up to the batch's)."""
  model = nnx.merge(graphdef, params)
  feats = batch.image_embeds  # given: a frozen tower, so a constant here (no backward through it)
  feats = None if feats is None else jax.lax.stop_gradient(feats.reshape(-1, feats.shape[-1]))
  logp, entropy = policy_logprobs(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                  pair_grid, batch.tokens, batch.mask, chunk, with_entropy=True,
                                  prefix_sharing=prefix_sharing, image_embeds=feats, temperature=temperature,
                                  entropy_grad=cfg.entropy_coef != 0)
  logp_old = jax.lax.stop_gradient(logp) if batch.logp_old is None else batch.logp_old
  loss, metrics = grpo_loss(logp, logp_old, batch.advantages, batch.weights, cfg, batch.logp_ref, entropy,
                            batch_tokens)
  on = batch.weights > 0
  if batch.logp_sampler is not None:  # the trainer's numerics against the sampler's, whatever the ratio reads
    metrics["logprob_drift"] = jnp.sum(jnp.where(on, jnp.abs(jax.lax.stop_gradient(logp) - batch.logp_sampler),
                                                 0.0)) / jnp.maximum(on.sum(), 1)
  if batch.logp_old is None:  # the old log-probs of any later pass
    metrics[OWN_LOGP] = jax.lax.stop_gradient(logp)
  return loss, metrics


OWN_LOGP = "_logp"  # not a metric: a pass's own log-probs (B, G, N), carried to the next passes


def _split(batch: PolicyBatch, k: int) -> PolicyBatch:
  """(k, B/k, …) micro-batches along the pair axis."""
  return jax.tree.map(lambda a: None if a is None else a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch,
                      is_leaf=lambda a: a is None)


def accumulate_grads(params, graphdef, batch: PolicyBatch, pair_grid, loss_cfg: LossConfig,
                     micro_batches: int, chunk: int = 8192, prefix_sharing: bool = True,
                     temperature: float = 1.0):
  """(Σ loss, Σ grads, metrics) over `micro_batches` equal slices of the pairs, one `lax.scan`."""
  b = batch.tokens.shape[0]
  if b % micro_batches:
    raise ValueError(f"{b} pairs do not split into {micro_batches} micro-batches")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n_tokens = jnp.sum(batch.weights > 0)  # the whole batch's, for an entropy bonus's mean
  if micro_batches == 1:  # no accumulator: one gradient tree alive instead of two
    (loss, metrics), grads = grad_fn(params, graphdef, batch, pair_grid, loss_cfg, chunk, prefix_sharing, temperature,
                                     n_tokens)
    return loss, grads, metrics
  micro = _split(batch, micro_batches)

  def body(carry, mb):
    loss_sum, grads_sum = carry
    (loss, metrics), grads = grad_fn(params, graphdef, mb, pair_grid, loss_cfg, chunk, prefix_sharing, temperature,
                                     n_tokens)
    return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), metrics = jax.lax.scan(body, (jnp.float32(0), zeros), micro)
  return loss, grads, combine_micro_metrics(metrics)


def combine_micro_metrics(metrics: dict) -> dict:
  """The whole batch's metrics from (k,)-stacked micro-batch ones: token means weighted by each
  micro-batch's `loss_tokens` (a micro-batch of padding rows counts for nothing), maxima as max."""
  n = metrics["loss_tokens"]
  out = {"loss_tokens": n.sum(), "ratio_max": jnp.max(metrics["ratio_max"])}
  if OWN_LOGP in metrics:  # (k, B/k, G, N) → (B, G, N), the micro-batches in order
    own = metrics[OWN_LOGP]
    out[OWN_LOGP] = own.reshape(-1, *own.shape[2:])
  for k, v in metrics.items():
    if k not in out:
      out[k] = jnp.sum(v * n) / jnp.maximum(n.sum(), 1)
  return out


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def update(params, opt_state, graphdef, tx: optax.GradientTransformation, batch: PolicyBatch, pair_grid,
           loss_cfg: LossConfig, optim_cfg: OptimConfig, chunk: int = 8192, prefix_sharing: bool = True,
           temperature: float = 1.0, rewards_ok=None):
  """μ optimiser steps on the same rollouts → (params, opt_state, metrics). A pass whose loss or
  gradients are not finite changes nothing (bit for bit) and is counted in `skipped_updates`; so
  does every pass when `rewards_ok` (a () bool) is False — a broken (∞) reward, or a text reward
  whose Python function raised, even where no loss token would have read it.

  A frozen vision tower (`optim_cfg.freeze` has "vision") is run once, before the passes, unless
  `batch.image_embeds` already holds its features: the loss then reads them as constants, so no
  pass runs the tower again or differentiates through it (its gradient would be thrown away). The
  same parameters, the same values; the reported `grad_norm` no longer counts the frozen tower.

  `temperature`: the policy is scored at the rollout's sampling temperature (see `policy_logprobs`)."""
  if "vision" in optim_cfg.freeze and batch.image_embeds is None and batch.pixel_values is not None:
    model = nnx.merge(graphdef, params)
    b = batch.pixel_values.shape[0]
    feats = model.image_features(batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1]), tuple(pair_grid) * b)
    batch = batch._replace(image_embeds=jax.lax.stop_gradient(feats).reshape(b, -1, feats.shape[-1]))

  def one_pass(carry, batch):
    params, opt_state, skipped = carry
    loss, grads, metrics = accumulate_grads(params, graphdef, batch, pair_grid, loss_cfg,
                                            optim_cfg.micro_batches, chunk, prefix_sharing, temperature)
    if optim_cfg.freeze:  # frozen parts' gradients are not this update's: not in grad_norm or the finite check
      grads = jax.tree.map(lambda g, part: jnp.zeros_like(g) if part == "frozen" else g, grads,
                           param_labels(params, optim_cfg))
    ok = jnp.isfinite(loss) & all_finite(grads)
    if rewards_ok is not None:
      ok &= rewards_ok

    def apply(args):
      p, s = args
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    params, opt_state = jax.lax.cond(ok, apply, lambda args: args, (params, opt_state))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return (params, opt_state, skipped + (~ok).astype(jnp.int32)), metrics

  carry = (params, opt_state, jnp.int32(0))
  if optim_cfg.passes == 1 or batch.logp_old is None:
    # The first pass alone (no scan: its carry would hold a second copy of parameters + optimiser
    # state); with the update's own old log-probs (`logp_old` None) it gives the later passes theirs.
    carry, metrics = one_pass(carry, batch)
    own = metrics.pop(OWN_LOGP, None)
    metrics = jax.tree.map(lambda v: v[None], metrics)
    if optim_cfg.passes > 1:
      later = batch._replace(logp_old=own)
      carry, rest = jax.lax.scan(lambda c, _: one_pass(c, later), carry, None, length=optim_cfg.passes - 1)
      metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), metrics, rest)
  else:  # the old log-probs given: every pass the same program, one scan
    carry, metrics = jax.lax.scan(lambda c, _: one_pass(c, batch), carry, None, length=optim_cfg.passes)
  params, opt_state, skipped = carry
  return params, opt_state, dict(combine_pass_metrics(metrics), skipped_updates=skipped)


# Metrics of the ratio ρ = π/π_old: on the first pass with the update's own old log-probs ρ is
# exactly 1 (nothing clipped), so over several passes they are the passes' mean (TRL logs its
# clip ratios averaged over the `num_iterations` optimizer steps of a logging window).
PASS_MEAN_METRICS = ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "policy_kept_fraction")


# Means (and the max) over the loss tokens: NaN in a step without any (every completion truncated
# under mask_truncated_completions), where 0 would read as a collapsed entropy or ratio.
TOKEN_METRICS = ("kl", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "ratio_max", "logprob_drift",
                 "entropy", "policy_kept_fraction")


def combine_pass_metrics(metrics: dict) -> dict:
  """One step's metrics from the (passes,)-stacked ones of its optimiser passes: the ratio's
  (`PASS_MEAN_METRICS`) averaged over the passes and `ratio_max` their max; the rest are the first
  pass's (the policy that sampled: kl, entropy, loss, grad_norm, drift), plus `loss_last_pass`.
  The token metrics are NaN when no token carried loss."""
  out = {k: v[0] for k, v in metrics.items()}
  out.update({k: jnp.mean(metrics[k]) for k in PASS_MEAN_METRICS if k in metrics})
  out.update(ratio_max=jnp.max(metrics["ratio_max"]), loss_last_pass=metrics["loss"][-1])
  any_tokens = out["loss_tokens"] > 0
  out.update({k: jnp.where(any_tokens, out[k], jnp.nan) for k in TOKEN_METRICS if k in out})
  return out
