"""Evaluation: the ImageReward protocol against a reimplementation of THUDM's `acc`, rankings from
pairwise judgements, both-order aggregation, and `python -m lgrpo_jax.evaluate` end to end on the
real ImageReward test annotations (stand-in images), with skips, resume and sharded = one device."""

import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from lgrpo_jax.evaluation import (Group, aggregate_samples, anchors_of, comparisons, image_scores,
                                  imagereward_accuracy, summarize)
from conftest import shared_dir


def thudm_acc(rankings, scores):
  """THUDM ImageReward test.py `acc`, written from its description: loop over i < j of each prompt;
  a lower rank is better; skip human ties; the model is right only with a strict score order."""
  tol = true = 0
  for rank, score in zip(rankings, scores):
    for i in range(len(rank)):
      for j in range(i + 1, len(rank)):
        if rank[i] > rank[j]:  # j preferred
          tol += 1
          true += score[i] < score[j]
        elif rank[i] < rank[j]:  # i preferred
          tol += 1
          true += score[i] > score[j]
  return true / tol


def test_imagereward_accuracy_matches_the_reference_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(30):
    n_prompts = int(rng.integers(1, 12))
    sizes = rng.integers(2, 10, n_prompts)
    rankings = [rng.integers(1, 5, n).tolist() for n in sizes]  # many human ties
    scores = [rng.integers(0, 4, n).astype(float).tolist() for n in sizes]  # many predicted ties
    if all(len(set(r)) == 1 for r in rankings):
      continue
    assert imagereward_accuracy(rankings, scores) == pytest.approx(thudm_acc(rankings, scores), abs=1e-12)
  # a predicted tie is wrong; a human tie is not counted
  assert imagereward_accuracy([[1, 2, 2]], [[0.5, 0.5, 0.1]]) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="prompt 0"):
    imagereward_accuracy([[1, 2]], [[0.1, 0.2, 0.3]])


def test_anchor_ranking_and_all_pairs_recover_a_consistent_judges_order():
  rng = np.random.default_rng(1)
  for n in range(3, 10):
    s = rng.standard_normal(n)  # the judge's hidden quality; P(i beats j) = sigmoid(s_i − s_j)
    ranks = (np.argsort(np.argsort(-s)) + 1).tolist()
    g = Group(f"g{n}", "p", tuple(range(n)), tuple(ranks))
    judge = lambda i, j: 1 / (1 + np.exp(-(s[i] - s[j])))
    full = image_scores(n, {(i, j): judge(i, j) for i, j in comparisons(g, "all")})
    for k in (1, 2, 3):
      comps = comparisons(g, "anchors", anchors=k)
      if k < n - 1:
        assert len(comps) == k * (n - k) + k * (k - 1) // 2 < n * (n - 1) // 2
      anchored = image_scores(n, {(i, j): judge(i, j) for i, j in comps},
                              anchors_of(g.group_id, n, k) if k < n - 1 else None)
      np.testing.assert_array_equal(np.argsort(anchored), np.argsort(s))
      assert imagereward_accuracy([ranks], [anchored]) == 1.0
    np.testing.assert_array_equal(np.argsort(full), np.argsort(s))
  # "untied" judges only what people ranked apart; anchors are not simply the first images
  g = Group("x", "p", tuple(range(4)), (1, 1, 2, 3))
  assert comparisons(g, "untied") == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
  assert {tuple(anchors_of(f"g{k}", 9, 2)) for k in range(20)} != {(0, 1)}


def test_a_confident_judge_and_a_cut_prompt_keep_the_protocol_exact():
  """Two ways a perfect judge used to score below 1 on the ImageReward protocol: (1) in
  `anchors:K` its P(beats anchor) saturated (rounded to 6 decimals, or fp32 past ~17 nats) so the
  images above every anchor tied — records now keep P in float64 from the log-odds; (2) a prompt
  cut by --max-pairs was scored with comparisons never judged — it is now left out."""
  from lgrpo_jax.evaluate import _sigmoid, plan
  n, seed = 9, 0
  ranks = (5, 1, 9, 2, 8, 3, 7, 4, 6)
  g = Group("g", "p", tuple(range(n)), ranks)

  def records(todo, gap, digits=None):  # both orders; P(first shown better) = σ(gap·(quality difference))
    out = []
    for _, i, j in todo:
      lo = gap * (ranks[j] - ranks[i])  # log-odds that i beats j (rank 1 is best)
      pref = 0 if ranks[i] < ranks[j] else 1
      for order, x in (("as_given", lo), ("swapped", -lo)):
        p = _sigmoid(x) if digits is None else round(_sigmoid(x), digits)
        out.append(_rec(f"g:{i}-{j}", order, pref, 1 if x > 0 else 2, p, i=i, j=j))
    return out

  for mode, k in (("anchors", 2), ("all", 0)):
    _, todo, _ = plan([g], mode, k, None, seed)
    m = summarize(records(todo, 8.0), [g], mode, k, seed)["imagereward_protocol"]  # 8 nats a rank
    assert m["accuracy"] == 1.0 and m["pairs"] == 36, (mode, m)
  rounded = summarize(records(todo_anchors := plan([g], "anchors", 2, None, seed)[1], 8.0, digits=6), [g],
                      "anchors", 2, seed)["imagereward_protocol"]
  assert rounded["accuracy"] < 1 and len(todo_anchors) == 2 * 7 + 1  # as the records were written before
  _, todo, left = plan([g], "all", 0, 10, seed)  # 10 of the prompt's 36 comparisons
  assert len(todo) == 10 and left["max_pairs"] == 26
  m = summarize(records(todo, 1.0), [g], "all", 0, seed)
  assert m["accuracy"] == 1.0 and m["imagereward_protocol"] == {"accuracy": None, "pairs": 0, "prompts": 0,
                                                               "partial_prompts_left_out": 1}


def test_a_damaged_predictions_line_is_dropped_and_named_not_the_lines_after_it(tmp_path, capsys):
  from lgrpo_jax.evaluate import read_predictions
  good = [_rec(f"p{k}", "as_given", 0, 1, 0.7) for k in range(4)]
  lines = [json.dumps(r) for r in good]
  lines.insert(2, lines[2][:25])  # torn mid-file (a copy cut short), then a line without pair_id
  lines.insert(4, json.dumps({k: v for k, v in good[3].items() if k != "pair_id"}))
  path = tmp_path / "predictions.jsonl"
  path.write_text("\n".join(lines) + "\n" + lines[0][:10])  # and a torn last line
  assert read_predictions(str(path)) == good
  assert "lines 3, 5, 7 not a whole record (torn or damaged): dropped" in capsys.readouterr().err


def test_sample_aggregation():
  assert aggregate_samples([1, 1, 2], [0.9, 0.6, 0.2]) == (1, pytest.approx(1.7 / 3))
  assert aggregate_samples([1, 2, 0, 0], [0.9, 0.1, 0.5, 0.5])[0] == 0  # a tied vote: no answer
  assert aggregate_samples([1, 1, 2], [0.9, 0.1, 0.2], "mean_prob") == (2, pytest.approx(0.4))


def _rec(pid, order, preferred, answer, p1, listener=None, ok=True, i=0, j=1, group="g"):
  return {"pair_id": pid, "group": group, "i": i, "j": j, "order": order, "preferred": preferred,
          "answer": answer, "p_image1": p1,
          "samples": [{"answer": answer, "format_ok": ok, "p": [p1, 1 - p1], "listener": listener}]}


def test_both_orders_position_bias_and_listener_split():
  rng = np.random.default_rng(2)
  prefs = rng.integers(0, 2, 40).tolist()
  # A judge that always says "Image 1" with P = 0.8: right on as-given pairs whose first image
  # people preferred, on swapped pairs whose second one they preferred — 50% on average.
  recs = [_rec(f"p{k}", o, pref, 1, 0.8) for k, pref in enumerate(prefs) for o in ("as_given", "swapped")]
  m = summarize(recs)
  first = np.mean([p == 0 for p in prefs])
  assert m["accuracy_as_given"] == pytest.approx(first) and m["accuracy_swapped"] == pytest.approx(1 - first)
  assert m["accuracy"] == pytest.approx(0.5) and m["position_bias_gap"] == pytest.approx(abs(2 * first - 1))
  assert m["image1_answer_rate"] == 1.0
  assert m["accuracy_debiased"] == 0.0  # P(first image better) averages to exactly 1/2: a tie, wrong
  assert m["counts"] == {"comparisons": 40, "judgements": 80, "samples": 80, "untied_comparisons": 40,
                         "tied_comparisons": 0}
  # A judge right on every pair, slightly biased to Image 1, and a listener that agrees on half.
  recs = []
  for k, pref in enumerate(prefs):
    for o in ("as_given", "swapped"):
      shown = pref if o == "as_given" else 1 - pref
      p1 = 0.9 if shown == 0 else 0.3
      listen = [0.7, 0.3] if k % 2 else [0.3, 0.7]
      recs.append(_rec(f"p{k}", o, pref, shown + 1, p1, listen))
  recs.append(_rec("tie", "as_given", None, 1, 0.5, [0.5, 0.5]))  # people tied: never scored
  m = summarize(recs)
  assert m["accuracy"] == 1.0 and m["accuracy_debiased"] == 1.0 and m["position_bias_gap"] == 0.0
  lis = m["listener"]
  listener_choice = [1 + int(k % 2 == 0) for k, pref in enumerate(prefs) for o in ("as_given", "swapped")]
  answers = [(pref if o == "as_given" else 1 - pref) + 1 for pref in prefs for o in ("as_given", "swapped")]
  contradict = [a != c for a, c in zip(answers, listener_choice)] + [False]  # the tie: choice 1, answer 1
  assert lis["contradiction_rate"] == pytest.approx(np.mean(contradict))
  assert lis["agree"] + lis["contradict"] == 81 and lis["contradict"] == sum(contradict)
  assert lis["accuracy_when_agree"] == 1.0 and lis["accuracy_when_contradict"] == 1.0
  assert lis["listener_accuracy"] == pytest.approx(1 - np.mean(contradict[:-1]))


# ---- the command, end to end ------------------------------------------------------------------
MAX_PAIRS = 39  # records 0-4 of test.json: four prompts of 4 images and one of 6 (with two human ties)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A random tiny reasoner as a Hugging Face directory (weights, config, tokenizer)."""
  from transformers import AutoTokenizer

  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
  out = tmp_path_factory.mktemp("hf")
  cfg = tiny_model_config(tok_dir)
  cfg["vision_config"].update(window_size=56)
  lgrpo_jax.save_hf(lgrpo_jax.from_config(cfg, seed=3), out)
  AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
  return str(out)


@pytest.fixture(scope="module")
def imagereward_images(tmp_path_factory):
  """Stand-in images for the first prompts of the real test set (one size: each image-grid
  signature compiles the judge once; sizes are the parity tests' business); one file missing, one
  corrupt. Returns (annotations path, image root, the real records used, {(record, image): reason})."""
  path = os.path.join(shared_dir(), "data", "imagereward", "test.json")
  records = json.load(open(path))[:5]
  root = tmp_path_factory.mktemp("ir_images")
  rng = np.random.default_rng(0)
  bad = {(1, 0): "missing_image", (4, 5): "bad_image"}
  for r, rec in enumerate(records):
    for k, rel in enumerate(rec["generations"]):
      f = root / rel
      f.parent.mkdir(parents=True, exist_ok=True)
      if bad.get((r, k)) == "missing_image":
        continue
      if bad.get((r, k)) == "bad_image":
        f.write_bytes(b"this is not an image")
        continue
      Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(f)
  return path, str(root), records, bad


def expected_counts(records, bad):
  """From the annotations alone: comparisons judged (all pairs, whole prompts up to MAX_PAIRS),
  those skipped by reason, and the human ties among the judged ones."""
  judged, tied, skipped, total = 0, 0, {}, 0
  for r, rec in enumerate(records):
    n = len(rec["generations"])
    if total + n * (n - 1) // 2 > MAX_PAIRS:
      break
    total += n * (n - 1) // 2
    for i, j in itertools.combinations(range(n), 2):
      reason = bad.get((r, i)) or bad.get((r, j))
      if reason:
        skipped[reason] = skipped.get(reason, 0) + 1
      else:
        judged += 1
        tied += rec["ranking"][i] == rec["ranking"][j]
  return total, judged, tied, skipped


def run_eval(*argv):
  from lgrpo_jax import evaluate
  return evaluate.main(["--quiet", "--max-new-tokens", "6", *argv])


def test_imagereward_end_to_end_counts_skips_resume_and_sharding(tiny_hf, imagereward_images, tmp_path, capsys):
  path, root, records, bad = imagereward_images
  data = ["--checkpoint", tiny_hf, "--data", f"imagereward:{path}", "--images", root,
          "--max-pairs", str(MAX_PAIRS), "--bad-records", "skip"]
  out = tmp_path / "eval"
  assert run_eval(*data, "--out", str(out)) == 0  # 8 simulated devices: sharded like training
  assert (out / "xla_cache").is_dir()  # --compile-cache auto, for a checkpoint that is not a run: OUT/xla_cache
  summary = json.load(open(out / "summary.json"))
  total, judged, tied, skipped = expected_counts(records, bad)
  assert summary["planned"]["comparisons"] == total == MAX_PAIRS
  assert summary["planned"]["judged_comparisons"] == judged == total - sum(skipped.values())
  assert summary["skipped"]["comparisons"] == skipped == {"missing_image": 3, "bad_image": 5}
  assert summary["skipped"]["images"] == {"missing_image": 1, "bad_image": 1}
  assert records[1]["generations"][0] in summary["skipped"]["examples"]["missing_image"][0]
  c = summary["metrics"]["counts"]
  assert (c["comparisons"], c["tied_comparisons"], c["untied_comparisons"]) == (judged, tied, judged - tied)
  assert tied == 1  # (0, 2) of record 4; its other tie touches the corrupt image
  preds = [json.loads(x) for x in open(out / "predictions.jsonl")]
  assert len(preds) == 2 * judged
  assert {(p["pair_id"], p["order"]) for p in preds} == {
      (f"{records[r]['id']}:{i}-{j}", o) for r, rec in enumerate(records[:5])
      for i, j in itertools.combinations(range(len(rec["generations"])), 2)
      if not (bad.get((r, i)) or bad.get((r, j))) for o in ("as_given", "swapped")}
  for p in preds:
    s = p["samples"][0]
    assert sum(s["p"]) == pytest.approx(1, abs=1e-5) and sum(s["listener"]) == pytest.approx(1, abs=1e-5)
    shown = p["preferred"] if p["order"] == "as_given" else None if p["preferred"] is None else 1 - p["preferred"]
    assert p["correct"] == (None if shown is None else p["answer"] == shown + 1)
  # The reported metrics are those of the predictions (recomputed here independently).
  acc = {o: np.mean([p["correct"] for p in preds if p["order"] == o and p["correct"] is not None])
         for o in ("as_given", "swapped")}
  m = summary["metrics"]
  assert m["accuracy_as_given"] == pytest.approx(acc["as_given"]) and m["accuracy"] == pytest.approx(
      (acc["as_given"] + acc["swapped"]) / 2)
  rankings, scores = [], []
  for r, rec in enumerate(records[:5]):
    n = len(rec["generations"])
    p_ij = {}
    for p in preds:
      if p["group"] == rec["id"]:
        p_ij.setdefault((p["i"], p["j"]), []).append(p["p_image1"] if p["order"] == "as_given" else 1 - p["p_image1"])
    wins, count = np.zeros(n), np.zeros(n)
    for (i, j), ps in p_ij.items():
      wins[i] += np.mean(ps)
      wins[j] += 1 - np.mean(ps)
      count[[i, j]] += 1
    keep = count > 0
    rankings.append(np.asarray(rec["ranking"])[keep])
    scores.append((wins / np.maximum(count, 1))[keep])
  assert m["imagereward_protocol"]["accuracy"] == pytest.approx(thudm_acc(rankings, scores))
  # (a random model writes no well-formed answer, so the listener split is tested on records above)
  assert (out / "evaluation.png").is_file() and (out / "listener.md").is_file()
  assert all(p["listener_p_correct"] is not None for p in preds if p["preferred"] is not None)

  # Interrupted: the file holds 10 judgements and half a line. The rerun (on one device) judges
  # only the rest and gives what the sharded run gave.
  lines = open(out / "predictions.jsonl").read().splitlines()
  with open(out / "predictions.jsonl", "w") as f:
    f.write("\n".join(lines[:10]) + "\n" + lines[10][:25])
  capsys.readouterr()
  assert run_eval(*data, "--out", str(out), "--single-device") == 0
  err = capsys.readouterr().err
  assert "10 judgements already in" in err and f"{2 * judged - 10} to go" in err
  again = [json.loads(x) for x in open(out / "predictions.jsonl")]
  assert len(again) == 2 * judged and len({(p["pair_id"], p["order"]) for p in again}) == 2 * judged
  by_key = {(p["pair_id"], p["order"]): p for p in preds}
  for p in again[10:]:
    ref = by_key[(p["pair_id"], p["order"])]
    assert p["samples"][0]["text"] == ref["samples"][0]["text"] and p["answer"] == ref["answer"]
    np.testing.assert_allclose(p["samples"][0]["p"] + p["samples"][0]["listener"],
                               ref["samples"][0]["p"] + ref["samples"][0]["listener"], atol=2e-5)
  # Other settings on the same output are refused; the error policy names the record and file.
  assert run_eval(*data, "--out", str(out), "--samples", "2") == 2
  assert "other settings (samples, temperature differ" in capsys.readouterr().err
  assert not (out / "predictions.jsonl.tmp").exists()  # the resume's rewrite was put in place
  import shutil
  shutil.copytree(tiny_hf, tmp_path / "same_tokenizer_elsewhere")
  assert run_eval(*data, "--out", str(out), "--tokenizer", str(tmp_path / "same_tokenizer_elsewhere")) == 2
  assert "other settings (tokenizer differ" in capsys.readouterr().err
  # --config brings its sampling settings (the completion length too, not the 256 default).
  (tmp_path / "cfg.py").write_text(
      "from lgrpo_jax.config import ExperimentConfig, SamplingConfig, StepConfig\n"
      "def config():\n"
      "  return ExperimentConfig(step=StepConfig(sampling=SamplingConfig(max_new_tokens=5, num_samples=2, stop_sequences=((9,),))))\n")
  from lgrpo_jax import evaluate
  assert evaluate.main(["--quiet", *data, "--out", str(out), "--config", str(tmp_path / "cfg.py")]) == 2
  assert "other settings (max_new_tokens, stop_sequences differ" in capsys.readouterr().err
  # A run's config.json naming a loss its own process registered is read all the same (evaluating
  # needs its prompt and sampling settings, not the loss).
  from lgrpo_jax.config import ExperimentConfig, SamplingConfig, StepConfig, to_record
  record = to_record(ExperimentConfig(step=StepConfig(sampling=SamplingConfig(max_new_tokens=5, num_samples=2))))
  record["step"]["loss"]["loss"] = "seq_sum_of_that_run"
  (tmp_path / "config.json").write_text(json.dumps(record))
  assert evaluate.main(["--quiet", *data, "--out", str(out), "--config", str(tmp_path / "config.json")]) == 2
  assert "other settings (max_new_tokens differ" in capsys.readouterr().err
  assert run_eval(*data[:-2], "--out", str(tmp_path / "strict")) == 2
  err = capsys.readouterr().err
  assert "image file not found" in err and records[1]["generations"][0] in err and "--bad-records skip" in err
  assert run_eval(*data, "--out", str(tmp_path / "c"), "--compile-cache", str(path)) == 2
  assert "exists and is not a directory" in capsys.readouterr().err


class FaultyBatches:
  """The evaluation's real batches, with `fault()` called on the `read`-th read (in the read's thread)."""

  def __init__(self, batches, read: int, fault):
    self.batches, self.read, self.fault, self.reads = batches, read, fault, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.reads += 1
    if self.reads == self.read:
      self.fault()
    return next(self.batches)

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, state):
    self.batches.set_state(state)


def test_a_stop_or_a_hung_read_ends_the_evaluation_and_the_same_command_resumes(tiny_hf, imagereward_images,
                                                                               tmp_path, capsys, monkeypatch):
  """The command used to read its batches on the main thread: a hung read (a stalled mount) hung it
  forever (with several processes, the others waited in the next all-gather), and SIGTERM killed it
  mid-batch. Now it reads through `stopping.Feed`: SIGTERM stops it at the next batch (exit 143), a
  read hanging past --stall-timeout stops it with exit 75, and the same command finishes the rest.
  The predictions then equal an uninterrupted run's."""
  import signal
  import threading
  import time

  from lgrpo_jax.data import pipeline
  path, root, _, _ = imagereward_images
  data = ["--checkpoint", tiny_hf, "--data", f"imagereward:{path}", "--images", root, "--max-pairs", "3",
          "--no-listener", "--single-device", "--batch", "2"]  # 3 comparisons × 2 orders: 3 batches
  keyed = lambda out: {(p["pair_id"], p["order"]): p for p in map(json.loads, open(out / "predictions.jsonl"))}
  assert run_eval(*data, "--out", str(tmp_path / "ref")) == 0
  ref = keyed(tmp_path / "ref")
  assert len(ref) == 6

  real = pipeline.make_batches
  faults = []  # (read, fault) for the next evaluation
  monkeypatch.setattr(pipeline, "make_batches", lambda *a, **k: FaultyBatches(real(*a, **k), *faults.pop()))
  out = tmp_path / "eval"
  previous = signal.getsignal(signal.SIGTERM)
  faults.append((2, lambda: os.kill(os.getpid(), signal.SIGTERM)))
  capsys.readouterr()
  assert run_eval(*data, "--out", str(out)) == 128 + signal.SIGTERM
  assert "SIGTERM: stopped with 2 of 6 judgements made" in capsys.readouterr().err
  assert len(keyed(out)) == 2 and signal.getsignal(signal.SIGTERM) is previous

  release = threading.Event()
  faults.append((2, release.wait))  # resumed: its first batch is judged, its second read hangs
  t0 = time.monotonic()
  assert run_eval(*data, "--out", str(out), "--stall-timeout", "1") == 75
  assert 1 <= time.monotonic() - t0 < 30
  err = capsys.readouterr().err
  assert "2 judgements already in" in err and "4 to go" in err
  assert "error: process 0: no batch after 1 s (--stall-timeout=1): the data source hangs" in err
  assert "the 4 judgements made are in" in err and len(keyed(out)) == 4
  release.set()

  faults.append((0, None))
  assert run_eval(*data, "--out", str(out)) == 0
  assert "4 judgements already in" in capsys.readouterr().err
  lines = open(out / "predictions.jsonl").read().splitlines()
  got = keyed(out)
  assert len(lines) == len(got) == 6 and (out / "summary.json").is_file()
  for k, p in got.items():
    assert (p["answer"], p["samples"][0]["text"]) == (ref[k]["answer"], ref[k]["samples"][0]["text"]), k
    np.testing.assert_allclose(p["samples"][0]["p"], ref[k]["samples"][0]["p"], atol=1e-5)
  assert run_eval(*data, "--out", str(out), "--stall-timeout", "-1") == 2
  assert "--stall-timeout -1.0: must be ≥ 0 seconds" in capsys.readouterr().err

  # The image headers, read before anything compiles, are watched the same way: per header read.
  from lgrpo_jax.data import images
  real_grid, hang = images.image_grid, threading.Event()

  def slow_then_hung(im, cfg, name):
    time.sleep(0.4)  # each read is slow, the check as a whole longer than the timeout: not a stall
    if name.startswith(f"group {records_id} image 3"):
      hang.wait()
    return real_grid(im, cfg, name)

  records_id = json.load(open(path))[0]["id"]
  with monkeypatch.context() as m:
    m.setattr(images, "image_grid", slow_then_hung)
    assert run_eval(*data, "--out", str(tmp_path / "stalled"), "--stall-timeout", "1") == 75
    assert re.search(rf"error: process 0: reading the header of group {records_id} image 3 \(\S+\) did not "
                     r"return in 1 s \(--stall-timeout=1\): the image store hangs", capsys.readouterr().err)
    hang.set()
    asked = []

    def asking(*a):  # once: a second SIGTERM would act as without the evaluation (end the process)
      if not asked:
        asked.append(os.kill(os.getpid(), signal.SIGTERM))
      return real_grid(*a)

    m.setattr(images, "image_grid", asking)
    assert run_eval(*data, "--out", str(tmp_path / "stopped")) == 128 + signal.SIGTERM
    assert "SIGTERM: stopped while checking the images; nothing was judged" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is previous


def test_sampled_judgements_are_aggregated(tiny_hf, imagereward_images, tmp_path):
  path, root, _, _ = imagereward_images
  out = tmp_path / "sampled"
  assert run_eval("--checkpoint", tiny_hf, "--data", f"imagereward:{path}", "--images", root, "--max-pairs", "3",
                  "--samples", "3", "--aggregate", "mean_prob", "--ranking", "anchors:1", "--no-listener",
                  "--out", str(out)) == 0
  summary = json.load(open(out / "summary.json"))
  assert summary["settings"]["temperature"] == 1.0 and summary["planned"]["comparisons"] == 3  # 4 images, 1 anchor
  preds = [json.loads(x) for x in open(out / "predictions.jsonl")]
  assert len(preds) == 6 and "listener" not in summary["metrics"]
  texts = set()
  for p in preds:
    assert len(p["samples"]) == 3 and all(s["listener"] is None for s in p["samples"])
    mean = np.mean([s["p"][0] for s in p["samples"]])
    assert p["p_image1"] == pytest.approx(mean, abs=1e-6)
    assert p["answer"] == (1 if mean > 0.5 else 2 if mean < 0.5 else 0)
    texts |= {s["text"] for s in p["samples"]}
  assert len(texts) > 6  # temperature 1: the samples differ


def test_pair_sources_become_groups_ranked_by_their_label(tmp_path):
  from lgrpo_jax import evaluate
  # An HPDv2 pair is one group of two images with ranks (1, 2) when the first is preferred: judged
  # as the pair (0, 1), the preferred image is the source's label again.
  from lgrpo_jax.data.sources import Report
  records = [{"prompt": "a cat", "image_path": ["a.png", "b.png"], "human_preference": [1, 0]},
             {"prompt": "a dog", "image_path": ["c.png", "d.png"], "human_preference": [0, 1]}]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))
  groups = evaluate.read_groups(f"hpdv2:{path}", str(tmp_path), Report(), None)
  assert [g.ranks for g in groups] == [(1, 2), (2, 1)]
  assert [evaluate.pair_of(g, 0, 1)[1] for g in groups] == [0, 1]
  assert [evaluate.pair_of(g, 0, 1)[0].images for g in groups] == [
      (str(tmp_path / "a.png"), str(tmp_path / "b.png")), (str(tmp_path / "c.png"), str(tmp_path / "d.png"))]


def test_run_checkpoint_picks_latest_step_or_best(tmp_path):
  from lgrpo_jax import runs
  for where, step in (("checkpoints", 2), ("checkpoints", 4), ("best", 2), ("checkpoints", 6)):
    # 6: an unfinished save (Orbax writes it under a temporary name, renamed when complete)
    (tmp_path / where / (str(step) if step != 6 else "6.orbax-checkpoint-tmp-1764000000")).mkdir(parents=True)
  assert runs.run_checkpoint(tmp_path) == (str(tmp_path / "checkpoints" / "4" / "state"), 4)
  assert runs.run_checkpoint(tmp_path, step=2) == (str(tmp_path / "checkpoints" / "2" / "state"), 2)
  assert runs.run_checkpoint(tmp_path, best=True) == (str(tmp_path / "best" / "2" / "state"), 2)
  with pytest.raises(runs.RunError, match=r"no checkpoint for step 6; there are \[2, 4\]"):
    runs.run_checkpoint(tmp_path, step=6)
  with pytest.raises(runs.RunError, match="loop.eval_every"):
    runs.run_checkpoint(tmp_path / "nothing", best=True)
