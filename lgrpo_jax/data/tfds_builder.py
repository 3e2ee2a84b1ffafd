"""Any pair source → a TFDS dataset in ArrayRecord files, read back by Grain without TensorFlow.

    build_tfds(pairs, data_dir, name="imagereward_test", split="test")   # once, offline
    source = tfds_pairs(data_dir, name="imagereward_test", split="test")  # random access
    batches = make_batches(source, tokenizer, cfg)

Images are stored as their encoded file bytes (read once at build time), so a run needs neither the
original image tree nor TensorFlow (tensorflow-datasets reads ArrayRecord without it). Needs the
`tfds` extra.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import numpy as np

from lgrpo_jax.data.sources import DataError, PreferencePair


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError("TFDS datasets need tensorflow-datasets (pip install 'lgrpo_jax[tfds]')") from None
  return tfds


def _image_bytes(image, where: str) -> bytes:
  if isinstance(image, (bytes, bytearray)):
    return bytes(image)
  try:
    with open(image, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{where}: cannot read image {image} ({e.strerror})") from None


def build_tfds(pairs: Iterable[PreferencePair], data_dir, name: str, split: str = "train",
               version: str = "1.0.0") -> str:
  """Writes `pairs` as TFDS dataset `name` (ArrayRecord) under `data_dir`; returns its directory."""
  tfds = _tfds()
  pairs = list(pairs)
  seen: dict[str, int] = {}
  for k, p in enumerate(pairs):  # TFDS keys examples by pair id (a repeat failed deep in its writer)
    if p.pair_id in seen:
      raise DataError(f"pair id {p.pair_id!r} of pair {k} was already used by pair {seen[p.pair_id]}: "
                      "every pair needs its own id")
    seen[p.pair_id] = k

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)

    def _info(self):
      return self.dataset_info_from_configs(
          description="lgrpo_jax preference pairs (images as encoded bytes)",
          # Stored in the source's order (TFDS orders by a hash of the key otherwise), so that
          # index i is pair i: the same seed gives the same batches from a list and from here.
          disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              "pair_id": tfds.features.Text(), "prompt": tfds.features.Text(),
              "image_0": tfds.features.Tensor(shape=(), dtype=np.object_),
              "image_1": tfds.features.Tensor(shape=(), dtype=np.object_),
              "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples()}

    def _generate_examples(self):
      for k, p in enumerate(pairs):  # integer keys: the order kept (ids are checked above)
        yield k, {"pair_id": p.pair_id, "prompt": p.prompt, "label": p.label,
                          "image_0": _image_bytes(p.images[0], f"pair {p.pair_id}"),
                          "image_1": _image_bytes(p.images[1], f"pair {p.pair_id}")}

  _Builder.name = name
  builder = _Builder(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


class TfdsPairs:
  """Random-access PreferencePairs over a built TFDS ArrayRecord split (what Grain wants)."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> PreferencePair:
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    try:
      rec = self._source[index]
      return PreferencePair(text(rec["pair_id"]), text(rec["prompt"]),
                            (bytes(rec["image_0"]), bytes(rec["image_1"])), int(rec["label"]))
    except Exception as e:  # noqa: BLE001 — a damaged ArrayRecord shard: which record, not a bare TypeError
      raise DataError(f"TFDS record {index}: cannot be read ({type(e).__name__}: {e}); is a shard "
                      "truncated? Build the dataset again") from None


def tfds_pairs(data_dir, name: str, split: str = "train") -> TfdsPairs:
  tfds = _tfds()
  path = os.fspath(data_dir)
  try:
    builder = tfds.builder_from_directory(_dataset_dir(path, name))
  except Exception as e:
    raise DataError(f"{path}: no TFDS dataset '{name}' ({e})") from None
  if split not in builder.info.splits:
    raise DataError(f"{path}: TFDS dataset '{name}' has no split {split!r} (it has {sorted(builder.info.splits)})")
  return TfdsPairs(builder.as_data_source(split=split))


def _dataset_dir(data_dir: str, name: str) -> str:
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    raise DataError(f"{data_dir}: no TFDS dataset '{name}'")
  # The newest finished version by number ("1.10.0" after "1.2.0"); TFDS's own unfinished builds
  # ("incomplete.XXXX_1.0.0", left by a killed build) are not versions.
  versions = sorted((tuple(int(p) for p in v.split(".")), v) for v in os.listdir(root)
                    if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isdir(os.path.join(root, v)))
  if not versions:
    raise DataError(f"{root}: no built version")
  return os.path.join(root, versions[-1][1])
