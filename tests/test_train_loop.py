"""The loop: metrics written per step, checkpoints, and exact resume (bit-identical parameters)."""

import json

import jax
import numpy as np
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import LoopConfig, StepConfig, Trainer


def trainer(run_dir, tok, tok_dir, steps):
  end = tok.convert_tokens_to_ids("<|im_end|>")
  step_cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=8, num_samples=3, temperature=1.0, eos_ids=(end,)),
                        loss=LossConfig(beta=0.0), optim=OptimConfig(learning_rate=1e-3))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  return Trainer(run_dir, model, tok, list(synthetic(6, seed=1, image_size=56)), step_cfg, pipe,
                 LoopConfig(steps=steps, save_every=2, keep=2, seed=3))


def test_resume_is_bit_identical_and_metrics_are_written(tmp_path):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  straight = trainer(tmp_path / "a", tok, tok_dir, steps=5)
  straight.run()
  first = trainer(tmp_path / "b", tok, tok_dir, steps=2)
  first.run()
  first.close()
  again = trainer(tmp_path / "b", tok, tok_dir, steps=5)
  assert again.resumed_from == 2
  again.run()
  for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(again.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
  assert {"reward/total", "accuracy", "format_rate", "contradiction_rate", "kl", "loss", "tokens_per_s",
          "compiled_programs"} <= set(lines[0])
  assert lines[-1]["compiled_programs"] == 1
  resumed = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")]
  assert resumed == [1, 2, 3, 4, 5]
  assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 5]
  straight.close()
  again.close()
