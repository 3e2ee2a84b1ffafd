"""The full GRPO step, ours against TRL's `GRPOTrainer`, in one run on this machine.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/vs_trl.py [--out FILE] [--pairs 4] [--samples 8] [--new-tokens 128]
      [--micro-batches 4] [--quick]

Runs, back to back in this one invocation, each in its own process (so neither sees the other's threads
or memory): `bench/trl_step.py` (TRL 1.16, PyTorch; one warm-up step, then one timed step) and
`bench/step.py --modes shared` (ours, prefix sharing, the update over --micro-batches micro-batches),
on the same 74M benchmark model config, the same sizes (B pairs × G completions × N tokens, two 448²
images per pair, β = 0.04, a listener reward from a frozen copy of the model). Needs the `bench` extra.

Prints one table: each side's phases, the step ratio, the counted FLOPs of our step (the FLOPs both
sides must do, counted once per pair for the shared prefix), the FLOP floor = those FLOPs / the fp32
matmul rate measured (by JAX, 2048³) in the same run, and each of our phases' fraction of that rate.
`--quick` shrinks everything (a minute; checks that the driver works).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# TRL's phases that correspond to each of ours (TRL's data loading and processing have no counterpart:
# our pipeline prepares batches on the host ahead of the step, so they stay in TRL's step total only).
MATCH = {"rollout": ("generate",), "listener": ("listener",), "reference": ("ref logps", "old logps"),
         "update": ("loss fwd", "backward", "optimizer")}


def run(cmd: list[str], log: str) -> float:
  t0 = time.perf_counter()
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  with open(log, "w") as f:
    proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
  if proc.returncode:
    tail = open(log).read().splitlines()[-20:]
    sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--micro-batches", type=int, default=4, help="our update's micro-batches (memory: 24 GB here)")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the driver, measures nothing useful")
  ap.add_argument("--out", default=None, help="write both sides' results and the comparison as JSON")
  args = ap.parse_args()

  work = tempfile.mkdtemp(prefix="vs_trl_")
  sizes = ["--pairs", str(args.pairs), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
  if args.quick:
    sizes = ["--pairs", "2", "--samples", "2", "--new-tokens", "8", "--image", "56", "--text-tokens", "16"]
  py = sys.executable
  started = time.strftime("%Y-%m-%d %H:%M")
  trl_wall = run([py, os.path.join(HERE, "trl_step.py"), *sizes, "--warmup", "0" if args.quick else "1",
                  "--steps", "1", "--out", os.path.join(work, "trl.json")], os.path.join(work, "trl.log"))
  ours_wall = run([py, os.path.join(HERE, "step.py"), *sizes, "--modes", "shared", "--micro-batches",
                   "1" if args.quick else str(args.micro_batches), "--out", os.path.join(work, "ours.json")],
                  os.path.join(work, "ours.log"))
  trl = json.load(open(os.path.join(work, "trl.json")))
  ours = json.load(open(os.path.join(work, "ours.json")))

  rate = max(ours["matmul_gflops_before"], ours["matmul_gflops_after"]) * 1e9
  flops = sum(ours["flops"].values())
  floor = flops / rate
  t_ours, t_trl = ours["step_s"], trl["step_s"]
  sz = ours["sizes"]
  print(f"\n{started}, {ours['cores']} cores; jax {ours['jax']} vs torch {trl['torch']} / transformers "
        f"{trl['transformers']} / trl {trl['trl']}; {sz['pairs']} pairs × {sz['samples']} completions × "
        f"{sz['new_tokens']} tokens, prompt {sz['prompt_tokens']}, β={sz['beta']}; wall: TRL {trl_wall:.0f} s, "
        f"ours {ours_wall:.0f} s (compiles and checks included)")
  print(f"fp32 matmul rate (JAX 2048³) {ours['matmul_gflops_before']:.0f} / {ours['matmul_gflops_after']:.0f} "
        f"GFLOP/s; (torch 2048³ in the TRL process {trl['matmul_gflops_before']:.0f} / "
        f"{trl['matmul_gflops_after']:.0f})")
  print(f"\n{'phase':10s} {'ours s':>8s} {'TRL s':>8s} {'ratio':>7s} {'TFLOP':>7s} {'ours %rate':>10s}  TRL phases")
  for ph, trl_names in MATCH.items():
    mine = ours["phases"][ph]
    theirs = sum(trl["phases"].get(n, 0.0) for n in trl_names)
    print(f"{ph:10s} {mine:8.2f} {theirs:8.2f} {theirs / mine:6.1f}× {ours['flops'][ph] / 1e12:7.3f} "
          f"{ours['flops'][ph] / mine / rate:10.0%}  {' + '.join(trl_names)}")
  rest = t_trl - sum(trl["phases"].get(n, 0.0) for names in MATCH.values() for n in names)
  print(f"{'(TRL rest)':10s} {'':8s} {rest:8.2f} {'':7s} {'':7s} {'':10s}  data, processing, format, other")
  print(f"{'step':10s} {t_ours:8.2f} {t_trl:8.2f} {t_trl / t_ours:6.1f}× {flops / 1e12:7.3f} {flops / t_ours / rate:10.0%}")
  print(f"\nours is {t_trl / t_ours:.1f}× faster than TRL per step; FLOP floor {floor:.1f} s "
        f"({flops / 1e12:.3f} TFLOP / {rate / 1e9:.0f} GFLOP/s): ours at {t_ours / floor:.2f}× the floor")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(started=started, ours=ours, trl=trl, ratio=t_trl / t_ours, floor_s=floor,
                     of_floor=t_ours / floor, rate_gflops=rate / 1e9, wall_s=dict(trl=trl_wall, ours=ours_wall)),
                f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
