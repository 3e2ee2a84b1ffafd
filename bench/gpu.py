"""Accelerator efficiency: a ~3B-shaped Qwen2.5-VL in bf16 (random weights) on one GPU, < 8 minutes.

  PYTHONPATH=. python3 bench/gpu.py --out DIR          # on the lent GPU (installs nothing)
  .venv/bin/python bench/gpu.py --tiny                  # anywhere: tiny configs, to know it runs

Two processes, one after the other (JAX and PyTorch each take the GPU's memory for themselves):

  torch   transformers on the GPU: a tiny random model (windows, two images of different sizes per
          row, left padding, untied head) in fp32 — its logits are the reference for ours; then the
          3B config's forward in bf16 (SDPA attention), timed; then a device-to-device copy.
  jax     correctness first: the tiny model loaded from the saved transformers directory gives the
          same logits (fp32 ≤ 1e-4 of the largest, bf16 ≤ 3e-2); then the ceilings measured here: a
          bf16 8192³ matmul (random inputs), a device-to-device copy (bytes read + written; the
          better of an XLA elementwise x·2 and PyTorch's `copy_`, measured in the torch part) and a
          read-only pass (row sums);
          then on the 3B config in bf16:
            forward   the same inputs as torch's (B rows: two 448² images + text each), once per
                      attention kernel (--attention: xla, cudnn)
            update    one GRPO update (loss + backward + AdamW, β > 0, prefix sharing), parameters and
                      optimiser state donated, in --update-param-dtype (default fp32 master weights, as
                      the configs' model.param_dtype; computed in bf16); MFU = counted model FLOPs (3 × forward) / time / the
                      measured matmul rate; each (remat, micro-batches, attention) plan of --plans
                      runs only if its compiled program fits in free memory (XLA's memory analysis,
                      before running); the first that fits is "the" update, --all-plans times the rest
            decode    the sampler (P prompts × G samples, N new tokens, no EOS) minus its prefill,
                      per step; HBM fraction = (decoder weights + the KV cache as read) / step time /
                      the measured copy bandwidth (and the read-only rate); one line per --decode variant (model, rows,
                      temperature: 0 is greedy, no sampling pass over the vocabulary), the 3B at 32 rows
                      traced once with --trace-decode (kernels per step, busy vs wall time)
          where the 1.5B is a ~1.5B text decoder (Qwen2-VL-2B-shaped). With --decode-attention …,pallas:
            first the compiled Pallas decode kernel's sampled tokens against the XLA path's (tiny
            model, fp32: `parity_pallas`), then one decode step's attention work for all 36 layers at
            the 3B shapes on its own (`decode_kernel`): the XLA path's µs per layer against the
            kernel's under a sweep of launch parameters (slots per chunk 64/128 × warps 2/4/8 ×
            stages 2/3); the fastest that matches the XLA path is kept for the decode timings.
          With --decode-matmul …,pallas (the decode's weight matmuls as Pallas kernels with the norms,
          bias, SwiGLU and residual adds folded in): the same tiny-model check (`parity_pallas`),
          then each of the four matmuls of the 3B decoder layer at 32 rows over 36 layers' own
          weights (`decode_matmul_kernel`): the XLA path's µs per layer and GB/s against the kernel's
          under a sweep (5–7 tile shapes, then warps and stages around the best: 7–10 per matmul),
          called as the decode step calls them (q/k/v and gate/up take the Σx² partials that o
          and down return); the fastest that matches is kept. Every decode variant is timed with
          each (attention, matmul) pair of the two lists.
          With --decode-while-graph: the first decode variant's all-XLA and all-Pallas runs once more
          (after those two, before the mixed pairs) with the whole loop as one CUDA graph (XLA
          command buffers with WHILE: no host round trip for the loop condition per step;
          `WHILE_GRAPH_OPTIONS`).

Prints a table last; JSON of everything under --out. Each part and section reports its own failure
and the rest goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from forward import median_time  # noqa: E402  (fn, runs, warm-up runs)

# Qwen2.5-VL-3B's shapes (text decoder 36 × 2048, GQA 16/2, tied head; the 32-layer windowed vision
# tower shared by the whole family).
VISION = {
    "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "hidden_act": "silu",
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "out_hidden_size": 2048,
}
TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
}
SPECIAL = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653}
CONFIG_3B = {"model_type": "qwen2_5_vl", "text_config": TEXT, "vision_config": VISION, **SPECIAL,
             "tie_word_embeddings": True}
CONFIG_1_5B = {"model_type": "qwen2_5_vl",
               "text_config": dict(TEXT, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12),
               "vision_config": dict(VISION, out_hidden_size=1536), **SPECIAL, "tie_word_embeddings": True}
# --tiny: the same program on configs that run on a laptop CPU in a minute.
TINY_VISION = dict(VISION, depth=2, hidden_size=64, num_heads=2, intermediate_size=96, fullatt_block_indexes=[1],
                   out_hidden_size=128)
TINY_TEXT = dict(TEXT, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [4, 6, 6]},
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_SPECIAL = {"image_token_id": 1020, "video_token_id": 1021, "vision_start_token_id": 1018,
                "vision_end_token_id": 1019}
TINY_BIG = {"model_type": "qwen2_5_vl", "text_config": TINY_TEXT, "vision_config": TINY_VISION, **TINY_SPECIAL,
            "tie_word_embeddings": True}
TINY_SMALL = {"model_type": "qwen2_5_vl", "text_config": dict(TINY_TEXT, intermediate_size=192, num_hidden_layers=1),
              "vision_config": TINY_VISION, **TINY_SPECIAL, "tie_word_embeddings": True}


def sizes(tiny: bool) -> dict:
  if tiny:
    return dict(big=TINY_BIG, small=TINY_SMALL, image=112, text=16, fwd_rows=2, pairs=2, samples=4, new=16,
                decode_new=16, matmul=512, copy_mib=64, name_big="tiny", name_small="tiny-small",
                update_plans=[("dots", 2, "auto")], chunk=32,
                decode=[("tiny", 8, 1.0), ("tiny", 8, 0.0), ("tiny-small", 8, 1.0)])
  # Forward: 8 rows of two 448² images (256 tokens each) + 128 text tokens (642 tokens). Update: 4 pairs
  # × 8 completions × 256 tokens. Decode: 4 prompts × 8 samples = 32 rows (bandwidth-bound: 32 FLOP per
  # weight byte against the ~270 of the chip's ridge), 256 new tokens.
  return dict(big=CONFIG_3B, small=CONFIG_1_5B, image=448, text=128, fwd_rows=8, pairs=4, samples=8, new=256,
              decode_new=256, matmul=8192, copy_mib=4096, name_big="3B", name_small="1.5B",
              # Estimated from XLA's CPU memory analysis (fp32 ÷ 2): activations per pair ~35 GB
              # without remat, ~18 with "dots", ~9 with "full". Free after the state: ~43 GB on an
              # H100 with bf16 parameters, grads and AdamW state; fp32 master weights (the default
              # --update-param-dtype) take ~28 GiB more. Each plan runs only if it fits (measured).
              update_plans=[("none", 4, "auto"), ("dots", 2, "auto"), ("full", 1, "auto")], chunk=2048,
              # 32 rows (4 prompts × 8): 32 FLOP per weight byte; 128 rows still under the ridge of an
              # H100 (~240 FLOP/byte) and near an H200's (~150).
              decode=[("3B", 32, 1.0), ("3B", 32, 0.0), ("3B", 64, 1.0), ("3B", 128, 1.0), ("1.5B", 32, 1.0)])


def hf_config(raw: dict):
  from transformers import Qwen2_5_VLConfig
  return Qwen2_5_VLConfig(**{k: v for k, v in raw.items() if k != "model_type"})


def tiny_parity_batch():
  import hf_tiny
  rows = [{"text": [5, 7, 4], "images": [(56, 84), (84, 140)], "pad": 3},
          {"text": [9, 3, 6], "images": [(112, 56), (56, 56)]}]
  return hf_tiny.config_dict("a"), hf_tiny.make_batch(rows, seed=0)


def forward_inputs(raw: dict, rows: int, text: int, image: int) -> dict:
  """Rows of two `image`² images + `text` tokens: numpy arrays as a processor returns them."""
  from step import pair_inputs
  ids, pixels, pair_grid = pair_inputs(raw, rows, text, image)
  return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64),
          "pixel_values": pixels.reshape(-1, pixels.shape[-1]),
          "image_grid_thw": np.asarray(pair_grid * rows, np.int64),
          "mm_token_type_ids": (ids == raw["image_token_id"]).astype(np.int64)}


def update_batch(sz: dict):
  """(PolicyBatch, pair grid, LossConfig) of the update: random completions of exactly N tokens."""
  import jax.numpy as jnp

  from lgrpo_jax.grpo import LossConfig, token_weights
  from lgrpo_jax.grpo.update import PolicyBatch
  from step import pair_inputs
  b, g, n = sz["pairs"], sz["samples"], sz["new"]
  ids_np, pixels_np, pair_grid = pair_inputs(sz["big"], b, sz["text"], sz["image"])
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 1000, (b, g, n)), jnp.int32)
  tmask = jnp.ones((b, g, n), jnp.int32)
  loss_cfg = LossConfig(beta=0.04)
  logp = jnp.asarray(-rng.random((b, g, n)) * 5, jnp.float32)
  pb = PolicyBatch(jnp.asarray(ids_np), jnp.ones(ids_np.shape, jnp.int32), jnp.asarray(pixels_np, jnp.bfloat16),
                   tokens, tmask, logp, jnp.asarray(rng.standard_normal((b, g)), jnp.float32),
                   token_weights(tmask, loss_cfg), logp)
  return pb, pair_grid, loss_cfg


# ---- torch part ----------------------------------------------------------------------------------
def forward_torch(args, sz, dev, out: dict) -> None:
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  inputs = forward_inputs(sz["big"], sz["fwd_rows"], sz["text"], sz["image"])
  hcfg = hf_config(sz["big"])
  hcfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  prev = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)
  with torch.device(dev):
    model = Qwen2_5_VLForConditionalGeneration(hcfg).eval()
  torch.set_default_dtype(prev)
  t = {k: torch.from_numpy(v).to(dev) for k, v in inputs.items()}
  t["pixel_values"] = t["pixel_values"].to(torch.bfloat16)

  def run():
    with torch.inference_mode():
      try:
        model(**t)
      except TypeError:  # an older transformers without mm_token_type_ids
        t.pop("mm_token_type_ids")
        model(**t)
    if dev == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):
    run()
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  out["forward_s"] = statistics.median(times)
  out["forward_shape"] = list(inputs["input_ids"].shape)
  if dev == "cuda":
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
  print(f"torch: forward {out['forward_s'] * 1e3:.1f} ms", flush=True)


def torch_part(args, work: str) -> dict:
  import torch

  import hf_tiny
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
  import transformers
  out["transformers"] = transformers.__version__
  sz = sizes(args.tiny)

  # Reference logits of the tiny model on this device (fp32, no TF32).
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg, batch = tiny_parity_batch()
  hf = hf_tiny.build_hf(cfg, seed=0)
  hf.save_pretrained(os.path.join(work, "tiny_hf"))
  np.savez(os.path.join(work, "tiny_batch.npz"), **batch)
  try:
    pos, _ = hf_tiny.hf_positions(hf, batch)
  except TypeError:  # an older transformers without mm_token_type_ids
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    pos, _ = hf.model.get_rope_index(input_ids=tb["input_ids"], image_grid_thw=tb["image_grid_thw"],
                                     attention_mask=tb["attention_mask"])
  hf = hf.to(dev)
  kw = {"input_ids": torch.from_numpy(batch["input_ids"]).to(dev),
        "attention_mask": torch.from_numpy(batch["attention_mask"]).to(dev), "position_ids": pos.to(dev),
        "pixel_values": torch.from_numpy(batch["pixel_values"]).to(dev),
        "image_grid_thw": torch.from_numpy(batch["image_grid_thw"]).to(dev)}
  with torch.no_grad():
    np.save(os.path.join(work, "tiny_logits_hf.npy"), hf(**kw).logits.float().cpu().numpy())
  del hf
  print("torch: tiny reference logits written", flush=True)

  # The big config's forward in bf16 (random weights: the timing does not depend on them); only
  # when the forward is measured (a decode-only run spends its device minutes on the decode).
  if not args.only or "forward" in args.only.split(","):
    forward_torch(args, sz, dev, out)

  # An independent copy ceiling: PyTorch's device-to-device copy of the same bytes as the jax probe.
  n = sz["copy_mib"] * 2**20 // 2
  src = torch.randn(n, dtype=torch.bfloat16, device=dev)
  dst = torch.empty_like(src)

  def copy():
    dst.copy_(src)
    if dev == "cuda":
      torch.cuda.synchronize()
  copy()
  out["copy_gbps"] = 2 * n * 2 / median_time(copy, 20, 0) / 1e9
  print(f"torch: copy {out['copy_gbps']:.0f} GB/s", flush=True)
  return out


# ---- jax part ------------------------------------------------------------------------------------
DEADLINE: float | None = None  # perf_counter() after which the jax part skips its remaining sections
PLANS: list[tuple[str, int, str]] = []  # --plans: the update's (remat, micro-batches, attention) candidates
ALL_PLANS = False  # --all-plans: time every plan that fits, not only the first
UPDATE_PARAM_DTYPE = "float32"  # --update-param-dtype: the trained parameters' (master weights') dtype
ATTENTION: tuple[str, ...] = ("xla", "cudnn")  # --attention: the forward's kernels
DECODE: list[tuple[str, int, float]] = []  # --decode: (model, rows, temperature) variants
TRACE_DECODE = False
DECODE_ATTENTION: tuple[str, ...] = ("xla",)  # --decode-attention: the decode loop's attention kernels
DECODE_MATMUL: tuple[str, ...] = ("xla",)  # --decode-matmul: the decode loop's weight matmuls
WHILE_GRAPH = False  # --decode-while-graph: also time the all-XLA and all-Pallas decodes as one CUDA graph
# XLA's default command-buffer kinds (openxla/xla debug_options_flags.cc, 2026-08) plus WHILE: the whole
# decode loop becomes one command buffer (CUDA graph conditional nodes) instead of one graph launched
# per iteration with the loop condition read back by the host in between. A per-compile override
# (`jax.jit(compiler_options=...)`) takes the whole list, not XLA_FLAGS' "+WHILE".
WHILE_GRAPH_OPTIONS = {"xla_gpu_enable_command_buffer":
                       "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,DYNAMIC_SLICE_FUSION,WHILE"}


def attention_tunings(tiny: bool) -> list:
  """The decode-attention kernel's sweep (also compiled for sm_90 by bench/triton_sm90.py)."""
  from lgrpo_jax.kernels import decode_attention as dk
  if tiny:
    return [dk.Tuning(block=64), dk.Tuning()]
  return [dk.Tuning(block=bl, num_warps=w, num_stages=st) for bl in (64, 128) for w in (2, 4, 8) for st in (2, 3)]


def matmul_first(kind: str, tiny: bool) -> list:
  """The decode matmul sweep's first stage for `kind`: tile shapes at 4 warps, 3 stages."""
  from lgrpo_jax.kernels import decode_matmul as dm
  if tiny:
    return [dm.Tuning(block_n=16, block_k=64), dm.Tuning(block_n=32, block_k=64, split=2)]
  if kind == "gate_up":  # gate and up share each program's x: x from L2 is 32 / (2 · block_n) of the weights
    return [dm.Tuning(bn, bk) for bn in (32, 64) for bk in (128, 256)] + [dm.Tuning(128, 128, split=2)]
  # N = 2,048–2,560: block_n 16 gives the most programs (128–160, one wave on 132 SMs), but every
  # program reads all of its rows' x from L2, 32 / block_n of the weights' bytes (2x at 16; for down
  # x is 704 KB a program); wider blocks with K split keep ~128 programs at a half or a quarter of it
  return ([dm.Tuning(bn, bk) for bn in (16, 32) for bk in (128, 256)] +
          [dm.Tuning(32, 128, split=2), dm.Tuning(64, 128, split=2), dm.Tuning(64, 128, split=4)])


def matmul_around(kind: str, best) -> list:
  """The second stage around the first stage's best: other warps / stages. (`prenorm` is not swept:
  in the decode step the norm matmuls take the Σx² partials from the kernel before them, and only
  layer 0's q/k/v would use it.)"""
  # gate/up at 2 warps spills registers at every tile of the first stage (bench/triton_sm90.py)
  pairs = ((8, 3), (4, 4)) if kind == "gate_up" else ((2, 3), (8, 3), (4, 4))
  return [dataclasses.replace(best, num_warps=w, num_stages=st) for w, st in pairs]


def decode_impls() -> list[tuple[str, str]]:
  """The (attention, matmul) pairs each decode variant is timed with: all-XLA first, then all-Pallas
  (what a short budget must not skip), then the mixed pairs."""
  pairs = list(itertools.product(DECODE_ATTENTION, DECODE_MATMUL))
  return sorted(pairs, key=lambda p: {"xla": 0, "pallas": 1}.get(p[0] if p[0] == p[1] else "", 2))
ONLY: tuple[str, ...] = ()  # --only: the sections to run (parity and ceilings always run)


def section(res: dict, name: str, fn, save: str | None = None) -> None:
  """res[name] = fn(), or the error; written to `save` at once (a later crash keeps what was measured)."""
  t0 = time.perf_counter()
  if ONLY and name.split("_")[0] not in ONLY:
    return
  if DEADLINE is not None and t0 > DEADLINE:
    res[name] = {"error": "skipped: past --budget"}
    print(f"jax: {name}: skipped (past --budget)", flush=True)
    return
  try:
    res[name] = fn()
  except Exception as e:  # report and go on: the other sections still measure
    res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    traceback.print_exc()
  res[name]["section_s"] = time.perf_counter() - t0
  print(f"jax: {name}: {json.dumps(res[name], default=float)[:600]}", flush=True)
  if save:
    with open(save, "w") as f:
      json.dump(res, f, indent=1, default=float)


def jax_part(args, work: str) -> dict:
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import lgrpo_jax
  from lgrpo_jax.grpo.update import OptimConfig, make_optimizer, update
  from lgrpo_jax.models.qwen2_5_vl import flops as F
  from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index
  from lgrpo_jax.sampling.sampler import SamplingConfig, _sample_jit
  from lgrpo_jax.sampling.sampler import sample as sample_rollout

  import flax
  sz = sizes(args.tiny)
  dev = jax.devices()[0]
  res: dict = {"jax": jax.__version__, "flax": flax.__version__, "device": str(dev.device_kind),
               "platform": dev.platform}

  save = os.path.join(work, "jax.json")

  def parity():
    batch = dict(np.load(os.path.join(work, "tiny_batch.npz")))
    ref = np.load(os.path.join(work, "tiny_logits_hf.npy"))
    valid = batch["attention_mask"].astype(bool)
    scale = np.abs(ref[valid]).max()
    out = {}
    cases = [("float32", "xla"), ("bfloat16", "xla")] + ([("bfloat16", "cudnn")] if dev.platform == "gpu" else [])
    for dtype, impl in cases:
      m = lgrpo_jax.load_hf(os.path.join(work, "tiny_hf"), dtype=dtype).set_attention(impl)
      got = np.asarray(lgrpo_jax.forward(m, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                         batch["image_grid_thw"]), np.float32)
      out[f"rel_err_{dtype}_{impl}"] = float(np.abs(got[valid] - ref[valid]).max() / scale)
    out["ok"] = all(v <= (1e-4 if "float32" in k else 3e-2) for k, v in out.items())
    if not out["ok"]:
      raise AssertionError(f"logits differ from transformers: {out}")
    return out

  def parity_pallas():
    """The Pallas decode kernels as compiled here, against the XLA decode path: the same sampled
    tokens from the tiny model in fp32 (their arithmetic is checked on CPU; this checks the GPU
    build), for each Pallas (attention, matmul) pair asked for."""
    batch = dict(np.load(os.path.join(work, "tiny_batch.npz")))
    m = lgrpo_jax.load_hf(os.path.join(work, "tiny_hf"), dtype="float32")
    gen_kw = dict(max_new_tokens=12, num_samples=4, temperature=1.0, seed=0, eos_token_id=[], pad_token_id=0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    want = lgrpo_jax.generate(m, **inputs, **gen_kw)
    out = {}
    for att, mm in decode_impls():
      if att == mm == "xla":
        continue
      got = lgrpo_jax.generate(m.set_decode_attention(att).set_decode_matmul(mm), **inputs, **gen_kw)
      out[f"{att}/{mm}"] = {"tokens_equal": bool(np.array_equal(np.asarray(got.tokens), np.asarray(want.tokens))),
                            "logprob_diff": float(np.abs(np.asarray(got.logprobs) - np.asarray(want.logprobs)).max())}
    m.set_decode_attention("xla").set_decode_matmul("xla")
    out["ok"] = all(r["tokens_equal"] and r["logprob_diff"] < 1e-4 for r in out.values())
    if not out["ok"]:
      raise AssertionError(f"pallas decode differs from the XLA decode: {out}")
    return out

  def ceilings():
    n = sz["matmul"]
    ks = jax.random.split(jax.random.key(0), 8)
    pairs = [(jax.random.normal(ks[2 * i], (n, n), jnp.bfloat16), jax.random.normal(ks[2 * i + 1], (n, n), jnp.bfloat16))
             for i in range(4)]  # rotate inputs: no cache reuse between timed products
    mm = jax.jit(lambda a, b: a @ b)
    for a, b in pairs:
      mm(a, b).block_until_ready()
    i = iter(range(10**9))

    def one():
      a, b = pairs[next(i) % 4]
      mm(a, b).block_until_ready()
    t = median_time(one, 20, 0)
    elems = sz["copy_mib"] * 2**20 // 2
    x = jax.random.normal(ks[0], (elems,), jnp.bfloat16)
    cp = jax.jit(lambda x: x * 2)  # one read + one write of every element
    cp(x).block_until_ready()
    tc = median_time(lambda: cp(x).block_until_ready(), 20, 0)
    # Read-only: a decode step mostly reads (weights, cache). Rows of 8192 summed in fp32.
    rd = jax.jit(lambda x: jnp.sum(x.reshape(-1, 8192), axis=1, dtype=jnp.float32))
    rd(x).block_until_ready()
    tr = median_time(lambda: rd(x).block_until_ready(), 20, 0)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbps": 2 * elems * 2 / tc / 1e9,
            "read_gbps": elems * 2 / tr / 1e9}

  def decode_kernel():
    """One decode step's attention work for all layers of the 3B shapes (4 prompts × 8 samples at
    slot N/2 of N, the decode variants' prompt), on its own: the XLA path (rotary, the q/k/v split,
    the swaps, both cache writes, `attention_decode`) against the Pallas kernel under each tuning
    of the sweep. µs per layer = one jitted call over all layers (caches donated) / layers; the
    outputs are compared with the XLA path's first. The fastest tuning is kept (`set_tuning`) for
    the decode timings that follow."""
    from lgrpo_jax.kernels import decode_attention as dk
    from lgrpo_jax.models.qwen2_5_vl.layers import apply_rotary, attention_decode
    t = sz["big"]["text_config"]
    nl, kh, d = t["num_hidden_layers"], t["num_key_value_heads"], t["hidden_size"] // t["num_attention_heads"]
    h = t["num_attention_heads"] // kh
    g, n = sz["samples"], sz["decode_new"]
    b = max(1, 32 // g)
    p = forward_inputs(sz["big"], 1, sz["text"], sz["image"])["input_ids"].shape[1]
    step, scale, bf = n // 2, d**-0.5, jnp.bfloat16
    ks = (jax.random.fold_in(jax.random.key(1), i) for i in itertools.count())
    rnd = lambda *shape: jax.random.normal(next(ks), shape, bf)
    # Per-layer arrays, as the sampler's cache and projections are: a stacked (nl, …) array sliced per
    # layer would make XLA copy each slice before the Pallas call, timed against the kernel only.
    qkv = tuple(rnd(b, g, kh, h + 2, d) for _ in range(nl))
    angle = jax.random.uniform(next(ks), (b, g, d // 2), jnp.float32, 0, 300)
    angle = jnp.concatenate([angle, angle], -1)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pk, pv = tuple(rnd(b, kh, p, d) for _ in range(nl)), tuple(rnd(b, kh, p, d) for _ in range(nl))
    mask = jnp.ones((b, p), jnp.int32)
    slots = lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (b, kh, g, n, d), bf)
    cache = lambda: (tuple(slots(i) for i in range(nl)), tuple(slots(nl + i) for i in range(nl)))  # same each time
    to_bk = lambda a: jnp.swapaxes(a, 1, 2)

    def xla_step(sk, sv, qkv, cos, sin, pk, pv, mask):
      c, s = cos[:, :, None], sin[:, :, None]
      own = jnp.arange(n) <= step
      outs, nk, nv = [], [], []
      for i in range(nl):
        y = qkv[i]
        q = apply_rotary(y[..., :h, :], c[..., None, :], s[..., None, :])
        k = apply_rotary(y[..., h, :], c, s)
        k_i = jax.lax.dynamic_update_slice(sk[i], to_bk(k)[:, :, :, None], (0, 0, 0, step, 0))
        v_i = jax.lax.dynamic_update_slice(sv[i], to_bk(y[..., h + 1, :])[:, :, :, None], (0, 0, 0, step, 0))
        outs.append(to_bk(attention_decode(to_bk(q), pk[i], pv[i], mask.astype(bool), k_i, v_i, own, scale)))
        nk.append(k_i)
        nv.append(v_i)
      return tuple(outs), tuple(nk), tuple(nv)

    def pallas_step(tuning):
      def run(sk, sv, qkv, cos, sin, pk, pv, mask):
        outs, nk, nv = [], [], []
        for i in range(nl):
          o, k_i, v_i = dk.decode_attention(qkv[i], cos, sin, pk[i], pv[i], mask, sk[i], sv[i], step,
                                            scale=scale, tuning=tuning)
          outs.append(o)
          nk.append(k_i)
          nv.append(v_i)
        return tuple(outs), tuple(nk), tuple(nv)
      return run

    iters = 2 if args.tiny else 20
    inputs = (qkv, cos, sin, pk, pv, mask)

    def measure(fn):
      f = jax.jit(fn, donate_argnums=(0, 1))
      state = cache()
      out, *state = f(*state, *inputs)
      jax.block_until_ready(state)
      times = []
      for _ in range(max(args.runs, 3)):
        t0 = time.perf_counter()
        for _ in range(iters):
          _, *state = f(*state, *inputs)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / iters)
      return out, statistics.median(times) / nl * 1e6

    ref, xla_us = measure(xla_step)
    tunings = attention_tunings(args.tiny)
    sweep = []
    sweep_start = time.perf_counter()
    for tu in tunings:
      if time.perf_counter() - sweep_start > 60:  # the decode timings after it matter more
        sweep.append({**dataclasses.asdict(tu), "error": "skipped: the sweep's 60 s were used"})
        continue
      try:
        out, us = measure(pallas_step(tu))
      except Exception as e:  # a tuning Triton rejects (e.g. out of shared memory) is reported, not fatal
        sweep.append({**dataclasses.asdict(tu), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        continue
      err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))) for a, r in zip(out, ref))
      sweep.append({**dataclasses.asdict(tu), "us_per_layer": us, "max_abs_diff": err, "ok": err < 5e-2})
    good = [r for r in sweep if r.get("ok")]
    if not good:
      raise AssertionError(f"no kernel tuning ran and matched the XLA path: {sweep}")
    best = min(good, key=lambda r: r["us_per_layer"])
    dk.set_tuning(dk.Tuning(best["block"], best["num_warps"], best["num_stages"]))
    return {"shape": {"layers": nl, "prompts": b, "samples": g, "kv_heads": kh, "heads_per_kv": h, "head_dim": d,
                      "prompt": p, "slots": n, "step": step},
            "xla_us_per_layer": xla_us, "best": best, "saving_ms_per_step": (xla_us - best["us_per_layer"]) * nl / 1e3,
            "sweep": sweep}

  def decode_matmul_kernel():
    """The four weight matmuls of a 3B decoder layer at 32 rows (4 prompts × 8 samples), each over 36
    layers' own weights (so they stream from HBM, as in the decode), on their own: the XLA path's ops
    (`DecoderLayer.decode_proj` / `decode_finish`: RMSNorm, the matmul on the (K, N) weights, bias /
    residual / SwiGLU) against `decode_matmul` on the (N, K) weights under a sweep, called as the decode
    step calls it: q/k/v and gate/up take x's Σx² partials (from the kernel before them there), o and
    down return theirs. µs per layer = one jitted call over all layers / layers; outputs compared with
    the XLA path's. The fastest matching tuning per matmul is kept (`set_tuning`) for the decode
    timings that follow."""
    from lgrpo_jax.kernels import decode_matmul as dm
    from lgrpo_jax.models.qwen2_5_vl.layers import RMSNorm
    from lgrpo_jax.models.qwen2_5_vl.model import _mm
    t = sz["big"]["text_config"]
    nl, e, inter = t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"]
    hd = e // t["num_attention_heads"]
    n_qkv = (t["num_attention_heads"] + 2 * t["num_key_value_heads"]) * hd
    rows, bf, f32 = 32, jnp.bfloat16, jnp.float32
    ks = (jax.random.fold_in(jax.random.key(3), i) for i in itertools.count())
    rnd = lambda *shape, s=1.0: (s * jax.random.normal(next(ks), shape, f32)).astype(bf)

    def rms(x, w):  # the model's own RMSNorm, with weight w
      norm = RMSNorm(w.shape[0], eps=1e-6, param_dtype=w.dtype)
      norm.weight[...] = w
      return norm(x)

    kinds = {  # kind: (K of x, one layer's weight in the XLA layout, the extra inputs' shapes)
        "qkv": (e, (e, n_qkv), dict(norm=(e,), bias=(n_qkv,))),
        "o": (e, (e, e), dict(residual=(rows, e))),
        "gate_up": (e, (e, 2, inter), dict(norm=(e,))),
        "down": (inter, (inter, e), dict(residual=(rows, e))),
    }
    iters = 2 if args.tiny else 20
    out = {}
    for kind, (k_in, w_shape, extra) in kinds.items():
      x = rnd(rows, k_in)
      ws = [rnd(*w_shape, s=k_in**-0.5) for _ in range(nl)]
      wts = [jnp.moveaxis(w, 0, -1) for w in ws]  # (N, K) / (2, I, E)
      ex = {k: rnd(*shp) for k, shp in extra.items()}
      if "norm" in ex:  # x's Σx² in E / 16 partials, as the o / down kernel before it returns them
        x32 = x.astype(f32)
        ex["norm_ss"] = jnp.sum(jnp.square(x32.reshape(rows, k_in // 16, 16)), axis=-1).T

      def xla_fn(x, ws, ex):
        outs = []
        for w in ws:
          xi = rms(x, ex["norm"]) if "norm" in ex else x
          y = _mm(xi, w)
          if w.ndim == 3:
            y = jax.nn.silu(y[:, 0]) * y[:, 1]
          y = y + ex["bias"] if "bias" in ex else y
          outs.append(ex["residual"] + y if "residual" in ex else y)
        return outs

      def pallas_fn(tuning):
        def run(x, ws, ex):
          return [dm.decode_matmul(x, w, norm_weight=ex.get("norm"), norm_ss=ex.get("norm_ss"), bias=ex.get("bias"),
                                   residual=ex.get("residual"), return_ss="residual" in ex, tuning=tuning)
                  for w in ws]
        return run

      def measure(fn, ws):
        f = jax.jit(fn)
        y = jax.block_until_ready(f(x, ws, ex))
        times = []
        for _ in range(max(args.runs, 3)):
          t0 = time.perf_counter()
          for _ in range(iters):
            r = f(x, ws, ex)
          jax.block_until_ready(r)
          times.append((time.perf_counter() - t0) / iters)
        return y, statistics.median(times) / nl * 1e6

      nbytes = 2 * int(np.prod(w_shape))
      ref, xla_us = measure(xla_fn, ws)

      kind_start = time.perf_counter()

      def sweep_one(tu, sweep):
        if time.perf_counter() - kind_start > 40:  # per matmul: the decode timings after it matter more
          sweep.append({**dataclasses.asdict(tu), "error": "skipped: the matmul's 40 s of sweep were used"})
          return
        try:
          y, us = measure(pallas_fn(tu), wts)
        except Exception as err:  # a tuning Triton rejects is reported, not fatal
          sweep.append({**dataclasses.asdict(tu), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
          return
        y = [a[0] if isinstance(a, tuple) else a for a in y]  # (y, Σy² partials) from o and down
        diff = max(float(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32)) / (1 + jnp.abs(b.astype(f32)))))
                   for a, b in zip(y, ref))
        sweep.append({**dataclasses.asdict(tu), "us_per_layer": us, "gbps": nbytes / us / 1e3,
                      "max_rel_diff": diff, "ok": diff < 3e-2})

      sweep: list = []
      for tu in matmul_first(kind, args.tiny):  # tile shapes first, then warps and stages around the best
        sweep_one(tu, sweep)
      good = [r for r in sweep if r.get("ok")]
      if good and not args.tiny:
        b0 = min(good, key=lambda r: r["us_per_layer"])
        for tu in matmul_around(kind, dm.Tuning(**{f.name: b0[f.name] for f in dataclasses.fields(dm.Tuning)})):
          sweep_one(tu, sweep)
        good = [r for r in sweep if r.get("ok")]
      if not good:
        out[kind] = {"xla_us_per_layer": xla_us, "error": "no tuning ran and matched", "sweep": sweep}
        continue
      best = min(good, key=lambda r: r["us_per_layer"])
      dm.set_tuning(kind, dm.Tuning(best["block_n"], best["block_k"], best["split"], best["num_warps"],
                                    best["num_stages"], best["prenorm"]))
      out[kind] = {"weight_mb": nbytes / 1e6, "xla_us_per_layer": xla_us, "xla_gbps": nbytes / xla_us / 1e3,
                   "best": best, "sweep": sweep}
      print(f"jax: decode matmul {kind}: xla {xla_us:.1f} µs, pallas {best['us_per_layer']:.1f} µs "
            f"({best['gbps']:.0f} GB/s)", flush=True)
      ws = wts = ref = None  # this kind's weights go before the next kind's are made
    fine = [v for v in out.values() if "best" in v]
    out["saving_ms_per_step"] = sum(v["xla_us_per_layer"] - v["best"]["us_per_layer"] for v in fine) * nl / 1e3
    out["rows"], out["layers"] = rows, nl
    return out

  section(res, "parity", parity, save)
  if "pallas" in DECODE_ATTENTION or "pallas" in DECODE_MATMUL:
    section(res, "parity_pallas", parity_pallas, save)
    if (not ONLY or "decode" in ONLY) and "error" not in res["parity_pallas"]:
      if "pallas" in DECODE_ATTENTION:
        section(res, "decode_kernel", decode_kernel, save)
      if "pallas" in DECODE_MATMUL:
        section(res, "decode_matmul_kernel", decode_matmul_kernel, save)
  section(res, "ceilings", ceilings, save)
  peak = res["ceilings"].get("matmul_tflops", float("nan")) * 1e12
  # The copy ceiling: the better of this probe and PyTorch's device-to-device copy (torch part).
  torch_copy = json.load(open(os.path.join(work, "torch.json"))).get("copy_gbps") if os.path.exists(
      os.path.join(work, "torch.json")) else None
  bw = max(res["ceilings"].get("copy_gbps", float("nan")), torch_copy or 0) * 1e9
  read_bw = res["ceilings"].get("read_gbps", float("nan")) * 1e9
  res["ceilings"]["torch_copy_gbps"] = torch_copy
  res["ceilings"]["copy_ceiling_gbps"] = bw / 1e9

  big = lgrpo_jax.from_config(sz["big"], dtype="bfloat16", param_dtype="bfloat16", seed=0)
  cfg = big.config
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(big, nnx.Param)))
  res["params_big"] = n_params

  logits = {}  # the 3B's logits per attention kernel: compared after both ran

  def forward(impl):
    def run_forward():
      big.set_attention(impl)
      inp = forward_inputs(sz["big"], sz["fwd_rows"], sz["text"], sz["image"])
      run = lambda: lgrpo_jax.forward(big, inp["input_ids"], inp["attention_mask"], inp["pixel_values"],
                                      inp["image_grid_thw"]).block_until_ready()
      t0 = time.perf_counter()
      run()
      compile_s = time.perf_counter() - t0
      t = median_time(run, args.runs, 0)
      logits[impl] = lgrpo_jax.forward(big, inp["input_ids"], inp["attention_mask"], inp["pixel_values"],
                                       inp["image_grid_thw"])
      b, p = inp["input_ids"].shape
      fl = F.forward_flops(cfg, b, p, tuple(map(tuple, inp["image_grid_thw"].tolist())))
      big.set_attention("auto")  # the update and decode sections set their own
      return {"s": t, "compile_s": compile_s, "tflop": fl / 1e12, "mfu": fl / t / peak, "shape": [b, p],
              "attention": impl}
    return run_forward

  def update_step():
    b, g, n = sz["pairs"], sz["samples"], sz["new"]
    pb, pair_grid, loss_cfg = update_batch(sz)
    p = pb.input_ids.shape[1]
    grid = pair_grid * b
    policy = F.matmul_flops(F.vision_matmuls(cfg, grid) + F.text_matmuls(cfg, b, p, lm_head=False)
                            + F.extend_matmuls(cfg, b, p, g, n, lm_head=True))
    fl = 3 * policy
    params = nnx.state(big, nnx.Param)
    measured = []
    # In the order given (fastest expected first); each is compiled and run only if XLA's memory
    # analysis says it fits next to the parameters already on the device.
    for remat, micro, impl in PLANS:
      if measured and not ALL_PLANS:
        break
      if DEADLINE is not None and time.perf_counter() > DEADLINE:
        measured.append({"remat": remat, "micro_batches": micro, "attention": impl, "error": "skipped: past --budget"})
        continue
      stats = dev.memory_stats() or {}
      free = stats["bytes_limit"] - stats["bytes_in_use"] if "bytes_limit" in stats else None
      graphdef, params = nnx.split(big.set_remat(remat).set_attention(impl), nnx.Param)
      # The shipped configs' master weights (model.param_dtype): fp32 parameters and Adam state,
      # computed in bf16 (the layers cast at use).
      params = jax.tree.map(lambda x: x.astype(UPDATE_PARAM_DTYPE), params)
      optim = OptimConfig(learning_rate=1e-6, micro_batches=micro)
      tx = make_optimizer(optim, params)
      opt_state = jax.eval_shape(tx.init, params)
      fn = jax.jit(lambda prm, st, tx=tx, optim=optim, gd=graphdef: update(prm, st, gd, tx, pb, pair_grid, loss_cfg,
                                                                            optim, sz["chunk"]),
                   donate_argnums=(0, 1))
      t0 = time.perf_counter()
      try:
        compiled = fn.lower(params, opt_state).compile()
      except Exception as e:  # e.g. a kernel this GPU / cuDNN cannot run: report, try the next plan
        measured.append({"remat": remat, "micro_batches": micro, "attention": impl,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(f"jax: update {remat}:{micro}:{impl}: {measured[-1]['error']}", flush=True)
        continue
      compile_s = time.perf_counter() - t0
      ma = compiled.memory_analysis()
      temp = getattr(ma, "temp_size_in_bytes", 0) if ma is not None else 0
      state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
      rec = {"remat": remat, "micro_batches": micro, "attention": impl, "temp_gib": temp / 2**30,
             "state_gib": state_bytes / 2**30, "free_gib": free / 2**30 if free else None, "compile_s": compile_s}
      print(f"jax: update remat={remat} micro_batches={micro} attention={impl}: temp {temp / 2**30:.1f} GiB + "
            f"optimiser state {state_bytes / 2**30:.1f} GiB, free {free / 2**30 if free else float('nan'):.1f} GiB, "
            f"compile {compile_s:.0f} s", flush=True)
      if free is not None and temp + state_bytes >= 0.9 * free:
        rec["error"] = "does not fit"
        measured.append(rec)
        continue
      opt_state = tx.init(params)
      params, opt_state, metrics = compiled(params, opt_state)
      jax.block_until_ready(params)
      times, losses = [], []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
      nnx.update(big, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))  # later sections: updated weights
      del opt_state, compiled
      if not (all(np.isfinite(losses)) and bool(np.isfinite(float(metrics["grad_norm"])))):
        rec["error"] = f"non-finite loss / grad norm: {losses}"
        measured.append(rec)
        continue
      t = statistics.median(times)
      rec.update(s=t, mfu=fl / t / peak, loss=losses[-1])
      measured.append(rec)
      print(f"jax: update {remat}:{micro}:{impl}: {t * 1e3:.1f} ms, MFU {fl / t / peak:.0%}", flush=True)
    big.set_remat("none").set_attention(default_impl)
    ok = [m for m in measured if "s" in m]
    if not ok:
      raise MemoryError(f"no update plan ran: {measured}")
    best = min(ok, key=lambda m: m["s"])
    return {**best, "tflop": fl / 1e12, "shape": [b, g, n, p], "tokens": b * p + b * g * n, "plans": measured,
            "param_dtype": UPDATE_PARAM_DTYPE}

  def decode(model, raw, name, rows, temperature, trace=False, while_graph=False):
    def run():
      mcfg = model.config
      g, n = sz["samples"], sz["decode_new"]
      b = max(1, rows // g)
      inp = forward_inputs(raw, b, sz["text"], sz["image"])
      ids, mask = jnp.asarray(inp["input_ids"], jnp.int32), jnp.asarray(inp["attention_mask"], jnp.int32)
      pixels = jnp.asarray(inp["pixel_values"], jnp.bfloat16)
      grid = tuple(map(tuple, inp["image_grid_thw"].tolist()))
      scfg = SamplingConfig(max_new_tokens=n, num_samples=g, temperature=temperature)
      sample = lambda: jax.block_until_ready(_sample_jit(model, ids, mask, pixels, jax.random.key(0), grid, scfg))
      if while_graph:  # the same rollout through jax.jit, which takes per-compile XLA options
        graphdef, state = nnx.split(model)
        rollout = jax.jit(lambda st, key: sample_rollout(nnx.merge(graphdef, st), ids, mask, pixels, grid, scfg, key),
                          compiler_options=WHILE_GRAPH_OPTIONS)
        sample = lambda: jax.block_until_ready(rollout(state, jax.random.key(0)))
        same_tokens = lambda: bool(jnp.array_equal(sample().tokens, _sample_jit(
            model, ids, mask, pixels, jax.random.key(0), grid, scfg).tokens))

      @nnx.jit
      def prefill(m):
        pos, _ = get_rope_index(ids, mask, grid, m.config)
        x = m.embed(ids, m.image_features(pixels, grid))
        h, k, v = m.prefill(x, pos, mask)
        return m.logits(h[:, -1:]), k, v

      t0 = time.perf_counter()
      out = sample()
      compile_s = time.perf_counter() - t0
      same = same_tokens() if while_graph else None  # after the compile is timed
      steps = int(out.steps)
      jax.block_until_ready(prefill(model))
      t_all = median_time(sample, args.runs, 0)
      t_pre = median_time(lambda: jax.block_until_ready(prefill(model)), args.runs, 0)
      per_step = (t_all - t_pre) / max(steps - 1, 1)
      t = mcfg.text
      p = ids.shape[1]
      layer_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
      head = t.vocab_size * t.hidden_size
      weight_bytes = 2 * (layer_params + head + t.hidden_size)
      # The cache as the decode step reads it: every layer's prefix keys/values once per prompt and
      # every sample's suffix slots — XLA reads all N (the not-yet-written ones masked), the Pallas
      # kernel only those written so far (N/2 on average over the rollout).
      slots_read = n if mcfg.decode_attention == "xla" else n / 2
      kv_bytes = 2 * 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * b * (p + g * slots_read)
      moved = weight_bytes + kv_bytes
      res = {"model": name, "decode_attention": mcfg.decode_attention, "decode_matmul": mcfg.decode_matmul,
             "while_graph": while_graph, **({"tokens_equal_plain_jit": same} if while_graph else {}), "rows": b * g, "temperature": temperature,
             "prompt": p, "new_tokens": n,
             "steps": steps, "s": t_all, "prefill_s": t_pre, "step_ms": per_step * 1e3, "compile_s": compile_s,
             "weights_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
             "gbps": moved / per_step / 1e9, "hbm_frac": moved / per_step / bw,
             "read_frac": moved / per_step / read_bw,
             "tokens_per_s": b * g * steps / t_all}
      if trace:
        res["trace"] = trace_decode(sample, steps, "_".join(sorted({mcfg.decode_attention, mcfg.decode_matmul}
                                                                   - {"xla"})) or "xla")
      return res
    return run

  def trace_decode(sample, steps, impl):
    """One traced rollout (already compiled): kernels per decode step and device busy time."""
    import glob
    import shutil
    from gpu_profile import busy_us, kernel_events, summarize
    d = tempfile.mkdtemp(prefix="trace_decode_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
      sample()
    found = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
      return {"error": "no trace written"}
    name = "decode.trace.json.gz" if impl == "xla" else f"decode_{impl}.trace.json.gz"
    dest = os.path.join(args.out_dir, name) if args.out_dir else found[0]
    if dest != found[0]:
      shutil.copy(found[0], dest)
    kernels, span_us = kernel_events(found[0])
    busy = busy_us(kernels)
    summarize(os.path.dirname(found[0]), pattern=os.path.basename(found[0]), per=steps)
    return {"kernels": len(kernels), "kernels_per_step": len(kernels) / steps, "busy_ms": busy / 1e3,
            "span_ms": span_us / 1e3, "file": dest}

  for impl in ATTENTION:
    section(res, f"forward_{impl}", forward(impl), save)
  if len(logits) == 2:
    a, b_ = logits.values()
    res["forward_kernels_rel_diff"] = float(jnp.max(jnp.abs(a - b_)) / jnp.max(jnp.abs(b_)))
    print(f"jax: forward logits xla vs cudnn (3B, bf16): max rel. diff {res['forward_kernels_rel_diff']:.1e}",
          flush=True)
  logits.clear()
  # A kernel that failed in the forward (e.g. cuDNN unavailable) is left out of what follows.
  failed = {impl for impl in ATTENTION if "error" in res.get(f"forward_{impl}", {})}
  global PLANS
  PLANS = [p for p in (PLANS or sz["update_plans"]) if p[2] not in failed]
  default_impl = "xla" if "cudnn" in failed else "auto"
  res["attention_default"] = default_impl
  section(res, "update", update_step, save)
  variants = (DECODE or sz["decode"]) if not ONLY or "decode" in ONLY else []
  built = {sz["name_big"]: (big, sz["big"])}
  for i, (name, rows, temp) in enumerate(variants):
    if name not in built:
      built.clear()  # the previous model's memory goes before the next one is built
      big = None
      raw = sz["big"] if name == sz["name_big"] else sz["small"]
      built[name] = (lgrpo_jax.from_config(raw, dtype="bfloat16", param_dtype="bfloat16", seed=0), raw)
    model, raw = built[name]
    model.set_attention(default_impl)
    pairs = decode_impls()  # all-XLA, all-Pallas, then the mixed pairs
    plain = [(att, mm, False) for att, mm in pairs if att == mm]  # all-XLA, all-Pallas
    # The one-graph runs after the all-XLA and all-Pallas ones (a failure there costs neither), before
    # the mixed pairs (the first to go when the budget is short).
    runs = plain + [(att, mm, True) for att, mm, _ in plain if WHILE_GRAPH and i == 0] + [
        (att, mm, False) for att, mm in pairs if att != mm]
    for att, mm, while_graph in runs:
      key = f"decode_{name}_{rows}_t{temp:g}" + ("" if att == "xla" else f"_{att}") + (
          "" if mm == "xla" else f"_mm_{mm}")
      if "pallas" in (att, mm) and "error" in res.get("parity_pallas", {}):
        res[key] = {"error": "skipped: the kernels failed their parity check"}
        continue
      # A sweep that found no working tuning: the default TUNING may be one that failed there, and a
      # 3B sampler compile with it costs device time for nothing.
      swept = [("attention", res.get("decode_kernel", {}))] if att == "pallas" else []
      if mm == "pallas":  # the section's own error (it raised) and each matmul kind's
        mk = res.get("decode_matmul_kernel", {})
        swept += [("matmul", mk)] + [(f"matmul {k}", v) for k, v in mk.items() if isinstance(v, dict)]
      failed = [f"{what}: {v['error']}" for what, v in swept if "error" in v]
      if failed:
        res[key] = {"error": f"skipped: the kernel sweep did not give a working tuning ({failed[0][:200]})"}
        print(f"jax: {key}: {res[key]['error']}", flush=True)
        continue
      if while_graph and "error" in res.get(key, {"error": "not run"}):
        continue  # its plain run failed or was skipped: nothing to compare with
      model.set_decode_attention(att).set_decode_matmul(mm)
      trace = TRACE_DECODE and i == 0 and att == mm and not while_graph  # the all-XLA and all-Pallas runs
      section(res, key + ("_whilegraph" if while_graph else ""),
              decode(model, raw, name, rows, temp, trace, while_graph=while_graph), save)
    model.set_decode_attention("xla").set_decode_matmul("xla")
  stats = dev.memory_stats() or {}
  res["peak_mem_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
  return res


# ---- driver --------------------------------------------------------------------------------------
def table(tr: dict, jr: dict, tiny: bool) -> str:
  sz = sizes(tiny)
  nan = float("nan")
  lines = [f"device: {jr.get('device')} ({jr.get('platform')}); jax {jr.get('jax')}, flax {jr.get('flax')}, "
           f"torch {tr.get('torch')}, transformers {tr.get('transformers')}; {platform.node()}, "
           f"{time.strftime('%Y-%m-%d')}",
           f"model: {sz['name_big']} ({jr.get('params_big', 0) / 1e9:.2f} B parameters) in bf16, random weights"]
  par = jr.get("parity", {})
  errs = ", ".join(f"{k[8:]} {v:.1e}" for k, v in par.items() if k.startswith("rel_err_"))
  lines.append(f"parity vs transformers (tiny; max rel. err. of the logits): {errs} "
               f"{'ok' if par.get('ok') else 'FAILED ' + par.get('error', '')}")
  pp = jr.get("parity_pallas")
  if pp is not None:
    lines.append("pallas decode vs xla decode (tiny, fp32, 4 × 12 sampled tokens; attention/matmul): " + (
        "; ".join(f"{k}: tokens equal {v['tokens_equal']}, max log-prob diff {v['logprob_diff']:.1e}"
                  for k, v in pp.items() if isinstance(v, dict)) if "ok" in pp else f"FAILED {pp.get('error')}"))
  c = jr.get("ceilings", {})
  lines.append(f"measured ceilings: bf16 matmul {c.get('matmul_tflops', nan):.0f} TFLOP/s; copy (read + write) "
               f"{c.get('copy_gbps', nan):.0f} GB/s (jax x·2), {c.get('torch_copy_gbps') or nan:.0f} GB/s "
               f"(torch copy_); read-only {c.get('read_gbps', nan):.0f} GB/s (jax row sums)")
  if "forward_kernels_rel_diff" in jr:
    lines.append(f"3B logits, xla vs cudnn attention: max rel. diff {jr['forward_kernels_rel_diff']:.1e}")
  lines.append(f"{'what':24s} {'ms':>9s} {'TFLOP':>8s} {'TFLOP/s':>8s} {'of peak':>8s}  notes")
  fwd = [v for k, v in jr.items() if k.startswith("forward_") and isinstance(v, dict)]
  for f in fwd:
    if "s" in f:
      lines.append(f"{'forward (ours, ' + f['attention'] + ')':24s} {f['s'] * 1e3:9.1f} {f['tflop']:8.2f} "
                   f"{f['tflop'] / f['s']:8.0f} {f['mfu']:8.0%}  {f['shape'][0]} rows × {f['shape'][1]} tokens, "
                   f"compile {f['compile_s']:.0f} s" + (f"; transformers / ours {tr['forward_s'] / f['s']:.2f}×"
                                                        if "forward_s" in tr else ""))
    else:
      lines.append(f"forward: {f.get('error')}")
  best = min((f for f in fwd if "s" in f), key=lambda f: f["s"], default=None)
  if "forward_s" in tr and best:
    lines.append(f"{'forward (transformers)':24s} {tr['forward_s'] * 1e3:9.1f} {best['tflop']:8.2f} "
                 f"{best['tflop'] / tr['forward_s']:8.0f} {best['mfu'] * best['s'] / tr['forward_s']:8.0%}  "
                 f"SDPA; ours ({best['attention']}) is {tr['forward_s'] / best['s']:.2f}× faster")
  u = jr.get("update", {})
  if "update" not in jr:
    pass
  elif "s" in u:
    b, g, n, p = u["shape"]
    for m in u["plans"]:
      what = f"update {m['remat']}:{m['micro_batches']}:{m['attention']}"
      if "s" in m:
        lines.append(f"{what:24s} {m['s'] * 1e3:9.1f} {u['tflop']:8.2f} {u['tflop'] / m['s']:8.0f} {m['mfu']:8.0%}  "
                     f"temp {m['temp_gib']:.1f} GiB + state {m['state_gib']:.1f} GiB; compile {m['compile_s']:.0f} s")
      else:
        lines.append(f"{what:24s} {'–':>9s}  {m.get('error')}" + (f" (temp {m['temp_gib']:.1f} + state "
                     f"{m['state_gib']:.1f} GiB vs free {m['free_gib']:.1f})" if m.get("free_gib") else ""))
    lines.append(f"  update = GRPO loss (β>0) + backward + AdamW on {b} pairs × {g} × {n} tokens, prompt {p} "
                 f"({u['tokens']} tokens), plan = remat:micro-batches:attention; best MFU {u['mfu']:.0%}")
  else:
    lines.append(f"update: {u.get('error')}")
  lines.append(f"{'decode':40s} {'ms/step':>9s} {'GB/step':>8s} {'GB/s':>8s} {'of copy':>8s} {'of read':>8s}  notes")
  dkr = jr.get("decode_kernel")
  if dkr is not None:
    if "best" in dkr:
      bst, sh = dkr["best"], dkr["shape"]
      lines.append(f"decode attention per layer ({sh['prompts']}×{sh['samples']} rows, prompt {sh['prompt']}, slot "
                   f"{sh['step']} of {sh['slots']}): xla {dkr['xla_us_per_layer']:.1f} µs, pallas "
                   f"{bst['us_per_layer']:.1f} µs (block {bst['block']}, {bst['num_warps']} warps, "
                   f"{bst['num_stages']} stages; max |diff| {bst['max_abs_diff']:.1e}): "
                   f"{dkr['saving_ms_per_step']:.2f} ms less per step")
      lines.append("  sweep (µs/layer): " + ", ".join(
          f"{r['block']}/{r['num_warps']}/{r['num_stages']} " + (f"{r['us_per_layer']:.1f}" if "us_per_layer" in r
                                                                  else "failed") for r in dkr["sweep"]))
    else:
      lines.append(f"decode attention per layer: {dkr.get('error')}")
  dmk = jr.get("decode_matmul_kernel")
  if dmk is not None:
    if "error" in dmk and "rows" not in dmk:
      lines.append(f"decode matmuls per layer: {dmk.get('error')}")
    else:
      lines.append(f"decode matmuls per layer ({dmk['rows']} rows, {dmk['layers']} layers' weights), xla vs pallas "
                   f"(block_n/block_k/split/warps/stages): {dmk['saving_ms_per_step']:.2f} ms less per step")
      for kind in ("qkv", "o", "gate_up", "down"):
        v = dmk.get(kind, {})
        if "best" in v:
          bst = v["best"]
          lines.append(f"  {kind:8s} {v['weight_mb']:6.1f} MB: xla {v['xla_us_per_layer']:6.1f} µs "
                       f"({v['xla_gbps']:5.0f} GB/s), pallas {bst['us_per_layer']:6.1f} µs ({bst['gbps']:5.0f} GB/s) "
                       f"{bst['block_n']}/{bst['block_k']}/{bst['split']}/{bst['num_warps']}/{bst['num_stages']}"
                       f"{'/prenorm' if bst['prenorm'] else ''}, "
                       f"max rel diff {bst['max_rel_diff']:.1e}; sweep: " + ", ".join(
                           f"{r['block_n']}/{r['block_k']}/{r['split']}/{r['num_warps']}/{r['num_stages']}"
                           f"{'/prenorm' if r['prenorm'] else ''} " + (f"{r['us_per_layer']:.1f}" if "us_per_layer" in r else "failed") for r in v["sweep"]))
        elif v:
          lines.append(f"  {kind}: {v.get('error')}")
      best = {k: v["best"] for k, v in dmk.items() if isinstance(v, dict) and "best" in v}
      if best:  # what to write into kernels/decode_matmul.py's TUNING if the Pallas decode wins
        lines.append("  as TUNING: {" + ", ".join(
            f'"{k}": Tuning({b["block_n"]}, {b["block_k"]}, {b["split"]}, {b["num_warps"]}, {b["num_stages"]}'
            + (", prenorm=True)" if b["prenorm"] else ")")
            for k, b in best.items()) + "}")
  for key, d in jr.items():
    if not key.startswith("decode_") or key in ("decode_kernel", "decode_matmul_kernel") or not isinstance(d, dict):
      continue
    if "step_ms" in d:
      sampling = "greedy" if d["temperature"] == 0 else "sampled"
      what = f"{d['model']} {d['rows']} rows {sampling}" + (
          "" if d.get("decode_attention", "xla") == "xla" else f" {d['decode_attention']}") + (
          "" if d.get("decode_matmul", "xla") == "xla" else f" mm:{d['decode_matmul']}") + (
          (" while-graph" + ("" if d.get("tokens_equal_plain_jit") else " (TOKENS DIFFER)")) if d.get("while_graph") else "")
      lines.append(f"{what:40s} {d['step_ms']:9.2f} "
                   f"{d['weights_gb'] + d['kv_gb']:8.2f} {d['gbps']:8.0f} {d['hbm_frac']:8.0%} {d.get('read_frac', nan):8.0%}  "
                   f"prompt {d['prompt']}, "
                   f"{d['steps']} steps, weights {d['weights_gb']:.2f} GB + KV {d['kv_gb']:.2f} GB; "
                   f"{d['tokens_per_s']:.0f} tok/s incl. prefill")
      tr_ = d.get("trace")
      if tr_ and "kernels" in tr_:
        lines.append(f"{'  (traced)':40s} {tr_['kernels_per_step']:.0f} kernels per step; device busy "
                     f"{tr_['busy_ms']:.1f} of {tr_['span_ms']:.1f} ms")
    else:
      lines.append(f"{key}: {d.get('error')}")
  return "\n".join(lines)


def parse_plans(text: str) -> list[tuple[str, int, str]]:
  out = []
  for item in text.split(","):
    parts = item.split(":")
    out.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "auto"))
  return out


def parse_decode(text: str, tiny: bool = False) -> list[tuple[str, int, float]]:
  """MODEL:ROWS:TEMPERATURE,… with MODEL the size's big or small model (3B / 1.5B; tiny / tiny-small
  with --tiny, where 3B and 1.5B name those). Another name was timed as the small model, labelled
  as given."""
  sz = sizes(tiny)
  names = {sz["name_big"]: sz["name_big"], sz["name_small"]: sz["name_small"]}
  if tiny:
    names.update({"3B": sz["name_big"], "1.5B": sz["name_small"]})
  out = []
  for v in text.split(","):
    parts = v.split(":")
    if len(parts) != 3 or parts[0] not in names:
      raise SystemExit(f"--decode {v!r}: expected MODEL:ROWS:TEMPERATURE with MODEL one of {sorted(names)}")
    out.append((names[parts[0]], int(parts[1]), float(parts[2])))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="folder for results.json, the parts' logs and the decode trace")
  ap.add_argument("--tiny", action="store_true", help="tiny configs (checks the script runs, e.g. on CPU)")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--budget", type=float, default=420,
                  help="seconds: sections not started by then (from the start) are skipped, the table still printed")
  ap.add_argument("--only", help="comma list of forward,update,decode (default: all)")
  ap.add_argument("--attention", default="xla,cudnn", help="the forward's attention kernels, in order")
  ap.add_argument("--plans", help="update candidates as remat:micro_batches[:attention],... e.g. full:1:cudnn "
                                  "(default: the size's)")
  ap.add_argument("--all-plans", action="store_true", help="time every update plan that fits, not only the first")
  ap.add_argument("--update-param-dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the update's parameters and optimiser state (the configs' model.param_dtype)")
  ap.add_argument("--decode", help="decode variants as model:rows:temperature,... e.g. 3B:32:1,1.5B:32:0")
  ap.add_argument("--trace-decode", action="store_true", help="trace the first decode variant (kernels per step)")
  ap.add_argument("--decode-attention", default="xla",
                  help="the decode loop's attention, each decode variant timed with each: xla,pallas")
  ap.add_argument("--decode-matmul", default="xla",
                  help="the decode loop's weight matmuls, each decode variant timed with each: xla,pallas")
  ap.add_argument("--decode-while-graph", action="store_true",
                  help="also time the first decode variant's all-XLA and all-Pallas runs with the whole loop as one "
                       "CUDA graph (XLA command buffers with WHILE)")
  ap.add_argument("--part", choices=("torch", "jax"), help=argparse.SUPPRESS)
  ap.add_argument("--work", help=argparse.SUPPRESS)
  ap.add_argument("--out-dir", help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args.part:
    global DEADLINE, ONLY, PLANS, ALL_PLANS, ATTENTION, DECODE, TRACE_DECODE, DECODE_ATTENTION, DECODE_MATMUL, WHILE_GRAPH
    global UPDATE_PARAM_DTYPE
    UPDATE_PARAM_DTYPE = args.update_param_dtype
    ONLY = tuple(("parity,ceilings," + args.only).split(",")) if args.only else ()
    PLANS = parse_plans(args.plans) if args.plans else []
    ALL_PLANS, TRACE_DECODE, WHILE_GRAPH = args.all_plans, args.trace_decode, args.decode_while_graph
    ATTENTION = tuple(args.attention.split(","))
    DECODE = parse_decode(args.decode, args.tiny) if args.decode else []
    DECODE_ATTENTION = tuple(args.decode_attention.split(","))
    DECODE_MATMUL = tuple(args.decode_matmul.split(","))
    DEADLINE = time.perf_counter() + args.budget if args.budget else None
    fn = torch_part if args.part == "torch" else jax_part
    res = fn(args, args.work)
    with open(os.path.join(args.work, f"{args.part}.json"), "w") as f:
      json.dump(res, f, indent=1, default=float)
    return

  if args.decode:
    parse_decode(args.decode, args.tiny)  # a misspelt model fails here, not after the torch part
  out = args.out or tempfile.mkdtemp(prefix="bench_gpu_")
  os.makedirs(out, exist_ok=True)
  work = os.path.join(out, "work")  # under --out: what a part saved comes back even if the run is cut short
  os.makedirs(work, exist_ok=True)
  results = {}
  start = time.perf_counter()
  for part in ("torch", "jax"):
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--work", work, "--out-dir", out,
           "--runs", str(args.runs), "--budget", str(max(1.0, args.budget - (time.perf_counter() - start))),
           f"--attention={args.attention}", f"--decode-attention={args.decode_attention}",
           f"--decode-matmul={args.decode_matmul}"]
    cmd += [f"--only={args.only}"] if args.only else []
    cmd += [f"--plans={args.plans}"] if args.plans else []
    cmd += [f"--decode={args.decode}"] if args.decode else []
    cmd += ["--all-plans"] if args.all_plans else []
    cmd += [f"--update-param-dtype={args.update_param_dtype}"]
    cmd += ["--trace-decode"] if args.trace_decode else []
    cmd += ["--decode-while-graph"] if args.decode_while_graph else []
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail = []
    with open(os.path.join(out, f"{part}.log"), "w") as log:
      proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for line in proc.stdout:  # streamed: a run cut short still shows its progress
        log.write(line)
        tail = (tail + [line.rstrip()])[-15:]
        if line.startswith(f"{part}:"):
          print(line.rstrip()[:400], flush=True)
      proc.wait()
    if proc.returncode:
      print(f"{part} part failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))
    path = os.path.join(work, f"{part}.json")
    results[part] = json.load(open(path)) if os.path.exists(path) else {"error": f"exit {proc.returncode}"}
    results[part]["wall_s"] = time.perf_counter() - t0
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  print()
  print(table(results["torch"], results["jax"], args.tiny))


if __name__ == "__main__":
  main()
