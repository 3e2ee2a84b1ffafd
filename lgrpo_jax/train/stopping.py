"""Stopping a run cleanly: signals, stalled data reads, and every process deciding together.

Used by the GRPO loop (`Trainer.run`), its held-out evaluation and the warm start (`run_sft`):

* `StopSignals`: during a stage, SIGTERM (pre-emption) and SIGINT (Ctrl-C) only *ask* for a stop,
  which the loop honours between steps by saving; a second signal acts as it would without the
  stage (SIGTERM ends the process, SIGINT raises KeyboardInterrupt), a way out of a hung save.
* `Read`: the next batch is read in a thread, and the loop waits for it in slices, so a stop asked
  for while the data stalls (a hung file system) is seen, and a stall longer than
  `pipeline.stall_timeout_s` counts as a failed read (`DataStall`): every process saves and stops
  instead of the others waiting forever in the next collective.
* `Watched`: a long pass of small reads (the evaluation's image-header check) in a thread, with the
  stall timeout applying to each read.
* `leave`/`exit_code`: how an entry point (the launcher, `python -m lgrpo_jax.evaluate`) ends after
  a stop or an agreed failure: every process at one barrier, and no wait for a read still hung.
* `agree`: with several processes, each step starts with one small all-gather of (stop, failed,
  ended), so that all processes stop, fail or end at the same step; without it, a process stopping
  or failing alone left the others waiting in the next step's collectives until a timeout.
"""

from __future__ import annotations

import signal
import threading
import time

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


class EvaluationStopped(Exception):
  """A held-out evaluation ended early by a stop asked for on some process (the caller saves)."""

  def __init__(self, signum: int):
    super().__init__(f"{signal_name(signum)} during the held-out evaluation")
    self.signum = signum


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


class Watched:
  """`fn(tick)` run in a background thread and watched from the main thread: `fn` may call
  `tick(what)` before each of its reads (a long pass of small reads, as the evaluation's
  image-header check), and `wait` gives up when the current read has not returned for `timeout_s`.
  `result` or `error` once `done`."""

  _unfinished: set = set()  # reads of this process still running (a hung one keeps its thread)

  def __init__(self, fn):
    self.result = self.error = None
    self.current = (None, time.monotonic())  # (what is being read, since when): one atomic swap
    self.done = threading.Event()
    Watched._unfinished.add(self)
    threading.Thread(target=self._run, args=(fn,), daemon=True, name="lgrpo_jax-read").start()

  def _tick(self, what) -> None:
    self.current = (what, time.monotonic())

  def _run(self, fn) -> None:
    try:
      self.result = fn(self._tick)
    except BaseException as e:  # handed to the main thread, which decides with the other processes
      self.error = e
    finally:
      self.done.set()
      Watched._unfinished.discard(self)

  def wait(self, stop: StopSignals, timeout_s: float = 0.0, slice_s: float = 0.1) -> bool | None:
    """True when done; False as soon as a stop is asked for; None when the current read has been
    running for over `timeout_s` seconds (0: no limit)."""
    while not self.done.wait(slice_s):
      if stop.signum:
        return False
      if timeout_s and time.monotonic() - self.current[1] > timeout_s:
        return None
    return True


class Read(Watched):
  """One batch read in a background thread: the data position before it (what a checkpoint saves
  while the batch is not trained on yet), then the batch or the error the read raised."""

  def __init__(self, batches):
    self.before = batches.get_state()
    super().__init__(lambda tick: next(batches))

  @property
  def batch(self):
    return self.result

  @property
  def started(self) -> float:
    return self.current[1]


def read_in_flight() -> bool:
  """Whether a batch read of this process has not finished (stuck in a stalled data source)."""
  return bool(Watched._unfinished)


class Feed:
  """A training loop's batches, each step decided with every process:

      stop, failed, ended = feed.next(signals)   # then feed.take() when none of them is set

  A batch read but not trained on (a stop or a failure came first) stays pending and is the next
  `next`'s; `position()` is the data position to checkpoint: before that batch, so that a restart
  reads it again."""

  def __init__(self, batches, stall_timeout_s: float = 0.0, saves: bool = True,
               setting: str = "pipeline.stall_timeout_s"):
    self.batches = batches
    self.stall_timeout_s = stall_timeout_s
    self.saves = saves  # whether the caller saves on a failure (the stall's message says so)
    self.setting = setting  # the timeout's name where the user sets it, for the messages
    self.pending: Read | None = None
    self.stalled: BaseException | None = None  # this process's hung read, as an error
    self._stalled_processes: list[int] = []  # the processes whose read hung, as last agreed

  def position(self) -> dict:
    return self.pending.before if self.pending is not None else self.batches.get_state()

  def next(self, signals: StopSignals, check=None) -> tuple[int, list[int], bool]:
    """Read (unless a stop came first), then `agree`. `check(batch)` raising ValueError (e.g. a
    missing target) counts as a failed read, and so does a read hanging for over the timeout."""
    if self.pending is None and not signals.signum:
      self.pending = Read(self.batches)
    finished = self.pending is not None and self.pending.wait(signals, self.stall_timeout_s)
    self.stalled = None
    if finished is None:  # the read hangs: a failure on this process (the read keeps its thread)
      from lgrpo_jax.data.sources import DataStall
      self.stalled = DataStall(
          f"process {jax.process_index()}: no batch after {time.monotonic() - self.pending.started:.0f} s "
          f"({self.setting}={self.stall_timeout_s:g}): the data source hangs (a stalled file "
          f"system?)" + ("; a restart resumes from the step saved" if self.saves else ""))
      error = self.stalled
    else:
      if finished and self.pending.error is None and check is not None:
        try:
          check(self.pending.batch)
        except ValueError as e:
          self.pending.error = e
      error = self.pending.error if finished else None
    stop, failed, ended, self._stalled_processes = agree(signals.signum, error)
    return stop, failed, ended

  def take(self) -> dict:
    self.taken_before = self.pending.before  # for `rewind`
    batch, self.pending = self.pending.batch, None
    return batch

  def rewind(self) -> None:
    """The batch last taken was not trained on (an error came first): read it again next."""
    self.batches.set_state(self.taken_before)

  def error(self, failed: list[int], step: int | None) -> BaseException:
    """After a failure was agreed (and `step` saved; None: nothing saved): this process's own error,
    or one naming the processes that failed. The batch's read is undone, so an in-process retry reads it again."""
    if self.stalled is not None:  # the read goes on in its thread; a retry in this process waits on it
      return self.stalled
    mine = self.pending.error if self.pending is not None and self.pending.done.is_set() else None
    if mine is not None:  # (a hung read keeps its thread: nothing to undo)
      self.batches.set_state(self.pending.before)
      self.pending = None
    if mine is not None and not isinstance(mine, StopIteration):
      return mine
    return failure_error(failed, step, self._stalled_processes, self.setting)


BAD_RECORD, STALLED = 1, 2  # what a process's failed read was, in the agreement's all-gather


def agree(stop: int, error: BaseException | None) -> tuple[int, list[int], bool, list[int]]:
  """(the stop signal or 0, the processes whose read failed, whether the data ran out, the processes
  among the failed whose read hangs), the same on every process: one all-gather of three int32 per
  process when there are several."""
  from lgrpo_jax.data.sources import DataStall
  ended = isinstance(error, StopIteration)
  failure = 0 if error is None or ended else STALLED if isinstance(error, DataStall) else BAD_RECORD
  mine = np.array([stop, failure, ended], np.int32)
  if jax.process_count() == 1:
    rows = mine[None]
  else:
    from jax.experimental import multihost_utils
    rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
  return (int(rows[:, 0].max()), [int(i) for i in np.flatnonzero(rows[:, 1])], bool(rows[:, 2].any()),
          [int(i) for i in np.flatnonzero(rows[:, 1] == STALLED)])


def failure_error(failed: list[int], step: int | None, stalled: list[int] = (),
                  setting: str = "pipeline.stall_timeout_s"):
  """The error raised on the processes whose own read went well when others' failed: a `DataStall`
  when every failed process hangs (a restart may succeed), else a `DataError` (a record to fix).
  `step`: the step every process saves (None: none is saved)."""
  from lgrpo_jax.data.sources import DataError, DataStall
  names = lambda ps: f"process {', '.join(map(str, ps))} of {jax.process_count()}"
  saved = "every process stops" if step is None else f"every process saved step {step} and stops"
  if set(failed) <= set(stalled):
    return DataStall(f"{names(failed)} got no batch within {setting} (its data source "
                     f"hangs); {saved}" + ("" if step is None else "; a restart resumes there"))
  bad = [p for p in failed if p not in stalled]
  return DataError(f"{names(bad)} stopped on a bad record (its log names the record); {saved}")


TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: a hung data source, which a restart may not meet again, or a
# write the storage refused (launch.py)


def exit_code(e: BaseException) -> int:
  """2 for a bad input to fix; `TEMPFAIL` for a data read that hung (`pipeline.stall_timeout_s`)."""
  from lgrpo_jax.data.sources import DataStall
  return TEMPFAIL if isinstance(e, DataStall) else 2


def leave(code: int, tag: str) -> int:
  """The exit code, after every process has got here (process 0 may have reported while the others
  waited). A command calls `exit_if_a_read_hangs` after it; `main()` called from Python does not
  (a notebook or a sweep driver would be ended by it)."""
  from lgrpo_jax import distributed
  distributed.finish(tag)
  return code


def exit_if_a_read_hangs(code: int) -> None:
  """A batch read still hung in its thread (a stalled file system) would keep the interpreter from
  exiting (Python joins the pipeline's decode threads at exit): then exit now, without waiting.
  For a command's `__main__` only: it ends the process."""
  import os
  import sys
  if read_in_flight():
    print("a data read is still hung; exiting without waiting for it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
