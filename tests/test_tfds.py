"""Pairs → TFDS ArrayRecord → Grain, without TensorFlow; images stored as bytes (self-contained)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.sources import DataError, PreferencePair
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tfds_builder import build_tfds, tfds_pairs
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer


def test_no_tensorflow_needed():
  assert importlib.util.find_spec("tensorflow") is None


def test_round_trip_and_same_batches_as_the_source(tmp_path):
  pairs = list(synthetic(9, seed=2, image_size=84))
  # one pair from image files, which are deleted after the build: the dataset must not need them
  files = tmp_path / "imgs"
  files.mkdir()
  for k in range(2):
    (files / f"{k}.png").write_bytes(pairs[0].images[k])
  pairs.append(PreferencePair("from-files", pairs[0].prompt, (str(files / "0.png"), str(files / "1.png")), 1))
  build_tfds(pairs, tmp_path / "tfds", name="pairs_test", split="train")
  shutil.rmtree(files)
  source = tfds_pairs(tmp_path / "tfds", "pairs_test", "train")
  assert len(source) == len(pairs)
  with pytest.raises(DataError, match=r"TFDS dataset 'pairs_test' has no split 'test' \(it has \['train'\]\)"):
    tfds_pairs(tmp_path / "tfds", "pairs_test", "test")
  damaged = tmp_path / "damaged"
  shutil.copytree(tmp_path / "tfds", damaged)
  for f in damaged.rglob("*array_record*"):
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)
  with pytest.raises(DataError, match=r"TFDS record 0: cannot be read .*is a shard truncated"):
    tfds_pairs(damaged, "pairs_test", "train")[0]
  got = {source[i].pair_id: source[i] for i in range(len(source))}
  assert got["from-files"].images == pairs[0].images and got["from-files"].label == 1
  for p in pairs[:-1]:
    assert got[p.pair_id] == p

  tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
  cfg = PipelineConfig(global_batch=5, seed=4, num_epochs=1)
  # Stored in the source's order (TFDS hashes keys into another order unless told not to), so the
  # same list gives the same batches from memory and from ArrayRecord.
  assert [source[i].pair_id for i in range(len(source))] == [p.pair_id for p in pairs]
  ordered = pairs[:-1] + [source[len(source) - 1]]  # the last pair's files are gone: its stored bytes
  for a, b in zip(make_batches(ordered, tok, cfg), make_batches(source, tok, cfg)):
    assert a["pair_ids"] == b["pair_ids"]
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_errors_name_pair_and_dataset(tmp_path):
  bad = [PreferencePair("p-7", "x", (str(tmp_path / "gone.png"), b"\x89PNG"), 0)]
  with pytest.raises(DataError, match=r"pair p-7: cannot read image .*gone\.png"):
    build_tfds(bad, tmp_path / "tfds", name="bad_pairs")
  with pytest.raises(DataError, match="no TFDS dataset 'nothing'"):
    tfds_pairs(tmp_path, "nothing")
  twice = [PreferencePair("p-1", "x", (b"a", b"b"), 0), PreferencePair("p-1", "y", (b"c", b"d"), 1)]
  with pytest.raises(DataError, match=r"pair id 'p-1' of pair 1 was already used by pair 0"):
    build_tfds(twice, tmp_path / "tfds", name="twice")
  assert not (tmp_path / "tfds" / "twice").exists()  # refused before TFDS wrote anything


def test_the_newest_finished_version_is_read():
  # by number, not as text ("1.10.0" after "1.9.0"), and never TFDS's unfinished build folders
  import tempfile

  from lgrpo_jax.data.tfds_builder import _dataset_dir
  with tempfile.TemporaryDirectory() as d:
    for v in ("1.9.0", "1.10.0", "incomplete.AB12CD_1.11.0", "notes"):
      os.makedirs(os.path.join(d, "pairs", v))
    assert _dataset_dir(d, "pairs") == os.path.join(d, "pairs", "1.10.0")
    os.makedirs(os.path.join(d, "only_incomplete", "incomplete.X_1.0.0"))
    with pytest.raises(DataError, match="no built version"):
      _dataset_dir(d, "only_incomplete")
