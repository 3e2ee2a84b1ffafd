"""One GRPO training step as one compiled program (docs/architecture.md), reading top to bottom like the
algorithm:

    vision encode (policy) → prefill once per pair → sample G completions (shared-prefix cache)
    → parse on device → listener P(correct) → rewards → group advantages
    → (reference log-probs when β > 0) → μ optimiser passes over micro-batches → metrics

Policy, reference and listener parameters are separate pytrees (the reference and the listener are
never updated and nothing differentiates them). When the listener *is* the reference model (the
default: both are the initial policy; `listener_is_reference`), the step gets one frozen pytree for
both and runs its vision tower once for the two passes. The train state (policy parameters, optimizer
state, step, RNG key) is donated. Every pair of a batch has the same image grids (the grouped
pipeline), so `pair_grid` — the two images' grids — is static and micro-batches are equal slices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lgrpo_jax.grpo.core import LossConfig, advantage_metrics, advantages, token_weights
from lgrpo_jax.grpo.update import OptimConfig, PolicyBatch, policy_logprobs, update
from lgrpo_jax.listener import ListenerSpec, listener_probs
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index
from lgrpo_jax.rewards import RewardConfig, RewardInputs, parse, reward_metrics
from lgrpo_jax.rewards.core import compute_rewards_and_failures
from lgrpo_jax.sampling import SamplingConfig, sample_from_embeddings


OLD_LOGPROBS = ("current", "sampler", "recompute")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  sampling: SamplingConfig = SamplingConfig(max_new_tokens=256, num_samples=8, temperature=1.0)
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  rewards: RewardConfig = RewardConfig()
  # The importance ratio's old log-probs. "current" (TRL without vLLM): the update's own, detached —
  # the first pass's ratio is exactly 1 (later passes take the first pass's). "sampler": the
  # rollout's (off by the numerics' drift, ~5e-4 per token in bf16). "recompute": a teacher-forced
  # pass of the sampling policy (a separate program: the same drift in bf16, one more forward).
  old_logprobs: str = "current"
  # True: each pair's prompt and images run once in the listener, reference, old and policy log-probs,
  # the G completions attending to that one pass (exact). False: every completion with its own copy of
  # the prompt and images, as the PyTorch peers do — for comparison (bench/) and as the test oracle.
  prefix_sharing: bool = True
  logprob_chunk: int = 8192  # vocabulary rows per chunk of the log-prob pass

  def __post_init__(self):
    if self.sampling.num_samples < 2:
      raise ValueError(f"StepConfig.sampling.num_samples={self.sampling.num_samples}: GRPO needs G ≥ 2 "
                       "completions per pair (advantages are relative to the group)")
    if self.sampling.temperature == 0 or self.sampling.top_k == 1:
      what = "temperature=0" if self.sampling.temperature == 0 else "top_k=1"
      raise ValueError(f"StepConfig.sampling.{what} samples greedily: the {self.sampling.num_samples} completions "
                       "of a pair would be the same, every group's rewards equal and every advantage 0, so "
                       "nothing would be learned; sample at a temperature > 0 (TRL's default: 1.0)")
    if self.logprob_chunk < 1:
      raise ValueError(f"StepConfig.logprob_chunk={self.logprob_chunk} must be ≥ 1 (vocabulary rows per chunk)")
    if self.old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"StepConfig.old_logprobs={self.old_logprobs!r}: choose one of {OLD_LOGPROBS}")


def check_step_code(cfg: StepConfig, global_batch: int) -> str | None:
  """Trace the configured rewards and loss pieces (registered code: ours or a notebook's) on abstract
  inputs of the step's shapes — before a model loads in the launcher's checks, and at a Trainer's
  start — so that one that fails or returns the wrong shape is an error naming it, not a traceback
  from inside the first step. Returns a warning for a setting that has no effect, or None."""
  from lgrpo_jax.grpo import check_loss
  from lgrpo_jax.rewards import check_rewards
  b, g, n = global_batch, cfg.sampling.num_samples, cfg.sampling.max_new_tokens
  check_rewards(cfg.rewards, b, g, n)
  return check_loss(cfg.loss, b, g, n)


class TrainState(NamedTuple):
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array  # () int32
  key: jax.Array  # PRNG key


class Batch(NamedTuple):
  """Device arrays of one (global) batch, as `data.pipeline` builds it."""
  input_ids: jax.Array  # (B, P)
  attention_mask: jax.Array  # (B, P)
  pixel_values: jax.Array  # (B, patches per pair, C·T·P·P)
  labels: jax.Array  # (B,) 0: first image shown is preferred
  valid: jax.Array  # (B,) 0 for padding rows
  listener_input_ids: jax.Array | None = None  # (B, P')
  listener_attention_mask: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=("byte_table", "byte_lengths"),
                   meta_fields=("choices",))
@dataclasses.dataclass(frozen=True)
class Tables:
  """Token tables found once from the tokenizer (device arrays), and the two answers the parser
  reads (`prompt.choices` as UTF-8; static: part of the compiled program, not an argument)."""
  byte_table: jax.Array  # (V, L) uint8
  byte_lengths: jax.Array  # (V,)
  choices: tuple[bytes, bytes] = (b"Image 1", b"Image 2")  # texts are encoded

  def __post_init__(self):
    object.__setattr__(self, "choices", tuple(c.encode("utf-8") if isinstance(c, str) else bytes(c)
                                              for c in self.choices))


def train_step(state: TrainState, ref_params, listener_params, batch: Batch, tables: Tables, *,
               graphdef, listener_graphdef, tx, cfg: StepConfig, spec: ListenerSpec | None, pair_grid,
               listener_is_reference: bool = False):
  """(new state, metrics). Traced; `make_train_step` jits it. `listener_is_reference`: the
  listener's weights are `ref_params` (`listener_params` is not read)."""
  b = batch.input_ids.shape[0]
  grid = tuple(pair_grid) * b
  key, k_sample = jax.random.split(state.key)
  policy = nnx.merge(graphdef, state.params)

  # 1. Rollout: the images and the prompt once per pair, G samples from a shared prefix.
  pixels = batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1])
  feats = policy.image_features(pixels, grid)
  pos, _ = get_rope_index(batch.input_ids, batch.attention_mask, grid, policy.config)
  x = policy.embed(batch.input_ids, feats)
  rollout = jax.lax.stop_gradient(
      sample_from_embeddings(policy, x, pos, batch.attention_mask, cfg.sampling, k_sample))

  # 2. Rewards: parse the completions' text, ask the listener, weight the parts.
  parsed = parse(rollout.tokens, rollout.mask, tables.byte_table, tables.byte_lengths, tables.choices)
  # The listener and the reference model read the same images; when they are one model, its image
  # features are computed once for both passes (the same arithmetic: the values do not change).
  frozen_feats = None
  if listener_is_reference and cfg.rewards.needs_listener and cfg.loss.beta > 0:
    frozen_feats = jax.lax.stop_gradient(nnx.merge(graphdef, ref_params).image_features(pixels, grid))
  probs = None
  if cfg.rewards.needs_listener:
    listener = nnx.merge(listener_graphdef, ref_params if listener_is_reference else listener_params)
    probs = listener_probs(listener, batch.listener_input_ids, batch.listener_attention_mask, pixels, grid,
                           rollout.tokens, rollout.lengths, spec, cfg.prefix_sharing, frozen_feats,
                           parsed.answer_token)
  inputs = RewardInputs(rollout.tokens, rollout.mask, rollout.lengths, batch.labels, parsed, probs)
  # (a text reward whose Python function raised: the update is skipped, the loop raises it)
  total, parts, reward_failed = compute_rewards_and_failures(inputs, cfg.rewards)
  adv = advantages(total, cfg.loss, batch.valid)

  # 3. Old and reference log-probs (prompt once per pair), then the update.
  logp_of = lambda params, gd, image_embeds=None: jax.lax.stop_gradient(policy_logprobs(
      nnx.merge(gd, params), batch.input_ids, batch.attention_mask, batch.pixel_values, pair_grid,
      rollout.tokens, rollout.mask, cfg.logprob_chunk, prefix_sharing=cfg.prefix_sharing,
      image_embeds=image_embeds, temperature=cfg.sampling.logprob_temperature))
  # Recomputed old log-probs: the sampling policy's own pass, so the rollout's image features.
  # "current": none here (the update's own, detached); the sampler's still give `logprob_drift`.
  logp_old = {"sampler": lambda: rollout.logprobs, "current": lambda: None,
              "recompute": lambda: logp_of(state.params, graphdef, feats)}[cfg.old_logprobs]()
  logp_ref = logp_of(ref_params, graphdef, frozen_feats) if cfg.loss.beta > 0 else None
  # A frozen vision tower gives the update the rollout's image features (the same parameters).
  frozen_vision = "vision" in cfg.optim.freeze
  loss_mask = rollout.mask
  if cfg.loss.mask_truncated_completions:  # cut at N without an EOS: sampled, rewarded, not trained on
    loss_mask = rollout.mask * rollout.ended[..., None].astype(rollout.mask.dtype)
  pb = PolicyBatch(batch.input_ids, batch.attention_mask, batch.pixel_values, rollout.tokens, rollout.mask,
                   logp_old, adv, token_weights(loss_mask, cfg.loss, batch.valid), logp_ref,
                   jax.lax.stop_gradient(feats).reshape(b, -1, feats.shape[-1]) if frozen_vision else None,
                   None if cfg.old_logprobs == "sampler" else rollout.logprobs)
  params, opt_state, update_metrics = update(state.params, state.opt_state, graphdef, tx, pb, pair_grid,
                                             cfg.loss, cfg.optim, cfg.logprob_chunk, cfg.prefix_sharing,
                                             cfg.sampling.logprob_temperature,
                                             rewards_ok=~reward_failed & ~jnp.any(
                                                 jnp.isinf(total) & (batch.valid[:, None] > 0)))

  valid = batch.valid.astype(jnp.float32)
  metrics = {**reward_metrics(inputs, total, parts, batch.valid), **advantage_metrics(total, adv, batch.valid),
             **update_metrics,
             "completion_length": jnp.sum(rollout.lengths * valid[:, None]) / jnp.maximum(
                 valid.sum() * rollout.lengths.shape[1], 1),
             "generated_tokens": jnp.sum(rollout.lengths * valid[:, None]),
             # TRL's completions/clipped_ratio: the fraction cut at max_new_tokens without an EOS
             "truncated_rate": jnp.sum(~rollout.ended * valid[:, None]) / jnp.maximum(
                 valid.sum() * rollout.lengths.shape[1], 1),
             "decode_steps": rollout.steps}
  return TrainState(params, opt_state, state.step + 1, key), metrics


def make_train_step(graphdef, listener_graphdef, tx, cfg: StepConfig, spec: ListenerSpec | None, pair_grid,
                    state_shardings=None, listener_is_reference: bool = False):
  """The jitted step for one image-grid signature: (state, ref_params, listener_params, batch,
  tables) → (state, metrics); the state is donated. One compiled program per batch shape.
  `listener_is_reference`: the listener is the reference model (pass its parameters as
  `ref_params`; `listener_params` is ignored): one vision pass for both, one copy of the weights.

  `state_shardings` (on a mesh): the new state is laid out exactly like the old one (metrics
  replicated), so the next step finds the same input layout and does not recompile.

  The same arguments give the same jitted function, within a process: a Trainer built again with
  the same model, optimizer and config (a notebook cell run twice, a run resumed in-process) reuses
  the compiled step instead of tracing and compiling it again. What the step reads at trace time
  besides its arguments is part of that key too (`_trace_globals`)."""
  pair_grid = tuple(map(tuple, pair_grid))
  layout = None
  if state_shardings is not None:  # shardings are hashable, the pytree of them is not
    leaves, treedef = jax.tree.flatten(state_shardings)
    layout = (tuple(leaves), treedef)
  key = (graphdef, listener_graphdef, tx, cfg, spec, pair_grid, layout, listener_is_reference, _trace_globals())

  def build():
    fn = functools.partial(train_step, graphdef=graphdef, listener_graphdef=listener_graphdef, tx=tx, cfg=cfg,
                           spec=spec, pair_grid=pair_grid, listener_is_reference=listener_is_reference)
    if state_shardings is None:
      return jax.jit(fn, donate_argnums=(0,))
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, donate_argnums=(0,), out_shardings=(state_shardings, replicated))

  return kept(_TRAIN_STEPS, key, build)


_TRAIN_STEPS: dict = {}


def kept(table: dict, key, build, keep: int = 8):
  """`table[key]`, built by `build()` the first time; the last `keep` are kept (the oldest goes,
  its compiled programs with it). The jitted GRPO step, warm-start step and held-out judge."""
  if key not in table:
    if len(table) >= keep:
      del table[next(iter(table))]
    table[key] = build()
  return table[key]


def clear_compiled_steps() -> None:
  """Forget the kept GRPO step, warm-start step and held-out judge functions (and their compiled
  programs): the next Trainer or warm start compiles afresh."""
  from lgrpo_jax.train import evaluation, sft
  _CLEARED[0] += 1  # a Trainer's own step functions are keyed on it (`_trace_globals`)
  _TRAIN_STEPS.clear()
  evaluation._JUDGES.clear()
  sft._SFT_STEPS.clear()


def _trace_globals() -> tuple:
  """What tracing the step reads besides its arguments: the registered rewards, KL estimators,
  losses, advantages and objectives (a notebook may replace one under the same name), the
  activation-sharding rules in use (`sharding.use_rules`), and how many times
  `clear_compiled_steps` was called (so that it reaches the Trainers built before it too).

  As `jax.jit` does, a registered function's module constants and helpers are read when the step is
  traced, and baked into it: a notebook that changes one registers the function again (its cell run
  again: a new function object, a new step) or calls `clear_compiled_steps()`. Keying on what the
  globals hold was tried and dropped: a counter that a host callback rebinds retraced every step."""
  from lgrpo_jax.grpo import core as grpo_core
  from lgrpo_jax.rewards import core as reward_core
  tables = (reward_core.REWARDS, grpo_core.KL_ESTIMATORS, grpo_core.LOSSES, grpo_core.ADVANTAGES,
            grpo_core.OBJECTIVES)
  return (tuple(tuple((name, _Same(fn)) for name, fn in t.items()) for t in tables), rules_key(),
          _CLEARED[0])


_CLEARED = [0]  # calls of clear_compiled_steps


class _Same:
  """Compares (and hashes) by identity, holding the object: a key part for a registered function
  that is an unhashable callable (a dataclass instance with __call__)."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __eq__(self, other):
    return isinstance(other, _Same) and other.obj is self.obj

  def __hash__(self):
    return id(self.obj)


def rules_key() -> str:
  """The activation-sharding rules in use (`sharding.use_rules`), as a key for kept jitted functions."""
  from lgrpo_jax import sharding
  return repr(sorted(sharding._ACTIVE_RULES[-1].items()))


def init_state(params, tx, seed: int, mesh=None) -> TrainState:
  """Step 0: `params` as given (not copied), the optimizer state, step and RNG key built in one
  program (eagerly, one per parameter shape), kept for the next state of the same optimizer and
  seed. With `mesh`: each Adam moment laid out as its parameter, the scalars replicated
  (`sharding.init_like`)."""
  from lgrpo_jax.sharding import init_like
  opt_state, step, key = init_like(lambda p: (tx.init(p), jnp.int32(0), jax.random.key(seed)), params, mesh,
                                   key=("init_state", tx, seed))
  return TrainState(params, opt_state, step, key)
