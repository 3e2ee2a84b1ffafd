"""Preference-pair sources over local files: ImageReward test set, HPDv2 train/test, Rapidata parquet.

Every source yields `PreferencePair`s (prompt, two images, which one people preferred) and reports
what it left out through one `Report`: pairs skipped by protocol (ties in a human ranking) and bad
records, handled by policy — `error` stops with the file and record id, `skip` counts per reason
and keeps the first few ids. Nothing is dropped silently.

Formats (docs/data.md):
  ImageReward test.json  [{id, prompt, generations: [path], ranking: [int]}], rank 1 best, ties
                         allowed; every untied pair within a prompt is a pair (THUDM protocol).
  HPDv2 train.json       [{prompt, human_preference: [0|1, 0|1], file_path|image_path: [a, b], ...}]
  HPDv2 test.json        [{prompt, image_path: [path], rank: [int] (lower better), ...}]
  Rapidata parquet       prompt, image1, image2 (bytes, path or {bytes, path}), votes_image1,
                         votes_image2; more votes wins, exact ties dropped and counted
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import os
from typing import Iterator

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")


class DataError(ValueError):
  """A record that cannot be used, naming the file and record."""


class DataStall(DataError):
  """No batch within `pipeline.stall_timeout_s`: the data source hangs (not a bad record)."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  pair_id: str  # stable id: "<record id>:<i>-<j>"
  prompt: str
  images: tuple[str, str]  # paths (resolved under the image root) or encoded image bytes
  label: int  # 0: images[0] preferred, 1: images[1] preferred


@dataclasses.dataclass(frozen=True)
class Group:
  """One prompt with N ≥ 2 images and, when people ranked them, their ranks (lower is better, ties
  allowed): an ImageReward / HPDv2-test record, or one pair of a pair source (ranks (1, 2) or (2, 1))."""
  group_id: str
  prompt: str
  images: tuple  # paths (resolved under the image root) or encoded image bytes
  ranks: tuple[int, ...] | None = None


class Report:
  """Counts of what a source or pipeline left out, and the bad-record policy."""

  def __init__(self, policy: str = "error", keep_ids: int = 5):
    if policy not in POLICIES:
      raise ValueError(f"bad-record policy {policy!r}: choose one of {POLICIES}")
    self.policy, self.keep_ids = policy, keep_ids
    self.skipped: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self.pairs = 0

  def protocol_skip(self, reason: str, n: int = 1) -> None:
    """Left out by design (e.g. tied pairs), not an error."""
    self.skipped[reason] += n

  def bad(self, reason: str, where: str, detail: str) -> None:
    """A bad record: raise (policy 'error') or count and log the first few (policy 'skip')."""
    if self.policy == "error":
      raise DataError(f"{where}: {detail}")
    self.skipped[reason] += 1
    if len(self.examples[reason]) < self.keep_ids:
      self.examples[reason].append(where)
      log.warning("skipping %s: %s", where, detail)

  def summary(self) -> dict:
    return {"pairs": self.pairs, "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()}}


def subsample(pair_id: str, fraction: float, seed: int = 0) -> bool:
  """Deterministic keep/drop by a hash of the pair id (same on every machine and run)."""
  if fraction >= 1:
    return True
  h = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2**64 < fraction


def _load_json_list(path: str) -> list:
  if not os.path.isfile(path):
    raise DataError(f"{path}: " + ("a directory, not a JSON file" if os.path.isdir(path) else "file not found"))
  from lgrpo_jax.safetensors_io import read_json
  data = read_json(path, DataError)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  return data


def _field(rec, name, kind, where, report: Report, reason="bad_schema"):
  value = rec.get(name) if isinstance(rec, dict) else None
  if value is None:
    report.bad(reason, where, f"missing field '{name}'")
    return None
  if not isinstance(value, kind):
    report.bad(reason, where, f"field '{name}' should be {getattr(kind, '__name__', kind)}, "
                              f"got {type(value).__name__}")
    return None
  return value


def _prompt(rec, where, report):
  prompt = _field(rec, "prompt", str, where, report)
  if prompt is not None and not prompt.strip():
    report.bad("empty_prompt", where, "empty prompt")
    return None
  if prompt is not None:
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON): no text can hold it
      report.bad("bad_prompt", where, f"prompt is not valid Unicode text ({e.reason} at character {e.start})")
      return None
  return prompt


def _ranked_pairs(rid, prompt, images, ranks, report: Report) -> Iterator[PreferencePair]:
  """Every pair within a ranked list; lower rank preferred; ties skipped and counted."""
  for i in range(len(images)):
    for j in range(i + 1, len(images)):
      if ranks[i] == ranks[j]:
        report.protocol_skip("tied_in_human_ranking")
        continue
      report.pairs += 1
      yield PreferencePair(f"{rid}:{i}-{j}", prompt, (images[i], images[j]), int(ranks[j] < ranks[i]))


def _resolve(root, paths):
  return [p if root is None or os.path.isabs(p) else os.path.join(root, p) for p in paths]


def _ranking_record(rec, where, path_key, rank_key, root, report):
  prompt = _prompt(rec, where, report)
  paths = _field(rec, path_key, list, where, report) if prompt is not None else None
  ranks = _field(rec, rank_key, list, where, report) if paths is not None else None
  if ranks is None:
    return None
  if len(ranks) != len(paths):
    report.bad("bad_label", where, f"'{rank_key}' has {len(ranks)} entries but '{path_key}' has {len(paths)}")
    return None
  # Only the order counts (lower is better; equal is a tie), so 0-based ranks and averaged
  # (fractional) ones are read as they are; what has no order is refused.
  if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
             for r in ranks):
    report.bad("bad_label", where, f"'{rank_key}' must hold non-negative numbers (lower is better), got {ranks}")
    return None
  if not all(isinstance(p, str) and p for p in paths):
    report.bad("bad_schema", where, f"'{path_key}' must hold non-empty paths")
    return None
  if len(paths) < 2:
    report.bad("bad_schema", where, f"'{path_key}' has {len(paths)} image(s); a ranking needs at least 2")
    return None
  return prompt, _resolve(root, paths), ranks


def ranked_groups(path, kind: str = "imagereward", image_root=None,
                  report: Report | None = None) -> Iterator[Group]:
  """The records of a ranked test file as groups: `kind` 'imagereward' (test.json: id, generations,
  ranking) or 'hpdv2_test' (test.json: image_path, rank; the group id is the record index)."""
  keys = {"imagereward": ("generations", "ranking"), "hpdv2_test": ("image_path", "rank")}
  if kind not in keys:
    raise ValueError(f"ranked source {kind!r}: choose one of {sorted(keys)}")
  report = report if report is not None else Report()
  path = os.fspath(path)
  first_of: dict[str, int] = {}  # group id → its record: pair ids (and resumes, targets) key on it
  for k, rec in enumerate(_load_json_list(path)):
    # ImageReward: its id (a record without one is "record-K": it cannot collide with a real id K)
    rid = (rec.get("id", f"record-{k}") if isinstance(rec, dict) else f"record-{k}") if kind == "imagereward" else k
    where = f"{path} record {k}" + (f" (id {rid})" if kind == "imagereward" else "")
    if kind == "imagereward" and isinstance(rec, dict) and not (
        isinstance(rid, str) and rid.strip() or isinstance(rid, int) and not isinstance(rid, bool)):
      # an id of null, "" or true: named as such (it used to read as a duplicate of another record)
      report.bad("bad_schema", where, f"'id' must be a non-empty string or an integer, got {rid!r}")
      continue
    if str(rid) in first_of:
      report.bad("duplicate_id", where, f"id {rid} was already used by record {first_of[str(rid)]}")
      continue
    first_of[str(rid)] = k
    got = _ranking_record(rec, where, *keys[kind], image_root, report)
    if got is not None:
      prompt, images, ranks = got
      yield Group(str(rid), prompt, tuple(images), tuple(ranks))


def imagereward(path, image_root=None, report: Report | None = None) -> Iterator[PreferencePair]:
  """ImageReward test.json: every untied pair within a prompt (ties skipped and counted)."""
  report = report if report is not None else Report()
  for g in ranked_groups(path, "imagereward", image_root, report):
    yield from _ranked_pairs(g.group_id, g.prompt, g.images, g.ranks, report)


def hpdv2_test(path, image_root=None, report: Report | None = None) -> Iterator[PreferencePair]:
  """HPDv2 test.json: every untied pair of a prompt's images by `rank` (lower better)."""
  report = report if report is not None else Report()
  for g in ranked_groups(path, "hpdv2_test", image_root, report):
    yield from _ranked_pairs(int(g.group_id), g.prompt, g.images, g.ranks, report)


def hpdv2_train(path, image_root=None, report: Report | None = None, fraction: float = 1.0,
                seed: int = 0) -> Iterator[PreferencePair]:
  """HPDv2 train.json: one pair per record, `human_preference` marks the preferred image with 1.
  `fraction` keeps a deterministic subset (the paper trains on ~16%)."""
  report = report if report is not None else Report()
  path = os.fspath(path)
  for k, rec in enumerate(_load_json_list(path)):
    where = f"{path} record {k}"
    prompt = _prompt(rec, where, report)
    if prompt is None:
      continue
    key = "file_path" if isinstance(rec, dict) and rec.get("file_path") is not None else "image_path"
    paths = _field(rec, key, list, where, report)
    pref = _field(rec, "human_preference", list, where, report) if paths is not None else None
    if pref is None:
      continue
    if len(paths) != 2 or not all(isinstance(p, str) and p for p in paths):
      report.bad("bad_schema", where, f"'{key}' must hold exactly two paths, got {paths!r}")
      continue
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in pref) or sorted(pref) != [0, 1]:
      report.bad("bad_label", where, f"'human_preference' must be [1, 0] or [0, 1], got {pref!r}")
      continue
    pid = f"{k}:0-1"
    if not subsample(pid, fraction, seed):
      report.protocol_skip("subsampled")
      continue
    report.pairs += 1
    yield PreferencePair(pid, prompt, tuple(_resolve(image_root, paths)), pref.index(1))


RAPIDATA_COLUMNS = ("prompt", "image1", "image2", "votes_image1", "votes_image2")


def _image_cell(value, where, column, root, report):
  """A parquet image cell: encoded bytes, a path, or a datasets-style {"bytes", "path"} struct."""
  if isinstance(value, dict):
    value = value.get("bytes") or value.get("path")
  if isinstance(value, (bytes, bytearray)) and value:
    return bytes(value)
  if isinstance(value, str) and value:
    return _resolve(root, [value])[0]
  report.bad("bad_schema", where, f"column '{column}' holds no image bytes or path")
  return None


def rapidata(path, image_root=None, report: Report | None = None,
             batch_rows: int = 256) -> Iterator[PreferencePair]:
  """Rapidata-style parquet: prompt, image1, image2 (bytes or paths), votes_image1, votes_image2.
  Label = the image with more votes; exact ties are dropped and counted. Read in row batches.
  Needs pyarrow (`pip install lgrpo_jax[parquet]`)."""
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'lgrpo_jax[parquet]')") from None
  report = report if report is not None else Report()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # not parquet, truncated footer
    raise DataError(f"{path}: cannot read parquet ({e})") from None
  missing = [c for c in RAPIDATA_COLUMNS if c not in pf.schema_arrow.names]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {pf.schema_arrow.names}")
  row = 0
  for batch in pf.iter_batches(batch_size=batch_rows, columns=list(RAPIDATA_COLUMNS)):
    for rec in batch.to_pylist():
      where, k = f"{path} row {row}", row
      row += 1
      prompt = _prompt(rec, where, report)
      if prompt is None:
        continue
      va, vb = rec["votes_image1"], rec["votes_image2"]
      if not all(isinstance(v, (int, float)) and v >= 0 for v in (va, vb)):
        report.bad("bad_label", where, f"votes must be non-negative numbers, got {va!r}, {vb!r}")
        continue
      if va == vb:
        report.protocol_skip("tied_votes")
        continue
      images = []
      for c in ("image1", "image2"):  # the first bad cell skips the row: one count per record
        images.append(_image_cell(rec[c], where, c, image_root, report))
        if images[-1] is None:
          break
      if None in images:
        continue
      report.pairs += 1
      yield PreferencePair(f"{os.path.basename(path)}:{k}", prompt, tuple(images), int(vb > va))
