"""Where the loop's scalars go: JSONL + TensorBoard always, Weights & Biases when asked (a recording
stand-in for the `wandb` module: the service itself is outside the test machine)."""

import json
import sys
import types

import pytest

from lgrpo_jax.train.metrics import MetricSinks, measured_matmul_tflops


class _Run:
  def __init__(self, calls):
    self.calls = calls

  def log(self, values, step):
    self.calls.append(("log", dict(values), step))

  def finish(self):
    self.calls.append(("finish",))


def test_wandb_gets_the_same_scalars_and_a_stable_run_id(tmp_path, monkeypatch):
  calls = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: calls.append(("init", kw)) or _Run(calls)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  sinks = MetricSinks(str(tmp_path), tensorboard=False, wandb_project="lgrpo", config_record={"a": 1})
  sinks.write({"step": 3, "reward/total": 1.5})
  sinks.close()
  init = calls[0][1]
  assert init["project"] == "lgrpo" and init["config"] == {"a": 1} and init["resume"] == "allow"
  again = []
  fake.init = lambda **kw: again.append(kw) or _Run([])
  MetricSinks(str(tmp_path), tensorboard=False, wandb_project="lgrpo").close()
  assert again[0]["id"] == init["id"]  # a resumed run appends to the same W&B run
  assert calls[1:] == [("log", {"reward/total": 1.5}, 3), ("finish",)]
  assert [json.loads(x) for x in open(tmp_path / "metrics.jsonl")] == [{"step": 3, "reward/total": 1.5}]


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
  with pytest.raises(ValueError, match="loop.wandb_project='x' needs Weights & Biases"):
    MetricSinks(str(tmp_path), tensorboard=False, wandb_project="x")


def test_measured_matmul_rate_is_plausible():
  assert 1e-4 < measured_matmul_tflops(n=256, repeats=2) < 1e3


def test_measured_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
  # A clock that advances 0.5 s per reading: every timed matmul takes 0.5 s, so the rate is
  # exactly 2·n³ FLOP / 0.5 s.
  from lgrpo_jax.train import metrics
  ticks = iter(range(100))
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
  assert metrics.measured_matmul_tflops(n=64, repeats=3) == pytest.approx(2 * 64**3 / 0.5 / 1e12)
