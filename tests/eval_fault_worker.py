"""One of two processes of `lgrpo_jax.evaluate` for tests/test_multiprocess.py, with a fault on
process 1 alone:

  python tests/eval_fault_worker.py FAULT K EVALUATE-ARGS... --coordinator H:P --num-processes 2 --process-id I

FAULT `sigterm`: process 1 sends itself SIGTERM during its K-th batch read (a pre-empted host);
`hang`: that read never returns (a stalled mount). `none`: no fault. Then it exits as
`python -m lgrpo_jax.evaluate` does."""

import os
import signal
import sys
import threading

from lgrpo_jax import evaluate
from lgrpo_jax.data import pipeline
from lgrpo_jax.train import stopping

fault, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_make_batches = pipeline.make_batches


class Faulty:
  def __init__(self, batches):
    self.batches, self.reads = batches, 0

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, state):
    self.batches.set_state(state)

  def __iter__(self):
    return self

  def __next__(self):
    self.reads += 1
    if self.reads == at and fault == "sigterm":
      os.kill(os.getpid(), signal.SIGTERM)
    if self.reads == at and fault == "hang":
      threading.Event().wait()  # never returns (the read's thread is a daemon)
    return next(self.batches)


def make_batches(*a, **k):
  batches = real_make_batches(*a, **k)
  return Faulty(batches) if k.get("process_index") == 1 and fault != "none" else batches


pipeline.make_batches = make_batches  # evaluate.main imports it when it runs
code = evaluate.main(argv)
stopping.exit_if_a_read_hangs(code)
sys.exit(code)
