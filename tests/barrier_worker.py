"""One of two processes for tests/test_multiprocess.py: Orbax's barrier in a background thread (as
during an async checkpoint save) beside a device collective in the main thread, staggered so that a
collective-based barrier would be matched with the other process's main-thread collective.

  python tests/barrier_worker.py PORT PROCESS_ID [--device-barriers]

`--device-barriers` puts back Orbax's default (device-collective barriers) to show the failure."""

import sys
import threading
import time

import numpy as np

from lgrpo_jax import distributed

port, pid = sys.argv[1], int(sys.argv[2])
distributed.initialize(f"127.0.0.1:{port}", 2, pid)
if "--device-barriers" in sys.argv:
  from absl import flags
  flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = False

from jax.experimental import multihost_utils  # noqa: E402
from orbax.checkpoint._src.multihost import multihost  # noqa: E402

errors = []


def background():
  try:
    if pid == 1:
      time.sleep(3)
    multihost.sync_global_processes("background save")
  except Exception as e:  # noqa: BLE001 - reported below
    errors.append(type(e).__name__)


thread = threading.Thread(target=background)
thread.start()
if pid == 0:
  time.sleep(3)
gathered = multihost_utils.process_allgather(np.array([pid + 1], np.uint32))  # the main thread's collective
thread.join()
print(f"gathered {gathered.ravel().tolist()} errors {errors}", flush=True)
distributed.finish("barrier worker: done")
