"""Reading and writing HF-style safetensors checkpoints, one tensor at a time.

Reading: a directory with `model.safetensors` or a sharded `model.safetensors.index.json`; tensors are
memory-mapped and read individually, so the checkpoint is never in host memory twice. Pickle formats
(`pytorch_model.bin`) are refused, never loaded.
Writing: shards of at most `max_shard_bytes`, with an index when there is more than one shard.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors' numpy reader needs it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # what `write_sharded` names


class CheckpointError(ValueError):
  """A checkpoint on disk does not match what the model expects."""


def read_json(path, error=None):
  """A JSON file's content; unreadable or invalid JSON is an `error` (default `CheckpointError`)
  naming the file."""
  error = error or CheckpointError
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise error(f"{os.fspath(path)}: not valid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise error(f"{os.fspath(path)}: not UTF-8 text (byte {e.start}: {e.reason}); JSON files must be UTF-8") from None
  except (RecursionError, ValueError) as e:  # nested too deep; an integer of over 4300 digits
    raise error(f"{os.fspath(path)}: not JSON this reader can take ({type(e).__name__}: {str(e)[:200]})") from None
  except OSError as e:
    raise error(f"{os.fspath(path)}: cannot read it ({e.strerror or e})") from None


class SafetensorsDir:
  """Key → tensor access over a (possibly sharded) safetensors checkpoint directory."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise CheckpointError(f"{self.path}: not a directory")
    index = os.path.join(self.path, INDEX)
    single = os.path.join(self.path, SINGLE)
    # transformers reads model.safetensors before an index when a folder holds both: so do we.
    if os.path.isfile(single):
      self.file_of = {k: single for k in self._keys_of(single)}
    elif os.path.isfile(index):
      raw = read_json(index)
      weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
      if not isinstance(weight_map, dict) or not all(
          isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: not a valid safetensors index (expected {{\"weight_map\": {{tensor "
                              "name: shard file name, ...}}}})")
      self.file_of = {k: os.path.join(self.path, v) for k, v in weight_map.items()}
    else:
      found = sorted(os.listdir(self.path))
      hint = " (pickle checkpoints such as pytorch_model.bin are not read)" if any(
          f.endswith((".bin", ".pt", ".pth")) for f in found) else ""
      raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX}{hint}; found {found[:10]}")
    self._handles: dict[str, object] = {}

  @staticmethod
  def _keys_of(file: str) -> list[str]:
    try:
      with safe_open(file, framework="np") as f:
        return list(f.keys())
    except Exception as e:  # corrupt header, truncated file
      raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None

  def keys(self) -> list[str]:
    return list(self.file_of)

  def _slice(self, key: str):
    try:
      return self._handle(key).get_slice(key)
    except CheckpointError:
      raise
    except Exception as e:  # e.g. an index that names the wrong shard for this key
      raise CheckpointError(f"{self.file_of[key]}: cannot read tensor '{key}' ({e})") from None

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """The tensor's safetensors dtype name ("BF16", "F32", "I32", …), from the header."""
    return str(self._slice(key).get_dtype())

  def get(self, key: str, *, finite: bool = False) -> np.ndarray:
    """The tensor `key`; with `finite`, a NaN or ±inf in it is a `CheckpointError` naming it."""
    try:
      array = self._handle(key).get_tensor(key)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{self.file_of[key]}: cannot read tensor '{key}' ({e})") from None
    if finite and not all_finite(array):
      bad = ~np.isfinite(array.astype(np.float32))
      first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
      raise CheckpointError(
          f"{self.file_of[key]}: tensor '{key}' holds {int(bad.sum()):,} non-finite values (NaN or ±inf; "
          f"the first at index {first}) — a diverged or corrupted checkpoint")
    return array

  def _handle(self, key: str):
    file = self.file_of[key]
    if file not in self._handles:
      if not os.path.isfile(file):
        raise CheckpointError(f"{file}: listed in {INDEX} for '{key}' but missing")
      try:
        self._handles[file] = safe_open(file, framework="np")
      except Exception as e:
        raise CheckpointError(f"{file}: cannot open ({e})") from None
    return self._handles[file]


# A float is NaN or ±inf exactly when its exponent bits are all ones: with the sign bit masked off,
# when its bits (read as an unsigned integer) are at least this.
_NON_FINITE_FROM = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80,
                    np.dtype(np.float32): 0x7F800000, np.dtype(np.float64): 0x7FF0000000000000}


def all_finite(array: np.ndarray, chunk: int = 1 << 20) -> bool:
  """No NaN or ±inf in `array` (True for non-float dtypes). Reads the bits a cache-sized chunk at a
  time: ~5 GB/s on one core here, where `np.isfinite` on bfloat16 converts every element."""
  limit = _NON_FINITE_FROM.get(array.dtype)
  if limit is None:
    return True
  bits = np.ascontiguousarray(array).reshape(-1).view(f"u{array.dtype.itemsize}")
  sign_off = np.array(np.iinfo(bits.dtype).max >> 1, bits.dtype)
  for i in range(0, bits.size, chunk):
    if (bits[i:i + chunk] & sign_off).max(initial=0) >= limit:
      return False
  return True


def write_sharded(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int) -> list[str]:
  """Writes `model.safetensors` (one shard) or `model-0000k-of-0000n.safetensors` + index.

  Holds at most one shard in memory. Returns the written file names.
  """
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  tmp_names: list[str] = []
  weight_map: dict[str, int] = {}
  total = 0

  def flush():
    name = f".shard-{len(tmp_names):05d}.tmp"
    save_file(shards[-1], os.path.join(out_dir, name), metadata={"format": "pt"})
    tmp_names.append(name)
    shards[-1] = {}

  for key, arr in tensors:
    nbytes = arr.nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      flush()
      size = 0
    shards[-1][key] = arr
    weight_map[key] = len(tmp_names)
    size += nbytes
    total += nbytes
  if shards[-1]:
    flush()

  n = len(tmp_names)
  names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  # An earlier export's weights in the same folder go, as with transformers' save_pretrained: a
  # leftover index or single file would make one loader or the other read the old weights.
  stale = [f for f in os.listdir(out_dir) if WEIGHT_FILE.fullmatch(f) and f not in names]
  if n == 1 and os.path.isfile(os.path.join(out_dir, INDEX)):
    os.remove(os.path.join(out_dir, INDEX))
  for tmp, name in zip(tmp_names, names):
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump(index, f, indent=2)
  for f in stale:
    os.remove(os.path.join(out_dir, f))
  return names
