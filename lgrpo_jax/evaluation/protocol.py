"""The evaluation protocol as small pure functions on host values (no model, no device).

Units. A *group* is one prompt with N ≥ 2 images and, when people ranked them, their ranks (1 =
best, ties allowed): an ImageReward/HPDv2-test record, or a single pair from a pair source. A
*comparison* (i, j) of a group is judged in both orders; the judge's probability that image i is
better, averaged over the two orders, is the comparison's soft score p_ij (p_ji = 1 − p_ij).

* `comparisons`: which (i, j) to judge — every pair ("all": N(N−1)/2 judgements), only the pairs
  people did not tie ("untied": the pairwise test set), or every image against K anchors
  ("anchors": K(N−K) + K(K−1)/2) when N² is too many.
* `image_scores`: score_i = mean over i's comparisons of P(i better) — a Borda-style count with soft
  votes; with a judge whose P(i better than j) = f(s_i − s_j), f increasing, all-pairs and anchors
  give the true order (tested). Getting each pair's direction right is not enough: p01 = p02 = 0.51,
  p12 = 0.99 ranks image 1 above image 0.
* `imagereward_accuracy`: THUDM ImageReward `test.py` — per prompt, every pair of images; pairs tied
  in the human ranking are skipped; a predicted tie counts as wrong.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Sequence

import numpy as np

from lgrpo_jax.data.sources import Group

RANKING_MODES = ("all", "untied", "anchors")


def imagereward_counts(rankings: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]) -> tuple[int, int]:
  """(correct, counted) over every untied pair of every prompt: lower rank = preferred, higher
  score = predicted preferred; equal predicted scores count as wrong."""
  if len(rankings) != len(scores):
    raise ValueError(f"{len(rankings)} rankings but {len(scores)} score lists")
  correct = counted = 0
  for k, (rank, score) in enumerate(zip(rankings, scores)):
    r, s = np.asarray(rank, float), np.asarray(score, float)
    if r.shape != s.shape or r.ndim != 1:
      raise ValueError(f"prompt {k}: {r.shape} ranks but {s.shape} scores")
    i, j = np.triu_indices(len(r), 1)
    untied = r[i] != r[j]
    human = np.sign(r[j] - r[i])[untied]  # +1: i preferred
    model = np.sign(s[i] - s[j])[untied]  # 0: a predicted tie, never equal to ±1
    correct += int(np.sum(human == model))
    counted += int(untied.sum())
  return correct, counted


def imagereward_accuracy(rankings: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]) -> float:
  """Accuracy under the ImageReward protocol (see `imagereward_counts`); nan when no pair counts."""
  correct, counted = imagereward_counts(rankings, scores)
  return correct / counted if counted else float("nan")


def anchors_of(group_id: str, n: int, k: int, seed: int = 0) -> list[int]:
  """K anchor images of a group, chosen by a hash of the group id (not the first K: file order
  can carry meaning, e.g. by generation model)."""
  order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{group_id}:{i}".encode()).digest())
  return sorted(order[:min(k, n)])


def comparisons(group: Group, mode: str = "all", anchors: int = 2, seed: int = 0) -> list[tuple[int, int]]:
  """The (i, j), i < j, to judge for one group (see the module docstring)."""
  n = len(group.images)
  if mode == "all" or (mode == "anchors" and anchors >= n - 1):
    return list(itertools.combinations(range(n), 2))
  if mode == "untied":
    if group.ranks is None:
      return list(itertools.combinations(range(n), 2))
    return [(i, j) for i, j in itertools.combinations(range(n), 2) if group.ranks[i] != group.ranks[j]]
  if mode == "anchors":
    anchor = set(anchors_of(group.group_id, n, anchors, seed))
    return [(i, j) for i, j in itertools.combinations(range(n), 2) if i in anchor or j in anchor]
  raise ValueError(f"ranking mode {mode!r}: choose one of {RANKING_MODES}")


def image_scores(n: int, p_first: dict[tuple[int, int], float], anchors: Sequence[int] | None = None) -> np.ndarray:
  """(n,) score of each image from soft pairwise judgements; `p_first[(i, j)]` is P(image i better
  than image j). nan for an image with no judgement.

  All pairs (anchors None): the mean of P(it is better) over its comparisons. Against anchors:
  the mean of P(it beats anchor a) over the anchors, an anchor counting 1/2 against itself — every
  image is then measured against the same set, so a judge with P(i beats j) = f(s_i − s_j), f
  increasing, ranks all images by s (with all pairs as well)."""
  total, count = np.zeros(n), np.zeros(n)
  anchor = None if anchors is None else set(anchors)
  seen = {k for pair in p_first for k in pair}
  for (i, j), p in p_first.items():
    if anchor is None or j in anchor:
      total[i] += p
      count[i] += 1
    if anchor is None or i in anchor:
      total[j] += 1 - p
      count[j] += 1
  if anchor is not None:
    for a in anchor:
      if a in seen:  # judged at all (its image was usable)
        total[a] += 0.5
        count[a] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def aggregate_samples(answers: Sequence[int], p_image1: Sequence[float], how: str = "majority") -> tuple[int, float]:
  """One judgement from k samples of one ordered pair: (answer in {1, 2, 0}, P(Image 1)).

  majority: the answer most samples give (parsed answers, as in training's evaluation; a tie or no
  answer → 0, counted wrong); mean_prob: the choice with the larger mean answer-slot probability
  (equal → 0). P(Image 1) is the mean answer-slot probability over the samples in both cases."""
  p = float(np.mean(p_image1))
  if how == "mean_prob":
    return (1 if p > 0.5 else 2 if p < 0.5 else 0), p
  if how != "majority":
    raise ValueError(f"aggregate {how!r}: choose 'majority' or 'mean_prob'")
  ones, twos = list(answers).count(1), list(answers).count(2)
  return (1 if ones > twos else 2 if twos > ones else 0), p


def _mean(xs) -> float | None:
  return float(np.mean(xs)) if len(xs) else None


def shown_label(rec: dict) -> int | None:
  """The preferred image in the order shown (0: Image 1), None for a pair people tied."""
  if rec["preferred"] is None:
    return None
  return rec["preferred"] if rec["order"] == "as_given" else 1 - rec["preferred"]


def p_first(rec: dict) -> float:
  """P(image i better than image j) from one ordered judgement."""
  return rec["p_image1"] if rec["order"] == "as_given" else 1 - rec["p_image1"]


def summarize(records: Sequence[dict], groups: Sequence[Group] = (), mode: str = "all", anchors: int = 2,
              seed: int = 0) -> dict:
  """All metrics from prediction records (one per comparison and order; see `lgrpo_jax.evaluate`).

  Accuracies count pairs people did not tie; per order, their mean and the gap (position bias);
  `accuracy_debiased` judges each pair by P(i better) averaged over both orders; the listener
  numbers count well-formed samples; `imagereward_protocol_accuracy` ranks each ranked group's
  images by `image_scores` and applies `imagereward_accuracy`."""
  by_order = {"as_given": [], "swapped": []}
  p_pair: dict[str, list[float]] = {}
  samples_formed, answers_1 = [], []
  agree, contra, listener_right = [], [], []
  for rec in records:
    label = shown_label(rec)
    p_pair.setdefault(rec["pair_id"], []).append(p_first(rec))
    answers_1.append(rec["answer"] == 1)
    if label is not None:
      by_order[rec["order"]].append(rec["answer"] == label + 1)
    for s in rec["samples"]:
      samples_formed.append(bool(s["format_ok"]))
      if s.get("listener") is None or not s["format_ok"]:
        continue
      choice = 1 + int(np.argmax(s["listener"]))
      contradicts = choice != s["answer"]
      if label is not None:
        (contra if contradicts else agree).append(s["answer"] == label + 1)
        listener_right.append(choice == label + 1)
      else:
        (contra if contradicts else agree).append(None)
  a1, a2 = _mean(by_order["as_given"]), _mean(by_order["swapped"])
  pair_of = {rec["pair_id"]: rec for rec in records}
  debiased = [(np.mean(ps) > 0.5 and pair_of[pid]["preferred"] == 0) or
              (np.mean(ps) < 0.5 and pair_of[pid]["preferred"] == 1)
              for pid, ps in p_pair.items() if pair_of[pid]["preferred"] is not None and len(ps) == 2]
  n_formed = len(agree) + len(contra)
  out = {
      "accuracy": (a1 + a2) / 2 if a1 is not None and a2 is not None else (a1 if a2 is None else a2),
      "accuracy_as_given": a1, "accuracy_swapped": a2,
      "position_bias_gap": abs(a1 - a2) if a1 is not None and a2 is not None else None,
      "image1_answer_rate": _mean(answers_1),
      "accuracy_debiased": _mean(debiased),
      "format_rate": _mean(samples_formed),
      "counts": {"comparisons": len(p_pair), "judgements": len(records), "samples": len(samples_formed),
                 "untied_comparisons": sum(1 for pid in p_pair if pair_of[pid]["preferred"] is not None),
                 "tied_comparisons": sum(1 for pid in p_pair if pair_of[pid]["preferred"] is None)},
  }
  if n_formed:
    right_agree = [c for c in agree if c is not None]
    right_contra = [c for c in contra if c is not None]
    out["listener"] = {
        "contradiction_rate": len(contra) / n_formed, "well_formed_samples": n_formed,
        "agree": len(agree), "contradict": len(contra),
        "accuracy_when_agree": _mean(right_agree), "accuracy_when_contradict": _mean(right_contra),
        "listener_accuracy": _mean(listener_right)}
  ranked = [g for g in groups if g.ranks is not None and len(g.images) > 2] if mode != "untied" else []
  if ranked:
    judged: dict[str, dict] = {}
    for pid, ps in p_pair.items():
      rec = pair_of[pid]
      judged.setdefault(rec["group"], {})[(rec["i"], rec["j"])] = float(np.mean(ps))
    rankings, scores, partial = [], [], 0
    for g in ranked:
      if g.group_id not in judged:
        continue
      # A prompt cut short (--max-pairs smaller than its comparisons) is left out: its images were
      # not all judged against the same opponents, so their scores are not comparable. (Images
      # never judged, e.g. missing files, leave the ranking below, the rest stays complete.)
      seen = {k for pair in judged[g.group_id] for k in pair}
      if any(i in seen and j in seen and (i, j) not in judged[g.group_id]
             for i, j in comparisons(g, mode, anchors, seed)):
        partial += 1
        continue
      n = len(g.images)
      s = image_scores(n, judged[g.group_id], anchors_of(g.group_id, n, anchors, seed)
                       if mode == "anchors" and anchors < n - 1 else None)
      keep = ~np.isnan(s)  # images never judged (e.g. missing files) leave the ranking
      rankings.append(np.asarray(g.ranks)[keep])
      scores.append(s[keep])
    correct, counted = imagereward_counts(rankings, scores)
    out["imagereward_protocol"] = {"accuracy": correct / counted if counted else None,
                                   "pairs": counted, "prompts": len(rankings), "partial_prompts_left_out": partial}
  return out
