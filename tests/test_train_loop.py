"""The loop: metrics written per step, checkpoints, and exact resume (bit-identical parameters)."""

import json
import shutil
import threading

import jax
import numpy as np
import pytest

from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
from lgrpo_jax.train.step import clear_compiled_steps
from train_worker import make
from conftest import check_saves_follow_a_sync, xla_flags


def test_resume_is_bit_identical_and_metrics_are_written(tmp_path):
  clear_compiled_steps()  # its program count and compile times are this test's own
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  straight = make(tmp_path / "a", tok_dir, steps=5, save_every=2)
  # The listener and the reference default to the initial policy: one frozen copy, not two.
  assert straight.listener_is_reference and straight.listener_params is straight.ref_params
  straight.run()
  first = make(tmp_path / "b", tok_dir, steps=2, save_every=2)
  first.run()
  first.close()
  again = make(tmp_path / "b", tok_dir, steps=5, save_every=2)
  assert again.resumed_from == 2
  again.run()
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(again.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
  assert {"reward/total", "accuracy", "format_rate", "contradiction_rate", "loss", "tokens_per_s",
          "compiled_programs"} <= set(lines[0])
  assert "kl" not in lines[0]  # β = 0: no KL computed, none logged (as TRL)
  assert lines[-1]["compiled_programs"] == 1
  # Every XLA compilation happens before the first step ends (checkpoint saves included): none after.
  assert lines[0]["compiles"] > 0 and lines[0]["compile_s"] > 0
  assert {(m["compiles"], m["compile_s"]) for m in lines} == {(lines[0]["compiles"], lines[0]["compile_s"])}
  resumed = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")]
  assert resumed == [1, 2, 3, 4, 5]
  assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 5]
  straight.close()
  again.close()


def test_periodic_eval_and_best_checkpoint(tmp_path, monkeypatch):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  t = make(tmp_path / "run", tok_dir, steps=4, save_every=2, eval_every=2)
  # Every checkpoint (and best/) is saved after metrics.jsonl is on the disk as it stands: a machine
  # that goes down after a save cannot leave that step without its line (a resume keeps the lines up
  # to its checkpoint and never writes that step's again; best/'s accuracy is read back from it).
  saves = check_saves_follow_a_sync(monkeypatch, tmp_path / "run" / "metrics.jsonl", t.manager, t.best)
  t.run()
  assert 2 in saves and 4 in saves
  t.close()
  lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  evals = [m for m in lines if "eval/accuracy" in m]
  assert [m["step"] for m in evals] == [0, 2, 4]  # before the first step (eval_at_start), then every 2
  for m in evals:
    assert m["eval/pairs"] == 3 and 0 <= m["eval/accuracy"] <= 1
    assert m["eval/accuracy"] == (m["eval/accuracy_as_given"] + m["eval/accuracy_swapped"]) / 2
    assert "eval/contradiction_rate" in m
  assert any(p.name.isdigit() for p in (tmp_path / "run" / "best").iterdir())


def test_held_out_accuracy_per_order_from_a_known_judge(tmp_path, monkeypatch):
  # The tiny model cannot write a well-formed answer in a few tokens, so the runs above evaluate
  # zeros. Here a judge with known answers: always "Image 1" (well-formed where the shown label is
  # 0, the listener always choosing "Image 2"). Pairs labelled [0, 0, 1]: as given it is right on
  # the two label-0 pairs, swapped on the one label-1 pair.
  import dataclasses

  import jax.numpy as jnp
  from transformers import AutoTokenizer

  from lgrpo_jax.data import ImageConfig
  from lgrpo_jax.data.pipeline import PipelineConfig
  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.listener import ListenerSpec
  from lgrpo_jax.sampling import SamplingConfig
  from lgrpo_jax.train import evaluation

  def judge(params, listener_params, batch, tables, **kw):
    n = batch.labels.shape[0]
    return jnp.ones(n, jnp.int32), batch.labels == 0, jnp.full(n, 2, jnp.int32)

  monkeypatch.setattr(evaluation, "judge_greedy", judge)
  tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
  pairs = [dataclasses.replace(p, label=label) for p, label in zip(synthetic(3, seed=9, image_size=56), (0, 0, 1))]
  # 4 rows per batch: the 6 judgements fill one batch and 2 rows of the next (2 padding rows).
  pipe = PipelineConfig(global_batch=4, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  for spec in (ListenerSpec.from_tokenizer(tok), None):
    m = evaluation.Evaluator(pairs, tok, pipe, SamplingConfig(), None, None, spec, None)(None, None)
    assert m["eval/pairs"] == 3
    assert m["eval/accuracy_as_given"] == pytest.approx(2 / 3) and m["eval/accuracy_swapped"] == pytest.approx(1 / 3)
    assert m["eval/accuracy"] == pytest.approx(0.5) and m["eval/position_bias_gap"] == pytest.approx(1 / 3)
    assert m["eval/format_rate"] == pytest.approx(0.5)  # shown label 0: 2 rows as given, 1 swapped
    if spec is None:
      assert "eval/contradiction_rate" not in m
    else:
      assert m["eval/contradiction_rate"] == 1.0  # every well-formed answer, "Image 1", against "Image 2"


def test_the_held_out_judge_is_kept_for_the_same_arguments(tmp_path):
  # As the step: an Evaluator built again (a notebook cell run twice) reuses the jitted judge, and
  # other sampling settings or a cleared cache give a new one. (Nothing is traced here.)
  import dataclasses
  from transformers import AutoTokenizer
  from lgrpo_jax.data.pipeline import PipelineConfig
  from lgrpo_jax.listener import ListenerSpec
  from lgrpo_jax.sampling import SamplingConfig
  from lgrpo_jax.train import evaluation
  tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
  spec, sampling, grid = ListenerSpec.from_tokenizer(tok), SamplingConfig(max_new_tokens=4), ((1, 4, 4), (1, 4, 4))
  new = lambda s=sampling: evaluation.Evaluator([], tok, PipelineConfig(), s, None, None, spec, None)._fn(grid)
  first = new()
  assert new() is first and evaluation.judge_fn(None, None, dataclasses.replace(sampling, temperature=0.0,
                                                                               num_samples=1), spec, [[1, 4, 4]] * 2) is first
  assert new(dataclasses.replace(sampling, max_new_tokens=5)) is not first
  from lgrpo_jax import sharding
  from lgrpo_jax.rewards.core import REWARDS, register_reward
  register_reward("kept_judge_test", lambda inputs: inputs.lengths * 0.0, replace=True)
  try:  # the judge reads no reward: a notebook's new reward keeps it
    assert new() is first
  finally:
    REWARDS.pop("kept_judge_test")
  with sharding.use_rules({**sharding.RULES, "embed": None}):  # it reads the activation rules
    assert new() is not first
  clear_compiled_steps()
  assert new() is not first


class ScriptedEvaluator:
  """Stands in for the held-out evaluation: the accuracies it returns are given in advance."""

  def __init__(self, accuracies):
    self.accuracies = list(accuracies)

  def __call__(self, params, listener_params, **kw):
    return {"eval/accuracy": self.accuracies.pop(0)}


def test_best_checkpoint_keeps_its_accuracy_across_restarts(tmp_path):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  best_steps = lambda: sorted(int(p.name) for p in (run / "best").iterdir() if p.name.isdigit())
  metric_steps = lambda: [json.loads(x)["step"] for x in open(run / "metrics.jsonl")]

  def train(steps, accuracies):
    t = make(run, tok_dir, steps=steps, save_every=1, eval_every=1)
    t.evaluator = ScriptedEvaluator(accuracies)
    t.run()
    t.close()
    assert not t.evaluator.accuracies
    return t

  train(4, [0.1, 0.5, 0.25, 0.6, 0.75])  # steps 0 (before the first step) to 4: the best is step 4
  assert best_steps() == [4]
  # Killed after step 4's best/ was written but before its checkpoint: the run resumes from step 3
  # and evaluates step 4 again (the same parameters, so the same accuracy) — best/4 already holds it.
  shutil.rmtree(run / "checkpoints" / "4")
  assert train(5, [0.75, 0.5]).resumed_from == 3
  assert best_steps() == [4]
  # A later restart: an evaluation below best/'s 0.75 does not replace it, a better one does.
  shutil.copytree(run / "best", tmp_path / "best_4")
  assert train(7, [0.7, 0.8]).resumed_from == 5
  assert best_steps() == [7]
  assert metric_steps() == [0, 1, 2, 3, 4, 5, 6, 7]
  # Killed after checkpoints/7 was committed but before best/7 was (best/ still holds step 4), and
  # with a torn metrics line: the restart at step 7 saves best/7 from the restored state, and drops
  # the torn line (which used to stop every later launch with a JSON error).
  shutil.rmtree(run / "best")
  shutil.copytree(tmp_path / "best_4", run / "best")
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "reward/tot')
  assert train(7, []).resumed_from == 7
  assert best_steps() == [7] and metric_steps() == [0, 1, 2, 3, 4, 5, 6, 7]
  # No checkpoint left (an attempt that died before its first save): the run starts over and its
  # metrics are written once, not after the earlier attempt's lines.
  shutil.rmtree(run / "checkpoints")
  assert train(1, [0.1, 0.2]).resumed_from is None
  assert metric_steps() == [0, 1] and best_steps() == [7]


def test_the_data_running_out_ends_the_run_as_its_last_step_would(tmp_path, capsys):
  # 4 pairs, 2 per batch, one epoch: 2 steps where 9 were asked.
  # As at `loop.steps`, the step reached is evaluated (eval_every does not divide it), saved, and
  # kept as best/ when it is the best; a restart of the finished run trains nothing more.
  from lgrpo_jax.data.synthetic import synthetic
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  t = make(run, tok_dir, steps=9, save_every=5, eval_every=5, pairs=list(synthetic(4, seed=1, image_size=56)),
           num_epochs=1)
  t.evaluator = ScriptedEvaluator([0.25, 0.5])
  out = t.run()
  t.close()
  assert not t.evaluator.accuracies and int(t.state.step) == 2
  assert "the data ran out (pipeline.num_epochs=1) at step 2" in capsys.readouterr().err
  lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
  same = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]  # noqa: E731 — NaN (a contradiction rate without a well-formed completion) ≠ NaN
  assert same(lines) == same(out)
  assert [(m["step"], m.get("eval/accuracy")) for m in lines] == [(0, 0.25), (1, None), (2, None), (2, 0.5)]
  assert set(lines[-1]) == {"step", "eval/accuracy"}
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2]
  assert sorted(int(p.name) for p in (run / "best").iterdir() if p.name.isdigit()) == [2]
  again = make(run, tok_dir, steps=9, save_every=5, eval_every=5, pairs=list(synthetic(4, seed=1, image_size=56)),
               num_epochs=1)
  again.evaluator = ScriptedEvaluator([])
  assert again.resumed_from == 2 and again.run() == []
  again.close()
  assert int(again.state.step) == 2 and len(open(run / "metrics.jsonl").readlines()) == 4


def test_an_evaluation_cut_short_is_done_when_the_run_resumes(tmp_path):
  # A stop (or a hung held-out read) during step 2's evaluation saves step 2 without it. Step 2 is
  # also the last: the restart would train nothing and end unevaluated, best/ never seeing step 2.
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  t = make(run, tok_dir, steps=2, save_every=1, eval_every=2)
  t.evaluator = ScriptedEvaluator([0.25, 0.5])
  t.run()
  t.close()
  lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
  assert [(m["step"], m.get("eval/accuracy")) for m in lines] == [(0, 0.25), (1, None), (2, 0.5)]
  lines[-1].pop("eval/accuracy")  # as the cut-short evaluation leaves the run
  (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
  shutil.rmtree(run / "best" / "2")
  again = make(run, tok_dir, steps=2, save_every=1, eval_every=2)
  again.evaluator = ScriptedEvaluator([0.5])
  assert again.resumed_from == 2 and again.run() == [{"step": 2, "eval/accuracy": 0.5}]
  again.close()
  assert sorted(int(p.name) for p in (run / "best").iterdir() if p.name.isdigit()) == [2]
  third = make(run, tok_dir, steps=2, save_every=1, eval_every=2)  # now evaluated: nothing to redo
  third.evaluator = ScriptedEvaluator([])
  assert third.run() == []
  third.close()


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  t = make(tmp_path / "run", tok_dir, steps=4, save_every=2)
  t.run()
  t.close()
  newest = tmp_path / "run" / "checkpoints" / "4"
  for f in newest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  again = make(tmp_path / "run", tok_dir, steps=4, save_every=2)
  assert again.resumed_from == 2
  err = capsys.readouterr().err
  assert "checkpoint 4 does not restore" in err and "set aside as checkpoints/4.unreadable-" in err
  assert "this run saves step 4 again" in err
  # Set aside, not deleted, so that the resumed run saves step 4 again (a listed step is never
  # saved) and the next start, evaluate or convert takes that one, not the damaged copy.
  kept = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("4.unreadable-")]
  assert len(kept) == 1 and not newest.exists()
  again.run()
  again.close()
  third = make(tmp_path / "run", tok_dir, steps=4, save_every=2)
  assert third.resumed_from == 4 and "unreadable" not in capsys.readouterr().err
  third.close()


def test_a_run_resumed_with_other_settings_says_so_and_keeps_the_old_config(tmp_path, capsys):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  t = make(run, tok_dir, steps=1, config_record={"loop": {"steps": 1}, "lr": 1})
  t.run()
  t.close()
  same = make(run, tok_dir, steps=1, config_record={"loop": {"steps": 1}, "lr": 1})
  same.close()
  assert "differ" not in capsys.readouterr().err and not list(run.glob("config.before-*"))
  again = make(run, tok_dir, steps=1, config_record={"loop": {"steps": 2}, "lr": 1})
  again.close()
  err = capsys.readouterr().err
  assert again.resumed_from == 1 and "loop.steps: 1 → 2" in err and "config.before-step-1.json" in err
  assert json.load(open(run / "config.before-step-1.json"))["loop"] == {"steps": 1}
  assert json.load(open(run / "config.json"))["loop"] == {"steps": 2}
  # Changed again at the same step: the first kept config stays, the second is kept beside it.
  third = make(run, tok_dir, steps=1, config_record={"loop": {"steps": 3}, "lr": 1})
  third.close()
  assert "config.before-step-1.1.json" in capsys.readouterr().err
  assert json.load(open(run / "config.before-step-1.json"))["loop"] == {"steps": 1}
  assert json.load(open(run / "config.before-step-1.1.json"))["loop"] == {"steps": 2}
  # A changed warm-start section is said not to re-run the warm start; a value holding "sft." is not one.
  make(run, tok_dir, steps=1, config_record={"loop": {"steps": 3}, "lr": 1, "data": "a/sft.json"}).close()
  assert "warm start is not run again" not in capsys.readouterr().err
  make(run, tok_dir, steps=1, config_record={"loop": {"steps": 3}, "lr": 1, "data": "a/sft.json",
                                             "sft": {"steps": 5}}).close()
  assert "warm start is not run again" in capsys.readouterr().err
  # A config.json hand-edited into invalid JSON was silently written over (the run's only record of
  # its settings): it is kept aside, said.
  (run / "config.json").write_text('{"loop": {"steps": 3,,}}')
  make(run, tok_dir, steps=1, config_record={"loop": {"steps": 3}, "lr": 1}).close()
  assert "config.json is not valid JSON" in capsys.readouterr().err
  kept, = run.glob("config.unreadable-*.json")
  assert kept.read_text() == '{"loop": {"steps": 3,,}}' and json.load(open(run / "config.json"))["lr"] == 1
  # A file where the checkpoint folders go: said at once (Orbax's save hung 5 minutes in a barrier).
  from lgrpo_jax.runs import RunError
  from lgrpo_jax.train.loop import checkpoint_managers
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "best").write_text("x")
  with pytest.raises(RunError, match=r"other/best is a file; the run saves its checkpoints in a directory"):
    checkpoint_managers(str(tmp_path / "other"), 1)


def test_a_run_resumed_with_another_state_layout_is_refused(tmp_path):
  # Freezing the vision tower changes the optimizer state's structure: the run's checkpoints cannot
  # be restored into it. That is an error naming the changed setting — not a silent fresh start
  # that would train from step 0 next to the old checkpoints — and the run's config.json is kept.
  from lgrpo_jax.runs import RunError
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  run = tmp_path / "run"
  t = make(run, tok_dir, steps=1, config_record={"step": {"optim": {"freeze": []}}})
  t.run()
  t.close()
  with pytest.raises(RunError, match=r"none of the checkpoints \[1\] can be restored.*"
                                     r"step\.optim\.freeze: \[\] → \[\"vision\"\]"):
    make(run, tok_dir, steps=2, freeze=("vision",), config_record={"step": {"optim": {"freeze": ["vision"]}}})
  assert json.load(open(run / "config.json")) == {"step": {"optim": {"freeze": []}}}
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def wait_for_step(path, step, proc, timeout=600):
  import time
  t0 = time.time()
  while time.time() - t0 < timeout:
    if path.exists() and sum(1 for _ in open(path)) >= step:
      return
    assert proc.poll() is None, "the training process died"
    time.sleep(0.2)
  raise TimeoutError


def test_sigkill_then_resume_is_bit_identical_and_sigterm_saves(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")
  # One persistent compilation cache for every process (`compile_cache=PATH`), every program in it
  # (no minimum compile time): the first run compiles and writes, the others load. So the resumed
  # run's parameters are those of programs loaded from disk, compared with freshly compiled ones.
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cache = tmp_path / "xla_cache"
  run = lambda d, steps, out: subprocess.Popen([sys.executable, worker, str(d), str(tok_dir), str(steps),
                                                str(out), str(cache)], env=env, stderr=subprocess.DEVNULL)
  straight = run(tmp_path / "a", 6, tmp_path / "a.npz")
  assert straight.wait(timeout=900) == 0
  hits = lambda d: [json.loads(x)["compile_cache_hits"] for x in open(tmp_path / d / "metrics.jsonl")]
  assert hits("a") == [0] * 6 and any(cache.iterdir())
  # The run to be killed and the SIGTERM run (checked below) load their programs side by side; the
  # resumed run, whose loading time is bounded below, runs alone.
  killed = run(tmp_path / "b", 6, tmp_path / "b.npz")
  term = run(tmp_path / "c", 50, tmp_path / "c.npz")
  wait_for_step(tmp_path / "b" / "metrics.jsonl", 3, killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "b.npz").exists()
  # SIGTERM: the run saves where it is and exits cleanly.
  wait_for_step(tmp_path / "c" / "metrics.jsonl", 2, term)
  term.send_signal(signal.SIGTERM)
  assert term.wait(timeout=300) == 0
  last = [json.loads(x)["step"] for x in open(tmp_path / "c" / "metrics.jsonl")][-1]
  saved = max(int(p.name) for p in (tmp_path / "c" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == last < 50
  assert run(tmp_path / "b", 6, tmp_path / "b.npz").wait(timeout=900) == 0
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
  # Both later processes (killed after step 3, resumed for 4–6) loaded their programs from the cache:
  # the resumed one too, though its state came from a checkpoint (committed to the device the same
  # way as a fresh state, so the step lowers alike) — every one of its programs, none compiled. (A
  # bound on the time instead, loading < 0.5 × compiling, failed under the CI's load: 2.4 of 4.6 s,
  # against 0.8 of 3.6 s alone.)
  assert min(hits("b")) > 0
  resumed = json.loads(open(tmp_path / "b" / "metrics.jsonl").readlines()[-1])
  assert resumed["compile_cache_hits"] == resumed["compiles"] > 0, resumed


def test_completions_end_at_the_tokenizers_end_ids_by_default(tmp_path):
  # A Trainer built in a notebook with the default SamplingConfig (no eos_ids) stops completions at
  # the tokenizer's EOS and <|im_end|>, as transformers' generate would; given ids are kept.
  import dataclasses
  from transformers import AutoTokenizer
  import lgrpo_jax
  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.data.tokenizer import tiny_model_config
  from lgrpo_jax.sampling import SamplingConfig
  from lgrpo_jax.train import StepConfig, Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  pairs = list(synthetic(2, seed=1, image_size=56))
  default = Trainer(tmp_path / "a", model, tok, pairs, StepConfig(sampling=SamplingConfig(num_samples=2)))
  end = tok.convert_tokens_to_ids("<|im_end|>")
  assert end in default.step_cfg.sampling.eos_ids and tok.eos_token_id in default.step_cfg.sampling.eos_ids
  given = Trainer(tmp_path / "b", model, tok, pairs, StepConfig(sampling=SamplingConfig(num_samples=2, eos_ids=(5,))))
  assert given.step_cfg.sampling.eos_ids == (5,)
  for t in (default, given):
    t.close()
  assert dataclasses.replace(default.step_cfg.sampling, eos_ids=()) == SamplingConfig(num_samples=2)


class StallingPairs:
  """A random-access source whose reads block until released (a hung file system)."""

  def __init__(self, pairs):
    self.pairs, self.release = pairs, threading.Event()

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    self.release.wait()
    return self.pairs[i]


def test_a_signal_during_a_data_stall_saves_and_stops(tmp_path):
  """The loop used to wait for data in `next()` on the main thread: a stop signal during a stall was
  never acted on. Now the read runs in a thread and SIGINT (here; SIGTERM alike) is seen within
  0.1 s: the run saves (the data position before the unread batch) and returns, and the signal's
  handler is the process's own again."""
  import os
  import signal
  import threading
  import time
  from lgrpo_jax.data.synthetic import synthetic
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  pairs = StallingPairs(list(synthetic(4, seed=1, image_size=56)))
  t = make(tmp_path / "run", tok_dir, steps=3, pairs=pairs)
  position = json.dumps(t.batches.get_state(), sort_keys=True)
  previous = signal.getsignal(signal.SIGINT)
  main = threading.current_thread() is threading.main_thread()

  def interrupt():  # once the loop handles the signal (and is waiting for the stalled read)
    deadline = time.monotonic() + 60
    while main and signal.getsignal(signal.SIGINT) is previous and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT) if main else t.request_stop(signal.SIGINT)

  threading.Thread(target=interrupt, daemon=True).start()
  t0 = time.monotonic()
  assert t.run() == [] and t.stopped_by == signal.SIGINT
  assert time.monotonic() - t0 < 30 and signal.getsignal(signal.SIGINT) is previous
  pairs.release.set()
  t.close()
  again = make(tmp_path / "run", tok_dir, steps=3, pairs=pairs)
  assert again.resumed_from == 0 and json.dumps(again.batches.get_state(), sort_keys=True) == position
  again.close()


def test_a_read_stalled_past_the_timeout_saves_and_stops_the_run(tmp_path):
  """A hung read used to be waited on forever (with several processes, the others waited in the
  agreement's all-gather). Past `pipeline.stall_timeout_s` it is a failed read: the run saves the
  data position before the unread batch and raises `DataStall` (the launcher exits 75 for it)."""
  import time
  from lgrpo_jax.data.sources import DataStall
  from lgrpo_jax.data.synthetic import synthetic
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  pairs = StallingPairs(list(synthetic(4, seed=1, image_size=56)))
  t = make(tmp_path / "run", tok_dir, steps=3, pairs=pairs, stall_timeout_s=1.5)
  position = json.dumps(t.batches.get_state(), sort_keys=True)
  t0 = time.monotonic()
  with pytest.raises(DataStall, match=r"process 0: no batch after \d+ s \(pipeline.stall_timeout_s=1.5\): "
                                      r"the data source hangs"):
    t.run()
  assert 1.5 <= time.monotonic() - t0 < 30 and t.manager.all_steps() == [0]
  pairs.release.set()
  t.close()
  again = make(tmp_path / "run", tok_dir, steps=3, pairs=pairs)
  assert again.resumed_from == 0 and json.dumps(again.batches.get_state(), sort_keys=True) == position
  again.close()


def test_a_held_out_read_that_hangs_saves_the_step_and_a_stop_during_the_evaluation_is_honoured(tmp_path,
                                                                                              monkeypatch):
  """The held-out evaluation used to read its batches on the main thread with no timeout: a hung read
  hung the run (with several processes, the others waited in the next all-gather), and a stop signal
  was not acted on until the evaluation ended. Now (1) a hang past `pipeline.stall_timeout_s` writes
  the step's metrics line, saves the step and raises `DataStall`; (2) a stop asked for while the
  held-out data is read ends the evaluation at once, and the run saves and returns."""
  import dataclasses
  import signal
  import time

  import jax.numpy as jnp
  from lgrpo_jax.data.sources import DataStall
  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.train import evaluation

  def judge(params, listener_params, batch, tables, **kw):  # no model run: the reads are under test
    n = batch.labels.shape[0]
    return jnp.ones(n, jnp.int32), jnp.ones(n, bool), jnp.ones(n, jnp.int32)

  monkeypatch.setattr(evaluation, "judge_greedy", judge)
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  held_out = StallingPairs(list(synthetic(3, seed=9, image_size=56)))
  held_out.release.set()
  t = make(tmp_path / "run", tok_dir, steps=3, save_every=5, eval_every=2, eval_pairs=held_out,
           stall_timeout_s=1.5)
  seen = []

  def on_metrics(m):
    seen.append(m)
    if m["step"] == 1:  # step 2's evaluation will hang
      held_out.release.clear()

  t0 = time.monotonic()
  with pytest.raises(DataStall, match=r"process 0: no batch after \d+ s \(pipeline.stall_timeout_s=1.5\)"):
    t.run(on_metrics)
  assert 1.5 <= time.monotonic() - t0 < 60
  assert [m["step"] for m in seen] == [0, 1, 2] and "eval/accuracy" in seen[0]
  assert "reward/total" in seen[2] and "eval/accuracy" not in seen[2]
  assert t.manager.all_steps() == [2]  # the step trained was saved before raising
  lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [0, 1, 2]
  held_out.release.set()

  # A stop asked for while the evaluation reads (the read itself asks, then hangs): the evaluation
  # ends within the agreement's 0.1 s slices, well before the 1.5 s stall timeout.
  class AskingPairs(StallingPairs):
    def __getitem__(self, i):
      if not self.release.is_set():
        t.request_stop(signal.SIGTERM)
      return super().__getitem__(i)

  t.evaluator.pairs = asking = AskingPairs(held_out.pairs)  # release not set: the first read asks
  out = t.run()
  assert t.stopped_by == signal.SIGTERM and [m["step"] for m in out] == [3]
  assert "eval/accuracy" not in out[0] and t.manager.all_steps() == [2, 3]
  asking.release.set()

  # A held-out read failing with an error of any type (not only the pipeline's own) is agreed on
  # as a failure too: the step is saved before it is raised (with several processes, every one saves).
  class Failing(StallingPairs):
    def __getitem__(self, i):
      raise OSError(5, "Input/output error", "/mnt/held_out/7.png")

  t.evaluator.pairs = Failing(held_out.pairs)
  t.loop_cfg = dataclasses.replace(t.loop_cfg, steps=4)
  with pytest.raises(OSError, match="Input/output error"):
    t.run()
  assert t.manager.all_steps() == [3, 4]
  t.close()


def test_a_step_whose_update_is_skipped_says_so(tmp_path, capsys):
  # A reward that is infinite for one completion of each group (a NaN would mean "not scored"):
  # every step's update is skipped (non-finite loss), the parameters stay bit for bit, and the loop
  # says so on stderr, not only in metrics.jsonl.
  import jax.numpy as jnp
  from lgrpo_jax.rewards import RewardConfig
  from lgrpo_jax.rewards.core import REWARDS, register_reward
  register_reward("nan_for_test", lambda inputs: jnp.where(jnp.arange(inputs.lengths.shape[1]) == 0, jnp.inf, 0.0)
                  * jnp.ones(inputs.lengths.shape), replace=True)
  try:
    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    t = make(tmp_path / "run", tok_dir, steps=2, save_every=5,
             rewards=RewardConfig(weights=(("format", 1.0), ("nan_for_test", 1.0))))
    before = [np.asarray(x) for x in jax.tree.leaves(t.state.params)]
    out = t.run()
    t.close()
  finally:
    REWARDS.pop("nan_for_test")
  assert [m["skipped_updates"] for m in out] == [1, 1]
  for a, b in zip(before, jax.tree.leaves(t.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  err = capsys.readouterr().err
  assert "step 1: 1 of 1 optimiser update(s) skipped: the loss or the gradients were not finite" in err
  assert "step 2: 1 of 1 optimiser update(s) skipped" in err and "2 step(s) with skipped updates in this run so far" in err
  from lgrpo_jax.launch import summary
  assert ("steps whose optimiser updates were skipped (non-finite loss or gradients): 2 of 2 (first: step 1)"
          in summary(str(tmp_path / "run")))


def test_a_notebook_session_trains_the_model_given_saves_on_an_error_and_sees_an_edited_reward(tmp_path):
  """What a notebook does and a script does not: a callback that raises at the last step (the step
  used to be lost: run() again and close() saved nothing), a reward cell edited and re-run with
  replace=True (the compiled step of the old one was kept), the model handed to a second Trainer
  (its arrays had been donated away: 'Buffer has been deleted'), run() after close()."""
  import dataclasses

  import jax.numpy as jnp
  from flax import nnx

  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.rewards import RewardConfig, register_reward
  from lgrpo_jax.train import LoopConfig, Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")

  def broken(inputs):
    raise ZeroDivisionError("a bug in my reward")

  register_reward("nb_const", replace=True)(broken)
  rewards = RewardConfig(weights=(("format", 1.0), ("nb_const", 1.0)))
  with pytest.raises(ValueError, match="reward 'nb_const' failed: ZeroDivisionError: a bug in my reward"):
    make(tmp_path / "a", tok_dir, steps=2, save_every=10, rewards=rewards)  # found as the Trainer starts
  register_reward("nb_const", replace=True)(lambda inputs: jnp.ones(inputs.lengths.shape))
  t = make(tmp_path / "a", tok_dir, steps=2, save_every=10, rewards=rewards)
  register_reward("nb_const", replace=True)(broken)  # the cell edited after the Trainer was built
  start = t.batches.get_state()
  with pytest.raises(ValueError, match="reward 'nb_const' failed: ZeroDivisionError"):
    t.run()  # fails while the first step is traced: saved at step 0, before the batch it never trained on
  assert t.manager.all_steps() == [0] and t.batches.get_state() == start
  register_reward("nb_const", replace=True)(lambda inputs: jnp.ones(inputs.lengths.shape))

  def fail_at_2(m):
    if m.get("step") == 2:
      raise RuntimeError("a bug in my callback")

  with pytest.raises(RuntimeError, match="a bug in my callback"):
    t.run(on_metrics=fail_at_2)
  assert t.manager.all_steps() == [0, 2]  # saved on the way out
  model_params = nnx.state(t._model, nnx.Param)
  for a, b in zip(jax.tree.leaves(model_params), jax.tree.leaves(t.state.params)):
    assert a is b and not a.is_deleted()  # the model given holds the trained parameters
  register_reward("nb_const", replace=True)(lambda inputs: 7.0 * jnp.ones(inputs.lengths.shape))
  t.loop_cfg = dataclasses.replace(t.loop_cfg, steps=3)
  (m,) = t.run()
  assert m["step"] == 3 and m["reward/nb_const"] == pytest.approx(7.0)
  t.close()
  with pytest.raises(RuntimeError, match="this Trainer is closed; build a new one"):
    t.run()
  # The same model into a new Trainer (the cell run again): it starts from the trained weights;
  # held-out pairs without eval_every: evaluate() on demand, none in the loop.
  from transformers import AutoTokenizer
  again = Trainer(str(tmp_path / "b"), t._model, AutoTokenizer.from_pretrained(tok_dir),
                  list(synthetic(4, seed=1, image_size=56)), t.step_cfg, t.pipe_cfg, LoopConfig(steps=1),
                  eval_pairs=list(synthetic(2, seed=9, image_size=56)))
  for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(nnx.state(t._model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again.evaluator is not None and not again._in_run_eval
  again.close()
  register_reward("nb_const", replace=True)(lambda inputs: jnp.ones(inputs.lengths.shape))


def test_a_text_reward_raising_in_a_step_keeps_the_state_and_saves_the_steps_before(tmp_path):
  """A text reward's Python function raising in the 3rd step: it failed the step's program, whose
  state had been donated — the two steps trained were lost (the save found deleted arrays), the
  model given held deleted arrays, run() again failed. Now the update is skipped (the reward is ∞),
  step 2 is saved with the data position before step 3's batch, and a run() with the reward fixed
  goes on exactly as a run that never failed."""
  from flax import nnx
  from transformers import AutoTokenizer

  from lgrpo_jax.rewards import RewardConfig, RewardError, register_reward, text_reward
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  calls = []

  def flaky(texts, labels):
    calls.append(1)
    if len(calls) == 3:
      raise ZeroDivisionError("a bug in my reward")
    return [float(len(t) % 3) for t in texts]

  register_reward("nb_text", text_reward(flaky, tok), replace=True)
  rewards = RewardConfig(weights=(("format", 1.0), ("nb_text", 1.0)))
  t = make(tmp_path / "a", tok_dir, steps=4, save_every=10, rewards=rewards)
  with pytest.raises(RewardError, match=r"text reward 'nb_text' failed: ZeroDivisionError: a bug in my reward "
                                        r"\(at step 3; the update was not applied, step 2 is saved") as e:
    t.run()
  assert isinstance(e.value.__cause__, ZeroDivisionError)
  assert t.manager.all_steps() == [2] and int(t.state.step) == 2
  for a, b in zip(jax.tree.leaves(nnx.state(t._model, nnx.Param)), jax.tree.leaves(t.state.params)):
    assert not a.is_deleted() and not b.is_deleted()
  resumed = t.run()  # the reward "fixed": it no longer raises
  t.close()
  straight = make(tmp_path / "b", tok_dir, steps=4, save_every=10, rewards=rewards)
  whole = straight.run()  # (calls are past the raising one)
  straight.close()
  drop = ("step_time", "tokens_per_s", "tflops", "mfu", "compiles", "compile_s", "compile_cache_hits",
          "compiled_programs")
  text = lambda ms: [json.dumps({k: v for k, v in m.items() if k not in drop}, sort_keys=True) for m in ms]
  assert [m["step"] for m in resumed] == [3, 4]
  assert text(resumed) == text(whole[2:])
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(t.state.params)[0]),
                                np.asarray(jax.tree.leaves(straight.state.params)[0]))
  # A text reward of weight 0 (a metric) raising: said too (its ∞ reached no total: the errors piled
  # up, and the next update skipped for any reason raised them, in another Trainer, at its step)
  def broken(texts, labels):
    raise ZeroDivisionError("a metric's bug")

  register_reward("nb_text0", text_reward(broken, tok), replace=True)
  metric_only = make(tmp_path / "c", tok_dir, steps=1, save_every=10,
                     rewards=RewardConfig(weights=(("format", 1.0), ("nb_text0", 0.0))))
  with pytest.raises(RewardError, match="text reward 'nb_text0' failed: ZeroDivisionError: a metric's bug"):
    metric_only.run()
  assert int(metric_only.state.step) == 0
  metric_only.close()
  # … while a weight-0 text reward that gives −∞ (a metric's log-probability) is no failure: the
  # update goes on (an ∞ check on the text rewards' values skipped every update, silently)
  register_reward("nb_text0", text_reward(lambda texts, labels: [float("-inf")] * len(texts), tok), replace=True)
  metric_only = make(tmp_path / "d", tok_dir, steps=1, save_every=10,
                     rewards=RewardConfig(weights=(("format", 1.0), ("nb_text0", 0.0))))
  (m,) = metric_only.run()
  assert m["skipped_updates"] == 0 and m["reward/nb_text0"] == float("-inf")
  metric_only.close()


def test_a_resume_with_the_model_a_run_trained_in_place_is_refused(tmp_path, monkeypatch):
  """The model handed back by run() holds the trained weights: a new Trainer on the same run
  directory built from it made the listener (and reference) the trained policy of the checkpoint's
  step, not the run's initial weights — the resumed run diverged from an uninterrupted one from its
  first step, while its warning said "the reference and the listener are the earlier run's"."""
  import dataclasses

  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import tiny_model_config
  from lgrpo_jax.runs import RunError
  from lgrpo_jax.train import Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  t = make(tmp_path / "a", tok_dir, steps=1)
  assert t.step_cfg.rewards.needs_listener
  t.run()
  t.close()
  from transformers import AutoTokenizer

  from lgrpo_jax.data.synthetic import synthetic
  loop = dataclasses.replace(t.loop_cfg, steps=2)
  tok, pairs = AutoTokenizer.from_pretrained(tok_dir), list(synthetic(6, seed=1, image_size=56))
  with pytest.raises(RunError, match=r"resuming from step 1 with a model an earlier Trainer of this run trained in "
                                     r"place .*the listener would be copied from them"):
    Trainer(tmp_path / "a", t._model, tok, pairs, t.step_cfg, t.pipe_cfg, loop)
  # The refused start closed the checkpoint managers it had opened (their threads and files outlived
  # it, through the exception's traceback in a notebook)
  import orbax.checkpoint as ocp
  closed = []
  real_close = ocp.CheckpointManager.close
  monkeypatch.setattr(ocp.CheckpointManager, "close", lambda self: closed.append(self) or real_close(self))
  with pytest.raises(RunError):
    Trainer(tmp_path / "a", t._model, tok, pairs, t.step_cfg, t.pipe_cfg, loop)
  assert len(closed) == 2
  monkeypatch.undo()
  # The initial weights again (as the launcher loads them): resumes
  fresh = Trainer(tmp_path / "a", lgrpo_jax.from_config(tiny_model_config(tok_dir)), tok, pairs, t.step_cfg,
                  t.pipe_cfg, loop)
  assert fresh.resumed_from == 1
  fresh.close()


def test_stops_interrupts_and_shared_models_between_runs_in_one_process(tmp_path):
  """A notebook's long life: a stop asked for between runs was dropped (the next run() trained on);
  evaluate() after a stopped run always raised EvaluationStopped (the spent stop was kept); a
  KeyboardInterrupt between reading a batch and training on it made run() again skip that batch;
  a second Trainer built from the same model object found its arrays donated by the first's run()
  ("Buffer has been deleted") and then put deleted arrays into the model."""
  import signal

  from flax import nnx
  from transformers import AutoTokenizer

  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.train import Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  t = make(tmp_path / "a", tok_dir, steps=2, save_every=10, eval_every=10)
  t.request_stop()  # a watchdog between runs: the next run stops at its start
  assert t.run() == [] and t.stopped_by == signal.SIGTERM and int(t.state.step) == 0
  assert t.evaluate()["eval/pairs"] > 0  # the stop was spent by the run
  from lgrpo_jax.train.stopping import EvaluationStopped
  t.request_stop()  # … or by the evaluation it stops (it stopped every later one)
  with pytest.raises(EvaluationStopped):
    t.evaluate()
  assert t.evaluate()["eval/pairs"] > 0
  start = t.batches.get_state()
  real = t._step_fn

  def interrupted(pair_grid):
    t._step_fn = real
    raise KeyboardInterrupt

  t._step_fn = interrupted
  with pytest.raises(KeyboardInterrupt):
    t.run()
  assert int(t.state.step) == 0 and t.batches.get_state() == start  # the batch read goes back
  assert [m["step"] for m in t.run() if "reward/total" in m] == [1, 2]
  # Two Trainers from one model object: the second is told, and the model keeps the first's weights
  tok, pairs = AutoTokenizer.from_pretrained(tok_dir), list(synthetic(6, seed=1, image_size=56))
  b = Trainer(tmp_path / "b", t._model, tok, pairs, t.step_cfg, t.pipe_cfg, t.loop_cfg)
  c = Trainer(tmp_path / "c", t._model, tok, pairs, t.step_cfg, t.pipe_cfg, t.loop_cfg)
  b.run()
  with pytest.raises(RuntimeError, match="deleted arrays: another Trainer built from the same model object has run"):
    c.run()
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(t._model, nnx.Param)))
  for x in (t, b, c):
    x.close()


def test_no_frozen_copy_is_held_that_nothing_reads(tmp_path):
  """β = 0 runs no reference pass (TRL then loads no reference model); without a listener reward
  there is no listener pass. The copy of the weights each would read is not made (at 7B ~15 GB)."""
  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import tiny_model_config
  from lgrpo_jax.rewards import RewardConfig
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  no_listener = RewardConfig(weights=(("format", 1.0), ("accuracy", 1.0)))
  t = make(tmp_path / "a", tok_dir, steps=1, rewards=no_listener)  # β = 0 in `make`
  assert t.ref_params is None and t.listener_params is None
  t.run()
  assert t.state.step == 1
  t.close()
  # β = 0 with the default listener (the initial policy): one copy, which the listener reads.
  from transformers import AutoTokenizer

  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.train.loop import Trainer
  base = make(tmp_path / "b", tok_dir, steps=1)
  assert base.listener_is_reference and base.ref_params is not None
  base.close()
  # β = 0 with a separate listener: the listener's copy only.
  t = Trainer(tmp_path / "c", lgrpo_jax.from_config(tiny_model_config(tok_dir)), AutoTokenizer.from_pretrained(tok_dir),
              list(synthetic(4, seed=1, image_size=56)), base.step_cfg, base.pipe_cfg, base.loop_cfg,
              listener=lgrpo_jax.from_config(tiny_model_config(tok_dir)))
  assert t.ref_params is None and t.listener_params is not None and not t.listener_is_reference
  t.close()


def test_a_trainer_keeps_a_step_per_image_grid_and_clear_compiled_steps_reaches_it(tmp_path):
  """A dataset of many image grids interleaves them: each grid's step function stays (the process
  keeps its last 8; an earlier cap of the Trainer's own at 8 recompiled every step past 8 grids).
  A reward registered again, or `clear_compiled_steps()`, gives the next step a new function."""
  from lgrpo_jax.rewards import register_reward
  from lgrpo_jax.rewards.core import REWARDS
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  t = make(tmp_path / "run", tok_dir, steps=1)
  grids = [((1, 4, 2 * k), (1, 4, 4)) for k in range(1, 11)]
  first = [t._step_fn(g) for g in grids]
  assert [t._step_fn(g) for g in grids] == first  # jitted functions: none built again (nothing compiled here)
  clear_compiled_steps()
  assert t._step_fn(grids[0]) is not first[0]
  again = t._step_fn(grids[0])
  try:
    register_reward("t_grid_reward", lambda inputs: inputs.lengths * 0.0)
    assert t._step_fn(grids[0]) is not again  # a registry changed
  finally:
    REWARDS.pop("t_grid_reward", None)
  assert len(t._steps) == len(grids)  # one per grid: replaced, not piled up
  t.close()
