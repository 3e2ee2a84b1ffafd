import os

# Tests check what the programs compute, not how fast XLA:CPU made them run: LLVM at -O0 and
# without the CPU fusion emitters compiles 4× faster (the tiny sampler: 5.5 → 1.3 s), and the suite
# is mostly compiling (docs/PERFORMANCE.md, "Test suite time"). LGRPO_TEST_XLA_OPT=default: XLA's
# own settings, as users run.
FAST_COMPILE = ("" if os.environ.get("LGRPO_TEST_XLA_OPT") == "default"
                else "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` simulated CPU devices, compiled as the tests are."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}".strip()


# Multi-device logic is tested on CPU with 8 simulated devices: must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def shared_dir() -> str:
  """The project's shared/ folder (real data): $LGRPO_SHARED, else beside the repository."""
  path = os.environ.get("LGRPO_SHARED") or os.path.join(os.path.dirname(__file__), "..", "..", "shared")
  if not os.path.isdir(os.path.join(path, "data")):
    raise FileNotFoundError(f"shared data not found at {os.path.abspath(path)}: CI places shared/ beside "
                            "the repository; elsewhere set LGRPO_SHARED")
  return path


@contextlib.contextmanager
def no_min_compile_time():
  """Every program goes to the persistent compilation cache, the tiny ones too (JAX's default only
  keeps those that took ≥ 1 s to compile)."""
  import jax
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


@pytest.fixture(scope="session", autouse=True)
def xla_compile_cache(tmp_path_factory):
  """One persistent compilation cache per test worker, so a program a test compiled (the same tiny
  configs recur across files) is loaded by the next test that builds it: the suite took 19:37
  instead of 21:38 on 2 cores (docs/PERFORMANCE.md). Every program is kept (no minimum compile
  time). Per worker (pytest-xdist gives each its own basetemp), so no two processes write one
  directory. The launcher's and test_compile_cache's own caches replace it for their block and
  restore it. LGRPO_TEST_COMPILE_CACHE=off: none, as before."""
  if os.environ.get("LGRPO_TEST_COMPILE_CACHE") == "off":
    yield None
    return
  from lgrpo_jax.train import compile_cache
  path = str(tmp_path_factory.getbasetemp() / "xla_cache")
  with no_min_compile_time(), compile_cache.use(path):
    yield path


def check_saves_follow_a_sync(monkeypatch, log_path, *owners) -> list:
  """Makes every `owner.save(step, ...)` (a CheckpointManager, or its class) assert that the log at
  `log_path` is on the disk as it stands (fsynced since its last write, and its directory entry
  too); returns the saved steps."""
  import os
  synced, saves = {}, []
  real_fsync = os.fsync

  def fsync(fd):
    if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(log_path):
      synced["size"] = os.fstat(fd).st_size
    if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(os.path.dirname(log_path)):
      synced["dir"] = True
    return real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  for owner in owners:
    def wrapped(*a, _save=owner.save, _bound=not isinstance(owner, type), **k):
      step = a[0] if _bound else a[1]
      saves.append(step)
      assert synced.get("size") == os.path.getsize(log_path), f"saved step {step} before syncing {log_path}"
      assert synced.get("dir"), f"saved step {step} before syncing {log_path}'s directory entry"
      return _save(*a, **k)
    monkeypatch.setattr(owner, "save", wrapped)
  return saves


class SignalOnRead:
  """Batches whose `read`-th read brings SIGINT to this process (a Ctrl-C, or SIGTERM alike,
  arriving while the run waits for its data)."""

  def __init__(self, batches, read: int = 1):
    self.batches, self.read, self.reads = batches, read, 0

  def __next__(self):
    import signal
    self.reads += 1
    if self.reads == self.read:
      os.kill(os.getpid(), signal.SIGINT)
    return next(self.batches)

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, state):
    self.batches.set_state(state)


# The files that run longest (subprocess runs, training), first, by their measured time (2026-11-28:
# multiprocess 375 s, train_loop 285, demo 235, … evaluate 62): `make test` passes
# --no-loadscope-reorder, so pytest-xdist's loadfile hands files out in this order. Its default
# orders files by their number of tests, which put the one-test demo (235 s) last: one worker ran it
# alone for minutes after the other had finished. Order within a file is kept.
LONGEST_FIRST = ("test_multiprocess.py", "test_train_loop.py", "test_demo.py", "test_prefix_sharing.py",
                 "test_sampling.py", "test_grpo.py", "test_notebooks.py", "test_shared_frozen_vision.py",
                 "test_launch_cli.py", "test_train_step.py", "test_attention.py", "test_sharding.py",
                 "test_sft.py", "test_decode_matmul.py", "test_decode_kernel.py", "test_evaluate.py",
                 "test_listener.py", "test_model_parity.py", "test_train_sharded.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
