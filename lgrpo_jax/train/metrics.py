"""Where a run's scalars go: metrics.jsonl (always), TensorBoard event files, Weights & Biases
(optional), and the MFU estimate that goes with them."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp

log = logging.getLogger("lgrpo_jax.train")

# XLA backend compilations in this process (every jit/pjit program, ours and JAX's small helpers):
# count and seconds, from JAX's monitoring events. The loop logs a run's own (`CompileCounter`) per
# step (`compiles`, `compile_s`): after the first steps of each shape bucket the count must stop
# growing. JAX times a program loaded from the persistent cache (train/compile_cache.py) as a
# compilation too, so the loads are counted apart as well (`compile_cache_hits`).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_compiles = {"count": 0, "seconds": 0.0, "cache_hits": 0, "registered": False}


def _on_duration(event: str, seconds: float, **_) -> None:
  if event == _BACKEND_COMPILE_EVENT:
    _compiles["count"] += 1
    _compiles["seconds"] += seconds


def _on_event(event: str, **_) -> None:
  if event == _CACHE_HIT_EVENT:
    _compiles["cache_hits"] += 1


def _register() -> None:
  if not _compiles["registered"]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    _compiles["registered"] = True


class CompileCounter:
  """A run's own XLA compilations and persistent-cache loads, counted from when this counter was
  made, so a second run in one process (a notebook, a test session) does not report the first
  one's programs."""

  def __init__(self):
    _register()
    self._base = (_compiles["count"], _compiles["seconds"], _compiles["cache_hits"])

  def stats(self) -> tuple[int, float]:
    """(compilations, seconds) since this counter was made; cache loads count as compilations."""
    return _compiles["count"] - self._base[0], _compiles["seconds"] - self._base[1]

  def cache_hits(self) -> int:
    """Programs loaded from the persistent compilation cache since this counter was made."""
    return _compiles["cache_hits"] - self._base[2]


class MetricSinks:
  """Writes one dict of scalars per step to every configured sink (process 0 only)."""

  def __init__(self, run_dir: str, *, tensorboard: bool = True, wandb_project: str = "",
               config_record: dict | None = None, resumed_from: int | None = None):
    """`resumed_from`: the checkpoint step a resumed run continues from; the steps after it that an
    earlier attempt logged are dropped (metrics.jsonl by the Trainer, TensorBoard by a restart
    event here). W&B keeps them: it accepts no step at or below one it has (docs/training.md)."""
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.primary = jax.process_index() == 0
    self.tb = self.wandb = None
    if not self.primary:
      return
    if tensorboard:
      from lgrpo_jax.train.tensorboard import EventWriter
      self.tb = EventWriter(os.path.join(run_dir, "tensorboard"))
      if resumed_from is not None:
        self.tb.restart_at(resumed_from + 1)
    if wandb_project:
      try:
        import wandb
      except ImportError:
        raise ValueError(f"loop.wandb_project={wandb_project!r} needs Weights & Biases: pip install wandb "
                         "(or set loop.wandb_project='')") from None
      # The run directory names the W&B run, so a resumed run appends to the same one.
      run_id = "".join(c if c.isalnum() else "-" for c in os.path.abspath(run_dir))[-64:].strip("-")
      self.wandb = wandb.init(project=wandb_project, dir=run_dir, id=run_id, resume="allow",
                              name=os.path.basename(run_dir), config=config_record or {})

  def write(self, metrics: dict) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(metrics) + "\n")
    step = int(metrics.get("step", 0))
    scalars = {k: v for k, v in metrics.items() if k != "step"}
    if self.tb is not None:
      self.tb.scalars(step, scalars)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)

  def sync(self) -> None:
    """metrics.jsonl onto the disk: before a checkpoint is saved (`runs.sync_file`)."""
    if self.primary:
      from lgrpo_jax.runs import sync_file
      sync_file(self.path)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def measured_matmul_tflops(dtype=jnp.float32, n: int = 2048, repeats: int = 3) -> float:
  """TFLOP/s of an n×n×n matmul on the default device (best of `repeats`, after a warm-up)."""
  from lgrpo_jax.models.qwen2_5_vl.layers import precision_for
  a = jnp.ones((n, n), dtype)
  # at the precision the model's matmuls use (fp32: HIGHEST, not an accelerator's TF32 default)
  f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision_for(jnp.dtype(dtype))))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e12
