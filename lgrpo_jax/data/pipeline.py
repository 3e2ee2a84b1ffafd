"""The input pipeline: preference pairs → device-ready batches, with Grain.

    pairs ─► shuffle(seed) ─► repeat ─► encode (random order swap, images, reasoner prompt)
          ─► this process's slice ─► [worker processes] ─► batch (skip bad records, pad prompts
          to a length bucket), in the main process

* Deterministic: the global order is a function of the seed; the order swap of pair k is a function
  of (seed, k); so the same seed gives the same batches with any number of workers or processes.
* Per-process: process p of P takes every P-th element, and the union of the processes' local
  batches at step s is the global batch s.
* Nothing is lost silently: an image that cannot be used stops the run naming the pair and file
  (policy 'error') or is skipped (policy 'skip') — the batcher then pulls the next pair so batches
  stay full, and each batch carries the (reason, where, detail) of what it skipped;
  `Batches.report` adds them up.
* Bounded shapes: prompts are left-padded to the smallest length bucket that fits the batch, and
  images keep their smart_resize grids (the set of grid tuples seen is reported by `Batches`).
* Checkpointable: `Batches.get_state()` / `set_state()` (JSON-able); a restored iterator yields
  exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from lgrpo_jax.data.images import ImageConfig, ImageError, process_image
from lgrpo_jax.data.prompts import PromptConfig, reasoner_ids
from lgrpo_jax.data.sources import DataError, Report

MAX_SKIPS_PER_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  global_batch: int = 8
  seed: int = 0
  swap_prob: float = 0.5  # training: random image order, label follows (DESIGN.md §1)
  both_orders: bool = False  # evaluation: every pair as given, then swapped (no shuffle)
  num_epochs: int | None = None  # None: repeat forever
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
  bad_records: str = "error"  # or "skip"
  pad_id: int = 0
  worker_count: int = 0  # >0: decode and tokenise in that many worker processes
  image: ImageConfig = ImageConfig()
  prompt: PromptConfig = PromptConfig()


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One pair → one example dict, or a skip record (picklable, for worker processes)."""
  tokenizer: object
  cfg: PipelineConfig

  def __call__(self, index: int, item) -> dict:
    pair, swap = item if isinstance(item, tuple) else (item, None)
    if swap is None:
      swap = np.random.default_rng([self.cfg.seed, index]).random() < self.cfg.swap_prob
    images, label = pair.images, pair.label
    if swap:
      images, label = images[::-1], 1 - label
    try:
      (pa, ga), (pb, gb) = (process_image(im, self.cfg.image, source=f"pair {pair.pair_id} image {k + 1}"
                                          + (f" ({im})" if isinstance(im, str) else ""))
                            for k, im in enumerate(images))
    except ImageError as e:
      if self.cfg.bad_records == "error":
        raise
      return {"skip": "bad_image", "where": e.source, "detail": e.reason}
    ids = reasoner_ids(self.tokenizer, pair.prompt, [ga, gb], self.cfg.prompt, self.cfg.image.merge_size)
    return {"input_ids": ids, "pixel_values": np.concatenate([pa, pb]), "grids": [ga, gb],
            "label": np.int32(label), "pair_id": pair.pair_id, "swapped": bool(swap)}


def collate(examples: list[dict], buckets: Sequence[int], pad_id: int, skipped: list) -> dict:
  length = max(len(e["input_ids"]) for e in examples)
  bucket = next((b for b in buckets if b >= length), None)
  if bucket is None:
    raise ValueError(f"prompt of {length} tokens is longer than the largest length bucket "
                     f"{max(buckets)} (pairs {[e['pair_id'] for e in examples]})")
  ids = np.full((len(examples), bucket), pad_id, np.int32)
  mask = np.zeros((len(examples), bucket), np.int32)
  for r, e in enumerate(examples):
    n = len(e["input_ids"])
    ids[r, bucket - n:] = e["input_ids"]  # left padding: generation continues at the right edge
    mask[r, bucket - n:] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "pixel_values": np.concatenate([e["pixel_values"] for e in examples]),
          "image_grid_thw": np.asarray([g for e in examples for g in e["grids"]], np.int64),
          "labels": np.asarray([e["label"] for e in examples], np.int32),
          "pair_ids": [e["pair_id"] for e in examples], "skipped": list(skipped)}


@dataclasses.dataclass(frozen=True)
class _BothOrders:
  pairs: object

  def __call__(self, i: int):
    return self.pairs[i // 2], bool(i % 2)


class _BatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, size: int, buckets, pad_id: int):
    super().__init__(parent)
    self._size, self._buckets, self._pad_id = size, tuple(buckets), pad_id

  def __next__(self) -> dict:
    examples, skipped = [], []
    while len(examples) < self._size:
      try:
        e = next(self._parent)
      except StopIteration:
        if not examples:
          raise
        break  # end of a finite dataset: a last, shorter batch (nothing dropped)
      if "skip" in e:
        skipped.append((e["skip"], e["where"], e["detail"]))
        if len(skipped) > MAX_SKIPS_PER_BATCH:
          raise DataError(f"{len(skipped)} pairs in a row could not be used (last: {e['where']}: "
                          f"{e['detail']}); is the image root right?")
      else:
        examples.append(e)
    return collate(examples, self._buckets, self._pad_id, skipped)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, size: int, buckets, pad_id: int):
    super().__init__(parent)
    self._size, self._buckets, self._pad_id = size, buckets, pad_id

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self._size, self._buckets, self._pad_id)


class Batches:
  """Iterator over this process's local batches, with skip accounting and checkpointable state."""

  def __init__(self, dataset: grain.IterDataset, report: Report):
    self._it = iter(dataset)
    self.report = report
    self.grids_seen: set[tuple] = set()
    self.lengths_seen: set[int] = set()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    for reason, where, detail in batch["skipped"]:
      self.report.bad(reason, where, detail)
    self.report.pairs += len(batch["labels"])
    self.grids_seen.add(tuple(map(tuple, batch["image_grid_thw"].tolist())))
    self.lengths_seen.add(batch["input_ids"].shape[1])
    return batch

  def get_state(self):
    return {"grain": self._it.get_state(), "report": self.report.summary()}

  def set_state(self, state) -> None:
    self._it.set_state(state["grain"])
    summary = state["report"]
    self.report.pairs = summary["pairs"]
    self.report.skipped.clear()
    self.report.skipped.update(summary["skipped"])


def make_batches(pairs, tokenizer, cfg: PipelineConfig = PipelineConfig(),
                 process_index: int = 0, process_count: int = 1, report: Report | None = None) -> Batches:
  """This process's batches of `global_batch / process_count` pairs, from a list, a generator or a
  random-access source such as `tfds_builder.tfds_pairs(...)` (read lazily, never copied)."""
  if cfg.global_batch % process_count:
    raise ValueError(f"global_batch {cfg.global_batch} is not divisible by {process_count} processes")
  if cfg.bad_records not in ("error", "skip"):
    raise ValueError(f"bad_records={cfg.bad_records!r}: choose 'error' or 'skip'")
  if not (hasattr(pairs, "__getitem__") and hasattr(pairs, "__len__")):
    pairs = list(pairs)  # a generator; random-access sources (lists, TfdsPairs) are used as they are
  if len(pairs) == 0:
    raise ValueError("no preference pairs to feed (empty source)")
  if cfg.both_orders:
    ds = grain.MapDataset.range(2 * len(pairs)).map(_BothOrders(pairs))
  else:
    ds = grain.MapDataset.source(pairs).shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  # Encode with the *global* index (the order swap must not depend on the process count).
  ds = ds.map_with_index(Encoder(tokenizer, cfg))
  ds = ds[process_index::process_count]
  elements = ds.to_iter_dataset()
  if cfg.worker_count > 0:
    # Workers decode and tokenise elements (Grain keeps their order); batching stays in this
    # process, so batches do not depend on the number of workers and skip records are counted here.
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we are not an absl app
      flags.FLAGS.mark_as_parsed()
    elements = elements.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  batches = _BatchDataset(elements, cfg.global_batch // process_count, cfg.length_buckets, cfg.pad_id)
  return Batches(batches, report if report is not None else Report(cfg.bad_records))
