"""A training run in its own process, for the kill/resume tests:
  python tests/train_worker.py RUN_DIR TOKENIZER_DIR STEPS OUT_NPZ [COMPILE_CACHE]
Trains the tiny model on synthetic pairs (checkpoint every step) and writes the final parameters;
with COMPILE_CACHE, through that persistent compilation cache (`ExperimentConfig.compile_cache`)."""

import sys

import jax
import numpy as np
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tokenizer import tiny_model_config
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import LoopConfig, StepConfig, Trainer


def make(run_dir, tok_dir, steps, save_every=1, eval_every=0, mesh=None, batch=2, samples=3, freeze=(),
         config_record=None, pairs=None, rewards=None, eval_pairs=None, optim=None, **pipeline):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  step_cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=8, num_samples=samples, temperature=1.0, eos_ids=(end,)),
                        loss=LossConfig(beta=0.0), optim=OptimConfig(**{"learning_rate": 1e-3, "freeze": freeze, **(optim or {})}),
                        **({} if rewards is None else {"rewards": rewards}))
  pipe = PipelineConfig(global_batch=batch, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,), **pipeline)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir), mesh=mesh)
  pairs = list(synthetic(6, seed=1, image_size=56)) if pairs is None else pairs
  return Trainer(run_dir, model, tok, pairs, step_cfg, pipe,
                 LoopConfig(steps=steps, save_every=save_every, keep=2, seed=3, eval_every=eval_every),
                 eval_pairs=(eval_pairs if eval_pairs is not None else list(synthetic(3, seed=9, image_size=56)))
                 if eval_every else None, mesh=mesh,
                 config_record=config_record)


def final_params(trainer) -> dict:
  return {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(trainer.state.params))}


if __name__ == "__main__":
  run_dir, tok_dir, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
  if len(sys.argv) > 5:
    from lgrpo_jax.train import compile_cache
    compile_cache.enable(compile_cache.resolve(sys.argv[5], run_dir))
  t = make(run_dir, tok_dir, steps)
  t.run()
  t.close()
  np.savez(out, **final_params(t))
