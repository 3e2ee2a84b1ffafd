"""Where a GRPO-step phase spends its CPU time: XLA's per-thunk trace events, grouped.

  .venv/bin/python bench/cpu_profile.py [--phase update] [--pairs 1] [--micro-batches 1] [--by-op]

Builds the phase exactly as bench/step.py does (74M benchmark model, prefix sharing, G = 8 × 128
tokens, two 448² images per pair), runs it once to compile and once untimed-warm, times one run,
then runs it once under `jax.profiler.trace`. On the CPU the thunk executor runs the thunks of one
program one after another here, so their summed durations add up to the wall time (printed, to
check). Prints the time per thunk kind (XLA's fusion name without its number: `ynn_fusion` is a
matmul with what XLA fused into it, `copy_bitcast_fusion` a transposing elementwise fusion, …),
the top thunks with their HLO shape and JAX op, and the minor page faults of the timed run; with
--by-op also the thunks summed per (kind, HLO shape, JAX op), e.g. one decoder op over its layers or
one decode-loop op over its steps. Run it alone on the machine; like the entry points it re-executes
itself with huge-page malloc where that applies (lgrpo_jax/hostmem.py).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import DEFAULT_CONFIG  # noqa: E402

SKIP = ("ThreadpoolListener", "ThunkExecutor", "PjRt", "Pjit", "$", "Await", "Handle", "Allocate", "Wait",
        "Parse", "end: ", "PythonRef", "Execute")


def thunk_events(trace_dir: str) -> list[dict]:
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and "dur" in e
          and not any(e["name"].startswith(k) or k in e["name"] for k in SKIP)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--phase", choices=("update", "reference", "listener", "rollout"), default="update")
  ap.add_argument("--pairs", type=int, default=1)
  ap.add_argument("--micro-batches", type=int, default=1)
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--kind", default=None, help="list the top thunks of this kind only (e.g. copy_bitcast_fusion)")
  ap.add_argument("--by-op", action="store_true",
                  help="also group the thunks by (HLO shape, JAX op): e.g. one decoder op summed over its layers")
  args = ap.parse_args()

  import jax

  import lgrpo_jax
  from step import build

  with open(DEFAULT_CONFIG) as f:
    raw = json.load(f)
  s = build(raw, lgrpo_jax.from_config(raw, seed=0), pairs=args.pairs, samples=8, new_tokens=128,
            text_tokens=128, image_px=448, micro_batches=args.micro_batches)
  fn, fargs = {"update": (s.update(True), (s.params, s.opt_state)), "reference": (s.logp(True), (s.params,)),
               "listener": (s.listen(True), (s.params,)), "rollout": (s.rollout(), (s.params,))}[args.phase]
  hlo = fn.lower(*fargs).compile().as_text()
  jax.block_until_ready(fn(*fargs))
  jax.block_until_ready(fn(*fargs))
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*fargs))
  wall = time.perf_counter() - t0
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  trace_dir = tempfile.mkdtemp(prefix="cpu_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(fn(*fargs))
  events = thunk_events(trace_dir)

  per_name, calls = collections.Counter(), collections.Counter()
  for e in events:
    per_name[e["name"]] += e["dur"]
    calls[e["name"]] += 1
  kinds, kind_calls = collections.Counter(), collections.Counter()
  for name, us in per_name.items():
    kinds[re.sub(r"\.\d+$", "", name)] += us
    kind_calls[re.sub(r"\.\d+$", "", name)] += calls[name]
  total = sum(kinds.values())
  print(f"{args.phase}, {args.pairs} pair(s), {args.micro_batches} micro-batch(es): {wall:.2f} s wall, "
        f"{total / 1e6:.2f} s summed over {len(events)} thunks; {faults} minor page faults in the timed run")
  print(f"\n{'thunk kind':38s} {'calls':>6s} {'s':>8s} {'share':>6s}")
  for kind, us in kinds.most_common(args.top):
    print(f"{kind:38s} {kind_calls[kind]:6d} {us / 1e6:8.3f} {us / total:6.1%}")
  print(f"\n{'thunk':38s} {'calls':>6s} {'ms':>8s}  shape, JAX op{f' ({args.kind} only)' if args.kind else ''}")
  named = [(n, us) for n, us in per_name.most_common()
           if args.kind is None or re.sub(r"\.\d+$", "", n) == args.kind][:args.top]
  def where(name):
    m = re.search(r"%" + re.escape(name) + r" = (\S+) [^\n]*?op_name=\"([^\"]*)\"", hlo)
    return f"{m.group(1)[:32]}  {m.group(2)[-70:]}" if m else ""

  for name, us in named:
    print(f"{name:38s} {calls[name]:6d} {us / 1e3:8.1f}  {where(name)}")
  if args.by_op:
    groups, group_calls = collections.Counter(), collections.Counter()
    for name, us in per_name.items():
      key = re.sub(r"\.\d+$", "", name) + "  " + where(name)
      groups[key] += us
      group_calls[key] += calls[name]
    print(f"\n{'ms':>8s} {'calls':>6s}  thunk kind, shape, JAX op (summed over thunks)")
    for key, us in groups.most_common(args.top):
      print(f"{us / 1e3:8.1f} {group_calls[key]:6d}  {key}")


if __name__ == "__main__":
  from lgrpo_jax.hostmem import reexec_with_hugepages
  reexec_with_hugepages()  # as the entry points do: huge-page malloc (lgrpo_jax/hostmem.py)
  main()
