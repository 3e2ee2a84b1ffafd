"""Compile the Pallas decode kernels' Triton IR for sm_90 (H100 / H200) on a machine without a GPU.

  .venv/bin/python bench/triton_sm90.py --triton-python /path/to/python [--out DIR]

Step 1 (this interpreter, the project's jax): lower each kernel at the 3B decode shapes (32 rows)
for CUDA through Pallas' Triton lowering and write its Triton IR without debug locations: the decode
attention kernel under every tuning of bench/gpu.py's sweep; each decode matmul under the sweep's
first-stage tunings and the second-stage variants around each of them (everything the GPU sweep can
try), called as the decode step calls it (Σx² partials in or out), and its `TUNING` default also
without them (layer 0's q/k/v).
Step 2 (`--triton-python`: any Python with the `triton` wheel — e.g. a separate venv with
`pip install triton`; not a dependency of lgrpo_jax): compile each to PTX, and with the wheel's
ptxas to a cubin for sm_90a, and report shared memory (over 227 KB a program cannot launch on an
H100 / H200), registers, spills, the widest global load, the MMA instruction and the cp.async
(pipelined copy) count.

What it cannot say: speed. And the GPU image's XLA compiles Pallas' Triton IR with its own Triton,
not the wheel's, so a clean compile here is evidence, not proof.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a program may use on sm_90


def dump(out: str) -> list[dict]:
  """Step 1: the kernels' Triton IR into `out`, and a manifest of them."""
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.join(HERE, "..", "tests"))
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import pallas_call_registration as registration

  import gpu
  from lgrpo_jax.kernels import decode_attention as dk
  from lgrpo_jax.kernels import decode_matmul as dm
  from lgrpo_jax.kernels import lower_for_cuda
  from test_decode_matmul import lower_3b

  captured: list[str] = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    result = original(*a, **k)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result
  registration.lowering.lower_jaxpr_to_triton_module = capture

  sds, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
  attention_args = (sds((4, 8, 2, 10, 128), bf), sds((4, 8, 128), f32), sds((4, 8, 128), f32),
                    sds((4, 2, 644, 128), bf), sds((4, 2, 644, 128), bf), sds((4, 644), jnp.int32),
                    sds((4, 2, 8, 256, 128), bf), sds((4, 2, 8, 256, 128), bf), sds((), jnp.int32))
  manifest = []

  def write(name, tuning, warps, stages):
    path = os.path.join(out, f"{name}.ttir")
    with open(path, "w") as f:
      f.write(captured[-1])
    manifest.append({"name": name, "tuning": dataclasses.asdict(tuning), "num_warps": warps, "num_stages": stages,
                     "path": path})

  for t in gpu.attention_tunings(tiny=False):
    fn = lambda *a, t=t: dk.decode_attention(*a, scale=128**-0.5, tuning=t, interpret=False)
    lower_for_cuda(fn, *attention_args)
    write(f"attention_b{t.block}_w{t.num_warps}_s{t.num_stages}", t, t.num_warps, t.num_stages)
  # As the decode step calls them: q/k/v and gate/up take the 2,048 / 16 Σx² partials of the o / down
  # kernel before them; o and down return theirs. The default tunings also as layer 0's q/k/v runs
  # (no partials: the Σx² pass in the kernel).
  ss_in = {"qkv": 2048 // 16, "gate_up": 2048 // 16}
  for kind in dm.KINDS:
    calls = [(dm.TUNING[kind], {})]
    for first in gpu.matmul_first(kind, tiny=False):
      calls += [(t, {"ss": ss_in.get(kind, 0), "ret_ss": kind in ("o", "down")})
                for t in [first] + gpu.matmul_around(kind, first)]
    calls += [(dm.TUNING[kind], calls[1][1])]
    seen = set()
    for t, kw in calls:
      name = f"{kind}_n{t.block_n}_k{t.block_k}_s{t.split}_w{t.num_warps}_st{t.num_stages}" + (
          "_prenorm" if t.prenorm else "") + ("_ss" if kw.get("ss") or kw.get("ret_ss") else "")
      if name in seen:
        continue
      seen.add(name)
      lower_3b(kind, t, **kw)
      write(name, t, t.num_warps, t.num_stages)
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def compile_all(out: str) -> list[dict]:
  """Step 2 (needs `triton`, not jax): compile every IR of the manifest for sm_90."""
  import triton
  from triton.backends.compiler import GPUTarget
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  results = []
  for item in manifest:
    rec = {"name": item["name"], "tuning": item["tuning"]}
    try:
      k = triton.compile(item["path"], target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": item["num_warps"], "num_stages": item["num_stages"]})
    except Exception as e:  # what the GPU sweep would report as a failed tuning
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      results.append(rec)
      continue
    ptx = k.asm["ptx"]
    # Pipelined loads are cp.async global → shared copies (bytes each: 16 is a full vector); the
    # rest are register loads (ld.global, .v2/.v4 = vectors).
    copies = collections.Counter(int(b, 0) for b in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?\], (0x[0-9a-f]+|\d+)", ptx))
    loads = collections.Counter(v or "v1" for v in re.findall(r"ld\.global(?:\.[a-zA-Z0-9:]+)*?(?:\.(v[248]))?\.[bfsu]\d+ ", ptx))
    rec.update(shared=k.metadata.shared, fits=k.metadata.shared <= SMEM_LIMIT,
               cp_async={f"{b}B": n for b, n in sorted(copies.items())}, ld_global=dict(sorted(loads.items())),
               mma=sorted(set(re.findall(r"(wgmma\.\w+|mma\.sync\.aligned\.m\d+n\d+k\d+)", ptx))))
    ptx_path = item["path"].replace(".ttir", ".ptx")
    with open(ptx_path, "w") as f:
      f.write(ptx)
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", ptx_path.replace(".ptx", ".cubin")],
                          capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", info.stderr)
    spill = re.search(r"(\d+) bytes spill stores", info.stderr)
    rec.update(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else None,
               ptxas_ok=info.returncode == 0)
    results.append(rec)
  with open(os.path.join(out, "compiled.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def table(results: list[dict]) -> str:
  lines = [f"{'kernel (3B shapes, 32 rows)':44s} {'smem KB':>8s} {'regs':>5s} {'spill':>6s}  "
           f"{'cp.async (bytes: count)':24s} {'ld.global':18s} mma"]
  for r in results:
    if "error" in r:
      lines.append(f"{r['name']:44s} FAILED: {r['error']}")
      continue
    fmt = lambda d: " ".join(f"{k}:{v}" for k, v in d.items()) or "-"
    lines.append(f"{r['name']:44s} {r['shared'] / 1024:8.1f} {r['registers'] or 0:5d} {r['spill_bytes'] or 0:6d}  "
                 f"{fmt(r['cp_async']):24s} {fmt(r['ld_global']):18s} {', '.join(m.split('.')[-1] for m in r['mma'])}"
                 + ("" if r["fits"] else "  OVER the 227 KB of shared memory")
                 + ("" if r["ptxas_ok"] else "  ptxas failed"))
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", help="folder for the IR, PTX, cubins and compiled.json (default: a temporary one)")
  ap.add_argument("--triton-python", help="a Python with the triton wheel, for step 2")
  ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # step 2, run under that Python
  args = ap.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="triton_sm90_")
  os.makedirs(out, exist_ok=True)
  if args.compile:
    print(table(compile_all(out)))
    return
  manifest = dump(out)
  print(f"{len(manifest)} kernels' Triton IR written to {out}", flush=True)
  if not args.triton_python:
    print(f"step 2: {os.path.basename(__file__)} --compile --out {out}, under a Python with triton")
    return
  subprocess.run([args.triton_python, os.path.abspath(__file__), "--compile", "--out", out], check=True)


if __name__ == "__main__":
  main()
