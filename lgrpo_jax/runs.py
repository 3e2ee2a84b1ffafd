"""A training run directory as a source of models: its config, its checkpoints, its parameters.

    RUN_DIR/config.json            the resolved ExperimentConfig (`config.to_record`; an invalid one is
                                   kept as config.unreadable-<time>.json)
    RUN_DIR/.lock                  held by the launcher's process 0 while it runs (one run per directory)
    RUN_DIR/checkpoints/<step>/    training states (policy params, optimizer state, …)
    RUN_DIR/best/<step>/           the best by held-out accuracy
    RUN_DIR/sft/                   the warm start's parameters (the listener's, by default)
    RUN_DIR/sft_checkpoints/       an interrupted warm start's state, until RUN_DIR/sft is saved
    RUN_DIR/tokenizer/             the tiny preset's tokenizer (written by the first launch)
    RUN_DIR/eval/<name>/summary.json   evaluations (`python -m lgrpo_jax.evaluate`)
    RUN_DIR/xla_cache/             compiled programs for a restart (`compile_cache`, by default)

Used by `lgrpo_jax.evaluate` and `lgrpo_jax.convert to-hf RUN_DIR`. Parameters are read straight
into an abstract model (and into their shards with a mesh); the optimizer state is never read.
"""

from __future__ import annotations

import json
import os


class RunError(ValueError):
  """A run directory (or checkpoint) that cannot give what was asked, with what to do."""


def read_jsonl(path) -> list[dict]:
  """The records of a JSON-lines file written by appending (metrics.jsonl): a line that does not
  parse (torn by a kill, a crash or a full disk while it was written) is left out with a warning,
  so a damaged tail never stops a resume or a report."""
  import logging
  out, torn = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        torn += 1
  if torn:
    logging.getLogger(__name__).warning("%s: %d unreadable line(s) left out (torn by an interrupted write)",
                                        path, torn)
  return out


def replace_file(path, text: str) -> None:
  """Replace `path` with `text` atomically: a kill leaves the old file or the new one, never a torn
  or empty one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _sync_dir_of(path)


def _sync_dir_of(path) -> None:
  """The directory entry of `path` onto the disk: a file created (or renamed into place) since the
  directory was last synced can otherwise vanish, or come back as its old version, after a crash."""
  try:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  except OSError:  # a platform or file system that cannot open a directory: nothing more to do
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def sync_file(path) -> None:
  """`path`'s written data onto the disk (fsync), if the file exists: an appended log (metrics.jsonl)
  before the checkpoint of its step is saved, so that a machine going down after the save cannot
  leave a checkpoint whose step's line was still in the page cache (a resume keeps the lines up to
  its checkpoint and never writes that step's again)."""
  if os.path.isfile(path):
    with open(path, "a") as f:
      os.fsync(f.fileno())
    _sync_dir_of(path)  # a newly created log's entry too


def keep_jsonl_through(path, step: int) -> None:
  """Rewrite the JSON-lines file at `path` (if any) with only its records of steps ≤ `step` (torn
  lines dropped), atomically: what a resumed run keeps of an earlier attempt's metrics."""
  if os.path.isfile(path):
    replace_file(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r.get("step", 0) <= step))


def is_run_dir(path) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      os.path.isdir(os.path.join(path, d)) for d in ("checkpoints", "best"))


def check_creatable_dir(path, setting: str, error=None) -> None:
  """`path` is a directory or can be made one: it and its nearest existing parent are directories
  (else an `error`, default `RunError`, naming `setting`, before anything is computed)."""
  error = error or RunError
  at = os.path.abspath(os.fspath(path))
  while not os.path.exists(at) and os.path.dirname(at) != at:
    at = os.path.dirname(at)
  if not os.path.isdir(at):
    where = "is" if at == os.path.abspath(os.fspath(path)) else f"is inside {at!r}, which is"
    raise error(f"{setting}={os.fspath(path)!r} {where} a file, not a directory")


def first_line(e: BaseException | str, limit: int = 240) -> str:
  """The first line of an error's message, cut at `limit` characters (Orbax's and TensorStore's go on
  for pages)."""
  line = (str(e).strip().splitlines() or [""])[0].strip()
  return line[:limit] + ("…" if len(line) > limit else "")


def check_writable_dir(path, setting: str, error=None) -> None:
  """`path` (or, before it exists, its nearest existing parent) takes new files: a probe file made
  and removed there; else an `error` naming `setting` and the reason (a read-only mount, no
  permission, a full disk), before a model is loaded."""
  import tempfile
  error = error or RunError
  at = os.path.abspath(os.fspath(path))
  while not os.path.exists(at) and os.path.dirname(at) != at:
    at = os.path.dirname(at)
  try:
    with tempfile.TemporaryFile(dir=at, prefix=".lgrpo-write-probe-"):
      pass
  except OSError as e:
    raise error(f"{setting}={os.fspath(path)!r}: cannot write in {at!r} ({e.strerror or e})") from None


def lock_run_dir(run_dir, setting: str = "run_dir", error=None):
  """An exclusive lock on RUN_DIR/.lock (which says who holds it) for as long as the returned file
  stays open: a second launch into a running run's directory is refused, naming the holder. Two
  runs there used to interleave their checkpoints and metrics.jsonl and both exit 0. Where the
  file system has no locks, the run goes on without, said."""
  import fcntl
  import socket
  error = error or RunError
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, ".lock")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise error(f"{setting}={os.fspath(run_dir)!r} is in use by {holder} (it holds {path}): two runs in one "
                "directory would interleave their checkpoints and metrics; wait for it to end, or give "
                f"another {setting}") from None
  except OSError as e:  # e.g. a network file system mounted without locks
    import sys
    print(f"warning: cannot lock {path} ({e.strerror or e}); nothing stops a second run in this directory",
          file=sys.stderr)
    return f
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  f.flush()
  return f


# errno of a failed write that is the storage's, not the run's: fix it, then run the same command
_STORAGE_ERRNOS = {"ENOSPC": "no space left", "EDQUOT": "disk quota exceeded", "EFBIG": "file too large",
                   "EROFS": "read-only file system", "EACCES": "permission denied", "EPERM": "not permitted",
                   "ENOTDIR": "not a directory", "EIO": "input/output error"}
_STORAGE_TEXTS = ("No space left", "Disk quota exceeded", "File too large", "Read-only file system",
                  "Permission denied", "Not a directory", "Input/output error")


def storage_failure(e: BaseException, under: str) -> str | None:
  """The first line of a failure of the storage under the directory `under` anywhere in `e`'s chain
  (an OSError on a file there, or the same reported by Orbax/TensorStore as text naming a path
  there), else None: a data file the user named that cannot be read is not one."""
  import errno
  under = os.path.abspath(os.fspath(under))
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    lines = str(e).strip().splitlines() or [type(e).__name__]
    code = errno.errorcode.get(e.errno or -1) if isinstance(e, OSError) else None
    if code in _STORAGE_ERRNOS:
      where = None if e.filename is None else os.path.abspath(os.fspath(e.filename))
      # a file under the run directory; with no file named, only what is the storage's whatever the file
      if (where is not None and (where == under or where.startswith(under + os.sep))) or (
          where is None and code in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")):
        return f"{_STORAGE_ERRNOS[code]}: {first_line(e)}"
    text_names_it = not isinstance(e, OSError) and (under + os.sep) in str(e)
    found = next((t for t in _STORAGE_TEXTS if t in str(e)), None) if text_names_it else None
    if found is not None:  # Orbax/TensorStore say it in text, among pages of detail
      return f"{found}: {first_line(next(x for x in lines if found in x))}"
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # `raise … from None`: not its cause
  return None


GLOB_CHARACTERS = "[]*?"


def check_run_dir_name(path, setting: str = "run_dir", error=None) -> None:
  """A run directory's path holds no glob character: Orbax finds each process's checkpoint data by
  a glob under it, so `[` or `]` in the path saves checkpoints that cannot be restored."""
  error = error or RunError
  found = sorted({c for c in os.fspath(path) if c in GLOB_CHARACTERS})
  if found:
    raise error(f"{setting}={os.fspath(path)!r} holds {' '.join(found)}: Orbax reads checkpoints back through a "
                "glob under the run directory (with [ ] a run's checkpoints cannot be restored; * ? may match "
                "other folders); choose a path without [ ] * ?")


def run_config(run_dir):
  """The run's ExperimentConfig, from RUN_DIR/config.json. Loss and reward names the run registered
  in its own process are accepted (evaluating or converting it does not need them)."""
  from lgrpo_jax.config import from_record
  from lgrpo_jax.grpo.core import unregistered_names_allowed
  from lgrpo_jax.safetensors_io import read_json
  path = os.path.join(os.fspath(run_dir), "config.json")
  record = read_json(path, RunError)
  with unregistered_names_allowed():
    try:
      return from_record(record)
    except ValueError as e:
      raise RunError(f"{path}: {e}") from None


def _steps(directory: str) -> list[int]:
  """The finished saves, as Orbax (and so the Trainer's CheckpointManager) judges them: on a local
  disk a step folder is renamed into place when complete; where renames are not atomic (GCS) it
  holds a commit marker. Orbax's own check, not a file of ours: which marker a version writes differs."""
  if not os.path.isdir(directory):
    return []
  import orbax.checkpoint as ocp
  return sorted(ocp.utils.checkpoint_steps(directory))


def run_checkpoint(run_dir, step: int | None = None, best: bool = False) -> tuple[str, int]:
  """(path of the training-state checkpoint, its step): the latest, `step`, or the best."""
  where = os.path.join(os.fspath(run_dir), "best" if best else "checkpoints")
  steps = _steps(where)
  if not steps:
    raise RunError(f"{where}: no finished checkpoints" + (" (is best-checkpointing on: loop.eval_every?)"
                                                          if best else ""))
  if step is not None and step not in steps:
    raise RunError(f"{where}: no checkpoint for step {step}; there are {steps}")
  chosen = step if step is not None else steps[-1]
  return os.path.join(where, str(chosen), "state"), chosen


def load_any(path, dtype=None, mesh=None):
  """An lgrpo_jax Orbax model checkpoint or a Hugging Face directory."""
  import lgrpo_jax
  from lgrpo_jax import checkpoint
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise RunError(f"{path}: not found")
  if checkpoint.is_checkpoint(path):
    return checkpoint.load_model(path, dtype=dtype, mesh=mesh)
  if os.path.isfile(os.path.join(path, "config.json")):
    return lgrpo_jax.load_hf(path, dtype=dtype or "float32", mesh=mesh)
  raise RunError(f"{path}: neither a run directory, an lgrpo_jax checkpoint nor a Hugging Face directory")


def model_config(cfg, run_dir):
  """The config of a run's model, from its ExperimentConfig (no weight is read)."""
  from lgrpo_jax import checkpoint
  from lgrpo_jax.data.tokenizer import tiny_model_config
  from lgrpo_jax.models.qwen2_5_vl.hf import resolve_config
  m = cfg.model
  if m.checkpoint is None:
    return resolve_config(tiny_model_config(tokenizer_dir(cfg, run_dir)), dtype=m.dtype, param_dtype=m.param_dtype)
  if not os.path.isdir(m.checkpoint):
    raise RunError(f"the run's model.checkpoint {m.checkpoint!r} is not found (from {run_dir}/config.json)")
  if checkpoint.is_checkpoint(m.checkpoint):
    return checkpoint.model_config(m.checkpoint, m.dtype, m.param_dtype)
  return resolve_config(m.checkpoint, dtype=m.dtype, param_dtype=m.param_dtype)


def tokenizer_dir(cfg, run_dir) -> str:
  """Where the run's tokenizer is: model.tokenizer, the base checkpoint, or RUN_DIR/tokenizer."""
  m = cfg.model
  return m.tokenizer or (os.path.join(os.fspath(run_dir), "tokenizer") if m.checkpoint is None else m.checkpoint)


def restore_params(cfg, path, key: str | None = None, mesh=None):
  """A model of config `cfg` with parameters read from an Orbax tree at `path` (under `key`, e.g.
  the training state's 'params': the optimizer state is not read), straight into its shards."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  from lgrpo_jax import sharding
  from lgrpo_jax.models.qwen2_5_vl import Qwen25VL
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  pure = nnx.to_pure_dict(params)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, pure)
  else:
    shardings = nnx.to_pure_dict(sharding.state_shardings(params, mesh))
  nnx.replace_by_pure_dict(params, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings))
  item = {key: params} if key else params  # the saved nesting: an nnx.State
  args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
  try:
    got = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=key is not None))
  except Exception as e:  # a damaged checkpoint or one of another model
    hint = ""
    step_dir = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.basename(os.fspath(path)) == "state" and os.path.basename(step_dir).isdigit():
      others = [x for x in _steps(os.path.dirname(step_dir)) if str(x) != os.path.basename(step_dir)]
      hint = (f"; if it is damaged, the run's other checkpoints there are {others} (--step N)" if others else "") + (
          "; resuming the run sets a damaged latest checkpoint aside")
    raise RunError(f"{path}: cannot restore the parameters ({type(e).__name__}: {first_line(e)}){hint}") from None
  return nnx.merge(graphdef, got[key] if key else got)


def policy(run_dir, step: int | None = None, best: bool = False, mesh=None):
  """(the trained policy of a run at its latest / `step` / best checkpoint, the step)."""
  cfg = run_config(run_dir)
  state, chosen = run_checkpoint(run_dir, step, best)
  return restore_params(model_config(cfg, run_dir), state, "params", mesh), chosen


def latest_eval_summary(run_dir) -> tuple[str, dict] | None:
  """(path, content) of the newest RUN_DIR/eval/*/summary.json, or None."""
  root = os.path.join(os.fspath(run_dir), "eval")
  found = [os.path.join(root, d, "summary.json") for d in (os.listdir(root) if os.path.isdir(root) else [])]
  found = [f for f in found if os.path.isfile(f)]
  if not found:
    return None
  newest = max(found, key=os.path.getmtime)
  from lgrpo_jax.safetensors_io import read_json
  return newest, read_json(newest, RunError)
