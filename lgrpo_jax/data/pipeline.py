"""The input pipeline: preference pairs → device-ready batches, with Grain.

Default (`group_by_grid=True`): every global batch holds pairs of one image-grid signature, so the
device programs see a bounded set of shapes and every process builds a batch of the same shape:

    pairs ─► shuffle(seed) ─► repeat ─► plan (order swap; grids from the image *headers*; every
          process plans the whole global stream, which is cheap) ─► group by (grid 1, grid 2) into
          global batches ─► this process's rows ─► decode/tokenise (threads) ─► pad prompts to the
          length bucket of the *global* batch

With `group_by_grid=False` (one process only) batches mix grids, as transformers would:

    pairs ─► shuffle(seed) ─► repeat ─► encode ─► [worker processes] ─► batch, in the main process

* Deterministic: the global order is a function of the seed; the order swap of pair k is a function
  of (seed, k); so the same seed gives the same batches with any number of workers or processes.
* Per-process: process p of P takes every P-th element, and the union of the processes' local
  batches at step s is the global batch s.
* Nothing is lost silently: an image that cannot be used stops the run naming the pair and file
  (policy 'error') or is skipped (policy 'skip') — the batcher then pulls the next pair so batches
  stay full, and each batch carries the (reason, where, detail) of what it skipped;
  `Batches.report` adds them up.
* Bounded shapes: prompts are left-padded to the smallest length bucket that fits the (global)
  batch; with grouping, a batch's grid tuple is one signature repeated, and `ImageConfig.grid_buckets`
  bounds the signatures (one bucket: one image shape). The shapes seen are reported by `Batches`.
  Grouped batches always have `global_batch / process_count` rows; rows that are padding (the end of
  finite data) or whose image failed to decode under policy 'skip' have `valid == 0`.
* Checkpointable: `Batches.get_state()` / `set_state()` (JSON-able); a restored iterator yields
  exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Sequence

import grain
import numpy as np
from PIL import Image

from lgrpo_jax.data.images import ImageConfig, ImageError, image_grid, process_image
from lgrpo_jax.data.prompts import PromptConfig, listener_parts, reasoner_ids
from lgrpo_jax.data.sources import DataError, Report

MAX_SKIPS_PER_BATCH = 1000
WARN_WAITING_GROUPS = 256  # grid groups waiting for a batch past which the grouped pipeline warns


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  global_batch: int = 8  # pairs per step over all processes
  seed: int = 0  # shuffle and order-swap seed (the launcher uses loop.seed)
  swap_prob: float = 0.5  # training: random image order, label follows (against position bias)
  both_orders: bool = False  # evaluation: every pair as given, then swapped (no shuffle)
  shuffle: bool = True  # False: the given order (evaluation of (pair, swapped) items)
  num_epochs: int | None = None  # None: repeat forever
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)  # prompts are left-padded to one of these
  bad_records: str = "error"  # or "skip"
  # A batch (training or held-out) not read after this many seconds (a hung network file system)
  # stops the run on every process, saved, with exit code 75 so that a scheduler retries it. 0: wait forever.
  stall_timeout_s: float = 1800.0
  pad_id: int = 0  # token id of prompt padding (masked out)
  # Grouped: decode/tokenise threads (0: one per core). Plain: 0 decodes in Grain's prefetch
  # threads, >0 in that many worker processes.
  worker_count: int = 0
  group_by_grid: bool = True  # batches of one grid signature, same shapes on every process
  listener: bool = True  # also the listener's prompt prefix (listener_input_ids / _attention_mask)
  image: ImageConfig = ImageConfig()
  prompt: PromptConfig = PromptConfig()

  def __post_init__(self):
    if self.global_batch < 1:
      raise ValueError(f"PipelineConfig.global_batch={self.global_batch}: must be ≥ 1")
    if not self.length_buckets or min(self.length_buckets) < 1:
      raise ValueError(f"PipelineConfig.length_buckets={self.length_buckets!r}: need at least one positive length")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"PipelineConfig.num_epochs={self.num_epochs}: must be ≥ 1 (None: repeat forever)")
    if not 0 <= self.swap_prob <= 1:
      raise ValueError(f"PipelineConfig.swap_prob={self.swap_prob} must be in [0, 1]")
    if self.bad_records not in ("error", "skip"):
      raise ValueError(f"PipelineConfig.bad_records={self.bad_records!r}: choose 'error' or 'skip'")
    if not 0 <= self.stall_timeout_s < float("inf"):
      raise ValueError(f"PipelineConfig.stall_timeout_s={self.stall_timeout_s}: must be ≥ 0 (0: wait forever)")
    if self.worker_count < 0:
      raise ValueError(f"PipelineConfig.worker_count={self.worker_count} must be ≥ 0")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"PipelineConfig.seed={self.seed}: must be in [0, 2**32)")


# Grain's `shuffle` (a cipher on indices, O(1) memory) walks cycles of a 2**16-element domain when the
# dataset is smaller: ~2**16 / n encryptions per element, 6.6 ms per element at n = 8, 0.9 ms at 64,
# 8 µs at 30,000 (this 2-core machine). Its prefetch plans 500 elements ahead, so a small dataset's
# pipeline spent seconds of CPU shuffling. Below this size a stored permutation per epoch is used.
SMALL_SHUFFLE = 1 << 16


@functools.lru_cache(maxsize=8)  # thread-safe; the prefetch window spans one or two epochs
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


class _SmallShuffle(grain.MapDataset):
  """Grain's ShuffleMapDataset contract for a small parent of length n: a different order every
  epoch, a function of (seed, epoch) only, so repeat() reshuffles and a restored iterator sees the
  same order. Index e·n + i reads the parent at e·n + perm(seed, e)[i]."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return "SmallShuffle"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    epoch, i = divmod(index, n)
    return self._parent[epoch * n + int(_epoch_permutation(self._seed, epoch, n)[i])]


def shuffled(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
  """`ds` reshuffled every epoch (with `repeat`): grain's shuffle, or a stored permutation below
  SMALL_SHUFFLE elements where grain's costs milliseconds per element."""
  return _SmallShuffle(ds, seed) if len(ds) < SMALL_SHUFFLE else ds.shuffle(seed=seed)


# Text that the chat template and the processor read as image structure: a prompt holding one would
# shift the image placeholders (transformers refuses such a prompt too).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


class BadPair(ValueError):
  """A pair that cannot be encoded (its schema, label or prompt): a skip record or a DataError."""

  def __init__(self, kind: str, where: str, detail: str):
    super().__init__(f"{where}: {detail}")
    self.kind, self.where, self.detail = kind, where, detail


def _check_pair(pair) -> None:
  """Raises BadPair for what the built-in sources check but a custom list or generator may hold."""
  where = f"pair {getattr(pair, 'pair_id', '?')}"
  images, label, prompt = (getattr(pair, k, None) for k in ("images", "label", "prompt"))
  if not (isinstance(images, (tuple, list)) and len(images) == 2
          and all(isinstance(im, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)) for im in images)):
    raise BadPair("bad_schema", where, f"images must be two paths, byte strings or PIL images, got {images!r:.120}")
  if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label not in (0, 1):
    raise BadPair("bad_label", where, f"label must be 0 (first image preferred) or 1, got {label!r}")
  if not isinstance(prompt, str):
    raise BadPair("bad_schema", where, f"prompt must be a string, got {type(prompt).__name__}")
  token = next((t for t in VISION_TOKENS if t in prompt), None)
  if token is not None:
    raise BadPair("bad_prompt", where, f"the prompt holds {token}, which would be read as image structure")


def _bad_pair(cfg: PipelineConfig, e: BadPair) -> dict:
  if cfg.bad_records == "error":
    raise DataError(str(e)) from None
  return {"skip": e.kind, "where": e.where, "detail": e.detail}


def _oriented(cfg: PipelineConfig, index: int, item):
  """(pair, swap, images in the order shown, label in that order); the swap is a function of
  (seed, global index) unless the item fixes it (both-orders evaluation). A pair that cannot be
  encoded raises BadPair."""
  pair, swap = item if isinstance(item, tuple) else (item, None)
  _check_pair(pair)
  if swap is None:
    swap = bool(np.random.default_rng([cfg.seed, index]).random() < cfg.swap_prob)
  images, label = tuple(pair.images), pair.label
  if swap:
    images, label = images[::-1], 1 - label
  return pair, swap, images, label


def _prompts(tokenizer, prompt: str, grids, cfg: "PipelineConfig") -> dict:
  """The reasoner prompt ids and (if configured) the listener prefix ids of one pair."""
  out = {"input_ids": reasoner_ids(tokenizer, prompt, grids, cfg.prompt, cfg.image.merge_size)}
  if cfg.listener:
    out["listener_ids"] = listener_parts(tokenizer, prompt, grids, cfg.prompt, cfg.image.merge_size)[0]
  return out


def _too_long(pair, prompts: dict, cfg: "PipelineConfig") -> dict | None:
  """A skip record for a pair whose prompt fits no length bucket (policy 'skip'), else None; under
  policy 'error' a DataError naming the pair (before a batch holds it)."""
  longest = max(len(x) for x in prompts.values())
  if longest <= max(cfg.length_buckets):
    return None
  detail = (f"prompt of {longest} tokens is longer than the largest length bucket {max(cfg.length_buckets)}: "
            "add a larger pipeline.length_buckets entry, shorten the prompt or lower pipeline.image.max_pixels")
  if cfg.bad_records == "error":
    raise DataError(f"pair {pair.pair_id}: {detail}")
  return {"skip": "prompt_too_long", "where": f"pair {pair.pair_id}", "detail": detail}


def _where(pair, k: int, image) -> str:
  return f"pair {pair.pair_id} image {k + 1}" + (f" ({image})" if isinstance(image, str) else "")


@dataclasses.dataclass(frozen=True)
class Encoder:
  """One pair → one example dict, or a skip record (picklable, for worker processes)."""
  tokenizer: object
  cfg: PipelineConfig

  def __call__(self, index: int, item) -> dict:
    try:
      pair, swap, images, label = _oriented(self.cfg, index, item)
    except BadPair as e:
      return _bad_pair(self.cfg, e)
    try:
      (pa, ga), (pb, gb) = (process_image(im, self.cfg.image, source=_where(pair, k, im))
                            for k, im in enumerate(images))
    except ImageError as e:
      if self.cfg.bad_records == "error":
        raise
      return {"skip": e.kind, "where": e.source, "detail": e.reason}
    prompts = _prompts(self.tokenizer, pair.prompt, [ga, gb], self.cfg)
    too_long = _too_long(pair, prompts, self.cfg)
    if too_long:
      return too_long
    return {**prompts, "pixel_values": np.concatenate([pa, pb]), "grids": [ga, gb],
            "label": np.int32(label), "pair_id": pair.pair_id, "swapped": bool(swap)}


def length_bucket(length: int, buckets: Sequence[int], pair_ids) -> int:
  bucket = next((b for b in buckets if b >= length), None)
  if bucket is None:
    raise DataError(f"prompt of {length} tokens is longer than the largest length bucket "
                    f"{max(buckets)} (pairs {list(pair_ids)}): add a larger pipeline.length_buckets "
                    "entry or lower pipeline.image.max_pixels")
  return bucket


def _left_pad(seqs, bucket: int, pad_id: int):
  ids = np.full((len(seqs), bucket), pad_id, np.int32)
  mask = np.zeros((len(seqs), bucket), np.int32)
  for r, x in enumerate(seqs):
    ids[r, bucket - len(x):] = x  # left padding: generation continues at the right edge
    mask[r, bucket - len(x):] = 1
  return ids, mask


def collate(examples: list[dict], buckets: Sequence[int], pad_id: int, skipped: list,
            lengths: dict | None = None) -> dict:
  """Left-pad the prompts (and listener prefixes) to the bucket of their longest, or of `lengths`
  (the global batch's, so that every process builds the same shapes)."""
  pair_ids = [e["pair_id"] for e in examples]
  out = {}
  for key, ids_key, mask_key in (("input_ids", "input_ids", "attention_mask"),
                                 ("listener_ids", "listener_input_ids", "listener_attention_mask")):
    if key not in examples[0]:
      continue
    length = max(len(e[key]) for e in examples) if lengths is None else lengths[key]
    out[ids_key], out[mask_key] = _left_pad([e[key] for e in examples],
                                            length_bucket(length, buckets, pair_ids), pad_id)
  return {**out,
          "pixel_values": np.concatenate([e["pixel_values"] for e in examples]),
          "image_grid_thw": np.asarray([g for e in examples for g in e["grids"]], np.int64),
          "labels": np.asarray([e["label"] for e in examples], np.int32),
          "valid": np.asarray([e.get("valid", 1) for e in examples], np.int32),
          "swapped": np.asarray([e["swapped"] for e in examples], bool),
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
    self.final_skips: list = []  # skips after the last batch (reported by `Batches`)

  def __next__(self) -> dict:
    examples, skipped = [], []
    while len(examples) < self._size:
      try:
        e = next(self._parent)
      except StopIteration:
        if not examples:
          self.final_skips.extend({"skip": r, "where": w, "detail": d} for r, w, d in skipped)
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
    if isinstance(state, dict) and "plan" in state:
      raise DataError(_OTHER_MODE.format(saved="true", now="false"))
    self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, size: int, buckets, pad_id: int):
    super().__init__(parent)
    self._size, self._buckets, self._pad_id = size, buckets, pad_id

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self._size, self._buckets, self._pad_id)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Global position → a light record: orientation and image grids from the headers only, and
  whether the prompt fits a length bucket (a tokenisation: cheap beside an image decode)."""
  cfg: PipelineConfig
  tokenizer: object = None
  # grids → the prompts' tokens with an empty T2I prompt (a few grid signatures per run)
  _empty_prompt_tokens: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __call__(self, index: int, item) -> dict:
    try:
      pair, swap, images, label = _oriented(self.cfg, index, item)
    except BadPair as e:
      return {"index": index, **_bad_pair(self.cfg, e)}
    try:
      grids = tuple(image_grid(im, self.cfg.image, _where(pair, k, im)) for k, im in enumerate(images))
    except ImageError as e:
      if self.cfg.bad_records == "error":
        raise
      return {"index": index, "skip": e.kind, "where": e.source, "detail": e.reason}
    if self.tokenizer is not None and self._may_be_too_long(pair.prompt, grids):
      too_long = _too_long(pair, _prompts(self.tokenizer, pair.prompt, grids, self.cfg), self.cfg)
      if too_long:
        return {"index": index, **too_long}
    return {"index": index, "swap": swap, "grids": grids}

  def _may_be_too_long(self, prompt: str, grids) -> bool:
    """Whether the pair's prompts might exceed the largest bucket, from a bound and no tokenising
    (1.7 ms a pair, on the batch read's critical path): the tokens of the prompts with an empty
    text-to-image prompt and these grids, plus at most one token per UTF-8 byte of the prompt as
    the tokenizer normalises it (a byte-level BPE token holds ≥ 1 byte; Qwen's NFC normaliser can
    lengthen a text: U+FB2C's 3 bytes become 6) and a margin for merges it breaks where it is inserted."""
    base = self._empty_prompt_tokens.get(grids)
    if base is None:
      base = max(len(x) for x in _prompts(self.tokenizer, "", grids, self.cfg).values())
      self._empty_prompt_tokens[grids] = base
    normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
    text = normalizer.normalize_str(prompt) if normalizer is not None else prompt
    return base + max(len(text.encode("utf-8")), len(prompt.encode("utf-8"))) + 8 > max(self.cfg.length_buckets)


class _GroupedIterator(grain.DatasetIterator):
  """Groups the planned global stream by grid signature into global batches and builds this
  process's rows of each. Its state holds the light records still waiting in a group."""

  def __init__(self, parent, base, tokenizer, cfg: PipelineConfig, process_index: int, process_count: int):
    super().__init__(parent)
    self._base, self._tok, self._cfg = base, tokenizer, cfg
    self._p, self._n = process_index, process_count
    self._groups: dict[tuple, list[dict]] = {}  # signature → waiting records, in arrival order
    self._encode = Encoder(tokenizer, cfg)
    # Decoding and resizing release the GIL, so threads use the cores (0: one per core).
    self._pool = concurrent.futures.ThreadPoolExecutor(cfg.worker_count or os.cpu_count() or 1)
    self.final_skips: list = []  # plan-time skips after the last batch (reported by `Batches`)
    self._warned_waiting = False

  def _next_global(self) -> tuple[list[dict], list[dict]]:
    skipped = []
    while True:
      try:
        rec = next(self._parent)
      except StopIteration:
        if not self._groups:  # each skip counted by one process, as within the stream
          self.final_skips.extend(r for r in skipped if r["index"] % self._n == self._p)
          raise
        oldest = min(self._groups, key=lambda k: self._groups[k][0]["index"])
        return self._groups.pop(oldest), skipped  # end of finite data: a short batch
      if "skip" in rec:
        skipped.append(rec)
        if len(skipped) > MAX_SKIPS_PER_BATCH:
          raise DataError(f"{len(skipped)} pairs in a row could not be used (last: {rec['where']}: "
                          f"{rec['detail']}); is the image root right?")
        continue
      group = self._groups.setdefault(rec["grids"], [])
      group.append(rec)
      if len(group) == self._cfg.global_batch:
        return self._groups.pop(rec["grids"]), skipped
      if not self._warned_waiting and len(self._groups) > WARN_WAITING_GROUPS:
        self._warned_waiting = True
        logging.getLogger(__name__).warning(
            "pipeline: %d pairs wait in %d image-grid groups for a batch of %d (a batch's pairs share their "
            "grids): with this many image sizes the data is read far ahead and the resume state grows with "
            "it; set pipeline.image.grid_buckets (a few grids for all images) or pipeline.group_by_grid=false "
            "(one process)", sum(map(len, self._groups.values())), len(self._groups), self._cfg.global_batch)

  def _example(self, rec: dict, valid: bool, skipped: list) -> dict:
    item = self._base[rec["index"]]
    e = self._encode(rec["index"], (item[0] if isinstance(item, tuple) else item, rec["swap"]))
    if "skip" in e:  # decoded badly after a good header (policy 'skip'): a placeholder row
      skipped.append((e["skip"], e["where"], e["detail"]))
      pair = item[0] if isinstance(item, tuple) else item
      grids = rec["grids"]
      n = sum(t * h * w for t, h, w in grids)
      width = 3 * self._cfg.image.temporal_patch_size * self._cfg.image.patch_size ** 2
      e = {**_prompts(self._tok, pair.prompt, grids, self._cfg),
           "pixel_values": np.zeros((n, width), np.float32), "grids": list(grids),
           "label": np.int32(0), "pair_id": pair.pair_id, "swapped": rec["swap"]}
      valid = False
    return dict(e, valid=int(valid))

  def __next__(self) -> dict:
    rows, plan_skips = self._next_global()
    local_size = self._cfg.global_batch // self._n
    padded = rows + [None] * (self._cfg.global_batch - len(rows))
    mine = padded[self._p * local_size:(self._p + 1) * local_size]
    skipped = [(r["skip"], r["where"], r["detail"]) for r in plan_skips if r["index"] % self._n == self._p]
    real = [r for r in mine if r is not None]
    examples = list(self._pool.map(lambda r: self._example(r, True, skipped), real))
    if len(examples) < local_size:  # padding rows: copies of a real row, marked invalid
      filler = dict(examples[0] if examples else self._example(rows[0], False, []), valid=0)
      examples += [filler] * (local_size - len(examples))
    # One prompt length for the global batch, so every process pads to the same bucket.
    mine_ids = {r["index"] for r in real}
    theirs = [r for r in rows if r["index"] not in mine_ids]
    others = [self._prompt_lengths(r) for r in theirs]
    lengths = {k: max([len(e[k]) for e in examples] + [o[k] for o in others])
               for k in examples[0] if k in ("input_ids", "listener_ids")}
    return collate(examples, self._cfg.length_buckets, self._cfg.pad_id, skipped, lengths)

  def _prompt_lengths(self, rec: dict) -> dict:
    item = self._base[rec["index"]]
    pair = item[0] if isinstance(item, tuple) else item
    return {k: len(v) for k, v in _prompts(self._tok, pair.prompt, rec["grids"], self._cfg).items()}

  def get_state(self):
    waiting = sorted((r for g in self._groups.values() for r in g), key=lambda r: r["index"])
    return {"plan": self._parent.get_state(),
            "waiting": [[r["index"], r["swap"], [list(g) for g in r["grids"]]] for r in waiting]}

  def set_state(self, state):
    if not isinstance(state, dict) or "plan" not in state:
      raise DataError(_OTHER_MODE.format(saved="false", now="true"))
    self._parent.set_state(state["plan"])
    self._groups = {}
    for index, swap, grids in state["waiting"]:
      grids = tuple(tuple(g) for g in grids)
      self._groups.setdefault(grids, []).append({"index": index, "swap": swap, "grids": grids})


_OTHER_MODE = ("the saved data position is the pipeline's with pipeline.group_by_grid={saved}, and this run has "
               "{now}: one cannot read the other's. Resume with pipeline.group_by_grid={saved} (false needs one "
               "process), or start a new run_dir (a finished run's weights: `python -m lgrpo_jax.convert to-hf RUN_DIR "
               "OUT`, then model.checkpoint=OUT)")


class _GroupedDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, *args):
    super().__init__(parent)
    self._args = args

  def __iter__(self):
    return _GroupedIterator(self._parent.__iter__(), *self._args)


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
    try:
      batch = next(self._it)
    except StopIteration:
      for r in getattr(self._it, "final_skips", []):
        self.report.bad(r["skip"], r["where"], r["detail"])
      self._it.final_skips = []
      raise
    for reason, where, detail in batch["skipped"]:
      self.report.bad(reason, where, detail)
    self.report.pairs += int(batch["valid"].sum())
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
  if not (hasattr(pairs, "__getitem__") and hasattr(pairs, "__len__")):
    pairs = list(pairs)  # a generator; random-access sources (lists, TfdsPairs) are used as they are
  if len(pairs) == 0:
    raise ValueError("no preference pairs to feed (empty source)")
  if process_count > 1 and not cfg.group_by_grid:
    raise ValueError("group_by_grid=False mixes image grids within a batch, so processes would build "
                     "batches of different shapes; use group_by_grid=True with several processes")
  if cfg.both_orders:
    ds = grain.MapDataset.range(2 * len(pairs)).map(_BothOrders(pairs))
  else:
    ds = grain.MapDataset.source(pairs)
    ds = shuffled(ds, cfg.seed) if cfg.shuffle else ds
  ds = ds.repeat(cfg.num_epochs)
  report = report if report is not None else Report(cfg.bad_records)
  if cfg.group_by_grid:
    planned = ds.map_with_index(_Plan(cfg, tokenizer)).to_iter_dataset()
    return Batches(_GroupedDataset(planned, ds, tokenizer, cfg, process_index, process_count), report)
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
  return Batches(batches, report)
