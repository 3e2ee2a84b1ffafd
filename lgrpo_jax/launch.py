"""`python -m lgrpo_jax.launch --config configs/NAME.py [key.path=value …]` — train with GRPO.

Config files are plain Python returning an `ExperimentConfig` (see configs/). Overrides are checked
against the config's typed fields (an unknown key or a wrong type is one clear error). Every input is
checked before anything compiles: checkpoint and data paths, the mesh against the devices, the batch
against the processes, G ≥ 2. The resolved config is written to RUN_DIR/config.json; an existing
run directory with checkpoints resumes. Multi-host start-up (lgrpo_jax.distributed) runs first.

Main knobs: run_dir, model.checkpoint, data.source/path/image_root/fraction, pipeline.global_batch,
step.sampling.num_samples/max_new_tokens/temperature, step.loss.beta/loss/eps_low/eps_high,
step.optim.learning_rate/micro_batches/passes, step.rewards.weights, loop.steps/save_every, mesh.fsdp.
"""

from __future__ import annotations

import argparse
import os
import sys


def build(cfg):
  """(model, listener or None, tokenizer, training pairs, held-out pairs or None) from a checked config."""
  import lgrpo_jax
  from transformers import AutoTokenizer

  from lgrpo_jax import checkpoint
  from lgrpo_jax.data import sources
  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config

  m = cfg.model
  if m.checkpoint is None:
    if m.preset != "tiny":
      raise ValueError(f"model.preset={m.preset!r}: only 'tiny' is built in; give model.checkpoint")
    tok_dir = m.tokenizer or build_tiny_tokenizer(os.path.join(cfg.run_dir, "tokenizer"))
    model = lgrpo_jax.from_config(tiny_model_config(tok_dir), dtype=m.dtype)
  else:
    tok_dir = m.tokenizer or m.checkpoint
    model = (checkpoint.load_model(m.checkpoint, dtype=m.dtype) if checkpoint.is_checkpoint(m.checkpoint)
             else lgrpo_jax.load_hf(m.checkpoint, dtype=m.dtype))
  tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  listener = None
  if m.listener is not None:
    listener = (checkpoint.load_model(m.listener, dtype=m.dtype) if checkpoint.is_checkpoint(m.listener)
                else lgrpo_jax.load_hf(m.listener, dtype=m.dtype))
  d = cfg.data
  report = sources.Report(cfg.pipeline.bad_records)

  def read(source, path, root, seed, fraction=1.0):
    if source == "synthetic":
      return list(synthetic(d.synthetic_pairs, seed=seed, n_wrong=d.synthetic_n_wrong,
                            image_size=d.synthetic_image_size))
    if source == "hpdv2":
      return list(sources.hpdv2_train(path, root, report, fraction=fraction))
    got = list(sources.imagereward(path, root, report) if source == "imagereward"
               else sources.rapidata(path, root, report))
    return [p for p in got if sources.subsample(p.pair_id, fraction, cfg.loop.seed)]

  pairs = read(d.source, d.path, d.image_root, cfg.loop.seed, d.fraction)
  eval_source = d.eval_source or ("synthetic" if d.source == "synthetic" else None)
  eval_pairs = None
  if eval_source is not None:
    eval_pairs = read(eval_source, d.eval_path, d.eval_image_root, cfg.loop.seed + 1000)[:d.eval_pairs]
  return model, listener, tokenizer, pairs, eval_pairs


def check(cfg) -> None:
  """Everything that can be checked before compiling."""
  import jax

  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  for name, path in (("model.checkpoint", cfg.model.checkpoint), ("model.listener", cfg.model.listener),
                     ("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path),
                     ("data.image_root", cfg.data.image_root), ("data.eval_path", cfg.data.eval_path),
                     ("data.eval_image_root", cfg.data.eval_image_root)):
    if path is not None and not os.path.exists(path):
      raise ConfigError(f"{name}={path!r}: not found")
  sizes = cfg.mesh.resolve(jax.device_count())  # MeshError if it does not fit
  data_shards = sizes[0] * sizes[1]
  if cfg.pipeline.global_batch % jax.process_count():
    raise ConfigError(f"pipeline.global_batch={cfg.pipeline.global_batch} is not divisible by "
                      f"{jax.process_count()} processes")
  if cfg.pipeline.global_batch * cfg.step.sampling.num_samples % data_shards:
    raise ConfigError(f"pipeline.global_batch × step.sampling.num_samples = "
                      f"{cfg.pipeline.global_batch * cfg.step.sampling.num_samples} completions do not "
                      f"split over {data_shards} data shards (mesh.data × mesh.fsdp)")
  if cfg.pipeline.global_batch % cfg.step.optim.micro_batches:
    raise ConfigError(f"pipeline.global_batch={cfg.pipeline.global_batch} is not divisible by "
                      f"step.optim.micro_batches={cfg.step.optim.micro_batches}")


def main(argv=None) -> int:
  from lgrpo_jax import distributed
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.launch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="a Python file defining config() -> ExperimentConfig")
  ap.add_argument("overrides", nargs="*", help="key.path=value (e.g. loop.steps=20 step.loss.beta=0)")
  distributed.add_args(ap)
  args = ap.parse_args(argv)
  from lgrpo_jax.config import apply_overrides, load_config_file, to_record
  from lgrpo_jax.data.sources import DataError
  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  from lgrpo_jax.safetensors_io import CheckpointError
  from lgrpo_jax.sharding import MeshError
  try:
    distributed.initialize_from_args(args)
    cfg = apply_overrides(load_config_file(args.config), args.overrides)
    check(cfg)
    model, listener, tokenizer, pairs, eval_pairs = build(cfg)
  except (ConfigError, MeshError, DataError, CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import dataclasses

  import jax

  from lgrpo_jax.train import Trainer
  if not cfg.step.sampling.eos_ids:  # default: the tokenizer's end-of-turn / end-of-text ids
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
    cfg = dataclasses.replace(cfg, step=dataclasses.replace(
        cfg.step, sampling=dataclasses.replace(cfg.step.sampling, eos_ids=tuple(sorted(ends)))))
  if jax.device_count() > 1:
    print(f"note: {jax.device_count()} devices; this version of the loop runs on one device "
          "(sharded training: issue 7)", file=sys.stderr)
  trainer = Trainer(cfg.run_dir, model, tokenizer, pairs, cfg.step, cfg.pipeline, cfg.loop,
                    listener=listener, config_record=to_record(cfg), eval_pairs=eval_pairs)
  if trainer.resumed_from is not None:
    print(f"resumed from step {trainer.resumed_from}", file=sys.stderr)
  metrics = trainer.run()
  trainer.close()
  if metrics:
    last = metrics[-1]
    held_out = f", held-out accuracy {last['eval/accuracy']:.3f}" if "eval/accuracy" in last else ""
    print(f"done: step {last['step']}, reward {last['reward/total']:.3f}, accuracy {last['accuracy']:.3f}"
          f"{held_out}; run directory {cfg.run_dir} (metrics.jsonl, curves.png, checkpoints/)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
