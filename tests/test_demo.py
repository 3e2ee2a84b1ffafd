"""The README's main command, shortened: `python -m lgrpo_jax.demo` in a subprocess as a user runs it
(warm start, then GRPO with the listener reward), asserting that the reward goes up."""

import json
import os
import subprocess
import sys


def test_shortened_demo_learns(tmp_path):
  run = tmp_path / "run"
  # XLA's own settings, as a user runs it: the demo trains 110 steps, at the tests' -O0 they run 3×
  # slower (measured for 150: 343 s against 190 s, of which compiling 23 s against 66 s).
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "lgrpo_jax.demo", f"run_dir={run}", "sft.steps=90",
                      "loop.steps=20", "loop.eval_every=20", "data.eval_pairs=4", "loop.save_every=20"],
                     capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
  train = [row for row in rows if "reward/total" in row]
  assert [row["step"] for row in train] == list(range(1, 21))
  # Halves, not the ends: one step's reward swings by ±0.15 (8 pairs × 8 samples). Measured: 1.03 →
  # 1.18 (format rate 0.64 → 0.73, sampled accuracy 0.32 → 0.42; 90 warm-start steps leave room).
  first = sum(row["reward/total"] for row in train[:10]) / 10
  last = sum(row["reward/total"] for row in train[10:]) / 10
  assert last > first + 0.05, (first, last)
  evals = [row for row in rows if "eval/accuracy" in row]
  assert [row["step"] for row in evals] == [0, 20]  # before GRPO and at the end
  assert "held-out accuracy at step 0" in r.stdout and "held-out accuracy at step 20" in r.stdout
  assert "demo finished in" in r.stdout
  assert (run / "curves.png").is_file() and (run / "sft").is_dir()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
  # MFU against the matmul rate measured at start-up. The demo's steps now run near that rate
  # (0.95 typical), and on a shared machine the probe can be slowed by the other test worker
  # (one step read 1.001 in CI): the bound catches a FLOP count or unit that is off by 2× or more,
  # the count itself is checked in test_flops.
  assert all(0 < row["mfu"] < 1.5 and row["tflops"] > 0 for row in train)
