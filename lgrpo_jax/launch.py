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
  """(model, listener or None, tokenizer, pairs) from a checked config."""
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
  if d.source == "synthetic":
    pairs = list(synthetic(d.synthetic_pairs, seed=cfg.loop.seed, n_wrong=d.synthetic_n_wrong,
                           image_size=d.synthetic_image_size))
  elif d.source == "hpdv2":
    pairs = list(sources.hpdv2_train(d.path, d.image_root, report, fraction=d.fraction))
  elif d.source == "imagereward":
    pairs = list(sources.imagereward(d.path, d.image_root, report))
  else:
    pairs = list(sources.rapidata(d.path, d.image_root, report))
  if d.source != "hpdv2" and d.fraction < 1:
    pairs = [p for p in pairs if sources.subsample(p.pair_id, d.fraction, cfg.loop.seed)]
  return model, listener, tokenizer, pairs


def check(cfg) -> None:
  """Everything that can be checked before compiling."""
  import jax

  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  for name, path in (("model.checkpoint", cfg.model.checkpoint), ("model.listener", cfg.model.listener),
                     ("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path),
                     ("data.image_root", cfg.data.image_root)):
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
    model, listener, tokenizer, pairs = build(cfg)
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
                    listener=listener, config_record=to_record(cfg))
  if trainer.resumed_from is not None:
    print(f"resumed from step {trainer.resumed_from}", file=sys.stderr)
  metrics = trainer.run()
  trainer.close()
  if metrics:
    last = metrics[-1]
    print(f"done: step {last['step']}, reward {last['reward/total']:.3f}, accuracy {last['accuracy']:.3f}, "
          f"run directory {cfg.run_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
