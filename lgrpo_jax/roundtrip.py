"""Model round-trip check: `python -m lgrpo_jax.roundtrip [--out DIR]`.

The smallest end-to-end check of the model stack: a tiny randomly initialised Qwen2.5-VL judges a batch of two procedurally drawn image pairs (images of
different sizes, left padding) through the real image processor and the jitted forward; the model
is exported to a Hugging Face directory, re-imported, converted to an Orbax checkpoint and restored,
and every copy must give bit-identical logits. Random weights: the choices it prints mean nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image, ImageDraw


def draw(kind: str, size: tuple[int, int], seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
  d = ImageDraw.Draw(img)
  w, h = size
  box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
  colour = {"red circle": (220, 30, 30), "green square": (30, 200, 60)}[kind]
  (d.ellipse if "circle" in kind else d.rectangle)(box, fill=colour)
  return img


def build_batch(cfg, processor, pairs):
  """Token rows `prompt <img1> <img2> question` with the image pads expanded, left-padded."""
  images = [im for pair in pairs for im in pair]
  proc = processor(images=images, return_tensors="np")
  grid = proc["image_grid_thw"]
  m2 = cfg.vision.spatial_merge_size**2
  rng = np.random.default_rng(0)
  rows, k = [], 0
  for b in range(len(pairs)):
    ids = list(rng.integers(3, 400, 6 + 3 * b))  # stand-in prompt tokens (tokenizer: data issue)
    for _ in range(2):
      n = int(np.prod(grid[k])) // m2
      ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
      k += 1
    ids += list(rng.integers(3, 400, 4))
    rows.append(ids)
  length = max(map(len, rows))
  input_ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, ids in enumerate(rows):
    input_ids[b, length - len(ids):] = ids
    mask[b, length - len(ids):] = 1
  return dict(input_ids=input_ids, attention_mask=mask, pixel_values=proc["pixel_values"],
              image_grid_thw=grid)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/roundtrip", help="where the exported checkpoints go")
  args = ap.parse_args(argv)

  from lgrpo_jax import distributed
  distributed.initialize()  # the first call of every entry point; a no-op on one machine
  import jax
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  import lgrpo_jax
  from lgrpo_jax import checkpoint
  from lgrpo_jax.models.qwen2_5_vl.presets import TINY

  t_start = time.perf_counter()
  print(f"lgrpo_jax {lgrpo_jax.__version__} round trip on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)): the model, the jitted forward and the HF/Orbax round trips "
        "on a tiny random model\n")
  model = lgrpo_jax.from_config(TINY, seed=0)
  cfg = model.config
  n_params = sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
  print(f"model: tiny random Qwen2.5-VL, {n_params / 1e6:.2f}M parameters, "
        f"{cfg.text.num_hidden_layers} decoder + {cfg.vision.depth} vision layers")

  processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
  pairs = [(draw("red circle", (168, 112), 1), draw("green square", (112, 112), 2)),
           (draw("green square", (224, 168), 3), draw("red circle", (84, 140), 4))]
  batch = build_batch(cfg, processor, pairs)
  print(f"batch: {batch['input_ids'].shape[0]} pairs, {batch['input_ids'].shape[1]} tokens, image "
        f"grids {batch['image_grid_thw'].tolist()}")

  t0 = time.perf_counter()
  logits = np.asarray(lgrpo_jax.forward(model, **batch))
  t_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(5):
    lgrpo_jax.forward(model, **batch).block_until_ready()
  t_fwd = (time.perf_counter() - t0) / 5
  print(f"forward: logits {logits.shape}, compile+first {t_compile:.2f} s, then {t_fwd * 1e3:.1f} ms "
        f"({batch['attention_mask'].sum() / t_fwd:.0f} tokens/s)")

  hf_dir = os.path.join(args.out, "hf")
  lgrpo_jax.save_hf(model, hf_dir)
  from_hf = lgrpo_jax.load_hf(hf_dir)
  ckpt_dir = os.path.join(args.out, "orbax")
  if checkpoint.is_checkpoint(ckpt_dir):
    import shutil
    shutil.rmtree(ckpt_dir)
  checkpoint.save_model(from_hf, ckpt_dir)
  from_orbax = checkpoint.load_model(ckpt_dir)
  same = all(np.array_equal(logits, np.asarray(lgrpo_jax.forward(m, **batch)))
             for m in (from_hf, from_orbax))
  print(f"export -> {hf_dir} (HF safetensors) -> re-import -> {ckpt_dir} (Orbax) -> restore: "
        f"logits bit-identical: {'yes' if same else 'NO'}")
  if not same:
    raise SystemExit("round trip changed the logits")

  last = logits[:, -1]
  print("next-token argmax per pair (random weights, meaningless):", last.argmax(-1).tolist())
  print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
  main()
