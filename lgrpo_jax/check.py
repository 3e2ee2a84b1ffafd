"""Cluster bring-up check: `python -m lgrpo_jax.check [--mesh.fsdp 8] [--checkpoint HF_DIR]`.

Run the same command on every host (see launch/). Each process joins the run (lgrpo_jax.distributed),
builds the (data, fsdp, tensor) mesh over all devices, creates the tiny model (or loads
--checkpoint) directly into its shards, feeds its own slice of a synthetic global batch (one image
per row), runs the sharded forward and prints what it holds. With --out, process 0 writes the
gathered last-position logits (the multi-process test compares them with a one-process run).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def synthetic_batch(cfg, batch: int, image_px: int = 56, text: int = 6, seed: int = 0):
  """Global rows `text <image> text`, left-padded to different lengths; the same on every process."""
  rng = np.random.default_rng(seed)
  v = cfg.vision
  g = image_px // v.patch_size
  n_img = g * g // v.spatial_merge_size**2
  length = 2 * text + n_img + 2 + 3
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), np.int32)
  special = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id)
  for b in range(batch):
    row = list(rng.integers(3, special, text)) + [cfg.vision_start_token_id] + \
        [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + list(rng.integers(3, special, text + b % 4))
    ids[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  pixels = rng.standard_normal((batch, g * g, v.patch_dim)).astype(np.float32)
  return ids, mask, pixels, np.tile([[1, g, g]], (batch, 1))


def build_parser() -> argparse.ArgumentParser:
  from lgrpo_jax import distributed
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.check", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mesh.data", dest="data", type=int, default=1)
  ap.add_argument("--mesh.fsdp", dest="fsdp", type=int, default=-1)
  ap.add_argument("--mesh.tensor", dest="tensor", type=int, default=1)
  ap.add_argument("--checkpoint", default=None, help="local HF directory (default: tiny random model)")
  ap.add_argument("--batch", type=int, default=None,
                  help="global batch (rows), split across processes; a multiple of the data shards (data × "
                       "fsdp; default: 8, or one row per shard when there are more)")
  ap.add_argument("--out", default=None, help="process 0 writes the gathered logits here (.npy)")
  distributed.add_args(ap)
  return ap


def main(argv=None) -> int:
  from lgrpo_jax import distributed
  args = build_parser().parse_args(argv)
  try:
    how = distributed.initialize_from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import jax
  from jax.experimental import multihost_utils

  import lgrpo_jax
  from lgrpo_jax import sharding
  from lgrpo_jax.models.qwen2_5_vl.presets import TINY

  try:
    mesh = sharding.make_mesh(sharding.MeshConfig(args.data, args.fsdp, args.tensor))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    args.batch = args.batch or shards * -(-8 // shards)
    if args.batch % shards:  # the batch axis would be replicated, and each process's rows refused
      raise sharding.MeshError(f"--batch {args.batch} does not split over the mesh's {shards} data shards "
                               f"(data × fsdp); use a multiple of {shards}")
    rows = sharding.process_batch_slice(args.batch)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
      raise ValueError(f"--out {args.out}: its directory does not exist")
    if args.checkpoint:
      model = lgrpo_jax.load_hf(args.checkpoint, mesh=mesh)
    else:
      model = lgrpo_jax.from_config(TINY, seed=0, mesh=mesh)
  except ValueError as e:  # MeshError, CheckpointError, ConfigError, a bad --out
    print(f"error: {e}", file=sys.stderr)
    return 2
  ids, mask, pixels, grid = synthetic_batch(model.config, args.batch)
  local = dict(input_ids=ids[rows], attention_mask=mask[rows],
               pixel_values=pixels[rows].reshape(-1, pixels.shape[-1]))
  glob = {k: sharding.global_batch_array(v, mesh) for k, v in local.items()}
  with jax.set_mesh(mesh):
    logits = lgrpo_jax.forward(model, glob["input_ids"], glob["attention_mask"], glob["pixel_values"], grid)
    last = multihost_utils.process_allgather(logits[:, -1], tiled=True)
  q = model.layers.q_proj.kernel.get_value()
  print(f"process {jax.process_index()}/{jax.process_count()} ({how}): {jax.local_device_count()} local "
        f"/ {jax.device_count()} devices, mesh {dict(mesh.shape)}, fed rows {rows.start}..{rows.stop - 1}, "
        f"q_proj {q.shape} as {q.sharding.spec}, logits {logits.shape} checksum {float(np.abs(last).sum()):.6f}")
  if args.out and jax.process_index() == 0:
    np.save(args.out, np.asarray(last))
  return 0


if __name__ == "__main__":
  sys.exit(main())
