"""The training loop: Grain batches in, one compiled step per batch shape, metrics out (JSONL and
log lines), Orbax checkpoints with exact resume.

    run_dir/
      config.json          the resolved configuration
      metrics.jsonl        one line per step: every scalar of the step + step time, tokens/s
                           (and eval/* every `eval_every` steps)
      checkpoints/<step>/  Orbax: state (policy params, optimizer state, step, RNG key) + data
                           (the pipeline's iterator state), every `save_every` steps and/or
                           `save_every_minutes`, at the end, and on SIGTERM; the last `keep` are kept
      best/<step>/         the checkpoint with the best held-out accuracy so far

A run directory that already holds checkpoints resumes from the latest readable one (an unreadable
newest checkpoint is reported and skipped for the previous one): same parameters, optimizer state,
RNG and next batch, so an interrupted run — even one killed with SIGKILL — ends exactly where an
uninterrupted one does (tested bit for bit in a subprocess). Metrics lines past the checkpoint are
dropped on resume, so metrics.jsonl has each step once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
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
  save_every_minutes: float = 0.0  # also save when this much time has passed since the last save (0: off)
  keep: int = 3  # checkpoints kept (plus the best by held-out accuracy)
  eval_every: int = 0  # steps between held-out evaluations (0: never; needs eval pairs)

  def __post_init__(self):
    for name in ("steps", "log_every", "save_every", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be ≥ 1")
    if self.eval_every < 0 or self.save_every_minutes < 0:
      raise ValueError("LoopConfig.eval_every and save_every_minutes must be ≥ 0")


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
               listener=None, reference=None, config_record: dict | None = None, eval_pairs=None):
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
    self.best = ocp.CheckpointManager(os.path.join(self.run_dir, "best"),
                                      options=ocp.CheckpointManagerOptions(max_to_keep=1))
    self.best_accuracy = -1.0
    self.evaluator = None
    if eval_pairs is not None and loop_cfg.eval_every:
      from lgrpo_jax.train.evaluation import Evaluator
      self.evaluator = Evaluator(eval_pairs, tokenizer, pipe_cfg, step_cfg.sampling, self.graphdef,
                                 self.listener_graphdef, self.spec if step_cfg.rewards.needs_listener else None,
                                 self.tables)
    self._stop = False
    if config_record is not None:
      with open(os.path.join(self.run_dir, "config.json"), "w") as f:
        json.dump(config_record, f, indent=2, default=str)
    self.resumed_from = self._restore()

  # ---- checkpoints ---------------------------------------------------------------------------
  def _tree(self, state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "key": jax.random.key_data(state.key)}

  def _args(self):
    return ocp.args.Composite(state=ocp.args.StandardSave(self._tree(self.state)),
                              data=ocp.args.JsonSave(self.batches.get_state()))

  def save(self) -> None:
    step = int(self.state.step)
    if step not in self.manager.all_steps():
      self.manager.save(step, args=self._args(), force=True)
    self._last_save = time.monotonic()

  def _restore(self) -> int | None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._tree(self.state))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except Exception as e:  # a damaged checkpoint: say so and take the one before
        log.warning("checkpoint %s/checkpoints/%d is unreadable (%s: %s); trying the previous one",
                    self.run_dir, step, type(e).__name__, str(e)[:200])
        print(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); trying the previous one",
              file=sys.stderr)
        continue
      t = restored["state"]
      self.state = TrainState(t["params"], t["opt_state"], jnp.asarray(t["step"], jnp.int32),
                              jax.random.wrap_key_data(t["key"]))
      self.batches.set_state(restored["data"])
      self._drop_metrics_after(step)
      log.info("resumed from %s/checkpoints/%d", self.run_dir, step)
      return step
    return None

  def _drop_metrics_after(self, step: int) -> None:
    path = os.path.join(self.run_dir, "metrics.jsonl")
    if os.path.isfile(path):
      keep = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= step]
      with open(path, "w") as f:
        f.writelines(keep)

  # ---- the loop ------------------------------------------------------------------------------
  def _step_fn(self, pair_grid):
    if pair_grid not in self._steps:
      self._steps[pair_grid] = make_train_step(self.graphdef, self.listener_graphdef, self.tx, self.step_cfg,
                                               self.spec, pair_grid)
    return self._steps[pair_grid]

  def evaluate(self) -> dict:
    return {} if self.evaluator is None else self.evaluator(self.state.params, self.listener_params)

  def run(self, on_metrics=None) -> list[dict]:
    """Train until `loop_cfg.steps` (or SIGTERM: save, then return); returns the metrics of the
    steps run in this call."""
    out = []
    path = os.path.join(self.run_dir, "metrics.jsonl")
    tty = sys.stderr.isatty()
    self._last_save = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)
    try:
      signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
    except ValueError:  # not the main thread: no preemption handling
      previous = None
    try:
      self._loop(out, path, tty, on_metrics)
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    if self._stop:
      self.save()
      print(f"\nSIGTERM: saved step {int(self.state.step)}, stopping", file=sys.stderr)
    self.manager.wait_until_finished()
    if out:
      from lgrpo_jax.plot import plot
      plot(self.run_dir)  # RUN_DIR/curves.png: reward, accuracy, contradiction rate
    return out

  def _loop(self, out, path, tty, on_metrics):
    while int(self.state.step) < self.loop_cfg.steps and not self._stop:
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
      is_eval = self.evaluator is not None and (step % self.loop_cfg.eval_every == 0
                                                or step == self.loop_cfg.steps)
      if is_eval:
        metrics.update(self.evaluate())
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
      minutes = (time.monotonic() - self._last_save) / 60
      if (step % self.loop_cfg.save_every == 0 or step == self.loop_cfg.steps
          or 0 < self.loop_cfg.save_every_minutes <= minutes):
        self.save()
      if is_eval and metrics["eval/accuracy"] > self.best_accuracy:
        self.best_accuracy = metrics["eval/accuracy"]
        self.best.save(step, args=self._args(), force=True)
    if tty and out:
      print(file=sys.stderr)

  def close(self) -> None:
    for m in (self.manager, self.best):
      m.wait_until_finished()
      m.close()
