"""The Grain pipeline: deterministic, per-process slices that add up to the global batch, order swap
with the label following, exact resume, bad images skipped and counted (also through workers)."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from lgrpo_jax.data import ImageError, process_image
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.sources import PreferencePair
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer

PAIRS = list(synthetic(24, seed=7, image_size=84))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def take(batches, n):
  return [next(batches) for _ in range(n)]


def test_same_seed_same_batches_other_seed_differs(tok):
  cfg = PipelineConfig(global_batch=4, seed=3)
  a = take(make_batches(PAIRS, tok, cfg), 3)
  b = take(make_batches(PAIRS, tok, cfg), 3)
  c = take(make_batches(PAIRS, tok, PipelineConfig(global_batch=4, seed=4)), 3)
  for x, y in zip(a, b):
    assert x["pair_ids"] == y["pair_ids"]
    for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels"):
      np.testing.assert_array_equal(x[k], y[k])
  assert [x["pair_ids"] for x in a] != [x["pair_ids"] for x in c]


def test_process_slices_add_up_to_the_global_batch(tok):
  cfg = PipelineConfig(global_batch=4, seed=1)
  one = take(make_batches(PAIRS, tok, cfg), 3)
  parts = [take(make_batches(PAIRS, tok, cfg, process_index=p, process_count=2), 3) for p in range(2)]
  for step in range(3):
    local = [parts[p][step] for p in range(2)]
    assert all(len(x["labels"]) == 2 for x in local)
    ids = {i: l for x in local for i, l in zip(x["pair_ids"], x["labels"])}
    assert ids == dict(zip(one[step]["pair_ids"], one[step]["labels"]))  # same pairs, same swaps
  with pytest.raises(ValueError, match="global_batch 4 is not divisible by 3 processes"):
    make_batches(PAIRS, tok, cfg, process_index=0, process_count=3)


def test_swap_moves_images_and_label_follows(tok):
  batch = next(make_batches(PAIRS, tok, PipelineConfig(global_batch=8, seed=0)))
  by_id = {p.pair_id: p for p in PAIRS}
  n = 36  # patches per 84x84 image
  swapped = 0
  for r, pid in enumerate(batch["pair_ids"]):
    pair = by_id[pid]
    preferred = process_image(pair.images[pair.label])[0]
    got = batch["pixel_values"][(2 * r + batch["labels"][r]) * n:(2 * r + batch["labels"][r] + 1) * n]
    np.testing.assert_array_equal(got, preferred)
    swapped += int(batch["labels"][r] != pair.label)
  assert 0 < swapped < 8


def test_resume_from_state_gives_the_same_next_batches(tok):
  cfg = PipelineConfig(global_batch=4, seed=2)
  it = make_batches(PAIRS, tok, cfg)
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # saved with a checkpoint
  expected = take(it, 8)  # crosses an epoch boundary (24 pairs = 6 batches)
  again = make_batches(PAIRS, tok, cfg)
  again.set_state(state)
  assert [b["pair_ids"] for b in take(again, 8)] == [b["pair_ids"] for b in expected]
  assert again.report.pairs == it.report.pairs


def bad_pairs(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
  return PAIRS[:6] + [PreferencePair("bad-1", "a cat", (str(tmp_path / "missing.png"), PAIRS[0].images[0]), 0),
                      PreferencePair("bad-2", "a dog", (PAIRS[0].images[1], str(tmp_path / "broken.png")), 1)]


def test_bad_images_skipped_and_counted_batches_stay_full(tok, tmp_path):
  cfg = PipelineConfig(global_batch=3, seed=0, num_epochs=1, bad_records="skip")
  it = make_batches(bad_pairs(tmp_path), tok, cfg)
  batches = list(it)
  assert [len(b["labels"]) for b in batches] == [3, 3]  # 6 good pairs, 2 bad ones skipped
  assert it.report.skipped["bad_image"] == 2
  where = " ".join(it.report.examples["bad_image"])
  assert "pair bad-1 image" in where and "pair bad-2 image" in where
  assert "missing.png" in where and "broken.png" in where


def test_bad_image_error_policy_names_pair_and_file(tok, tmp_path):
  cfg = PipelineConfig(global_batch=8, seed=0, num_epochs=1)
  with pytest.raises(ImageError, match=r"pair bad-\d image \d \(.*(missing|broken)\.png\)"):
    list(make_batches(bad_pairs(tmp_path), tok, cfg))


def test_last_partial_batch_is_kept_and_buckets_are_reported(tok):
  it = make_batches(PAIRS[:10], tok, PipelineConfig(global_batch=4, num_epochs=1, length_buckets=(128, 256)))
  sizes = [len(b["labels"]) for b in it]
  assert sizes == [4, 4, 2] and it.report.pairs == 10
  assert it.lengths_seen == {256}
  with pytest.raises(ValueError, match="longer than the largest length bucket 128"):
    next(make_batches(PAIRS, tok, PipelineConfig(global_batch=2, length_buckets=(128,))))


def test_workers_give_the_same_batches_and_counts(tok, tmp_path):
  cfg = PipelineConfig(global_batch=3, seed=5, num_epochs=1, bad_records="skip")
  ref = list(make_batches(bad_pairs(tmp_path), tok, cfg))
  it = make_batches(bad_pairs(tmp_path), tok, dataclass_replace(cfg, worker_count=2))
  got = list(it)
  assert [b["pair_ids"] for b in got] == [b["pair_ids"] for b in ref]
  assert it.report.skipped["bad_image"] == 2
  # resume through worker processes
  first = make_batches(bad_pairs(tmp_path), tok, dataclass_replace(cfg, worker_count=2))
  next(first)
  state = json.loads(json.dumps(first.get_state()))
  again = make_batches(bad_pairs(tmp_path), tok, dataclass_replace(cfg, worker_count=2))
  again.set_state(state)
  assert next(again)["pair_ids"] == ref[1]["pair_ids"]


def dataclass_replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)


def test_both_orders_for_evaluation(tok):
  it = make_batches(PAIRS[:3], tok, PipelineConfig(global_batch=2, num_epochs=1, both_orders=True))
  batches = list(it)
  ids = [i for b in batches for i in b["pair_ids"]]
  labels = [int(l) for b in batches for l in b["labels"]]
  assert ids == [p.pair_id for p in PAIRS[:3] for _ in range(2)]
  assert labels == [l for p in PAIRS[:3] for l in (p.label, 1 - p.label)]
  n = 36
  first = batches[0]["pixel_values"]
  np.testing.assert_array_equal(first[:n], first[3 * n:4 * n])  # image 1 of row 0 = image 2 of row 1
