"""Where the GPU time goes: a profiler trace of the 3B forward and GRPO update of bench/gpu.py.

  PYTHONPATH=. python3 bench/gpu_profile.py --out DIR     # on the lent GPU; --tiny anywhere

Runs each program once to compile, then once under `jax.profiler.trace` (Perfetto JSON), and copies
the traces to DIR/{forward,update}.trace.json.gz. `--summarize DIR` (here, no GPU needed) prints the
device time per kernel category of each trace: matmuls (cuBLAS / Triton gemm), attention-like
fusions, the rest.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def profile(args) -> None:
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import jax
  from flax import nnx

  import lgrpo_jax
  from gpu import forward_inputs, sizes, update_batch
  from lgrpo_jax.grpo.update import OptimConfig, make_optimizer, update

  sz = sizes(args.tiny)
  os.makedirs(args.out, exist_ok=True)
  big = lgrpo_jax.from_config(sz["big"], dtype="bfloat16", param_dtype="bfloat16", seed=0)

  def traced(name, fn):
    jax.block_until_ready(fn())  # compile
    d = tempfile.mkdtemp(prefix=f"trace_{name}_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    found = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if found:
      shutil.copy(found[0], os.path.join(args.out, f"{name}.trace.json.gz"))
    print(f"{name}: trace {'written' if found else 'MISSING'}", flush=True)

  inp = forward_inputs(sz["big"], sz["fwd_rows"], sz["text"], sz["image"])
  traced("forward", lambda: lgrpo_jax.forward(big, inp["input_ids"], inp["attention_mask"], inp["pixel_values"],
                                              inp["image_grid_thw"]))
  pb, pair_grid, loss_cfg = update_batch(sz)
  # The plan: --plan REMAT:MICRO:ATTENTION as bench/gpu.py's --plans, default its last; fp32 master
  # weights (--param-dtype) as bench/gpu.py's update section and the shipped configs.
  remat, micro, impl = (args.plan.split(":") if args.plan else sz["update_plans"][-1])
  graphdef, params = nnx.split(big.set_remat(remat).set_attention(impl), nnx.Param)
  params = jax.tree.map(lambda x: x.astype(args.param_dtype), params)
  micro = int(micro)
  optim = OptimConfig(learning_rate=1e-6, micro_batches=micro)
  tx = make_optimizer(optim, params)
  state = {"p": params, "s": tx.init(params)}
  step = jax.jit(lambda prm, st: update(prm, st, graphdef, tx, pb, pair_grid, loss_cfg, optim, sz["chunk"])[:2],
                 donate_argnums=(0, 1))

  def run():
    state["p"], state["s"] = step(state["p"], state["s"])
    return state["p"]
  traced("update", run)


def categorize(name: str) -> str:
  low = name.lower()
  if any(k in low for k in ("gemm", "cublas", "nvjet", "xmma", "cutlass", "matmul", "dot")):
    return "matmul"
  if any(k in low for k in ("softmax", "reduce", "row_reduction")):
    return "reductions"
  if any(k in low for k in ("copy", "transpose", "memcpy", "memset", "dynamic-update", "concatenate", "gather",
                            "scatter")):
    return "copies/gathers"
  if "fusion" in low or "loop_" in low or "input_" in low:
    return "fusions (elementwise)"
  return "other"


def kernel_events(path: str) -> tuple[list[dict], float]:
  """The device (GPU) kernel events of a Perfetto JSON trace, and their span in µs."""
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"].get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {p for p, nm in pids.items() if "/device:GPU" in nm or "gpu" in nm.lower()}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
  span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) if kernels else 0
  return kernels, span


def busy_us(kernels: list[dict]) -> float:
  """Time the device ran at least one kernel: the union of the kernels' intervals (events can nest)."""
  total, end = 0.0, float("-inf")
  for e in sorted(kernels, key=lambda e: e["ts"]):
    start, stop = e["ts"], e["ts"] + e["dur"]
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarize(folder: str, pattern: str = "*.trace.json.gz", per: int = 0) -> None:
  """Device time per kernel category and the top kernels; `per` > 0 also lists every kernel name as
  count and µs per call, and its time per `per`-th of the trace (e.g. per decode step)."""
  for path in sorted(glob.glob(os.path.join(folder, pattern))):
    kernels, span = kernel_events(path)
    print(f"\n{os.path.basename(path)}: device busy (union of kernel intervals) {busy_us(kernels) / 1e3:.1f} ms "
          f"of {span / 1e3:.1f} ms")
    if per:
      calls, dur = collections.Counter(), collections.Counter()
      for e in kernels:
        calls[e["name"]] += 1
        dur[e["name"]] += e["dur"]
      print(f"  per 1/{per} of the trace: {len(kernels) / per:.0f} kernels; top kernels:")
      for nm, us in dur.most_common(30):
        print(f"    {nm[:60]:60s} {calls[nm]:7d} calls {us / calls[nm]:7.2f} µs each {us / per / 1e3:7.3f} ms")
    by_cat, by_name = collections.Counter(), collections.Counter()
    for e in kernels:
      op = (e.get("args") or {}).get("hlo_op", "")
      by_cat[categorize(e["name"] + " " + op)] += e["dur"]
      by_name[f"{e['name']} [{op}]" if op else e["name"]] += e["dur"]
    total = sum(by_cat.values())
    tiny = [e["dur"] for e in kernels if e["dur"] < 5]
    print(f"\n{os.path.basename(path)}: {len(kernels)} device events, busy {total / 1e3:.1f} ms of a "
          f"{span / 1e3:.1f} ms span; {len(tiny)} events under 5 µs take {sum(tiny) / 1e3:.1f} ms")
    for cat, us in by_cat.most_common():
      print(f"  {cat:24s} {us / 1e3:9.1f} ms {us / max(total, 1):6.1%}")
    print("  top kernels:")
    for nm, us in by_name.most_common(25):
      print(f"    {us / 1e3:8.1f} ms  {nm[:110]}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="profile_out")
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--plan", default=None, metavar="REMAT:MICRO:ATTENTION",
                  help="the update plan, as bench/gpu.py --plans (default: its last plan for the size)")
  ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the trained parameters' dtype (default fp32 master weights, as bench/gpu.py)")
  ap.add_argument("--summarize", metavar="DIR", help="print the summary of the traces in DIR (no profiling)")
  ap.add_argument("--per", type=int, default=0, help="with --summarize: also per kernel, per N-th of the trace "
                                                      "(e.g. the decode steps of decode.trace.json.gz)")
  args = ap.parse_args()
  if args.summarize:
    summarize(args.summarize, per=args.per)
  else:
    profile(args)
    summarize(args.out)


if __name__ == "__main__":
  main()
