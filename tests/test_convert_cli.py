"""`python -m lgrpo_jax.convert`: HF -> Orbax -> HF is bit-exact; bad paths give one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lgrpo_jax
from lgrpo_jax import checkpoint
from hf_tiny import CASES, build_hf, config_dict, make_batch, ours_inputs
from test_hf_io import read_all
from conftest import xla_flags

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}


def run(*args):
  return subprocess.run([sys.executable, "-m", "lgrpo_jax.convert", *map(str, args)],
                        capture_output=True, text=True, env=ENV, timeout=600)


def test_help_explains_both_directions():
  r = run("--help")
  assert r.returncode == 0 and "to-jax" in r.stdout and "to-hf" in r.stdout
  r = run("to-hf", "--help")
  assert r.returncode == 0 and "--hf-source" in r.stdout and "--max-shard-size" in r.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_to_jax_then_to_hf_round_trip(tmp_path, dtype):
  import torch
  hf = build_hf(config_dict("a"), seed=11, dtype=getattr(torch, dtype))
  hf.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer_config.json").write_text('{"x": 1}')
  r = run("to-jax", tmp_path / "hf", tmp_path / "jax", "--dtype", dtype)
  assert r.returncode == 0, r.stderr
  assert checkpoint.is_checkpoint(tmp_path / "jax")
  r = run("to-hf", tmp_path / "jax", tmp_path / "out", "--hf-source", tmp_path / "hf", "--dtype", dtype)
  assert r.returncode == 0, r.stderr
  src, out = read_all(tmp_path / "hf"), read_all(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for k in src:
    assert src[k].dtype == out[k].dtype and src[k].tobytes() == out[k].tobytes(), k
  assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"x": 1}
  # the Orbax checkpoint restores to the same model
  a = lgrpo_jax.load_hf(tmp_path / "hf", dtype=dtype)
  b = checkpoint.load_model(tmp_path / "jax")
  batch = ours_inputs(make_batch(CASES["one_image_windows"]))
  np.testing.assert_array_equal(np.asarray(lgrpo_jax.forward(a, **batch)),
                                np.asarray(lgrpo_jax.forward(b, **batch)))


@pytest.mark.parametrize("args,match", [
    (["to-jax", "/nonexistent/hf", "{tmp}/o"], "/nonexistent/hf: not a directory"),
    (["to-hf", "/nonexistent/ck", "{tmp}/o"], "/nonexistent/ck: not an lgrpo_jax checkpoint"),
    (["to-jax", "{tmp}", "{tmp}/o"], "no such config file"),
])
def test_bad_paths_give_one_line_error(tmp_path, args, match):
  r = run(*[a.format(tmp=tmp_path) for a in args])
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and match in lines[0], r.stderr
