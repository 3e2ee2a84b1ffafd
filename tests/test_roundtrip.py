"""The model round-trip check runs end to end (in a subprocess, as a user would run it)."""

import os
import subprocess
import sys
from conftest import xla_flags


def test_demo_runs_and_round_trips(tmp_path):
  env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "lgrpo_jax.roundtrip", "--out", str(tmp_path)],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "logits bit-identical: yes" in r.stdout
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  assert (tmp_path / "orbax" / "params").is_dir()
