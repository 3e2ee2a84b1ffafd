"""The embedded demo: `make demo` (or `python -m lgrpo_jax.demo [key.path=value …]`).

Trains the tiny reasoner on the synthetic preference task with the listener reward, on CPU, in a few
minutes: `python -m lgrpo_jax.launch --config configs/demo.py` with the overrides given here. See
configs/demo.py for what happens (a position-biased warm start, then GRPO) and the README for the
expected output.
"""

from __future__ import annotations

import os
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if not os.path.isfile(CONFIG):
    print(f"error: {CONFIG} not found: the demo runs from a clone of the repository (pip install -e .)",
          file=sys.stderr)
    return 2
  from lgrpo_jax import launch
  t0 = time.perf_counter()
  rc = launch.main(["--config", CONFIG, *argv])
  if rc == 0:
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
  return rc


if __name__ == "__main__":
  from lgrpo_jax.hostmem import reexec_with_hugepages
  reexec_with_hugepages()  # huge-page malloc where the kernel offers it (see lgrpo_jax/hostmem.py)
  code = main()
  from lgrpo_jax.train.stopping import exit_if_a_read_hangs
  exit_if_a_read_hangs(code)  # a hung data read's thread would keep the interpreter from exiting
  sys.exit(code)
