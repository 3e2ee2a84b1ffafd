"""One of two processes for tests/test_multiprocess.py: Orbax's barriers from background threads,
staggered between the processes so that badly named or collective-based barriers go wrong.

  python tests/barrier_worker.py thread [--device-barriers] --coordinator H:P --num-processes 2 --process-id I
  python tests/barrier_worker.py managers RUN_DIR --coordinator H:P --num-processes 2 --process-id I

`thread`: Orbax's barrier in a background thread (as during an async save) beside a device
collective in the main thread. `--device-barriers` puts back Orbax's default (device-collective
barriers) to show the cross-match.

`managers`: the training loop's two checkpoint managers save the same step at once (as at an
evaluation step that is also a save step)."""

import argparse
import threading
import time

import numpy as np

from lgrpo_jax import distributed

ap = argparse.ArgumentParser()
ap.add_argument("scenario", choices=("thread", "managers"))
ap.add_argument("run_dir", nargs="?")
ap.add_argument("--device-barriers", action="store_true")
distributed.add_args(ap)
args = ap.parse_args()
distributed.initialize_from_args(args)
pid = args.process_id
if args.device_barriers:
  from absl import flags
  flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = False

import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from orbax.checkpoint._src.multihost import multihost  # noqa: E402

# Stagger from a common point: after the imports, which take a different time in each process.
distributed.barrier("barrier worker: ready")
errors = []

if args.scenario == "thread":
  def background():
    try:
      if pid == 1:
        time.sleep(5)
      multihost.sync_global_processes("background save")
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(type(e).__name__)

  thread = threading.Thread(target=background)
  thread.start()
  if pid == 0:
    time.sleep(5)
  gathered = multihost_utils.process_allgather(np.array([pid + 1], np.uint32))  # the main thread's collective
  thread.join()
  print(f"gathered {gathered.ravel().tolist()} errors {errors}", flush=True)
else:
  from lgrpo_jax.train.loop import checkpoint_managers
  managers = checkpoint_managers(args.run_dir, keep=2)
  if pid == 1:
    time.sleep(5)  # process 0's two save threads reach their barriers first
  tree = {"w": np.arange(8, dtype=np.float32) + pid}
  for m in managers:
    m.save(1, args=ocp.args.StandardSave(tree))
  for m in managers:
    try:
      m.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(type(e).__name__)
  print(f"saved {[m.all_steps() for m in managers]} errors {errors}", flush=True)
distributed.finish("barrier worker: done")
