"""The training loop: Grain batches in, one compiled step per batch shape, metrics out (JSONL and
log lines), Orbax checkpoints with exact resume.

    run_dir/
      config.json          the resolved configuration
      metrics.jsonl        one line per step: every scalar of the step + step time, tokens/s,
                           compiled programs, counted TFLOP/s and MFU (and eval/* every
                           `eval_every` steps; with `eval_at_start`, a step-0 line of eval/* only)
      tensorboard/         the same scalars as TensorBoard event files (`loop.tensorboard`); the
                           warm start's as the run tensorboard/sft
      checkpoints/<step>/  Orbax: state (policy params, optimizer state, step, RNG key) + data
                           (the pipeline's iterator state), every `save_every` steps and/or
                           `save_every_minutes`, at the end, and on SIGTERM/SIGINT or a data error
                           on any process (see `run`); the last `keep` are kept
      best/<step>/         the checkpoint with the best held-out accuracy so far

A run directory that already holds checkpoints resumes from the latest readable one (an unreadable
newest checkpoint is reported and skipped for the previous one): same parameters, optimizer state,
RNG and next batch, so an interrupted run — even one killed with SIGKILL — ends exactly where an
uninterrupted one does (tested bit for bit in a subprocess). Metrics lines past the checkpoint are
dropped on resume (all of them when no checkpoint was left), so metrics.jsonl has each step once
(it is fsynced before every save, so a checkpoint's own line is never the one a crash lost);
best/ keeps its held-out accuracy across restarts (read back from metrics.jsonl), so a resumed run
replaces it only with a better evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.prompts import end_of_turn_ids
from lgrpo_jax.grpo.update import make_optimizer
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.rewards import ByteTable
from lgrpo_jax.rewards.core import REWARDS, take_host_errors
from lgrpo_jax.sharding import copy_tree, on_mesh, put, state_shardings
from lgrpo_jax.models.qwen2_5_vl.flops import grpo_step_flops
from lgrpo_jax.train.metrics import CompileCounter, MetricSinks, measured_matmul_tflops
from lgrpo_jax.train import stopping
from lgrpo_jax.train.step import (Batch, StepConfig, Tables, TrainState, _trace_globals, check_step_code, init_state,
                                  make_train_step)

log = logging.getLogger("lgrpo_jax.train")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 100  # GRPO steps (a resumed run continues to this step)
  # data order, order swaps and sampling; in the launcher also the data.fraction subset and the
  # synthetic pairs (the held-out ones from seed + 1000)
  seed: int = 0
  log_every: int = 1  # steps between log lines (metrics.jsonl has every step)
  save_every: int = 50  # steps between checkpoints (the last step is always saved)
  save_every_minutes: float = 0.0  # also save when this much time has passed since the last save (0: off)
  keep: int = 3  # checkpoints kept (plus the best by held-out accuracy)
  eval_every: int = 0  # steps between held-out evaluations (0: never; needs eval pairs)
  eval_at_start: bool = True  # also evaluate before the first step (a step-0 line), when evaluating
  tensorboard: bool = True  # RUN_DIR/tensorboard/events.out.tfevents.* (the warm start's: RUN_DIR/tensorboard/sft)
  wandb_project: str = ""  # also log to Weights & Biases (needs `pip install wandb`); "" = off
  # MFU = counted FLOPs per step / step time / peak. 0: the peak is the matmul rate measured on this
  # device at start-up (an honest ceiling on CPU; on accelerators give the datasheet number).
  peak_tflops_per_device: float = 0.0

  def __post_init__(self):
    for name in ("steps", "log_every", "save_every", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be ≥ 1")
    if self.eval_every < 0 or self.save_every_minutes < 0 or self.peak_tflops_per_device < 0:
      raise ValueError("LoopConfig.eval_every, save_every_minutes and peak_tflops_per_device must be ≥ 0")
    if not 0 <= self.seed < 2**32:  # numpy's and the pipeline's seeds
      raise ValueError(f"LoopConfig.seed={self.seed} must be in [0, 2**32)")


def to_device(batch: dict, mesh=None) -> Batch:
  """A pipeline batch as device arrays; with a mesh, rows are split over its data axes ("batch"
  rule) and each process contributes its own rows of the global batch."""
  n = batch["input_ids"].shape[0]
  if mesh is None:
    arr = jnp.asarray
  else:
    from lgrpo_jax.sharding import global_batch_array
    arr = lambda a: global_batch_array(np.asarray(a), mesh)
  opt = lambda k: arr(batch[k]) if k in batch else None
  return Batch(arr(batch["input_ids"]), arr(batch["attention_mask"]),
               arr(np.asarray(batch["pixel_values"]).reshape(n, -1, batch["pixel_values"].shape[-1])),
               arr(batch["labels"]), arr(batch["valid"]), opt("listener_input_ids"),
               opt("listener_attention_mask"))


def host_scalar(x) -> float:
  """A replicated device scalar as a Python float (also when the array spans several processes)."""
  return float(np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x)


def pair_grid_of(batch: dict) -> tuple:
  grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
  pair = tuple(grids[:2])
  if grids != list(pair) * (len(grids) // 2):  # every process holds the same global grids: all stop
    from lgrpo_jax.data.sources import DataError
    raise DataError(f"a batch holds image pairs of several grid signatures ({sorted(set(zip(grids[::2], grids[1::2])))}"
                    "); the step compiles for one: keep pipeline.group_by_grid=true (the default), or give "
                    "pipeline.image.grid_buckets one bucket")
  return pair


def place(params, mesh):
  """Parameters laid out on `mesh` by the rules table (already-placed arrays are not copied)."""
  shardings = state_shardings(params, mesh)
  return jax.tree.map(lambda v, s: v.replace(put(v.get_value(), s)), params, shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def checkpoint_managers(run_dir: str, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """RUN_DIR/checkpoints (the last `keep`) and RUN_DIR/best (one), both saving asynchronously.

  The two may write the same step at once, each from its own background thread, and Orbax names
  its process-wide barriers by step only: each manager gets its own barrier prefix (with the same
  names, a multi-process run failed with "barrier _async_write_complete.N is already ongoing")."""
  from lgrpo_jax.runs import RunError
  for name in ("checkpoints", "best"):  # a file there: Orbax's save failed after a 5-minute barrier timeout
    if os.path.exists(p := os.path.join(run_dir, name)) and not os.path.isdir(p):
      raise RunError(f"{p} is a file; the run saves its checkpoints in a directory of that name: move it away")
  barriers = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, multiprocessing_options=barriers("checkpoints")))
  best = ocp.CheckpointManager(os.path.join(run_dir, "best"), options=ocp.CheckpointManagerOptions(
      max_to_keep=1, multiprocessing_options=barriers("best")))
  return manager, best


def config_diffs(path: str, record: dict | None) -> list[tuple]:
  """(dotted key, old, new) for every setting in which `record` differs from the config JSON at
  `path` ([] when either is missing)."""
  if record is None or not os.path.isfile(path):
    return []
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return []
  flat = lambda d, pre="": ({k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{pre}{k}.").items()}
                            if isinstance(d, dict) else {pre[:-1]: d})
  new = json.loads(json.dumps(record, default=str))  # as it would be written: tuples as lists
  a, b = flat(old), flat(new)
  # A setting added since the run was started (absent from its record) at its default is no change
  from lgrpo_jax.config import ExperimentConfig, to_record
  default = flat(json.loads(json.dumps(to_record(ExperimentConfig()), default=str)))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not (k not in a and k in default and b.get(k) == default[k])]


def config_changes(path: str, record: dict | None, limit: int = 8) -> str:
  """The settings in which `record` differs from the config JSON at `path` ("key: old → new", …),
  or "" when either is missing."""
  diffs = [f"{k}: {json.dumps(o)} → {json.dumps(n)}" for k, o, n in config_diffs(path, record)]
  return ", ".join(diffs[:limit]) + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


# Models whose weights a Trainer's run() trained in place and handed back → that run's directory
_HANDED_BACK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Trainer:
  """Owns the policy/reference/listener parameters, the optimizer, the data iterator and the
  checkpoints of one run directory."""

  def __init__(self, run_dir, model, tokenizer, pairs, step_cfg: StepConfig = StepConfig(),
               pipe_cfg: PipelineConfig = PipelineConfig(), loop_cfg: LoopConfig = LoopConfig(),
               listener=None, reference=None, config_record: dict | None = None, eval_pairs=None,
               mesh=None, compile_counter=None):
    """With `mesh` (sharding.make_mesh), every parameter and optimizer-state array is laid out by
    the rules table (FSDP / tensor / data axes) and batch rows are split over the data axes;
    without, everything lives on the default device. With several processes (multi-host) a mesh
    is required: each process feeds its own rows of every global batch. Completions end at
    `step_cfg.sampling.eos_ids`, by default (none given) the tokenizer's EOS and `<|im_end|>`."""
    if jax.process_count() > 1 and mesh is None:
      raise ValueError("several processes: the Trainer needs a mesh over all their devices (sharding.make_mesh)")
    # A tokenizer that is not the models' (another checkpoint's, another vocabulary): the images
    # would silently go nowhere
    from lgrpo_jax.data.prompts import check_tokenizer_fits
    for what, m in (("the model", model), ("the listener", listener), ("the reference", reference)):
      if m is not None:
        check_tokenizer_fits(tokenizer, m.config, what)
    # This run's XLA compilations: from the launcher's start when it hands its counter over (the
    # warm start included), else from here.
    self.compiles = compile_counter or CompileCounter()
    self.mesh = mesh
    self.run_dir = os.path.abspath(os.fspath(run_dir))
    from lgrpo_jax.runs import check_run_dir_name
    check_run_dir_name(self.run_dir)
    os.makedirs(self.run_dir, exist_ok=True)
    if not step_cfg.sampling.eos_ids:  # as transformers' generate stops at the model's end ids
      step_cfg = dataclasses.replace(step_cfg, sampling=dataclasses.replace(
          step_cfg.sampling, eos_ids=end_of_turn_ids(tokenizer)))
    self.step_cfg, self.pipe_cfg, self.loop_cfg = step_cfg, pipe_cfg, loop_cfg
    # A reward or loss piece that fails or returns the wrong shape: named now, not from inside the first step
    warning = check_step_code(step_cfg, pipe_cfg.global_batch)
    if warning:
      log.warning(warning)
    self.model_config = model.config
    # The model given is trained in place, as TRL's trainer trains the model it is given: its
    # parameters are the step's state (donated to each step, so no second copy is held), and every
    # `run` ends by putting the state's parameters back into it (`_hand_back`).
    self._model = model
    self._closed = False
    self._skips_saved = self._skips_at_restore = 0  # `skipped_records` across a resume
    self.graphdef, params = nnx.split(model, nnx.Param)
    if mesh is not None:
      params = place(params, mesh)
    # Frozen copies: the reference (for β > 0) and the listener default to the initial policy. When
    # both do, they are one copy (one model's memory, not two) and the step runs its vision tower
    # once for the listener and reference passes (`make_train_step(listener_is_reference=True)`).
    # They are kept in the compute dtype: the layers cast every weight to it at use, so a bf16 copy
    # of fp32 master weights computes exactly what they do, in half the memory.
    # A copy nothing reads is not made: with β = 0 there is no reference pass (as TRL then loads no
    # reference model), and without a listener reward no listener pass — at 7B a copy is ~17 GB (bf16).
    dt = jnp.dtype(model.config.dtype)
    copy = lambda m: copy_tree(nnx.split(m, nnx.Param)[1], dt)
    listener = listener if listener is not None else model
    self.listener_graphdef = nnx.split(listener, nnx.Param)[0]
    self.listener_model_config = listener.config  # its own sizes, for the FLOP count
    self.listener_is_reference = listener is model and reference is None
    needs_listener, needs_reference = step_cfg.rewards.needs_listener, step_cfg.loss.beta > 0
    # Which frozen copies are the given model's weights (for `_check_frozen_source` on a resume)
    self._frozen_from_model = [name for name, yes in (("reference", needs_reference and reference is None),
                                                      ("listener", needs_listener and listener is model)) if yes]
    self.ref_params = self.listener_params = None
    if needs_reference or (needs_listener and self.listener_is_reference):
      self.ref_params = copy(reference) if reference is not None else copy_tree(params, dt)
    if self.listener_is_reference:
      self.listener_params = self.ref_params
    elif needs_listener:
      self.listener_params = copy(listener) if listener is not model else copy_tree(params, dt)
    if mesh is not None:
      self.ref_params = place(self.ref_params, mesh) if self.ref_params is not None else None
      self.listener_params = self.ref_params if self.listener_is_reference else (
          place(self.listener_params, mesh) if self.listener_params is not None else None)
    self.tx = make_optimizer(step_cfg.optim, params)
    # One program; on a mesh the moments are laid out as their parameters and the scalars (step,
    # key, optimizer counts) replicated, like the step's outputs.
    self.state = init_state(params, self.tx, loop_cfg.seed, mesh)
    self.state_shardings = None
    if mesh is not None:
      self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    else:  # one device: commit the arrays to it as a restored checkpoint's are, so that a fresh and a
      # resumed run lower the step alike (else the restart misses the persistent compilation cache)
      self.state, self.ref_params, self.listener_params = jax.device_put(
          (self.state, self.ref_params, None if self.listener_is_reference else self.listener_params),
          jax.devices()[0])
      if self.listener_is_reference:
        self.listener_params = self.ref_params
    bt = ByteTable.from_tokenizer(tokenizer)
    if bt.truncated:
      log.warning("%d tokens are longer than the byte table's width; their tails are ignored by parsing",
                  bt.truncated)
    self.tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths), pipe_cfg.prompt.choices)
    if mesh is not None:
      self.tables = on_mesh(self.tables, mesh)
    self.spec = ListenerSpec.from_tokenizer(tokenizer, pipe_cfg.prompt)
    self.batches = make_batches(pairs, tokenizer, dataclasses.replace(pipe_cfg, seed=loop_cfg.seed),
                                process_index=jax.process_index(), process_count=jax.process_count())
    self._steps: dict = {}
    self.manager, self.best = checkpoint_managers(self.run_dir, loop_cfg.keep)
    try:  # a refused resume, a bad held-out set: the managers' threads and files are not left open
      self.evaluator = None
      # Held-out pairs given: `evaluate()` scores them whenever asked; the loop itself evaluates only
      # with `loop.eval_every` (`_in_run_eval`).
      if eval_pairs is not None:
        from lgrpo_jax.train.evaluation import Evaluator
        self.evaluator = Evaluator(eval_pairs, tokenizer, pipe_cfg, step_cfg.sampling, self.graphdef,
                                   self.listener_graphdef, self.spec if step_cfg.rewards.needs_listener else None,
                                   self.tables, mesh)
      self._signals, self.stopped_by, self._eval_error = stopping.StopSignals(), None, None
      self._running = False
      self.best_accuracy = self._best_accuracy()  # before _restore drops the metrics past its step
      self._eval_missed = False  # the resumed step's evaluation was cut short: `run` does it first
      self.resumed_from = self._restore(config_record)
      if config_record is not None and jax.process_index() == 0:  # after the restore: a refused one keeps it
        cfg_path = os.path.join(self.run_dir, "config.json")
        try:
          if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
              json.load(f)
        except ValueError as e:  # hand-edited or torn: kept, not written over (the run's only record of its settings)
          kept = os.path.join(self.run_dir, f"config.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.json")
          os.replace(cfg_path, kept)
          print(f"warning: {cfg_path} is not valid JSON ({e}); kept as {os.path.basename(kept)}, and this run's "
                "settings are written in its place (the differences from it cannot be listed)", file=sys.stderr)
        changed = config_changes(cfg_path, config_record, limit=20) if self.resumed_from is not None else ""
        if changed:  # allowed (a longer run, another learning rate), said, and the old settings kept
          sft_changed = any(k.startswith("sft.") for k, _, _ in config_diffs(cfg_path, config_record))
          kept = os.path.join(self.run_dir, f"config.before-step-{self.resumed_from}.json")
          n = 1
          while os.path.exists(kept):  # resumed at this step before: each earlier config is kept
            kept = os.path.join(self.run_dir, f"config.before-step-{self.resumed_from}.{n}.json")
            n += 1
          os.replace(cfg_path, kept)
          print(f"warning: resumed from step {self.resumed_from} with settings that differ from the run's: "
                f"{changed} (the earlier config.json is kept as {os.path.basename(kept)}; the data position, "
                "the reference and the listener are the earlier run's"
                + ("; the warm start is not run again: RUN_DIR/sft is loaded as it is" if sft_changed else "")
                + ")", file=sys.stderr)
        with open(cfg_path, "w") as f:
          json.dump(config_record, f, indent=2, default=str)
      self.sinks = MetricSinks(self.run_dir, tensorboard=loop_cfg.tensorboard, wandb_project=loop_cfg.wandb_project,
                               config_record=config_record, resumed_from=self.resumed_from)
      per_device = loop_cfg.peak_tflops_per_device or measured_matmul_tflops(jnp.dtype(model.config.dtype))
      self.peak_tflops = per_device * jax.device_count()
    except BaseException:
      for m in (self.manager, self.best):
        try:
          m.close()
        except Exception:  # noqa: BLE001 — the error being raised is the one to see
          pass
      raise

  @property
  def batches(self):
    """This process's batches (`data.pipeline.Batches`); assigning one replaces the feed."""
    return self.feed.batches

  @batches.setter
  def batches(self, batches) -> None:
    self.feed = stopping.Feed(batches, self.pipe_cfg.stall_timeout_s)

  def _local_skips(self) -> int:
    report = getattr(self.batches, "report", None)  # (a test's stand-in feed may have none)
    return sum(report.skipped.values()) if report is not None else 0

  def skipped_records(self) -> int:
    """Records the pipeline has left out so far in the run (`pipeline.bad_records='skip'`: an image
    that failed to decode, …), on every process together (a collective: every process calls it).
    A checkpoint keeps the total: each process's own counts are not all in it (process 0 writes
    the data position), so a resumed run adds what every process skips after it."""
    n = self._local_skips() - self._skips_at_restore
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      n = int(np.sum(multihost_utils.process_allgather(np.asarray(n, np.int64))))
    return self._skips_saved + int(n)

  # ---- checkpoints ---------------------------------------------------------------------------
  def _tree(self, state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "key": jax.random.key_data(state.key)}

  def _args(self):
    data = {**self.feed.position(), "skipped_records": self.skipped_records()}
    return ocp.args.Composite(state=ocp.args.StandardSave(self._tree(self.state)), data=ocp.args.JsonSave(data))

  def save(self) -> None:
    if self._closed:
      raise RuntimeError(f"this Trainer is closed; build a new one on {self.run_dir} to go on from its checkpoint")
    step = int(self.state.step)
    if step not in self.manager.all_steps():
      self.sinks.sync()
      self.manager.save(step, args=self._args(), force=True)
    self._last_save = time.monotonic()

  def _set_aside(self, failures, resumed: int) -> None:
    """Renames the unreadable checkpoints newer than `resumed` to `<step>.unreadable-<time>`: the
    resumed run saves those steps again (a step already listed is never saved), and a later restart,
    `evaluate` or `convert` no longer takes the damaged one for the latest. Renamed, not deleted:
    the error may have been passing (a network file system); renaming it back restores it."""
    if not failures:
      return
    where = os.path.join(self.run_dir, "checkpoints")
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step, _ in failures:
        os.replace(os.path.join(where, str(step)), os.path.join(where, f"{step}.unreadable-{stamp}"))
        again = (f"this run saves step {step} again" if step <= self.loop_cfg.steps else
                 f"this run ends before step {step} (loop.steps={self.loop_cfg.steps})")
        print(f"warning: checkpoint {step} set aside as checkpoints/{step}.unreadable-{stamp}; {again}",
              file=sys.stderr)
    if jax.process_count() > 1:
      from lgrpo_jax.distributed import barrier
      barrier("lgrpo_jax: unreadable checkpoints set aside")
    self.manager.reload()
    assert resumed in self.manager.all_steps()

  def _restore(self, config_record: dict | None = None) -> int | None:
    """The newest readable checkpoint's step (its state and data position loaded), or None when
    there is none. Checkpoints that exist but none of which can be read are an error (`RunError`,
    naming the settings that differ from the run's config.json), never a silent fresh start."""
    from lgrpo_jax.runs import RunError
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self._tree(self.state))
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      except Exception as e:  # a damaged checkpoint: say so and take the one before
        # Said once (a logger on stderr would say it twice); damaged, or saved with other settings
        # (a changed state layout: the error below names the settings when no checkpoint restores).
        log.info("checkpoint %s/checkpoints/%d does not restore (%s: %s)", self.run_dir, step,
                 type(e).__name__, str(e)[:200])
        print(f"warning: checkpoint {step} does not restore into this run's state ({type(e).__name__}: damaged, "
              "or saved with other settings); trying the previous one", file=sys.stderr)
        failures.append((step, f"{step}: {type(e).__name__}: {str(e)[:300]}"))
        continue
      t = restored["state"]
      self.state = TrainState(t["params"], t["opt_state"], jnp.asarray(t["step"], jnp.int32),
                              jax.random.wrap_key_data(t["key"]))
      if self.state_shardings is not None:
        self.state = jax.tree.map(put, self.state, self.state_shardings)
      else:
        self.state = jax.device_put(self.state, jax.devices()[0])
      if step > 0:
        self._check_frozen_source(step)
      self.batches.set_state(restored["data"])
      self._skips_at_restore = self._local_skips()
      self._skips_saved = int(restored["data"].get("skipped_records", self._skips_at_restore))
      self._set_aside(failures, step)
      self._drop_metrics_after(step)
      self._save_best_if_missed(step)
      self._eval_missed = self._missed_evaluation(step)
      log.info("resumed from %s/checkpoints/%d", self.run_dir, step)
      return step
    if steps:
      changed = config_changes(os.path.join(self.run_dir, "config.json"), config_record)
      raise RunError(
          f"{self.run_dir}/checkpoints: none of the checkpoints {sorted(steps)} can be restored into this "
          f"run's state" + (f"; the config differs from the run's config.json in {changed}" if changed else "")
          + ". Resume with the settings the run was started with, give a new run_dir, or remove "
          f"{self.run_dir}/checkpoints to start over (the newest one's failure: {failures[0][1]})")
    self._drop_metrics_after(-1)  # an earlier attempt that left no checkpoint: its lines are redone
    return None

  def _check_frozen_source(self, step: int) -> None:
    """A `RunError` when the model given was trained in place by an earlier Trainer on this run
    directory (its `run()` handed the weights back: `_HANDED_BACK`) while a frozen copy (reference,
    listener) is made from it: they would be that run's trained policy, not the run's initial
    weights, and the run would go on with another reward and KL than it started with. (Known by the
    model object, not by comparing weights: no device program only a resume would compile.)"""
    from lgrpo_jax.runs import RunError
    trained_here = _HANDED_BACK.get(self._model)
    if not self._frozen_from_model or trained_here != self.run_dir:
      return
    which = " and ".join(self._frozen_from_model)
    raise RunError(
        f"{self.run_dir}: resuming from step {step} with a model an earlier Trainer of this run trained in "
        f"place (its run() handed the trained weights back): the {which} would be copied from them, not from "
        f"the weights the run started with. Give the initial model again (loaded afresh), or pass "
        f"{', '.join(f'{w}=' for w in self._frozen_from_model)} a model with the initial weights "
        "(`run()` again on the same Trainer goes on without this)")

  def _best_accuracy(self) -> float:
    """The held-out accuracy of the checkpoint in best/ (from its step's metrics line), or -1 when
    there is none. Read on process 0 and broadcast, so every process decides the same saves."""
    steps = self.best.all_steps()
    acc = self._eval_accuracy_at(max(steps)) if steps else -1.0
    if steps and acc < 0:
      log.warning("%s/best/%d has no held-out accuracy in metrics.jsonl: the next evaluation replaces it",
                  self.run_dir, max(steps))
    return acc

  def _eval_accuracy_at(self, step: int) -> float:
    """eval/accuracy of `step`'s line in metrics.jsonl, or -1 when there is none. Read on process 0
    and broadcast, so every process decides the same saves."""
    from lgrpo_jax.runs import read_jsonl
    path = os.path.join(self.run_dir, "metrics.jsonl")
    acc = -1.0
    if jax.process_index() == 0 and os.path.isfile(path):
      for record in read_jsonl(path):
        if record.get("step") == step and "eval/accuracy" in record:
          acc = float(record["eval/accuracy"])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      acc = float(multihost_utils.broadcast_one_to_all(np.float32(acc)))
    return acc

  def _missed_evaluation(self, step: int) -> bool:
    """Whether `step` is one the loop evaluates (0 with `eval_at_start`, every `eval_every`-th, the
    last) and metrics.jsonl holds no evaluation of it: one cut short by a stop or a hung held-out
    read, after which the step was saved. (Agreed by every process: `_eval_accuracy_at`.)"""
    if not self._in_run_eval:
      return False
    due = self.loop_cfg.eval_at_start if step == 0 else (step % self.loop_cfg.eval_every == 0
                                                         or step == self.loop_cfg.steps)
    return bool(due) and self._eval_accuracy_at(step) < 0

  def _drop_metrics_after(self, step: int) -> None:
    """metrics.jsonl without the lines past `step` (nor a line torn by a kill), replaced atomically."""
    from lgrpo_jax.runs import keep_jsonl_through
    if jax.process_index() == 0:
      keep_jsonl_through(os.path.join(self.run_dir, "metrics.jsonl"), step)

  def _save_best_if_missed(self, step: int) -> None:
    """A kill after checkpoints/`step` was committed but before best/`step` was can leave best/
    without the best evaluation so far; the restored state is that step's, so save it there now."""
    acc = self._eval_accuracy_at(step)
    if acc >= 0 and np.float32(acc) > np.float32(self.best_accuracy) and step not in self.best.all_steps():
      self.best.save(step, args=self._args(), force=True)
      self.best_accuracy = acc
      log.info("best/%d saved from the restored checkpoint (held-out accuracy %.4f)", step, acc)

  # ---- the loop ------------------------------------------------------------------------------
  @property
  def _in_run_eval(self) -> bool:
    return self.evaluator is not None and self.loop_cfg.eval_every > 0

  def _step_fn(self, pair_grid):
    # One step function per image grid (every grid's kept: a dataset with many grids interleaves
    # them), replaced when what the step reads at trace time changed: a reward or loss registered
    # again with replace=True (a notebook cell edited, then run() again), `clear_compiled_steps()`.
    key = _trace_globals()
    kept_key, fn = self._steps.get(pair_grid, (None, None))
    if kept_key != key:
      if self.step_cfg.rewards.needs_listener and self.listener_params is None:
        raise ValueError("a reward now reads the listener (registered with uses_listener=True after this "
                         "Trainer was built), but the Trainer kept no listener copy: build a new Trainer")
      fn = make_train_step(self.graphdef, self.listener_graphdef, self.tx, self.step_cfg, self.spec, pair_grid,
                           self.state_shardings, self.listener_is_reference)
      self._steps[pair_grid] = (key, fn)
    return fn

  def _mesh_ctx(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def evaluate(self) -> dict:
    """The held-out metrics of the current parameters ({} without held-out pairs). A held-out read
    failing or hanging (past `pipeline.stall_timeout_s`) on any process raises on every process."""
    if self.evaluator is None:
      return {}
    try:
      with self._mesh_ctx():
        return self.evaluator(self.state.params, self.listener_params, signals=self._signals)
    except stopping.EvaluationStopped:
      if not self._running:  # a stop asked for between runs is spent by the evaluation it stopped
        self._signals = stopping.StopSignals()
      raise

  def _evaluate_in_run(self) -> dict:
    """`evaluate` inside `run`. A stop asked for during it ends it early: {} is returned and
    `stopped_by` set (`run` then saves and returns). A failed or hung held-out read is kept for
    `_raise_eval_error`, which saves the step on every process once its metrics line is written."""
    try:
      with self._mesh_ctx():
        return self.evaluator(self.state.params, self.listener_params, signals=self._signals,
                              step=int(self.state.step))
    except stopping.EvaluationStopped as e:
      self.stopped_by = e.signum
      return {}
    except Exception as e:
      if not getattr(self.evaluator, "read_failed", False):
        raise
      # A read failure agreed on every process (of any type: every process must save): a hang, mostly,
      # as held-out bad records are skipped.
      self._eval_error = e
      return {}

  def _raise_eval_error(self) -> None:
    if self._eval_error is not None:
      error, self._eval_error = self._eval_error, None
      self.save()
      self.manager.wait_until_finished()
      raise error

  def request_stop(self, signum: int = signal.SIGTERM) -> None:
    """Ask `run` to stop as SIGTERM does (callable from any thread: a watchdog, a callback). Asked
    between two runs, the next `run()` (or `evaluate()`) stops at its start."""
    self._signals.request(signum)

  def run(self, on_metrics=None) -> list[dict]:
    """Train until `loop_cfg.steps`; returns the metrics of the steps run in this call.

    Stopping early: SIGTERM or SIGINT (Ctrl-C) reaching *any* process, or `request_stop()`, makes
    every process save the step it reached and return, with `stopped_by` set to the signal number
    (the launcher then exits with 128 + it, so that a scheduler restarts the run); a second signal
    acts as it would without the loop. A data error on any process (`bad_records='error'`) saves
    the step reached on every process, then raises on every process. In both cases the saved data
    position is the one before the batch not trained on, so a restart reads it again. The data
    running out (a finite `pipeline.num_epochs`) ends the run as reaching `loop.steps` does."""
    if self._closed:
      raise RuntimeError(f"this Trainer is closed; build a new one on {self.run_dir} to go on from its checkpoint")
    deleted = [x for x in jax.tree.leaves(self.state) if x.is_deleted()]
    if deleted:
      raise RuntimeError(
          f"this Trainer's state has {len(deleted)} deleted arrays: another Trainer built from the same model "
          "object has run (a Trainer trains the model's arrays in place, donating them to each step), or a step's "
          "program failed (a reward's own jax.pure_callback raising). Build each Trainer from a model loaded "
          f"afresh; the checkpoints in {self.run_dir} are kept")
    out = []
    tty = sys.stderr.isatty()
    self.stopped_by, self._eval_error = None, None  # (a stop asked for since the last run is kept)
    self._host_rewards = any(hasattr(REWARDS.get(name), "reward_name") for name, _ in self.step_cfg.rewards.weights)
    take_host_errors()  # none left from elsewhere (a test's own call of the reward)
    self.skipped_steps = 0
    self._untrained = False
    self._running = True
    try:
      self._run(out, tty, on_metrics)
    except BaseException as e:
      # An error in the caller's code (an `on_metrics` callback, a registered reward) or a bug: the
      # steps trained are saved (unless the last save has them), so that a new run() or Trainer
      # resumes there. One process only: with several, a save is collective and the others are
      # not here. A KeyboardInterrupt (a second Ctrl-C: out without saving) still puts back the
      # batch not trained on, so that run() again reads it.
      if jax.process_count() == 1 and not self._closed:
        try:
          if self._untrained:  # the batch taken was not trained on: the saved position is before it
            self.feed.rewind()
            self._untrained = False
          if isinstance(e, Exception):
            self.save()
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 — the original error is the one to see
          log.exception("saving the step reached after an error failed")
      raise
    finally:
      self._running = False
      self._signals = stopping.StopSignals()  # this run's stop is spent: `evaluate()` after it runs
      self._hand_back()
    return out

  def _hand_back(self) -> None:
    """The model given to the Trainer holds the current parameters (shared with the state, which
    the next step donates: `run` hands them back again when it returns)."""
    try:
      nnx.update(self._model, self.state.params)
      if int(self.state.step) > 0:
        _HANDED_BACK[self._model] = self.run_dir
    except Exception:  # noqa: BLE001 — a state deleted by a failed step: nothing to hand back
      log.warning("could not put the trained parameters back into the model")

  def _run(self, out, tty, on_metrics) -> None:
    with self._signals:
      at = int(self.state.step)
      # Before the first step; or, resumed, the evaluation of the resumed step that a stop or a hung
      # read cut short (the step was saved without it: at `loop.steps` the run would otherwise end
      # unevaluated, and best/ never see it).
      if self._in_run_eval and (self._eval_missed or (self.loop_cfg.eval_at_start and at == 0
                                                                and self.resumed_from is None)):
        first = {"step": at, **self._evaluate_in_run()}
        if len(first) > 1:
          self._eval_missed = False
          self.sinks.write(first)
          out.append(first)
          if on_metrics is not None:
            on_metrics(first)
        self._raise_eval_error()
        if at > 0 and "eval/accuracy" in first:
          self._keep_if_best(at, first)
      self._last_save = time.monotonic()
      if self.stopped_by is None:
        self._loop(out, tty, on_metrics)
    if self.stopped_by is not None:
      self.save()
      print(f"\n{stopping.signal_name(self.stopped_by)}: saved step {int(self.state.step)}, stopping",
            file=sys.stderr)
    self.manager.wait_until_finished()
    if out and jax.process_index() == 0:
      from lgrpo_jax.plot import plot
      plot(self.run_dir)  # RUN_DIR/curves.png: reward, accuracy, contradiction rate

  def step_flops(self, host: dict, decode_steps: int) -> int:
    """Counted FLOPs of the step just run on `host` (see flops.grpo_step_flops)."""
    b, p = host["input_ids"].shape
    b *= jax.process_count()  # host rows are this process's share of the global batch
    c = self.step_cfg
    return grpo_step_flops(
        self.model_config, b, p, pair_grid_of(host) * b, c.sampling.num_samples, c.sampling.max_new_tokens,
        decode_steps=max(decode_steps, 1),
        listener_len=host["listener_input_ids"].shape[1] if c.rewards.needs_listener else 0,
        listener_suffix=len(self.spec.suffix_ids), passes=c.optim.passes,
        recompute_old=c.old_logprobs == "recompute", reference=c.loss.beta > 0,
        shared_frozen_vision=self.listener_is_reference, frozen_vision="vision" in c.optim.freeze,
        listener_cfg=self.listener_model_config)

  def _loop(self, out, tty, on_metrics):
    while int(self.state.step) < self.loop_cfg.steps:
      t0 = time.perf_counter()
      stop, failed, ended = self.feed.next(self._signals)
      if failed:
        self.save()
        self.manager.wait_until_finished()
        raise self.feed.error(failed, int(self.state.step))
      if stop:
        self.stopped_by = stop
        break
      if ended:
        step = int(self.state.step)
        print(f"\nthe data ran out (pipeline.num_epochs={self.pipe_cfg.num_epochs}) at step {step}",
              file=sys.stderr)
        # As at `loop.steps`: the last step trained is evaluated (a line of eval/* only, as at step 0).
        final = self._in_run_eval and out and "eval/accuracy" not in out[-1]
        metrics = self._evaluate_in_run() if final else {}  # {} when a stop came during it
        if metrics:
          out.append({"step": step, **metrics})
          self.sinks.write(out[-1])
          if on_metrics is not None:
            on_metrics(out[-1])
        self.save()
        self._raise_eval_error()
        if metrics:
          self._keep_if_best(step, out[-1])
        break
      host = self.feed.take()
      self._untrained = True  # until the state has the step: an error before then rewinds the data
      step_fn = self._step_fn(pair_grid_of(host))
      with self._mesh_ctx():
        # the state is donated: the key kept for `_raise_reward_errors` (a dispatch, ~0.1 ms: only
        # when a configured reward is a text reward)
        key_before = jnp.copy(self.state.key) if self._host_rewards else None
        self.state, metrics = step_fn(self.state, self.ref_params, self.listener_params,
                                      to_device(host, self.mesh), self.tables)
      self._untrained = False
      metrics = {k: host_scalar(v) for k, v in metrics.items()}
      errors = take_host_errors()  # what text rewards raised in this step (on the process that ran them)
      if metrics["skipped_updates"]:  # (the same on every process) a text reward failing skips every pass
        self._raise_reward_errors(key_before, errors)
      dt = time.perf_counter() - t0
      step = int(self.state.step)
      tflops = self.step_flops(host, int(metrics["decode_steps"])) / dt / 1e12
      metrics.update(step=step, step_time=dt, tokens_per_s=metrics["generated_tokens"] / dt,
                     compiled_programs=sum(f._cache_size() for _, f in self._steps.values()),
                     **dict(zip(("compiles", "compile_s"), self.compiles.stats())),
                     compile_cache_hits=self.compiles.cache_hits(),
                     tflops=tflops, mfu=tflops / self.peak_tflops, skipped_records=self.skipped_records())
      is_eval = self._in_run_eval and (step % self.loop_cfg.eval_every == 0
                                                or step == self.loop_cfg.steps)
      if is_eval:
        metrics.update(self._evaluate_in_run())  # {} when a stop came during it
      self.sinks.write(metrics)
      out.append(metrics)
      if on_metrics is not None:
        on_metrics(metrics)
      if metrics["skipped_updates"]:  # every update is also counted in metrics.jsonl; this one is loud
        self.skipped_steps += 1
        print(f"\nstep {step}: {int(metrics['skipped_updates'])} of {self.step_cfg.optim.passes} optimiser "
              f"update(s) skipped: the loss or the gradients were not finite (NaN/inf), the parameters not "
              f"changed by them; {self.skipped_steps} step(s) with skipped updates in this run so far",
              file=sys.stderr, flush=True)
      if step % self.loop_cfg.log_every == 0 or step == self.loop_cfg.steps:
        line = (f"step {step}/{self.loop_cfg.steps}  reward {metrics['reward/total']:.3f}  "
                f"accuracy {metrics['accuracy']:.3f}  format {metrics['format_rate']:.2f}  "
                f"{dt:.2f} s/step")
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
      minutes = (time.monotonic() - self._last_save) / 60
      if (step % self.loop_cfg.save_every == 0 or step == self.loop_cfg.steps
          or 0 < self.loop_cfg.save_every_minutes <= minutes):
        self.save()
      self._raise_eval_error()
      if "eval/accuracy" in metrics:
        self._keep_if_best(step, metrics)
      if self.stopped_by is not None:  # asked for during the evaluation: `run` saves
        break
    if tty and out:
      print(file=sys.stderr)

  def _raise_reward_errors(self, key_before, mine: list) -> None:
    """After a step whose update was skipped: if a text reward's Python function raised in it on
    any process (`rewards.text_reward`; `mine`: this process's errors), the state goes back to the
    step before — its failure skipped every update pass, so parameters and optimizer state are
    unchanged — the step is saved with the data position before its batch, and the error is raised
    on every process (the reward's own on the processes where it raised)."""
    from lgrpo_jax.rewards.core import RewardError
    failed = [jax.process_index()] if mine else []
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(mine)))).reshape(-1)
      failed = [int(i) for i in np.flatnonzero(flags)]
    if not failed:
      return
    # (a text reward called from inside another reward: no key was kept; the run differs from one
    # that never failed only in its sampling from here)
    self.state = self.state._replace(step=self.state.step - 1, **({} if key_before is None else {"key": key_before}))
    self.feed.rewind()
    self.save()
    self.manager.wait_until_finished()
    step = int(self.state.step)
    if mine:
      error = mine[0]
      error.args = (f"{error.args[0]} (at step {step + 1}; the update was not applied, step {step} is saved and "
                    "a new run() or restart reads that batch again)",)
      raise error
    raise RewardError(f"a text reward failed at step {step + 1} on process {', '.join(map(str, failed))} of "
                      f"{jax.process_count()} (its log names it); every process saved step {step} and stops")

  def _keep_if_best(self, step: int, metrics: dict) -> None:
    """Saves the state into `RUN_DIR/best` when `metrics`' held-out accuracy beats the best so far."""
    # compared in float32: the restored best accuracy was broadcast to every process as one
    if np.float32(metrics["eval/accuracy"]) > np.float32(self.best_accuracy):
      self.best_accuracy = metrics["eval/accuracy"]
      if step not in self.best.all_steps():  # else an earlier attempt saved this very step
        self.sinks.sync()  # a restart reads best/'s accuracy from metrics.jsonl
        self.best.save(step, args=self._args(), force=True)

  def close_quietly(self) -> None:
    """`close`, for a caller on its way out with an error (the launcher): a failure here is logged,
    not raised over that error."""
    try:
      self.close()
    except Exception:  # noqa: BLE001
      log.exception("closing the Trainer after an error failed")

  def close(self) -> None:
    self._closed = True
    self.sinks.close()
    for m in (self.manager, self.best):
      m.wait_until_finished()
      m.close()
