"""Image preprocessing: lgrpo_jax.data.process_image vs transformers' Qwen2VLImageProcessorPil.

  .venv/bin/python bench/images.py [--n 32] [--size 1024x768] [--max-pixels 200704]

Same decoded PIL images on both sides (decode excluded), outputs checked equal, ms per image
(median of 3 passes over --n images).
"""

import argparse
import statistics
import time

import numpy as np
from PIL import Image


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=32)
  ap.add_argument("--size", default="1024x768", help="WxH of the synthetic images")
  ap.add_argument("--max-pixels", type=int, default=448 * 448)
  args = ap.parse_args()
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  from lgrpo_jax.data import ImageConfig, process_image
  w, h = map(int, args.size.split("x"))
  rng = np.random.default_rng(0)
  imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.n)]
  cfg = ImageConfig(max_pixels=args.max_pixels)
  hf = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
  np.testing.assert_array_equal(process_image(imgs[0], cfg)[0],
                                hf(images=[imgs[0]], return_tensors="np")["pixel_values"])
  sides = {"transformers Qwen2VLImageProcessorPil": lambda im: hf(images=[im], return_tensors="np"),
           "lgrpo_jax process_image": lambda im: process_image(im, cfg)}
  print(f"{args.n} images {w}x{h}, max_pixels {args.max_pixels}; outputs equal")
  for name, fn in sides.items():
    passes = []
    for _ in range(3):
      t0 = time.perf_counter()
      for im in imgs:
        fn(im)
      passes.append((time.perf_counter() - t0) / args.n)
    print(f"{name:40s} {statistics.median(passes) * 1e3:6.1f} ms/image")


if __name__ == "__main__":
  main()
