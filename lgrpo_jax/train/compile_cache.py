"""JAX's persistent compilation cache for a run: a restarted run (after preemption, a SIGKILL, or a
second `launch` into the same run directory) loads its compiled programs instead of compiling them.

`ExperimentConfig.compile_cache` (override `compile_cache=…`):

    "auto"   $JAX_COMPILATION_CACHE_DIR if set, else RUN_DIR/xla_cache   (the default)
    "off"    no persistent cache, even if $JAX_COMPILATION_CACHE_DIR is set
    PATH     that directory: share one across runs that compile the same programs

JAX keys an entry by the program, the devices, the compiler options and the jax/XLA versions, so a
changed config, mesh or install compiles afresh. Only process 0 writes, and only programs that took
at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile. JAX treats the
cache as trusted code: never point it at a directory others can write to. The loop logs
`compile_cache_hits` next to `compiles` (which counts programs compiled *or* loaded).

Two things JAX alone gets wrong for restarts, handled here:
* A torn entry (the process killed while JAX wrote it; JAX writes in place) is never rewritten:
  every restart warned and compiled again. `enable` checks the entries on process 0 and removes the
  ones that do not decompress, so the next compilation writes them anew.
* Off GPU, the cache directory's own path entered every key (JAX adds its GPU autotuning cache
  directory, under the cache directory, to the compiler options): a moved or copied run directory
  loaded nothing. `enable` turns that GPU-only option off on other platforms; on GPU the autotuning
  results are worth it, and a moved cache compiles afresh once.
"""

from __future__ import annotations

import contextlib
import os

from lgrpo_jax.models.qwen2_5_vl.config import ConfigError

ENV = "JAX_COMPILATION_CACHE_DIR"
RUN_SUBDIR = "xla_cache"


def resolve(setting: str, run_dir: str, env=None) -> str | None:
  """The cache directory for `setting` ("auto", "off" or a path), or None for no cache."""
  env = os.environ if env is None else env
  if setting == "off":
    return None
  path = (env.get(ENV) or os.path.join(run_dir, RUN_SUBDIR)) if setting == "auto" else setting
  if not path:
    raise ConfigError("compile_cache='': choose 'auto', 'off' or a directory")
  if "://" in path:  # a remote file system (gs://…): JAX opens it through etils.epath
    return path
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"compile_cache={setting!r}: {path} exists and is not a directory")
  return path


def enable(path: str | None) -> None:
  """Use `path` as this process's persistent compilation cache (None: none at all)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    if "://" not in path:
      try:
        os.makedirs(path, exist_ok=True)
      except OSError as e:
        raise ConfigError(f"compile_cache: cannot create {path}: {e.strerror}") from None
      if jax.process_index() == 0:  # the only writer, before anything compiles
        repair(path)
    jax.config.update("jax_enable_compilation_cache", True)
    cc.set_cache_dir(path)
    if jax.default_backend() != "gpu":  # keys that do not depend on where the cache is
      jax.config.update("jax_persistent_cache_enable_xla_caches", "")
  # JAX decides once per process, at its first compilation, whether a cache is in use: start over
  # so that the setting holds even if something was compiled before.
  cc.reset_cache()


def repair(path: str) -> int:
  """Remove the entries of the cache at `path` that do not decompress (torn by a kill while they were
  written); returns how many. Reads every entry once (its cost: the cache's size, at start-up)."""
  import logging
  try:
    from jax._src.compilation_cache import decompress_executable  # JAX's own reader of an entry
  except ImportError:  # a private module: a JAX release may move it; then nothing is checked
    return 0
  removed = 0
  for name in os.listdir(path):
    if not name.endswith("-cache"):
      continue
    entry = os.path.join(path, name)
    try:
      with open(entry, "rb") as f:
        decompress_executable(f.read())
    except OSError:
      continue  # unreadable here (permissions): JAX will say so when it reads it
    except Exception:
      for p in (entry, entry[:-len("-cache")] + "-atime"):
        try:
          os.remove(p)
        except OSError:
          pass
      removed += 1
  if removed:
    logging.getLogger(__name__).warning("compilation cache %s: removed %d torn entr%s (rewritten at the next "
                                        "compilation)", path, removed, "y" if removed == 1 else "ies")
  return removed


@contextlib.contextmanager
def use(path: str | None):
  """`enable(path)` for the duration of a `with` block, then this process's previous setting again
  (the launcher runs in-process from tests and notebooks: it must not leave its run's cache on)."""
  import jax
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,
            jax.config.jax_persistent_cache_enable_xla_caches)
  enable(path)
  try:
    yield path
  finally:
    from jax.experimental.compilation_cache import compilation_cache as cc
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])
    jax.config.update("jax_persistent_cache_enable_xla_caches", before[2])
    cc.reset_cache()
