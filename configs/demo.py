"""The embedded demo (`make demo`): a tiny random Qwen2.5-VL learns the synthetic preference task on
2 CPU cores in a few minutes.

  python -m lgrpo_jax.launch --config configs/demo.py [loop.steps=20 …]

The task (data.synthetic_n_wrong=0): both images show what the prompt asks for ("a red circle on a
black background"), but one has a strong magenta colour cast; people prefer the clean one.

1. Warm start (SFT, 300 steps): a scripted judge that says of each image whether it is clean and
   acceptable ("Image 1: tinted, no. Image 2: clean, yes.") — always rightly — but whose final
   answer follows them only 20% of the time and is otherwise "Image 1" (right on 60% of pairs: every
   one whose clean image is first, 20% of the others): a position-biased judge whose
   answers contradict its own reasoning, like an instruct model that knows the format but judges
   poorly. The same step teaches the listener role (read the reasoning
   with the answer removed, say which image), so the frozen listener — the warm-started model, as
   the paper's listener is the base checkpoint — follows the reasoning. Greedy held-out accuracy
   after it: ~0.5 (it answers "Image 1"), with a high contradiction rate.
2. GRPO (format + 0.5·accuracy + 0.5·listener confidence), G = 8, 8 pairs per step: the answers
   come to agree with the reasoning; held-out accuracy in both orders rises above 0.9.
"""

from lgrpo_jax.config import (DataConfig, ExperimentConfig, ImageConfig, LoopConfig, LossConfig, ModelConfig,
                              OptimConfig, PipelineConfig, SamplingConfig, SFTConfig, StepConfig)

TOKENS = 48  # the scripted judgements are ~26 tokens of the tiny tokenizer; room to ramble


def config() -> ExperimentConfig:
  return ExperimentConfig(
      run_dir="runs/demo",
      model=ModelConfig(preset="tiny"),  # random weights, the tiny local tokenizer
      # n_wrong=0: an image-quality judgement (a colour cast), which a 2-layer vision tower learns to
      # see within ~150 steps; prompt-matching judgements (n_wrong ≥ 1) need the model to compare
      # prompt words with what it sees, which took it 250 to > 400 steps (docs/training.md).
      data=DataConfig(source="synthetic", synthetic_pairs=1024, synthetic_image_size=56, synthetic_n_wrong=0,
                      eval_pairs=32),
      pipeline=PipelineConfig(global_batch=8, length_buckets=(256,),
                              image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56)),
      # a tiny random model: a large rate, no clipping (TRL's defaults are for pretrained weights)
      sft=SFTConfig(steps=300, learning_rate=3e-3, max_grad_norm=0.0, weight_decay=1e-4, global_batch=16,
                    max_target_tokens=TOKENS,
                    teacher="synthetic", teacher_accuracy=0.2, listener_weight=1.0),
      step=StepConfig(
          # eos_ids left empty: the launcher takes the tokenizer's end-of-turn ids
          sampling=SamplingConfig(max_new_tokens=TOKENS, num_samples=8, temperature=1.0),
          loss=LossConfig(beta=0.0),
          optim=OptimConfig(learning_rate=3e-4)),
      loop=LoopConfig(steps=100, save_every=50, keep=2, eval_every=25, log_every=10),
  )
