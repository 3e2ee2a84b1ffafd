"""Rollout: lgrpo_jax's sampler vs transformers `generate` on the same weights, in one run.

  .venv/bin/python bench/rollout.py [--prompts 4] [--samples 8] [--new-tokens 128] [--skip-torch]
                                    [--scaling]

G samples of each prompt (one 448² image + 128 text tokens, the shared 74M benchmark model), plain
sampling at temperature 1 (no top-k/top-p, no EOS: every row generates --new-tokens). Checks that
greedy decoding agrees token for token on one prompt before printing anything, and times (median of --runs, after a
compile run) ours and transformers' `generate(do_sample=True, num_return_sequences=G)`, and a
2048³ fp32 matmul just before and after ours. Prints new tokens/s, the ratio, the counted FLOPs of
the rollout (one prefill per prompt + decode steps) and the FLOP floor (FLOPs / matmul rate).
--scaling adds decode time per token against batch (prompts × samples) and cache length.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import DEFAULT_CONFIG, make_inputs, median_time  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--text-tokens", type=int, default=128)
  ap.add_argument("--image", type=int, default=448)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--torch-runs", type=int, default=1)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--scaling", action="store_true")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  import lgrpo_jax
  from lgrpo_jax.models.qwen2_5_vl.flops import matmul_flops, rollout_matmuls
  from lgrpo_jax.sampling.sampler import SamplingConfig, _sample_jit

  with open(args.config) as f:
    cfg = json.load(f)
  inputs = make_inputs(cfg, args.prompts, args.text_tokens, args.image)
  tmp = tempfile.mkdtemp(prefix="bench_rollout_")
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  hf = Qwen2_5_VLForConditionalGeneration(
      Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
  hf.save_pretrained(tmp)
  ours = lgrpo_jax.load_hf(tmp, dtype="float32")
  grid = tuple(map(tuple, inputs["image_grid_thw"].tolist()))
  dev = {k: jnp.asarray(inputs[k], jnp.int32) for k in ("input_ids", "attention_mask")}
  pixels = jnp.asarray(inputs["pixel_values"])

  def ours_run(prompts, samples, new_tokens, temperature=1.0, seed=0):
    n_pix = pixels.shape[0] // args.prompts * prompts
    c = SamplingConfig(max_new_tokens=new_tokens, num_samples=samples, temperature=temperature)
    out = _sample_jit(ours, dev["input_ids"][:prompts], dev["attention_mask"][:prompts], pixels[:n_pix],
                      jax.random.key(seed), grid[:prompts], c)
    return jax.block_until_ready(out)

  # Ours (timed before torch computes anything more: torch's OpenMP threads slow what follows).
  b, g, n = args.prompts, args.samples, args.new_tokens
  t0 = time.perf_counter()
  ours_run(b, g, n)
  compile_s = time.perf_counter() - t0
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
  mm = jax.jit(lambda a, c: a @ c)
  mm_times = [median_time(lambda: mm(x, x).block_until_ready(), 5, 2)]
  ours_s = median_time(lambda: ours_run(b, g, n), args.runs, 0)
  prefill_s = median_time(lambda: ours_run(b, g, 1), args.runs, 1)
  mm_times.append(median_time(lambda: mm(x, x).block_until_ready(), 5, 1))
  rate = 2 * 2048**3 / statistics.mean(mm_times)

  scaling = []
  if args.scaling:
    for pb, pg, pn in [(1, 8, 128), (2, 8, 128), (4, 8, 128), (4, 16, 128), (4, 8, 64), (4, 8, 256)]:
      if pb > args.prompts:  # only --prompts rows exist: a larger point would run fewer, labelled more
        print(f"scaling: {pb} prompts skipped (--prompts {args.prompts})")
        continue
      ours_run(pb, pg, pn)
      ours_run(pb, pg, 1)
      total = median_time(lambda: ours_run(pb, pg, pn), 2, 0)
      pre = median_time(lambda: ours_run(pb, pg, 1), 2, 0)
      scaling.append((pb, pg, pn, (total - pre) / (pn - 1)))

  # Correctness: greedy tokens equal transformers' on one prompt (32 tokens), checked before any
  # figure is printed (run after our timings: torch's OpenMP threads slow whatever runs next).
  one = {k: torch.from_numpy(v[:1]) for k, v in inputs.items() if k != "pixel_values"}
  one["pixel_values"] = torch.from_numpy(inputs["pixel_values"][:pixels.shape[0] // args.prompts])
  with torch.no_grad():
    ref = hf.generate(**one, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
  got = np.asarray(ours_run(1, 1, 32, temperature=0.0).tokens[0, 0])
  same = int((got == ref[0, inputs["input_ids"].shape[1]:].numpy()).sum())
  print(f"greedy parity (1 prompt, 32 tokens): {same}/32 tokens equal to transformers")
  assert same == 32, "greedy decoding differs from transformers: timings would not be comparable"

  torch_s = None
  if not args.skip_torch:
    hf_in = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def torch_run():
      with torch.no_grad():
        return hf.generate(**hf_in, do_sample=True, num_return_sequences=g, max_new_tokens=n,
                           min_new_tokens=n, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                           pad_token_id=0)

    torch_s = median_time(torch_run, args.torch_runs, 0)

  model_cfg = lgrpo_jax.Qwen25VLConfig.from_hf_dict(cfg)
  prompt_len = inputs["input_ids"].shape[1]
  flops = matmul_flops(rollout_matmuls(model_cfg, b, prompt_len, grid[:b], g, n))
  pre_flops = matmul_flops(rollout_matmuls(model_cfg, b, prompt_len, grid[:b], g, 1))
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
        f"{jax.__version__}; torch {torch.__version__}; python {sys.version.split()[0]}")
  print(f"rollout: {b} prompts x {g} samples x {n} new tokens, prompt {prompt_len} tokens "
        f"({args.image}^2 image); counted FLOPs {flops / 1e9:.0f} GFLOP (prefill {pre_flops / 1e9:.0f})")
  print(f"fp32 2048^3 matmul (jax, around our runs): {rate / 1e9:.1f} GFLOP/s -> FLOP floor "
        f"{flops / rate:.2f} s; ours compile + first run {compile_s:.1f} s")
  print(f"\n{'':26s} {'seconds':>8s} {'new tok/s':>10s} {'of floor':>9s}")
  print(f"{'lgrpo_jax':26s} {ours_s:8.2f} {b * g * n / ours_s:10.0f} {flops / rate / ours_s:9.0%}")
  print(f"{'  of which prefill':26s} {prefill_s:8.2f} {'':10s} {pre_flops / rate / prefill_s:9.0%}")
  dec_flops = flops - pre_flops
  print(f"{'  decode':26s} {ours_s - prefill_s:8.2f} {'':10s} "
        f"{dec_flops / rate / (ours_s - prefill_s):9.0%}")
  if torch_s:
    print(f"{'transformers generate':26s} {torch_s:8.2f} {b * g * n / torch_s:10.0f} "
          f"{flops / rate / torch_s:9.0%}")
    print(f"\nspeed-up lgrpo_jax vs transformers: {torch_s / ours_s:.1f}x")
  if scaling:
    print("\ndecode time per generated position (all rows), ours:")
    print(f"{'prompts':>8s} {'samples':>8s} {'new tok':>8s} {'ms/step':>8s} {'us/token':>9s}")
    for pb, pg, pn, per in scaling:
      print(f"{pb:8d} {pg:8d} {pn:8d} {per * 1e3:8.1f} {per / (pb * pg) * 1e6:9.0f}")


if __name__ == "__main__":
  main()
