"""The persistent compilation cache setting (`ExperimentConfig.compile_cache`): where it points, that
programs are written there and loaded back (counted), that "off" turns it off, and that the
launcher's setting ends with the run. A restarted training run through it: test_train_loop."""

import os

import jax
import numpy as np
import pytest

from conftest import no_min_compile_time
from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
from lgrpo_jax.train import compile_cache
from lgrpo_jax.train.metrics import CompileCounter


def test_resolve(tmp_path, monkeypatch):
  run = str(tmp_path / "run")
  assert compile_cache.resolve("auto", run, env={}) == os.path.join(run, "xla_cache")
  assert compile_cache.resolve("auto", run, env={"JAX_COMPILATION_CACHE_DIR": "/shared/xla"}) == "/shared/xla"
  assert compile_cache.resolve("off", run, env={"JAX_COMPILATION_CACHE_DIR": "/shared/xla"}) is None
  monkeypatch.chdir(tmp_path)
  assert compile_cache.resolve("cache", run, env={}) == str(tmp_path / "cache")
  assert compile_cache.resolve("gs://bucket/xla", run, env={}) == "gs://bucket/xla"
  with pytest.raises(ConfigError, match="choose 'auto', 'off' or a directory"):
    compile_cache.resolve("", run, env={})
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"compile_cache='file': .*file exists and is not a directory"):
    compile_cache.resolve("file", run, env={})
  with pytest.raises(ConfigError, match=r"compile_cache: cannot create .*file/sub"):
    compile_cache.enable(compile_cache.resolve("file/sub", run, env={}))


@pytest.fixture
def every_program_cached():
  """No minimum compile time, so that the tiny programs here are written."""
  with no_min_compile_time():
    yield


def run_new_program(scale: float):
  """Compiles (or loads) a program no other test has: a constant of its own in the HLO."""
  x = np.arange(8, dtype=np.float32)  # not jnp: that would be a program of its own
  return np.asarray(jax.jit(lambda v: v * scale + 1.0)(x))


def test_programs_are_written_and_loaded_back_and_off_turns_it_off(tmp_path, every_program_cached):
  cache = tmp_path / "xla"
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  with compile_cache.use(str(cache)):
    first = run_new_program(3.25)
    written = set(os.listdir(cache))
    assert written  # the program (and its compile time) is in the cache
    counter = CompileCounter()
    jax.clear_caches()  # as a new process would: nothing compiled in memory
    again = run_new_program(3.25)
    assert counter.cache_hits() == 1 and set(os.listdir(cache)) == written
    np.testing.assert_array_equal(again, first)
    with compile_cache.use(None):  # "off": neither written nor read
      run_new_program(5.5)
      jax.clear_caches()
      run_new_program(3.25)
      assert set(os.listdir(cache)) == written and counter.cache_hits() == 1
    run_new_program(7.75)  # the outer setting is back
    assert len(os.listdir(cache)) > len(written)
  # ... and after the block, the process's own setting (none, unless the environment gave one).
  assert (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache) == before
  n = len(os.listdir(cache))
  run_new_program(9.125)
  assert len(os.listdir(cache)) == n


def test_compile_counter_counts_a_runs_own(tmp_path, every_program_cached):
  """The loop's `compiles` / `compile_cache_hits` are the run's own: a second run in one process (a
  notebook) does not report what the first one compiled or loaded."""
  run_new_program(11.5)  # compiled before the counter: not its
  counter = CompileCounter()
  assert counter.stats() == (0, 0.0) and counter.cache_hits() == 0
  with compile_cache.use(str(tmp_path / "xla")):
    run_new_program(12.5)
    n, seconds = counter.stats()
    assert n >= 1 and seconds > 0 and counter.cache_hits() == 0
    jax.clear_caches()
    run_new_program(12.5)  # loaded: a compilation and a hit
    assert counter.stats()[0] == n + 1 and counter.cache_hits() == 1
  later = CompileCounter()
  assert later.stats() == (0, 0.0) and later.cache_hits() == 0 and counter.cache_hits() == 1


def test_a_torn_entry_is_removed_and_written_again(tmp_path, every_program_cached):
  """JAX writes an entry in place and never rewrites one that exists: a process killed mid-write
  left a torn entry that every restart failed to read (a warning) and compiled again. `enable`
  (process 0, before anything compiles) removes it, so the next compilation writes it anew."""
  cache = tmp_path / "xla"
  with compile_cache.use(str(cache)):
    run_new_program(13.75)
  entries = [p for p in cache.iterdir() if p.name.endswith("-cache")]
  assert len(entries) == 1 and compile_cache.repair(str(cache)) == 0
  whole = entries[0].read_bytes()
  entries[0].write_bytes(whole[:len(whole) // 2])  # as a kill during the write leaves it
  jax.clear_caches()
  with compile_cache.use(str(cache)):
    assert not entries[0].exists()
    counter = CompileCounter()
    run_new_program(13.75)
    assert counter.cache_hits() == 0 and entries[0].exists()  # written anew (it holds its compile time)
    jax.clear_caches()
    run_new_program(13.75)
    assert counter.cache_hits() == 1

def test_a_moved_cache_still_hits(tmp_path, every_program_cached):
  """The keys do not depend on where the cache is (off GPU), so a run directory that was moved or
  copied loads its programs. JAX put its GPU autotuning cache path, inside the cache directory, into
  every program's compile options: a copy got no hits."""
  import shutil
  with compile_cache.use(str(tmp_path / "a")):
    run_new_program(15.25)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  jax.clear_caches()
  counter = CompileCounter()
  with compile_cache.use(str(tmp_path / "b")):
    run_new_program(15.25)
  assert counter.cache_hits() == 1
