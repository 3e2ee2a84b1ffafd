"""Stopping a run cleanly: signals, stalled data reads, and every process deciding together.

Used by the GRPO loop (`Trainer.run`) and the warm start (`run_sft`):

* `StopSignals`: during a stage, SIGTERM (pre-emption) and SIGINT (Ctrl-C) only *ask* for a stop,
  which the loop honours between steps by saving; a second signal acts as it would without the
  stage (SIGTERM ends the process, SIGINT raises KeyboardInterrupt), a way out of a hung save.
* `Read`: the next batch is read in a thread, and the loop waits for it in slices, so a stop asked
  for while the data stalls (a hung file system) is seen.
* `agree`: with several processes, each step starts with one small all-gather of (stop, failed,
  ended), so that all processes stop, fail or end at the same step; without it, a process stopping
  or failing alone left the others waiting in the next step's collectives until a timeout.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """`with StopSignals() as stop:` … `stop.signum` is the first SIGTERM/SIGINT received (0: none).
  Off the main thread no handler can be installed; `request(signum)` still works from anywhere."""

  def __init__(self):
    self.signum = 0
    self._previous: dict = {}

  def request(self, signum: int = signal.SIGTERM) -> None:
    self.signum = self.signum or int(signum)

  def _handle(self, signum, frame) -> None:
    self.request(signum)
    signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)  # the second one acts

  def __enter__(self) -> "StopSignals":
    for signum in SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        break
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}


class Stopped(Exception):
  """A stage that saved and stopped on a signal (the warm start: the GRPO loop returns instead)."""

  def __init__(self, signum: int, where: str, saved_to: str):
    super().__init__(f"{signal_name(signum)}: saved {where} to {saved_to}, stopping")
    self.signum = signum


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


class Read:
  """One batch read in a background thread: the data position before it (what a checkpoint saves
  while the batch is not trained on yet), then the batch or the error the read raised."""

  _unfinished: set = set()  # reads of this process still running (a hung one keeps its thread)

  def __init__(self, batches):
    self.before = batches.get_state()
    self.batch = self.error = None
    self.done = threading.Event()
    Read._unfinished.add(self)
    threading.Thread(target=self._read, args=(batches,), daemon=True, name="lgrpo_jax-read").start()

  def _read(self, batches) -> None:
    try:
      self.batch = next(batches)
    except BaseException as e:  # handed to the main thread, which decides with the other processes
      self.error = e
    finally:
      self.done.set()
      Read._unfinished.discard(self)

  def wait(self, stop: StopSignals, slice_s: float = 0.1) -> bool:
    """True when the read finished; False as soon as a stop is asked for."""
    while not self.done.wait(slice_s):
      if stop.signum:
        return False
    return True


def read_in_flight() -> bool:
  """Whether a batch read of this process has not finished (stuck in a stalled data source)."""
  return bool(Read._unfinished)


class Feed:
  """A training loop's batches, each step decided with every process:

      stop, failed, ended = feed.next(signals)   # then feed.take() when none of them is set

  A batch read but not trained on (a stop or a failure came first) stays pending and is the next
  `next`'s; `position()` is the data position to checkpoint: before that batch, so that a restart
  reads it again."""

  def __init__(self, batches):
    self.batches = batches
    self.pending: Read | None = None

  def position(self) -> dict:
    return self.pending.before if self.pending is not None else self.batches.get_state()

  def next(self, signals: StopSignals, check=None) -> tuple[int, list[int], bool]:
    """Read (unless a stop came first), then `agree`. `check(batch)` raising ValueError (e.g. a
    missing target) counts as a failed read."""
    if self.pending is None and not signals.signum:
      self.pending = Read(self.batches)
    finished = self.pending is not None and self.pending.wait(signals)
    if finished and self.pending.error is None and check is not None:
      try:
        check(self.pending.batch)
      except ValueError as e:
        self.pending.error = e
    return agree(signals.signum, self.pending.error if finished else None)

  def take(self) -> dict:
    batch, self.pending = self.pending.batch, None
    return batch

  def error(self, failed: list[int], step: int) -> BaseException:
    """After a failure was agreed (and the step saved): this process's own error, or one naming the
    processes that failed. The batch's read is undone, so an in-process retry reads it again."""
    mine = self.pending.error if self.pending is not None and self.pending.done.is_set() else None
    if mine is not None:  # (a hung read keeps its thread: nothing to undo)
      self.batches.set_state(self.pending.before)
      self.pending = None
    return mine if mine is not None and not isinstance(mine, StopIteration) else failure_error(failed, step)


def agree(stop: int, error: BaseException | None) -> tuple[int, list[int], bool]:
  """(the stop signal or 0, the processes whose read failed, whether the data ran out), the same on
  every process: one all-gather of three int32 per process when there are several."""
  ended = isinstance(error, StopIteration)
  mine = np.array([stop, error is not None and not ended, ended], np.int32)
  if jax.process_count() == 1:
    rows = mine[None]
  else:
    from jax.experimental import multihost_utils
    rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
  return int(rows[:, 0].max()), [int(i) for i in np.flatnonzero(rows[:, 1])], bool(rows[:, 2].any())


def failure_error(failed: list[int], step: int):
  """The error raised on the processes whose own read went well when others' failed."""
  from lgrpo_jax.data.sources import DataError
  return DataError(f"process {', '.join(map(str, failed))} of {jax.process_count()} stopped on a bad "
                   f"record (its log names the record); every process saved step {step} and stops")
