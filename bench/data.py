"""Input pipeline throughput: pairs/second through decode + resize + patchify + tokenize + batch.

  .venv/bin/python bench/data.py [--workers 0 2] [--pairs 64] [--size 768] [--max-pixels 200704] [--plain]

Default: the grouped pipeline (workers are threads). --plain: group_by_grid=False (workers are
Grain worker processes).

Pairs of HPDv2-like PNG images (random content, --size px, encoded on disk) go through
`lgrpo_jax.data.pipeline.make_batches` with the tiny local tokenizer; the first batch (start-up,
worker spawn) is excluded. Prints pairs/s per worker count.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  ap.add_argument("--pairs", type=int, default=64)
  ap.add_argument("--size", type=int, default=768, help="side of the square source images (px)")
  ap.add_argument("--max-pixels", type=int, default=448 * 448)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--plain", action="store_true", help="group_by_grid=False: Grain worker processes")
  args = ap.parse_args()
  from transformers import AutoTokenizer

  from lgrpo_jax.data import ImageConfig
  from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
  from lgrpo_jax.data.sources import PreferencePair
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer

  tmp = tempfile.mkdtemp(prefix="bench_data_")
  rng = np.random.default_rng(0)
  paths = []
  for k in range(16):  # 16 distinct files, reused across pairs (decode cost is per use)
    p = os.path.join(tmp, f"{k}.png")
    # smooth random content (PNG of pure noise would be unrealistically slow to decode)
    small = rng.integers(0, 256, (args.size // 16, args.size // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((args.size, args.size), Image.Resampling.BILINEAR).save(p)
    paths.append(p)
  pairs = [PreferencePair(f"p{k}", f"prompt number {k}", (paths[k % 16], paths[(k + 5) % 16]), k % 2)
           for k in range(args.pairs)]
  tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(os.path.join(tmp, "tok")))
  print(f"{args.pairs} pairs of {args.size}x{args.size} PNGs, max_pixels {args.max_pixels}, "
        f"batch {args.batch}, {os.cpu_count()} cores")
  for workers in args.workers:
    cfg = PipelineConfig(global_batch=args.batch, num_epochs=None, worker_count=workers,
                         group_by_grid=not args.plain,
                         image=ImageConfig(max_pixels=args.max_pixels))
    it = make_batches(pairs, tok, cfg)
    next(it)
    n_batches = args.pairs // args.batch
    t0 = time.perf_counter()
    for _ in range(n_batches):
      next(it)
    dt = time.perf_counter() - t0
    if args.plain:
      kind = f"{workers} Grain worker processes" if workers else "in-process"
    else:
      kind = f"{workers or os.cpu_count()} decoding threads" + (" (0: one per core)" if not workers else "")
    print(f"workers={workers} ({kind}): {n_batches * args.batch / dt:6.1f} pairs/s")


if __name__ == "__main__":
  main()
