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
    jax.config.update("jax_enable_compilation_cache", True)
    cc.set_cache_dir(path)
  # JAX decides once per process, at its first compilation, whether a cache is in use: start over
  # so that the setting holds even if something was compiled before.
  cc.reset_cache()


@contextlib.contextmanager
def use(path: str | None):
  """`enable(path)` for the duration of a `with` block, then this process's previous setting again
  (the launcher runs in-process from tests and notebooks: it must not leave its run's cache on)."""
  import jax
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  enable(path)
  try:
    yield path
  finally:
    from jax.experimental.compilation_cache import compilation_cache as cc
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])
    cc.reset_cache()
