"""TensorBoard scalars without TensorFlow: a small writer of `events.out.tfevents.*` files.

An event file is a TFRecord stream of `Event` protocol buffers. Each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian), and the first event carries `file_version = "brain.Event:2"`. A scalar is an Event
{wall_time (1, double), step (2, int64), summary (5) {value (1) {tag (1), simple_value (2, float)}}}.
We encode those few fields by hand rather than depending on tensorflow or tensorboard at run time;
the test reads the files back with TensorBoard's own reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 fields are two's complement on the wire
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, summary: bytes = b"", file_version: str = "",
           session_start: bool = False) -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version:
    out += _field_bytes(3, file_version.encode())
  if summary:
    out += _field_bytes(5, summary)
  if session_start:  # session_log { status: START }
    out += _field_bytes(7, _varint(1 << 3 | 0) + _varint(1))
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  return _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))


class EventWriter:
  """Appends scalar summaries to `log_dir/events.out.tfevents.<time>.<host>.<pid>` (a new file per
  writer, as TensorBoard expects; a resumed run starts a new file and TensorBoard merges them)."""

  def __init__(self, log_dir: str):
    os.makedirs(log_dir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path, n = os.path.join(log_dir, name), 0
    while True:  # a second writer of this process in the same second (a close and a resume): its own file
      try:
        self._f = open(self.path, "xb")
        break
      except FileExistsError:
        n += 1
        self.path = os.path.join(log_dir, f"{name}.{n}")
    self._record(_event(time.time(), 0, file_version="brain.Event:2"))

  def _record(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked(crc32c(header))) + data
                  + struct.pack("<I", _masked(crc32c(data))))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event holding every finite-or-not float of `values` (non-numbers are skipped)."""
    summary = b"".join(_scalar_value(k, float(v)) for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool))
    self._record(_event(time.time(), int(step), summary=summary))
    self._f.flush()

  def restart_at(self, step: int) -> None:
    """A SessionLog START at `step`: TensorBoard drops what earlier files logged at `step` and after
    (a run resumed from the checkpoint of step − 1 logs those steps again)."""
    self._record(_event(time.time(), int(step), session_start=True))
    self._f.flush()

  def close(self) -> None:
    self._f.close()
