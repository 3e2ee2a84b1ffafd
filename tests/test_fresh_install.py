"""`make demo` on a fresh machine installs lgrpo_jax *without* the test extras. Every module the
demo's path imports must then come from a declared runtime dependency: jinja2 (which transformers
needs to render chat templates but does not require) came only through torch, a test extra, so the
suite passed while a fresh `make demo` failed at its first prompt."""

import os
import subprocess
import sys

from conftest import xla_flags

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_the_demo_runs_on_the_runtime_dependencies_alone(tmp_path):
  venv = tmp_path / "venv"
  # --system-site-packages off: nothing of the test environment (torch, jinja2 …) is visible
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", "-e", ROOT], capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONPATH": ""}
  # The demo as `make demo` runs it, shortened to a step of each stage (the learning is test_demo's).
  r = subprocess.run([py, "-m", "lgrpo_jax.demo", f"run_dir={tmp_path / 'run'}", "sft.steps=1", "loop.steps=1",
                      "loop.eval_every=1", "data.eval_pairs=2"], capture_output=True, text=True, env=env,
                     cwd=tmp_path, timeout=900)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  assert "demo finished" in r.stdout + r.stderr
  for extra in ("torch", "jinja2"):  # torch must stay absent; jinja2 must be there by right
    probe = subprocess.run([py, "-c", f"import {extra}"], capture_output=True, timeout=120)
    assert (probe.returncode == 0) == (extra == "jinja2"), extra
