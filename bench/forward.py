"""Forward pass: jitted lgrpo_jax vs transformers PyTorch on the same weights, same inputs, one run.

  .venv/bin/python bench/forward.py [--config ../shared/bench/qwen2_5_vl_bench_74m.config.json]
                                    [--batch 4] [--text-tokens 128] [--image 448] [--runs 5]

Builds the transformers model from the config (seeded), saves it, loads that directory into ours,
checks the logits agree, then times both (median of --runs after warm-up) and a large fp32 matmul in
each framework. Prints counted model FLOPs, each side's GFLOP/s and its fraction of the matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "..", "..", "shared", "bench", "qwen2_5_vl_bench_74m.config.json")


def median_time(fn, runs: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def weight_matmul_floor(matmuls, runs: int) -> tuple[int, float]:
  """Times the forward's weight matmuls alone — same shapes and counts, one jitted program, no
  attention and no element-wise work — the most the model's matmul shapes get from this CPU."""
  import jax
  import jax.numpy as jnp
  from lgrpo_jax.models.qwen2_5_vl.flops import matmul_flops
  dense = [mm for mm in matmuls if not mm[0].endswith(".attn")]
  rng = np.random.default_rng(0)
  args = [(jnp.asarray(rng.standard_normal((m, k)), jnp.float32),
           jnp.asarray(rng.standard_normal((c, k, n)), jnp.float32)) for _, c, m, k, n in dense]
  run = jax.jit(lambda args: [jax.lax.scan(lambda z, w: (z, x @ w), 0, ws)[1] for x, ws in args])
  return matmul_flops(dense), median_time(lambda: jax.block_until_ready(run(args)), runs, 1)


def make_inputs(cfg: dict, batch: int, text_tokens: int, image_px: int, seed: int = 0) -> dict:
  v = cfg["vision_config"]
  p, m = v["patch_size"], v["spatial_merge_size"]
  g = image_px // p
  n_img = g * g // (m * m)
  rng = np.random.default_rng(seed)
  vocab = cfg["text_config"]["vocab_size"]
  special = min(cfg["vision_start_token_id"], cfg["image_token_id"], cfg["video_token_id"])
  half = text_tokens // 2
  rows = []
  for _ in range(batch):
    text = rng.integers(0, min(vocab, special), text_tokens)
    rows.append(np.concatenate([text[:half], [cfg["vision_start_token_id"]],
                                np.full(n_img, cfg["image_token_id"]), [cfg["vision_end_token_id"]],
                                text[half:]]))
  ids = np.stack(rows).astype(np.int64)
  patch_dim = v["in_channels"] * v["temporal_patch_size"] * p * p
  return {
      "input_ids": ids,
      "attention_mask": np.ones_like(ids),
      "pixel_values": rng.standard_normal((batch * g * g, patch_dim)).astype(np.float32),
      "image_grid_thw": np.tile(np.array([[1, g, g]], np.int64), (batch, 1)),
      "mm_token_type_ids": (ids == cfg["image_token_id"]).astype(np.int64),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--text-tokens", type=int, default=128)
  ap.add_argument("--image", type=int, default=448, help="square image side in pixels")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--matmul", type=int, default=2048, help="side of the reference fp32 matmul")
  ap.add_argument("--skip-torch", action="store_true")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  import lgrpo_jax
  from lgrpo_jax.models.qwen2_5_vl.flops import forward_matmuls, matmul_flops

  with open(args.config) as f:
    cfg = json.load(f)
  inputs = make_inputs(cfg, args.batch, args.text_tokens, args.image)
  ours_in = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
  seq_len = inputs["input_ids"].shape[1]
  tmp = tempfile.mkdtemp(prefix="bench_forward_")

  # Order matters on a 2-core machine: torch's OpenMP workers spin after each op and slow whatever
  # runs next, so JAX is timed first; torch builds and saves the weights but computes nothing yet.
  results = {}
  if not args.skip_torch:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    hf.save_pretrained(tmp)
    ours = lgrpo_jax.load_hf(tmp, dtype="float32")
  else:
    ours = lgrpo_jax.from_config(cfg, dtype="float32")

  def jax_forward():
    return lgrpo_jax.forward(ours, **ours_in).block_until_ready()

  t0 = time.perf_counter()
  got = np.asarray(jax_forward())
  compile_s = time.perf_counter() - t0
  # The reference matmul is timed just before and just after our forward (this machine is noisy);
  # the rate is the mean of the two medians.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((args.matmul, args.matmul)), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  mm_times = [median_time(lambda: mm(x, x).block_until_ready(), 5, 2)]
  results["lgrpo_jax (jit)"] = median_time(jax_forward, args.runs, args.warmup)
  mm_times.append(median_time(lambda: mm(x, x).block_until_ready(), 5, 1))
  jax_mm = statistics.mean(mm_times)

  grid = tuple(map(tuple, inputs["image_grid_thw"].tolist()))
  model_cfg = lgrpo_jax.Qwen25VLConfig.from_hf_dict(cfg)
  dense_flops, dense_s = weight_matmul_floor(forward_matmuls(model_cfg, args.batch, seq_len, grid), 3)

  torch_mm = None
  if not args.skip_torch:
    hf_in = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def torch_forward():
      with torch.no_grad():
        return hf(**hf_in).logits

    a = torch.randn(args.matmul, args.matmul)
    b = torch.randn(args.matmul, args.matmul)
    torch_mm_times = [median_time(lambda: a @ b, 5, 2)]
    results["transformers (torch eager)"] = median_time(torch_forward, args.runs, args.warmup)
    torch_mm_times.append(median_time(lambda: a @ b, 5, 1))
    torch_mm = statistics.mean(torch_mm_times)
    ref = torch_forward().numpy()
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    print(f"logits parity: max|ours - transformers| / max|transformers| = {err:.2e}")
    assert err < 1e-4, "outputs differ: timings would not be comparable"

  matmuls = forward_matmuls(model_cfg, args.batch, seq_len, grid)
  flops = matmul_flops(matmuls)
  mm_flops = 2 * args.matmul**3
  jax_rate = mm_flops / jax_mm / 1e9
  torch_rate = mm_flops / torch_mm / 1e9 if torch_mm else None

  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; python {sys.version.split()[0]}")
  print(f"inputs: batch {args.batch} x {seq_len} tokens ({args.image}x{args.image} image + "
        f"{args.text_tokens} text); counted forward FLOPs {flops / 1e9:.1f} GFLOP; "
        f"jax compile+first run {compile_s:.1f} s")
  print(f"fp32 {args.matmul}^3 matmul: jax {jax_rate:.1f} GFLOP/s"
        + (f", torch {torch_rate:.1f} GFLOP/s" if torch_rate else ""))
  print(f"the forward's weight matmuls alone (same shapes, no attention): {dense_flops / 1e9:.1f} "
        f"GFLOP in {dense_s:.3f} s = {dense_flops / dense_s / 1e9:.1f} GFLOP/s "
        f"({dense_flops / dense_s / 1e9 / jax_rate:.0%} of the {args.matmul}^3 rate)")
  print(f"\n{'':28s} {'median s':>9s} {'GFLOP/s':>8s} {'of own matmul rate':>19s}")
  for name, sec in sorted(results.items(), reverse=True):
    rate = flops / sec / 1e9
    own = jax_rate if name.startswith("lgrpo") else torch_rate
    print(f"{name:28s} {sec:9.3f} {rate:8.1f} {rate / own:18.0%}")
  if len(results) == 2:
    t, j = results["transformers (torch eager)"], results["lgrpo_jax (jit)"]
    print(f"\nspeed-up lgrpo_jax vs transformers: {t / j:.2f}x")


if __name__ == "__main__":
  main()
