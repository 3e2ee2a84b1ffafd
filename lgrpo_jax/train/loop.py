"""The training loop: Grain batches in, one compiled step per batch shape, metrics out (JSONL and
log lines), Orbax checkpoints with exact resume.

    run_dir/
      config.json          the resolved configuration
      metrics.jsonl        one line per step: every scalar of the step + step time, tokens/s
      checkpoints/<step>/  Orbax: state (policy params, optimizer state, step, RNG key) + data
                           (the pipeline's iterator state), saved every `save_every` steps and at the end

A run directory that already holds checkpoints resumes from the latest one: same parameters,
optimizer state, RNG and next batch, so an interrupted run ends exactly where an uninterrupted one
does (tested bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.grpo.update import make_optimizer
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.rewards import ByteTable
from lgrpo_jax.train.step import Batch, StepConfig, Tables, TrainState, init_state, make_train_step

log = logging.getLogger("lgrpo_jax.train")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 100
  seed: int = 0
  log_every: int = 1
  save_every: int = 50  # steps between checkpoints (the last step is always saved)
  keep: int = 3  # checkpoints kept

  def __post_init__(self):
    for name in ("steps", "log_every", "save_every", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be ≥ 1")


def to_device(batch: dict) -> Batch:
  n = batch["input_ids"].shape[0]
  opt = lambda k: jnp.asarray(batch[k]) if k in batch else None
  return Batch(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
               jnp.asarray(batch["pixel_values"]).reshape(n, -1, batch["pixel_values"].shape[-1]),
               jnp.asarray(batch["labels"]), jnp.asarray(batch["valid"]), opt("listener_input_ids"),
               opt("listener_attention_mask"))


def pair_grid_of(batch: dict) -> tuple:
  grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
  pair = tuple(grids[:2])
  if grids != list(pair) * (len(grids) // 2):
    raise ValueError("a training batch must hold one image-grid signature (PipelineConfig.group_by_grid)")
  return pair


class Trainer:
  """Owns the policy/reference/listener parameters, the optimizer, the data iterator and the
  checkpoints of one run directory."""

  def __init__(self, run_dir, model, tokenizer, pairs, step_cfg: StepConfig = StepConfig(),
               pipe_cfg: PipelineConfig = PipelineConfig(), loop_cfg: LoopConfig = LoopConfig(),
               listener=None, reference=None, config_record: dict | None = None):
    self.run_dir = os.path.abspath(os.fspath(run_dir))
    os.makedirs(self.run_dir, exist_ok=True)
    self.step_cfg, self.pipe_cfg, self.loop_cfg = step_cfg, pipe_cfg, loop_cfg
    self.graphdef, params = nnx.split(model, nnx.Param)
    copy = lambda m: jax.tree.map(jnp.copy, nnx.split(m, nnx.Param)[1])
    # Frozen copies: the reference (for β > 0) and the listener default to the initial policy.
    self.ref_params = copy(reference) if reference is not None else jax.tree.map(jnp.copy, params)
    listener = listener if listener is not None else model
    self.listener_graphdef = nnx.split(listener, nnx.Param)[0]
    self.listener_params = copy(listener) if listener is not model else jax.tree.map(jnp.copy, params)
    self.tx = make_optimizer(step_cfg.optim, params)
    self.state = init_state(params, self.tx, loop_cfg.seed)
    bt = ByteTable.from_tokenizer(tokenizer)
    if bt.truncated:
      log.warning("%d tokens are longer than the byte table's width; their tails are ignored by parsing",
                  bt.truncated)
    self.tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
    self.spec = ListenerSpec.from_tokenizer(tokenizer, pipe_cfg.prompt)
    self.batches = make_batches(pairs, tokenizer, dataclasses.replace(pipe_cfg, seed=loop_cfg.seed))
    self._steps: dict = {}
    self.manager = ocp.CheckpointManager(
        os.path.join(self.run_dir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=loop_cfg.keep, enable_async_checkpointing=True))
    if config_record is not None:
      with open(os.path.join(self.run_dir, "config.json"), "w") as f:
        json.dump(config_record, f, indent=2, default=str)
    self.resumed_from = self._restore()

  # ---- checkpoints ---------------------------------------------------------------------------
  def _tree(self, state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "key": jax.random.key_data(state.key)}

  def save(self) -> None:
    step = int(self.state.step)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self._tree(self.state)),
                                                    data=ocp.args.JsonSave(self.batches.get_state())),
                      force=True)

  def _restore(self) -> int | None:
    latest = self.manager.latest_step()
    if latest is None:
      return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._tree(self.state))
    restored = self.manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    t = restored["state"]
    self.state = TrainState(t["params"], t["opt_state"], jnp.asarray(t["step"], jnp.int32),
                            jax.random.wrap_key_data(t["key"]))
    self.batches.set_state(restored["data"])
    log.info("resumed from %s/checkpoints/%d", self.run_dir, latest)
    return latest

  # ---- the loop ------------------------------------------------------------------------------
  def _step_fn(self, pair_grid):
    if pair_grid not in self._steps:
      self._steps[pair_grid] = make_train_step(self.graphdef, self.listener_graphdef, self.tx, self.step_cfg,
                                               self.spec, pair_grid)
    return self._steps[pair_grid]

  def run(self, on_metrics=None) -> list[dict]:
    """Train until `loop_cfg.steps`; returns the metrics of the steps run in this call."""
    out = []
    path = os.path.join(self.run_dir, "metrics.jsonl")
    tty = sys.stderr.isatty()
    while int(self.state.step) < self.loop_cfg.steps:
      t0 = time.perf_counter()
      host = next(self.batches)
      step_fn = self._step_fn(pair_grid_of(host))
      self.state, metrics = step_fn(self.state, self.ref_params, self.listener_params, to_device(host),
                                    self.tables)
      metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
      dt = time.perf_counter() - t0
      step = int(self.state.step)
      metrics.update(step=step, step_time=dt, tokens_per_s=metrics["generated_tokens"] / dt,
                     compiled_programs=sum(f._cache_size() for f in self._steps.values()))
      with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
      out.append(metrics)
      if on_metrics is not None:
        on_metrics(metrics)
      if step % self.loop_cfg.log_every == 0 or step == self.loop_cfg.steps:
        line = (f"step {step}/{self.loop_cfg.steps}  reward {metrics['reward/total']:.3f}  "
                f"accuracy {metrics['accuracy']:.3f}  format {metrics['format_rate']:.2f}  "
                f"{dt:.2f} s/step")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
      if step % self.loop_cfg.save_every == 0 or step == self.loop_cfg.steps:
        self.save()
    if tty and out:
      print(file=sys.stderr)
    self.manager.wait_until_finished()
    return out

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
