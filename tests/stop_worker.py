"""One of two processes of a training run for tests/test_multiprocess.py: stopping and failing
reach every process.

  python tests/stop_worker.py RUN_DIR TOKENIZER_DIR --coordinator H:P --num-processes 2 --process-id I

1. Process 1 alone reads a bad record: both save step 0 and raise (process 0 an error naming
   process 1).
2. The run goes on in the same processes, and process 1 alone gets SIGTERM while it reads its
   batch: both return, saved at step 0. (The decisions come before a step: none is compiled.)
3. Process 1's next read hangs past its `stall_timeout_s`: both save step 0 and raise `DataStall`
   (process 0 one naming process 1).
4. A held-out evaluation over both processes with a judge of known answers (the shown label's image,
   well-formed where that label is 0, the listener always disagreeing): answers computed on the
   mesh and labels read by each process must be gathered in the same row order to score 1.0.
5. The same evaluation where process 1's held-out read hangs: both raise `DataStall`.
6. A text reward raising in a step (its function runs on process 0, on every row): both roll back
   to step 0, save it and raise (process 1 an error naming process 0); run() again goes on.
Each process prints one line per part."""

import argparse
import os
import signal
import threading

from lgrpo_jax import distributed

ap = argparse.ArgumentParser()
ap.add_argument("run_dir")
ap.add_argument("tok_dir")
distributed.add_args(ap)
args = ap.parse_args()
distributed.initialize_from_args(args)

import jax  # noqa: E402

from lgrpo_jax.data.images import ImageError  # noqa: E402
from lgrpo_jax.data.sources import DataError  # noqa: E402
from lgrpo_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from train_worker import make  # noqa: E402

me = jax.process_index()
t = make(args.run_dir, args.tok_dir, steps=4, save_every=10, batch=2, samples=2,
         mesh=make_mesh(MeshConfig(fsdp=2)))


class Process1:
  """Process 1's batches: its next read fails as a truncated image would, or brings a SIGTERM (a
  pre-empted host)."""

  def __init__(self, batches):
    self.batches, self.then = batches, "bad record"

  def __next__(self):
    if self.then == "hang":
      threading.Event().wait()  # a read that never returns (its thread is a daemon)
    if self.then == "sigterm":
      os.kill(os.getpid(), signal.SIGTERM)
      return next(self.batches)
    raise ImageError("/data/b7.png", "truncated file")

  def get_state(self):
    return self.batches.get_state()

  def set_state(self, state):
    self.batches.set_state(state)


if me == 1:
  t.batches = Process1(t.batches)
try:
  t.run()
  print("failed: nothing raised", flush=True)
except (DataError, ImageError) as e:
  print(f"failed: {type(e).__name__}: {e}; step {int(t.state.step)}, saved {t.manager.all_steps()}", flush=True)
if me == 1:
  t.batches.then = "sigterm"
out = t.run()  # the same trainer goes on (as in a notebook), and is stopped
print(f"stopped: steps {[m['step'] for m in out]}, by {t.stopped_by}, saved {t.manager.all_steps()}", flush=True)
if me == 1:
  t.batches = Process1(t.batches.batches)  # a new feed: the batch read in part 2 is dropped
  t.batches.then = "hang"
  t.feed.stall_timeout_s = 2.0
try:
  t.run()
  print("hung: nothing raised", flush=True)
except DataError as e:
  print(f"hung: {type(e).__name__}: {e}; step {int(t.state.step)}, saved {t.manager.all_steps()}", flush=True)

import dataclasses  # noqa: E402
import json  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402
from lgrpo_jax.data.synthetic import synthetic  # noqa: E402
from lgrpo_jax.sampling import SamplingConfig  # noqa: E402
from lgrpo_jax.train import evaluation  # noqa: E402


def judge(params, listener_params, batch, tables, **kw):
  return batch.labels + 1, batch.labels == 0, 2 - batch.labels


class Hanging:
  """Held-out pairs (random access) whose reads block until released (a hung file system)."""
  release = threading.Event()

  def __init__(self, pairs):
    self.pairs = pairs

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    self.release.wait()
    return self.pairs[i]


evaluation.judge_greedy = judge
tok = AutoTokenizer.from_pretrained(args.tok_dir)
pairs = [dataclasses.replace(p, label=label) for p, label in zip(synthetic(3, seed=9, image_size=56), (0, 0, 1))]
pipe = dataclasses.replace(t.pipe_cfg, global_batch=4, stall_timeout_s=2.0)  # 6 judgements: 2 padding rows
evaluate = lambda held_out: evaluation.Evaluator(held_out, tok, pipe, SamplingConfig(), None, None, t.spec,
                                                 t.tables, t.mesh)(None, None)
with jax.set_mesh(t.mesh):
  print(f"evaluated: {json.dumps(evaluate(pairs), sort_keys=True)}", flush=True)
  try:
    evaluate(Hanging(pairs) if me == 1 else pairs)
    print("eval hung: nothing raised", flush=True)
  except DataError as e:
    print(f"eval hung: {type(e).__name__}: {e}", flush=True)
Hanging.release.set()
t.close()

from lgrpo_jax.rewards import RewardConfig, RewardError, register_reward, text_reward  # noqa: E402

calls = []


def flaky(texts, labels):
  calls.append(len(texts))
  if len(calls) == 1:
    raise ZeroDivisionError("a bug in my reward")
  return [0.5] * len(texts)


register_reward("mp_text", text_reward(flaky, tok))
r = make(args.run_dir + "_reward", args.tok_dir, steps=2, save_every=10, batch=2, samples=2, mesh=t.mesh,
         rewards=RewardConfig(weights=(("format", 1.0), ("mp_text", 1.0))))
try:
  r.run()
  print("reward: nothing raised", flush=True)
except RewardError as e:
  print(f"reward: {e}; step {int(r.state.step)}, saved {r.manager.all_steps()}", flush=True)
print(f"reward then: steps {[m['step'] for m in r.run()]}, calls here {calls}", flush=True)
r.close()
distributed.finish("stop_worker: done")
