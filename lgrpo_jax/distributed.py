"""Multi-process start-up: the first call of every entry point.

One program per host (JAX's multi-controller model): each process runs the same command, and
`initialize()` joins them through `jax.distributed.initialize` when the environment says there are
several, and does nothing for a single process. How the processes are found, in order:

  1. explicit: arguments, or LGRPO_COORDINATOR_ADDRESS (host:port) + LGRPO_NUM_PROCESSES +
     LGRPO_PROCESS_ID (any launcher: torchrun-style scripts, Kubernetes, a shell loop);
     LGRPO_NUM_PROCESSES=1 alone: one process (e.g. a tool run in a SLURM batch script, outside srun);
  2. SLURM: SLURM_NTASKS > 1 (srun sets it; JAX reads the rest of the SLURM variables itself).
     JAX's SLURM default is one process per GPU (each sees GPU SLURM_LOCALID only); with one task
     per node every GPU the task was given is used instead (`local_device_ids`);
  3. Cloud TPU pod slices: more than one host in TPU_WORKER_HOSTNAMES, or a multislice
     MEGASCALE_COORDINATOR_ADDRESS (JAX reads the TPU metadata itself);
  4. LGRPO_DISTRIBUTED=auto: `jax.distributed.initialize()` with no arguments, JAX's own detection
     (what launch/tpu_pod.sh sets: a TPU VM keeps its worker list in metadata, not the environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "LGRPO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LGRPO_NUM_PROCESSES"
ENV_PROCESS_ID = "LGRPO_PROCESS_ID"
ENV_AUTO = "LGRPO_DISTRIBUTED"  # "auto": leave the detection to jax.distributed.initialize()

_initialized = False


class StartupError(ValueError):
  """The processes of a multi-process run could not be joined (named settings, not JAX's words)."""


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env=None) -> tuple[str, dict]:
  """(how, kwargs for jax.distributed.initialize); how is 'single', 'explicit', 'slurm', 'tpu' or 'auto'."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR)
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = int(env[ENV_NUM_PROCESSES])
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = int(env[ENV_PROCESS_ID])
  if num_processes == 1 and coordinator is None and process_id in (None, 0):
    # LGRPO_NUM_PROCESSES=1 alone: one process, whatever SLURM or TPU variables say — but not inside
    # an srun step of several tasks (exported before the srun line, every task would train alone).
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if step_tasks > 1:
      raise StartupError(f"{ENV_NUM_PROCESSES}=1 inside an srun step of {step_tasks} tasks: each task would run "
                         f"alone, all writing the same run; give {ENV_NUM_PROCESSES}=1 to the one command that "
                         f"runs outside srun ({ENV_NUM_PROCESSES}=1 python -m lgrpo_jax.convert …), not by export")
    return "single", {}
  given = [coordinator is not None, num_processes is not None, process_id is not None]
  if any(given):
    if not all(given):
      raise ValueError("multi-process start-up needs all three of coordinator address, number of "
                       f"processes and process id (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                       f"{ENV_PROCESS_ID}); got coordinator={coordinator!r}, "
                       f"num_processes={num_processes!r}, process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    if num_processes == 1:
      return "single", {}
    return "explicit", dict(coordinator_address=coordinator, num_processes=num_processes,
                            process_id=process_id)
  if int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
    return "slurm", _slurm_devices(env)
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu", {}
  if env.get(ENV_AUTO, "").lower() == "auto":
    return "auto", {}
  if env.get(ENV_AUTO):
    raise ValueError(f"{ENV_AUTO}={env[ENV_AUTO]!r}: the only value is 'auto'")
  return "single", {}


def _slurm_devices(env) -> dict:
  """{'local_device_ids': every GPU of the task} when SLURM runs one task per node with several
  GPUs: JAX would otherwise give each task GPU SLURM_LOCALID alone (its one-process-per-GPU
  default), and a node would drive one of its GPUs. {} otherwise (JAX_LOCAL_DEVICE_IDS wins)."""
  per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or \
      env.get("SLURM_TASKS_PER_NODE", "")
  first = per_node.split("(")[0].split(",")[0]
  if env.get("JAX_LOCAL_DEVICE_IDS") or first != "1":
    return {}
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
  return {"local_device_ids": list(range(count))} if count > 1 else {}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Joins the processes of a multi-host run (idempotent). Returns how they were found."""
  global _initialized
  how, kwargs = detect(coordinator, num_processes, process_id)
  if how == "single" or _initialized:
    return how
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    # CPU processes exchange data through gloo (the default CPU backend has no cross-process
    # collectives); used by the multi-process tests and CPU clusters.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX's own words name none of the variables that sent us here
    why = {"slurm": f"SLURM_NTASKS={os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_STEP_NUM_TASKS'))} "
                    "says this is one of several processes, started by srun",
           "tpu": "TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS say this is one of several TPU hosts",
           "auto": f"{ENV_AUTO}=auto asked JAX to find the other processes"}.get(how, "")
    way_out = (f" Outside srun (the batch script, an salloc shell) run a single process as "
               f"`{ENV_NUM_PROCESSES}=1 python -m …`." if how == "slurm" else "")
    raise StartupError(f"multi-process start-up ({how}) failed: {e} {why}.{way_out}") from None
  _initialized = True
  coordination_barriers_for_orbax()
  log.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(),
           jax.process_count(), how, jax.local_device_count(), jax.device_count())
  return how


def add_args(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("multi-process (optional; detected from SLURM / TPU otherwise)")
  g.add_argument("--coordinator", default=None, help=f"host:port of process 0 (or ${ENV_COORDINATOR})")
  g.add_argument("--num-processes", type=int, default=None, help=f"(or ${ENV_NUM_PROCESSES})")
  g.add_argument("--process-id", type=int, default=None, help=f"(or ${ENV_PROCESS_ID})")


def initialize_from_args(args: argparse.Namespace) -> str:
  return initialize(args.coordinator, args.num_processes, args.process_id)


BARRIER_TIMEOUT_S = 1800  # a barrier waits this long for the slowest process (checkpoint writes included)


ORBAX_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def coordination_barriers_for_orbax() -> None:
  """Make Orbax wait at the distributed service's named barriers instead of device collectives.

  By default Orbax's barrier is `multihost_utils.sync_global_devices`, a device all-gather, and it
  runs it from its background save thread. Collectives are matched across processes by order, not
  by name: process 0's save thread could meet process 1's main-thread collective (training, or the
  barrier of `finish`), and the run hung until the shutdown barrier killed it — seen in the
  two-process tests under load. Named barriers of the coordination service cannot cross-match and
  take a timeout. Orbax reads its (absl) flag at each barrier; it is set as if given on the command
  line, without parsing anyone else's flags."""
  from absl import flags
  try:
    from orbax.checkpoint._src.multihost import multihost  # noqa: F401  (defines the flag)
    flag = flags.FLAGS[ORBAX_BARRIER_FLAG]
  except (ImportError, KeyError) as e:  # a private module: an Orbax release may move or rename it
    import orbax.checkpoint
    warnings.warn(f"orbax-checkpoint {getattr(orbax.checkpoint, '__version__', '?')} has no flag "
                  f"{ORBAX_BARRIER_FLAG!r} ({type(e).__name__}: {e}): its checkpoint barriers may be "
                  "device collectives run from a background thread, which can hang multi-process runs "
                  "at a save (docs/troubleshooting.md); orbax-checkpoint 0.12.8 has the flag",
                  RuntimeWarning, stacklevel=2)
    return
  flag.value, flag.present = True, 1


def barrier(tag: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """All processes wait here (a named barrier of the distributed service; no device collective, so
  it is safe beside other threads' collectives). A process that does not arrive in `timeout_s` makes
  every waiting process fail with the barrier's name and the missing process ids."""
  if jax.process_count() > 1:
    from jax._src import distributed as jax_distributed
    jax_distributed.global_state.client.wait_at_barrier(tag, timeout_s * 1000)


def finish(tag: str) -> None:
  """The last call of a multi-process entry point: a named barrier, then the distributed service's
  own shutdown while every process is still here. (A shutdown barrier that times out means one
  process left early: its own log has the error.)"""
  if jax.process_count() > 1:
    barrier(tag)
    jax.distributed.shutdown()
