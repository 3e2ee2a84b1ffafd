"""Preference-pair sources on the real ImageReward annotations and on HPDv2-format files with dirt."""

import json
import os

import pytest

from conftest import shared_dir
from lgrpo_jax.data.sources import (DataError, Report, hpdv2_test, hpdv2_train, imagereward, rapidata,
                                    subsample)

IR = os.path.join(shared_dir(), "data", "imagereward", "test.json")


def test_real_imagereward_counts_match_an_independent_count():
  with open(IR) as f:
    records = json.load(f)
  untied = tied = 0
  for r in records:  # independent count: all pairs i<j, tied where the human ranks are equal
    ranks = r["ranking"]
    for i in range(len(ranks)):
      for j in range(i + 1, len(ranks)):
        tied += ranks[i] == ranks[j]
        untied += ranks[i] != ranks[j]
  report = Report()
  pairs = list(imagereward(IR, image_root="/imgs", report=report))
  assert len(records) == 466
  assert (untied, tied) == (6399, 831)  # the figures docs/data.md and docs/evaluation.md quote
  assert len(pairs) == report.pairs == untied
  assert report.skipped["tied_in_human_ranking"] == tied
  first = records[0]
  p = pairs[0]
  assert p.pair_id == f"{first['id']}:0-1" and p.prompt == first["prompt"]
  assert p.images == (os.path.join("/imgs", first["generations"][0]), os.path.join("/imgs", first["generations"][1]))
  assert p.label == int(first["ranking"][1] < first["ranking"][0])
  assert len({q.pair_id for q in pairs}) == len(pairs)


def write(tmp_path, name, data):
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


DIRTY_TRAIN = [
    {"prompt": "a cat", "human_preference": [0, 1], "file_path": ["a.png", "b.png"], "user_hash": "u"},
    {"prompt": "a dog", "human_preference": [1, 0], "image_path": ["c.png", "d.png"]},
    {"prompt": "", "human_preference": [1, 0], "image_path": ["e.png", "f.png"]},        # empty prompt
    {"prompt": "a fox", "human_preference": [2, 0], "image_path": ["g.png", "h.png"]},   # bad label
    {"prompt": "an owl", "human_preference": [1, 0]},                                    # missing paths
    {"prompt": "a bee", "human_preference": [1, 1], "image_path": ["i.png", "j.png"]},   # bad label
    {"prompt": "a hen", "human_preference": ["1", 0], "image_path": ["k.png", "l.png"]},  # bad label: a string
    {"prompt": "a cow", "human_preference": [None, 1], "image_path": ["m.png", "n.png"]},  # bad label: null
    {"prompt": "a pig", "human_preference": [True, False], "image_path": ["o.png", "p.png"]},  # bad label: bools
    "not a record",
    {"prompt": "a \ud800 rat", "human_preference": [1, 0], "image_path": ["q.png", "r.png"]},  # a lone surrogate
]


def test_hpdv2_train_skip_policy_counts_every_reason(tmp_path):
  path = write(tmp_path, "train.json", DIRTY_TRAIN)
  report = Report("skip")
  pairs = list(hpdv2_train(path, image_root="/root", report=report))
  assert [(p.prompt, p.label) for p in pairs] == [("a cat", 1), ("a dog", 0)]
  assert pairs[0].images == ("/root/a.png", "/root/b.png")
  # (a lone surrogate, valid JSON, made the pipeline's tokenizer raise a bare TypeError/UnicodeEncodeError)
  assert report.skipped == {"empty_prompt": 1, "bad_label": 5, "bad_schema": 2, "bad_prompt": 1}
  assert report.examples["bad_label"] == [f"{path} record {k}" for k in (3, 5, 6, 7, 8)]


def test_data_files_that_are_not_json_lists_name_the_file(tmp_path):
  latin1 = tmp_path / "latin1.json"
  latin1.write_bytes('[{"prompt": "café"}]'.encode("latin-1"))
  with pytest.raises(DataError, match=r"latin1\.json: not UTF-8 text"):
    list(hpdv2_train(str(latin1)))
  with pytest.raises(DataError, match=r": a directory, not a JSON file"):
    list(hpdv2_train(str(tmp_path)))


def test_hpdv2_train_error_policy_names_file_and_record(tmp_path):
  path = write(tmp_path, "train.json", DIRTY_TRAIN)
  with pytest.raises(DataError, match=r"train\.json record 2: empty prompt"):
    list(hpdv2_train(path))


def test_hpdv2_test_ranks_and_ties(tmp_path):
  path = write(tmp_path, "test.json", [
      {"prompt": "p", "image_path": ["a", "b", "c"], "rank": [2, 1, 2], "raw_annotations": []},
      {"prompt": "q", "image_path": ["d", "e"], "rank": [1]},  # length mismatch
      {"prompt": "r", "image_path": ["f", "g"], "rank": [0, 1]},  # 0-based: only the order counts
      {"prompt": "s", "image_path": ["h", "i"], "rank": [2.5, 1.5]},  # averaged ranks
      {"prompt": "t", "image_path": ["j", "k"], "rank": [-1, 1]},
      {"prompt": "u", "image_path": ["l", "m"], "rank": [1, "2"]},
  ])
  report = Report("skip")
  pairs = list(hpdv2_test(path, report=report))
  assert [(p.images, p.label) for p in pairs] == [(("a", "b"), 1), (("b", "c"), 0), (("f", "g"), 0), (("h", "i"), 1)]
  assert report.skipped == {"tied_in_human_ranking": 1, "bad_label": 3}


def test_imagereward_duplicate_ids_and_single_images_are_counted(tmp_path):
  path = write(tmp_path, "test.json", [
      {"id": "x", "prompt": "p", "generations": ["a", "b"], "ranking": [1, 2]},
      {"id": "x", "prompt": "q", "generations": ["c", "d"], "ranking": [2, 1]},  # the same id again
      {"id": "y", "prompt": "r", "generations": ["e"], "ranking": [1]},  # one image: no pair
  ])
  report = Report("skip")
  pairs = list(imagereward(path, report=report))
  assert [(p.pair_id, p.images) for p in pairs] == [("x:0-1", ("a", "b"))]
  assert report.skipped == {"duplicate_id": 1, "bad_schema": 1}
  with pytest.raises(DataError, match=r"record 1 \(id x\): id x was already used by record 0"):
    list(imagereward(path))
  # A null id is named as such (it read as a duplicate of the next null); a record without one is
  # "record-K", which a real id K does not collide with.
  path = write(tmp_path, "ids.json", [
      {"id": None, "prompt": "p", "generations": ["a", "b"], "ranking": [1, 2]},
      {"id": "1", "prompt": "q", "generations": ["c", "d"], "ranking": [2, 1]},
      {"prompt": "r", "generations": ["e", "f"], "ranking": [1, 2]}, {"id": "2", "prompt": "s",
                                                                     "generations": ["g", "h"], "ranking": [1, 2]}])
  report = Report("skip")
  assert [p.pair_id for p in imagereward(path, report=report)] == ["1:0-1", "record-2:0-1", "2:0-1"]
  assert report.skipped == {"bad_schema": 1}
  with pytest.raises(DataError, match=r"record 0 \(id None\): 'id' must be a non-empty string or an integer"):
    list(imagereward(path))
  # A record that is not an object is "record-K" too: a later real id "K" is not its duplicate.
  path = write(tmp_path, "nondict.json", ["not a record", {"id": "0", "prompt": "q", "generations": ["c", "d"],
                                                          "ranking": [2, 1]}])
  report = Report("skip")
  assert [p.pair_id for p in imagereward(path, report=report)] == ["0:0-1"]
  assert "duplicate_id" not in report.skipped and sum(report.skipped.values()) == 1
  # HPDv2: a file_path that is not a list is named as itself (it was reported as a missing image_path)
  path = write(tmp_path, "train.json", [{"prompt": "p", "human_preference": [1, 0], "file_path": "a.png"}])
  with pytest.raises(DataError, match=r"field 'file_path' should be list, got str"):
    list(hpdv2_train(path))
  # … and a null file_path beside a good image_path reads the image_path
  path = write(tmp_path, "train2.json", [{"prompt": "p", "human_preference": [1, 0], "file_path": None,
                                          "image_path": ["a.png", "b.png"]}])
  assert [p.images for p in hpdv2_train(path)] == [("a.png", "b.png")]


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"), (json.dumps({"a": 1}), "expected a JSON list of records"),
    # a bare RecursionError / ValueError from the json module before
    ("[" * 100000 + "]" * 100000, r"x\.json: not JSON this reader can take \(RecursionError"),
    ('[{"id": ' + "9" * 5000 + "}]", r"x\.json: not JSON this reader can take \(ValueError: Exceeds the limit")])
def test_bad_files(tmp_path, content, match):
  (tmp_path / "x.json").write_text(content)
  with pytest.raises(DataError, match=match):
    list(imagereward(tmp_path / "x.json"))
  with pytest.raises(DataError, match="file not found"):
    list(imagereward(tmp_path / "missing.json"))


def test_subsample_is_deterministic_and_close_to_the_fraction():
  ids = [f"{k}:0-1" for k in range(20000)]
  kept = [i for i in ids if subsample(i, 0.16, seed=1)]
  assert kept == [i for i in ids if subsample(i, 0.16, seed=1)]
  assert abs(len(kept) / len(ids) - 0.16) < 0.01
  assert kept != [i for i in ids if subsample(i, 0.16, seed=2)]


def test_rapidata_parquet_bytes_paths_ties_and_dirt(tmp_path):
  import io

  import pyarrow as pa
  import pyarrow.parquet as pq
  from PIL import Image

  from lgrpo_jax.data import process_image
  buf = io.BytesIO()
  Image.new("RGB", (60, 40), (200, 10, 10)).save(buf, "PNG")
  png = buf.getvalue()
  # Image cells as the datasets library stores them: {bytes, path} structs (bytes or a path set).
  def cells(values):
    return [{"bytes": v, "path": None} if isinstance(v, bytes) else
            v if isinstance(v, dict) else {"bytes": None, "path": v} for v in values]
  img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  empty = {"bytes": None, "path": None}  # a row with neither image: one skip, not two
  table = pa.table({"prompt": pa.array(["a red box", "tie", "", "paths", "structs", "negative", "no images"]),
                    "image1": pa.array(cells([png, png, png, "x/a.png", {"bytes": png, "path": None}, png, empty]),
                                       img),
                    "image2": pa.array(cells([png, png, png, "x/b.png", {"bytes": None, "path": "c.png"}, png, empty]),
                                       img),
                    "votes_image1": [3, 5, 1, 0, 7, -1, 1], "votes_image2": [9, 5, 0, 2, 1, 4, 2]})
  pq.write_table(table, tmp_path / "r.parquet")
  report = Report("skip")
  pairs = list(rapidata(tmp_path / "r.parquet", image_root="/root", report=report))
  assert [(p.prompt, p.label) for p in pairs] == [("a red box", 1), ("paths", 1), ("structs", 0)]
  assert pairs[1].images == ("/root/x/a.png", "/root/x/b.png")
  assert pairs[2].images == (png, "/root/c.png")
  assert process_image(pairs[0].images[0])[1] == (1, 4, 6)  # 60x40 upscaled to 84x56 by min_pixels
  assert report.skipped == {"tied_votes": 1, "empty_prompt": 1, "bad_label": 1, "bad_schema": 1}

  pq.write_table(pa.table({"prompt": ["p"], "image1": [png]}), tmp_path / "short.parquet")
  with pytest.raises(DataError, match=r"missing column\(s\) \['image2', 'votes_image1', 'votes_image2'\]"):
    list(rapidata(tmp_path / "short.parquet"))
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(DataError, match="junk.parquet: cannot read parquet"):
    list(rapidata(tmp_path / "junk.parquet"))
