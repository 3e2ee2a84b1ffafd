"""The tiny demo: a random tiny Qwen2.5-VL, synthetic colour/shape pairs, CPU, a few minutes.

  python -m lgrpo_jax.launch --config configs/demo.py [loop.steps=20 …]
"""

from lgrpo_jax.config import (DataConfig, ExperimentConfig, ImageConfig, LoopConfig, LossConfig, ModelConfig,
                              OptimConfig, PipelineConfig, SamplingConfig, StepConfig)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      run_dir="runs/demo_grpo",
      model=ModelConfig(preset="tiny"),  # random weights, the tiny local tokenizer
      data=DataConfig(source="synthetic", synthetic_pairs=128, synthetic_image_size=56, eval_pairs=16),
      pipeline=PipelineConfig(global_batch=4, length_buckets=(256, 512),
                              image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56)),
      step=StepConfig(
          # eos_ids left empty: the launcher takes the tokenizer's end-of-turn ids
          sampling=SamplingConfig(max_new_tokens=32, num_samples=4, temperature=1.0),
          loss=LossConfig(beta=0.0),
          optim=OptimConfig(learning_rate=1e-3)),
      loop=LoopConfig(steps=20, save_every=10, keep=2, eval_every=10),
  )
