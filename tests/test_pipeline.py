"""The Grain pipeline: deterministic, per-process slices that add up to the global batch, order swap
with the label following, exact resume, bad images skipped and counted (also through workers)."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from lgrpo_jax.data import ImageError, process_image
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.sources import DataError, PreferencePair
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


@pytest.mark.parametrize("small", [True, False], ids=["stored permutation", "grain's shuffle"])
def test_every_epoch_is_a_new_permutation_fixed_by_the_seed(monkeypatch, small):
  """Both shuffles (a stored permutation below SMALL_SHUFFLE elements, grain's above) visit every
  element once per epoch, in an order that changes with the epoch and the seed only."""
  import grain
  from lgrpo_jax.data import pipeline
  monkeypatch.setattr(pipeline, "SMALL_SHUFFLE", 1 << 16 if small else 0)
  n = 37
  base = grain.MapDataset.range(n)
  chosen = pipeline.shuffled(base, seed=5)
  assert isinstance(chosen, pipeline._SmallShuffle) == small
  order = lambda ds: [ds[i] for i in range(3 * n)]
  a = order(chosen)
  epochs = [a[e * n:(e + 1) * n] for e in range(3)]
  assert all(sorted(ep) == list(range(n)) for ep in epochs)
  assert epochs[0] != list(range(n)) and len({tuple(ep) for ep in epochs}) == 3
  assert a == order(pipeline.shuffled(base, seed=5)) and a != order(pipeline.shuffled(base, seed=6))
  assert order(pipeline.shuffled(base, seed=5).repeat(3)) == a  # as make_batches uses it


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
  # The other mode's position (pipeline.group_by_grid changed on a resume, as moving a one-process
  # run to several processes needs): one error saying so, both ways (a bare KeyError: 'plan' /
  # 'next_index' before)
  plain_cfg = dataclass_replace(cfg, group_by_grid=False)
  plain = make_batches(PAIRS, tok, plain_cfg)
  take(plain, 1)
  for saved, reader, now in ((state, make_batches(PAIRS, tok, plain_cfg), "false"),
                             (json.loads(json.dumps(plain.get_state())), make_batches(PAIRS, tok, cfg), "true")):
    with pytest.raises(DataError, match=rf"saved data position is the pipeline's with pipeline.group_by_grid="
                                        rf"{'true' if now == 'false' else 'false'}, and this run has {now}"):
      reader.set_state(saved)


def bad_pairs(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
  return PAIRS[:6] + [PreferencePair("bad-1", "a cat", (str(tmp_path / "missing.png"), PAIRS[0].images[0]), 0),
                      PreferencePair("bad-2", "a dog", (PAIRS[0].images[1], str(tmp_path / "broken.png")), 1)]


def test_bad_images_skipped_and_counted_batches_stay_full(tok, tmp_path):
  cfg = PipelineConfig(global_batch=3, seed=0, num_epochs=1, bad_records="skip")
  it = make_batches(bad_pairs(tmp_path), tok, cfg)
  batches = list(it)
  assert [len(b["labels"]) for b in batches] == [3, 3]  # 6 good pairs, 2 bad ones skipped
  # counted by reason: a file that is not there, and one that does not decode
  assert it.report.skipped["missing_image"] == 1 and it.report.skipped["bad_image"] == 1
  assert "pair bad-1 image" in it.report.examples["missing_image"][0]
  assert "missing.png" in it.report.examples["missing_image"][0]
  assert "pair bad-2 image" in it.report.examples["bad_image"][0]
  assert "broken.png" in it.report.examples["bad_image"][0]


def test_processes_count_each_skip_once_also_after_the_last_batch(tok, tmp_path):
  """Summed over processes, the skip counts are the one-process counts — also for bad pairs met
  after the last full batch, which no batch reports (`Batches` reports them at the end)."""
  cfg = PipelineConfig(global_batch=2, shuffle=False, num_epochs=1, bad_records="skip")
  for pairs in (bad_pairs(tmp_path), bad_pairs(tmp_path)[6:] + PAIRS[:4]):  # bad ones last, then first
    counts = []
    for n in (1, 2):
      its = [make_batches(pairs, tok, cfg, process_index=p, process_count=n) for p in range(n)]
      for it in its:
        list(it)
      counts.append({k: sum(it.report.skipped[k] for it in its) for k in ("missing_image", "bad_image")})
    # plain batching (one process only): the bad pairs after the last full batch were lost
    plain = make_batches(pairs, tok, dataclass_replace(cfg, group_by_grid=False))
    list(plain)
    counts.append(dict(plain.report.skipped))
    assert counts[0] == counts[1] == counts[2] == {"missing_image": 1, "bad_image": 1}, counts


@pytest.mark.parametrize("grouped", [True, False])
def test_pairs_a_custom_source_gets_wrong_are_named_or_skipped(tok, grouped):
  """A custom list may hold what the built-in sources refuse: a label outside {0, 1}, not two
  images, a prompt that is not a string, or one holding image-structure tokens (which shifted the
  placeholders). Each is a DataError naming the pair, or under skip a counted skip."""
  good = PAIRS[:4]
  bad = [dataclass_replace(PAIRS[4], label=2), dataclass_replace(PAIRS[5], label=True),
         dataclass_replace(PAIRS[6], images=PAIRS[6].images[:1]),
         dataclass_replace(PAIRS[7], images=(None, PAIRS[7].images[1])),
         dataclass_replace(PAIRS[8], prompt=None),
         dataclass_replace(PAIRS[9], prompt="a cat <|image_pad|> on a mat")]
  cfg = PipelineConfig(global_batch=2, shuffle=False, num_epochs=1, group_by_grid=grouped)
  for b in bad:
    with pytest.raises(DataError, match=rf"pair {b.pair_id}: "):
      list(make_batches([b] + list(good), tok, cfg))
  it = make_batches(bad + list(good), tok, dataclass_replace(cfg, bad_records="skip"))
  kept = [i for batch in it for i, v in zip(batch["pair_ids"], batch["valid"]) if v]
  assert sorted(kept) == sorted(p.pair_id for p in good)
  assert dict(it.report.skipped) == {"bad_label": 2, "bad_schema": 3, "bad_prompt": 1}


def test_bad_image_error_policy_names_pair_and_file(tok, tmp_path):
  cfg = PipelineConfig(global_batch=8, seed=0, num_epochs=1)
  with pytest.raises(ImageError, match=r"pair bad-\d image \d \(.*(missing|broken)\.png\)"):
    list(make_batches(bad_pairs(tmp_path), tok, cfg))


def test_last_partial_batch_is_kept_and_buckets_are_reported(tok):
  cfg = PipelineConfig(global_batch=4, num_epochs=1, length_buckets=(128, 256))
  it = make_batches(PAIRS[:10], tok, cfg)
  batches = list(it)
  # Grouped (default): fixed shapes, the last batch padded with rows marked invalid.
  assert [len(b["labels"]) for b in batches] == [4, 4, 4]
  assert [int(b["valid"].sum()) for b in batches] == [4, 4, 2] and it.report.pairs == 10
  assert sorted(i for b in batches for i, v in zip(b["pair_ids"], b["valid"]) if v) == \
      sorted(p.pair_id for p in PAIRS[:10])
  assert it.lengths_seen == {256}
  plain = make_batches(PAIRS[:10], tok, dataclass_replace(cfg, group_by_grid=False))
  assert [len(b["labels"]) for b in plain] == [4, 4, 2] and plain.report.pairs == 10
  with pytest.raises(ValueError, match=r"pair \S+: prompt of \d+ tokens is longer than the largest length bucket 128"):
    next(make_batches(PAIRS, tok, PipelineConfig(global_batch=2, length_buckets=(128,))))
  # One over-long prompt: under bad_records=skip that pair alone is left out (counted), the run goes on.
  long = [dataclass_replace(PAIRS[3], prompt=" ".join(["a red circle"] * 80))] + list(PAIRS[:3])
  it = make_batches(long, tok, dataclass_replace(cfg, bad_records="skip"))
  kept = [i for b in it for i, v in zip(b["pair_ids"], b["valid"]) if v]
  assert sorted(kept) == sorted(p.pair_id for p in PAIRS[:3]) and it.report.skipped == {"prompt_too_long": 1}
  assert it.report.examples["prompt_too_long"] == [f"pair {PAIRS[3].pair_id}"]


def test_a_prompt_the_normaliser_lengthens_is_skipped_not_fatal(tok, tmp_path):
  # Qwen2's tokenizer.json declares an NFC normaliser, which turns U+FB2C's 3 UTF-8 bytes into 6: a
  # prompt planned as fitting (one token per byte at most) was 857 tokens against a bucket of 512,
  # and under bad_records=skip the run stopped on a DataError naming an innocent pair beside it.
  import shutil

  from lgrpo_jax.data.pipeline import _prompts
  d = tmp_path / "nfc"
  shutil.copytree(tok.name_or_path, d)
  spec = json.loads((d / "tokenizer.json").read_text())
  spec["normalizer"] = {"type": "NFC"}
  (d / "tokenizer.json").write_text(json.dumps(spec))
  nfc = AutoTokenizer.from_pretrained(d)
  cfg = PipelineConfig(global_batch=2, num_epochs=1, shuffle=False, length_buckets=(512,), bad_records="skip")
  grids = make_batches(PAIRS[:1], nfc, cfg).__next__()["image_grid_thw"]
  base = len(_prompts(nfc, "", [tuple(g) for g in grids[:2]], cfg)["input_ids"])
  long = dataclass_replace(PAIRS[3], prompt="\ufb2c" * ((512 - base - 8) // 3))
  assert len(_prompts(nfc, long.prompt, [tuple(g) for g in grids[:2]], cfg)["input_ids"]) > 512
  it = make_batches([long] + list(PAIRS[:3]), nfc, cfg)
  kept = [i for b in it for i, v in zip(b["pair_ids"], b["valid"]) if v]
  assert sorted(kept) == sorted(p.pair_id for p in PAIRS[:3]) and it.report.skipped == {"prompt_too_long": 1}


@pytest.mark.parametrize("grouped", [True, False], ids=["threads (grouped)", "processes (plain)"])
def test_workers_give_the_same_batches_and_counts(tok, tmp_path, grouped):
  cfg = PipelineConfig(global_batch=3, seed=5, num_epochs=1, bad_records="skip", group_by_grid=grouped)
  ref = list(make_batches(bad_pairs(tmp_path), tok, cfg))
  it = make_batches(bad_pairs(tmp_path), tok, dataclass_replace(cfg, worker_count=2))
  got = list(it)
  assert [b["pair_ids"] for b in got] == [b["pair_ids"] for b in ref]
  assert it.report.skipped["bad_image"] == 1 and it.report.skipped["missing_image"] == 1
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


def mixed_pairs(n=30):
  """Pairs whose images come in three sizes (two aspect ratios), mixed within and across pairs."""
  sizes = [(84, 84), (112, 112), (84, 140)]
  out = []
  for k, p in enumerate(synthetic(n, seed=11, image_size=84)):
    a, b = (Image.open(io.BytesIO(im)).resize(sizes[(k + j * (k // 3)) % 3][::-1])
            for j, im in enumerate(p.images))
    out.append(PreferencePair(p.pair_id, p.prompt, (a, b), p.label))
  return out


def test_grouping_gives_one_grid_signature_per_batch_and_loses_nothing(tok):
  pairs = mixed_pairs()
  it = make_batches(pairs, tok, PipelineConfig(global_batch=4, seed=0, num_epochs=1))
  batches = list(it)
  for b in batches:
    grids = [tuple(g) for g in b["image_grid_thw"].tolist()]
    assert len(set(grids[0::2])) == 1 and len(set(grids[1::2])) == 1  # one (grid 1, grid 2) per batch
    n = sum(t * h * w for t, h, w in grids)
    assert b["pixel_values"].shape[0] == n
  used = [i for b in batches for i, v in zip(b["pair_ids"], b["valid"]) if v]
  assert sorted(used) == sorted(p.pair_id for p in pairs) and it.report.pairs == len(pairs)
  signatures = {(tuple(b["image_grid_thw"][0]), tuple(b["image_grid_thw"][1])) for b in batches}
  assert 3 < len(signatures) <= 9 and len(it.grids_seen) == len(signatures)
  # Without grouping the same data gives (almost) one grid tuple per batch.
  plain = make_batches(pairs, tok, PipelineConfig(global_batch=4, seed=0, num_epochs=1, group_by_grid=False))
  assert all(len({tuple(g) for g in b["image_grid_thw"].tolist()}) > 1 for b in plain)


def test_grid_buckets_bound_the_shapes(tok):
  from lgrpo_jax.data.images import ImageConfig
  cfg = PipelineConfig(global_batch=4, seed=0, num_epochs=1, image=ImageConfig(grid_buckets=((112, 112),)))
  it = make_batches(mixed_pairs(), tok, cfg)
  list(it)
  assert it.grids_seen == {((1, 8, 8),) * 8}


def test_processes_build_the_same_shapes_and_add_up_with_mixed_grids(tok):
  pairs = mixed_pairs()
  cfg = PipelineConfig(global_batch=4, seed=3, num_epochs=1)
  one = list(make_batches(pairs, tok, cfg))
  parts = [list(make_batches(pairs, tok, cfg, process_index=p, process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(one)
  for g, a, b in zip(one, *parts):
    for k in ("input_ids", "pixel_values", "image_grid_thw", "listener_input_ids"):
      assert a[k].shape == b[k].shape  # every process builds the same shapes
    valid = np.concatenate([a["valid"], b["valid"]])
    np.testing.assert_array_equal(valid, g["valid"])
    ok = valid.astype(bool)  # padding rows are placeholders: only real rows must agree
    np.testing.assert_array_equal(np.concatenate([a["input_ids"], b["input_ids"]])[ok], g["input_ids"][ok])
    rows = lambda x: x.reshape(4 if x is g["pixel_values"] else 2, -1)  # one grid signature per batch
    np.testing.assert_array_equal(np.concatenate([rows(a["pixel_values"]), rows(b["pixel_values"])])[ok],
                                  rows(g["pixel_values"])[ok])
  with pytest.raises(ValueError, match="group_by_grid=True with several processes"):
    make_batches(pairs, tok, dataclass_replace(cfg, group_by_grid=False), process_index=0, process_count=2)


def test_grouped_resume_restores_the_pairs_waiting_in_groups(tok):
  pairs = mixed_pairs()
  cfg = PipelineConfig(global_batch=4, seed=9)
  it = make_batches(pairs, tok, cfg)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state["grain"]["waiting"]  # some pairs wait in incomplete groups
  expected = take(it, 10)  # crosses the epoch boundary
  again = make_batches(pairs, tok, cfg)
  again.set_state(state)
  got = take(again, 10)
  assert [b["pair_ids"] for b in got] == [b["pair_ids"] for b in expected]
  for x, y in zip(got, expected):
    np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])


def test_grouped_bad_data_after_a_good_header_gives_an_invalid_row(tok, tmp_path):
  noise = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(noise, "PNG")
  (tmp_path / "cut.png").write_bytes(noise.getvalue()[:len(noise.getvalue()) // 2])  # header fine, pixels cut
  pairs = PAIRS[:5] + [PreferencePair("cut-1", "a cat", (str(tmp_path / "cut.png"), PAIRS[0].images[1]), 0),
                       PreferencePair("gone-1", "a dog", (str(tmp_path / "gone.png"), PAIRS[0].images[1]), 0)]
  cfg = PipelineConfig(global_batch=3, seed=0, num_epochs=1, bad_records="skip")
  it = make_batches(pairs, tok, cfg)
  batches = list(it)
  rows = {i: int(v) for b in batches for i, v in zip(b["pair_ids"], b["valid"])}
  assert rows["cut-1"] == 0 and "gone-1" not in rows  # decode failure: placeholder; header failure: skipped
  assert it.report.skipped["bad_image"] == 1 and it.report.skipped["missing_image"] == 1
  assert it.report.pairs == 5
  with pytest.raises(ImageError, match=r"pair (cut|gone)-1 image [12] \(.*(cut|gone)\.png\)"):
    list(make_batches(pairs, tok, dataclass_replace(cfg, bad_records="error")))


def test_listener_prefix_is_in_the_batch(tok):
  from lgrpo_jax.data.prompts import listener_parts
  batch = next(make_batches(PAIRS, tok, PipelineConfig(global_batch=3, seed=1)))
  by_id = {p.pair_id: p for p in PAIRS}
  for r, pid in enumerate(batch["pair_ids"]):
    want = listener_parts(tok, by_id[pid].prompt, [(1, 6, 6), (1, 6, 6)])[0]
    got = batch["listener_input_ids"][r][batch["listener_attention_mask"][r] > 0]
    np.testing.assert_array_equal(got, want)
  assert "listener_input_ids" not in next(make_batches(PAIRS, tok, PipelineConfig(global_batch=3, listener=False)))


def test_many_image_sizes_in_the_grouped_pipeline_are_warned_of(tok, monkeypatch, caplog):
  # Every pair of its own grid: the grouped pipeline read ~16 passes over 300 pairs before its first
  # batch, its resume state 187 KB, silently. Now it says so once, naming the settings that help.
  import logging

  from lgrpo_jax.data import pipeline
  monkeypatch.setattr(pipeline, "WARN_WAITING_GROUPS", 3)
  pairs = [PreferencePair(f"p{k}", "a cat", (Image.new("RGB", (56 + 28 * k, 56)),) * 2, 0) for k in range(6)]
  cfg = PipelineConfig(global_batch=2, num_epochs=1, shuffle=False, length_buckets=(512,))
  with caplog.at_level(logging.WARNING, logger="lgrpo_jax.data.pipeline"):
    assert len(list(make_batches(pairs, tok, cfg))) == 6  # each a batch of its own at the end
  warned = [r.getMessage() for r in caplog.records if "image-grid groups" in r.getMessage()]
  assert len(warned) == 1 and "pipeline.image.grid_buckets" in warned[0], warned
