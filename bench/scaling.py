"""How the GRPO step's time and memory grow: G, completion length, image size, simulated FSDP devices.

  .venv/bin/python bench/scaling.py [--out docs/scaling_cpu.png] [--quick]

The step's four phases (rollout, listener, reference log-probs, update; prefix sharing on, as
bench/step.py builds them) on the shared 74M model, summed per point, around a base of 2 pairs ×
G = 8 × 128 tokens with two 224² images per pair (2×2 windows of 112 px per side):

  G            2, 4, 8, 16
  length       64, 128, 256, 512 new tokens
  image        112, 224, 336, 448 px per side (1–4 vision windows per side)
  devices      1, 2, 4, 8 simulated CPU devices, parameters FSDP-sharded, batch rows split
               (8 pairs × 4 × 64 tokens, 112² images: the rows must divide over 8 devices)

Each point runs in its own process (a fresh XLA, its own device count; peak memory = that process's
peak resident set, model and compiled programs included, and XLA's memory analysis of the update).
Prints a table with the counted matmul FLOPs of each point next to its time, so the growth can be
compared with what the FLOP count predicts, and draws one panel per axis (time and the FLOP
prediction scaled to the base point; peak memory on the right axis).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BASE = dict(pairs=2, samples=8, new_tokens=128, image=224, devices=1)
AXES = {
    "samples": [2, 4, 8, 16],
    "new_tokens": [64, 128, 256, 512],
    "image": [112, 224, 336, 448],
    "devices": [1, 2, 4, 8],
}
DEVICE_BASE = dict(pairs=8, samples=4, new_tokens=64, image=112)
LABELS = {"samples": "G (completions per pair)", "new_tokens": "completion length (tokens)",
          "image": "image side (px; 112 px = one window)", "devices": "simulated devices (FSDP)"}


def point(args) -> None:
  """One point, in this process: time each phase once after compiling, print one JSON line."""
  d = int(args.devices)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={d}"
  import jax

  import lgrpo_jax
  from forward import DEFAULT_CONFIG
  from lgrpo_jax.sharding import MeshConfig, make_mesh
  from step import build, timed

  with open(DEFAULT_CONFIG) as f:
    raw = json.load(f)
  mesh = make_mesh(MeshConfig(data=1, fsdp=d)) if d > 1 else None
  model = lgrpo_jax.from_config(raw, seed=0, mesh=mesh)
  s = build(raw, model, pairs=args.pairs, samples=args.samples, new_tokens=args.new_tokens, text_tokens=128,
            image_px=args.image, micro_batches=1)
  phases = {"rollout": lambda: s.rollout()(s.params), "listener": lambda: s.listen(True)(s.params),
            "reference": lambda: s.logp(True)(s.params), "update": lambda: s.update(True)(s.params, s.opt_state)}
  out = {"prompt_len": s.prompt_len}
  ctx = jax.set_mesh(mesh) if mesh is not None else None
  if ctx is not None:
    ctx.__enter__()
  t0 = time.perf_counter()
  for name, fn in phases.items():
    out[name] = timed(fn, 1)
  out["wall_s"] = time.perf_counter() - t0
  ma = s.update(True).lower(s.params, s.opt_state).compile().memory_analysis()
  out["update_temp_gib"] = ma.temp_size_in_bytes / 2**30
  out["flops"] = sum(v[0] for v in s.flops.values())
  out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print("POINT " + json.dumps(out), flush=True)


def run_point(cfg: dict) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--point"] + [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("POINT ")]
  if proc.returncode or not lines:
    return {"error": (proc.stdout.strip().splitlines() or ["?"])[-1][:200]}
  return json.loads(lines[-1][6:])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="the plot (default docs/scaling_cpu.png; with --quick a temporary file)")
  ap.add_argument("--json", default=None, help="also write every point here")
  ap.add_argument("--quick", action="store_true", help="two values per axis, tiny sizes (checks the script)")
  ap.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  for k in ("pairs", "samples", "new_tokens", "image", "devices"):
    ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.point:
    point(args)
    return

  if args.out is None:  # --quick checks the script: it must not overwrite the committed plot
    args.out = (os.path.join(tempfile.mkdtemp(prefix="scaling_quick_"), "scaling.png") if args.quick
                else os.path.join(HERE, "..", "docs", "scaling_cpu.png"))
  axes, base, dbase = AXES, BASE, DEVICE_BASE
  if args.quick:
    axes = {"samples": [2, 4], "new_tokens": [8, 16], "image": [56, 112], "devices": [1, 2]}
    base = dict(pairs=2, samples=2, new_tokens=8, image=56, devices=1)
    dbase = dict(pairs=2, samples=2, new_tokens=8, image=56)
  results, cache = {}, {}
  for axis, values in axes.items():
    for v in values:
      cfg = dict(dbase, devices=v) if axis == "devices" else dict(base, **{axis: v})
      key = tuple(sorted(cfg.items()))
      if key not in cache:
        cache[key] = run_point(cfg)
        r = cache[key]
        step = sum(r.get(p, 0) for p in ("rollout", "listener", "reference", "update"))
        print(f"{axis}={v}: " + (f"step {step:.2f} s, {r['flops'] / 1e12:.3f} TFLOP, peak RSS "
                                 f"{r['peak_rss_gib']:.1f} GiB" if "error" not in r else r["error"]), flush=True)
      results.setdefault(axis, []).append((v, cache[key]))

  import platform

  import jax
  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  print(f"{'axis':10s} {'value':>6s} {'prompt':>6s} {'rollout':>8s} {'listen':>7s} {'ref':>6s} {'update':>7s} "
        f"{'step s':>7s} {'×base':>6s} {'TFLOP':>7s} {'FLOP ×':>7s} {'RSS GiB':>8s} {'upd temp':>8s}")
  for axis, pts in results.items():
    ok = [(v, r) for v, r in pts if "error" not in r]
    if not ok:
      continue
    step = lambda r: sum(r[p] for p in ("rollout", "listener", "reference", "update"))
    b = dict(ok)[base[axis]] if axis != "devices" else ok[0][1]
    for v, r in pts:
      if "error" in r:
        print(f"{axis:10s} {v:6d} failed: {r['error']}")
        continue
      print(f"{axis:10s} {v:6d} {r['prompt_len']:6d} {r['rollout']:8.2f} {r['listener']:7.2f} {r['reference']:6.2f} "
            f"{r['update']:7.2f} {step(r):7.2f} {step(r) / step(b):6.2f} {r['flops'] / 1e12:7.3f} "
            f"{r['flops'] / b['flops']:7.2f} {r['peak_rss_gib']:8.2f} {r['update_temp_gib']:8.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({k: [[v, r] for v, r in pts] for k, pts in results.items()}, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, 4, figsize=(18, 4.2))
  for ax, (axis, pts) in zip(axs, results.items()):
    ok = [(v, r) for v, r in pts if "error" not in r]
    if not ok:
      continue
    xs = [v for v, _ in ok]
    step = [sum(r[p] for p in ("rollout", "listener", "reference", "update")) for _, r in ok]
    bi = xs.index(base[axis]) if axis != "devices" else 0
    pred = [r["flops"] / ok[bi][1]["flops"] * step[bi] for _, r in ok]
    ax.plot(xs, step, "o-", label="step time (s)")
    ax.plot(xs, pred, "k--", label="FLOP count (scaled at base)")
    ax.set_xlabel(LABELS[axis])
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, [r["peak_rss_gib"] for _, r in ok], "s:", color="tab:red", label="peak RSS (GiB)")
    ax2.set_ylabel("peak memory (GiB)", color="tab:red")
    ax.legend(loc="upper left", fontsize=8)
  fig.suptitle("GRPO step (rollout + listener + reference + update), 74M model, CPU")
  fig.tight_layout()
  fig.savefig(args.out, dpi=90)
  print(f"plot: {args.out}")


if __name__ == "__main__":
  main()
