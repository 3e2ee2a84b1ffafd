"""A pytest plugin that writes, per test, its wall time and the XLA compilations it made (count,
seconds, persistent-cache loads): where the test suite's time goes, and what tests/conftest.py's
per-worker compilation cache saves. Not a test; nothing imports it.

    PYTHONPATH=bench PROBE_OUT=/tmp/probe .venv/bin/python -m pytest tests -n 2 --dist loadfile \
        -p pytest_compile_probe                       # add LGRPO_TEST_COMPILE_CACHE=off for none
    .venv/bin/python bench/pytest_compile_probe.py /tmp/probe    # totals, and per file
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  from lgrpo_jax.train.metrics import CompileCounter
  counter, t0 = CompileCounter(), time.perf_counter()
  yield
  n, seconds = counter.stats()
  out = os.environ.get("PROBE_OUT", "/tmp/probe")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{os.getpid()}.jsonl"), "a") as f:  # one file per xdist worker
    f.write(json.dumps({"test": item.nodeid, "wall": time.perf_counter() - t0, "compiles": n,
                        "compile_s": seconds, "hits": counter.cache_hits()}) + "\n")


def report(out: str, top: int = 25) -> None:
  rows = [json.loads(line) for path in glob.glob(os.path.join(out, "*.jsonl")) for line in open(path)]
  total = {k: sum(r[k] for r in rows) for k in ("wall", "compile_s", "compiles", "hits")}
  print(f"{len(rows)} tests: wall {total['wall']:.0f} s, compile {total['compile_s']:.0f} s "
        f"({total['compiles']} compilations, {total['hits']} loaded from the cache)")
  per_file = collections.defaultdict(lambda: collections.Counter())
  for r in rows:
    per_file[r["test"].split("::")[0]].update({k: r[k] for k in ("wall", "compile_s", "hits")})
  for name, c in sorted(per_file.items(), key=lambda kv: -kv[1]["wall"])[:top]:
    print(f"{name:48s} wall {c['wall']:6.0f} s  compile {c['compile_s']:6.0f} s  loaded {c['hits']:5d}")


if __name__ == "__main__":
  report(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe")
