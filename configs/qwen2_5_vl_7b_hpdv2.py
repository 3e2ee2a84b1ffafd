"""The paper's recipe as far as it is known: Qwen2.5-VL-7B-Instruct reasoner, the same checkpoint frozen as the
listener, GRPO on ~16% of HPDv2 (arXiv 2506.22832). Point model.checkpoint at a local
copy of the checkpoint and data.path / data.image_root at a local HPDv2:

  python -m lgrpo_jax.launch --config configs/qwen2_5_vl_7b_hpdv2.py \
      model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct data.path=/data/hpdv2/train.json data.image_root=/data/hpdv2 \
      data.eval_path=/data/hpdv2/test.json data.eval_image_root=/data/hpdv2

What the paper does not state (G, β, ε, learning rate, batch size, completion length, temperature,
image resolution) uses the community GRPO defaults, named beside each value.
"""

from lgrpo_jax.config import (DataConfig, ExperimentConfig, ImageConfig, LoopConfig, LossConfig, MeshConfig,
                              ModelConfig, OptimConfig, PipelineConfig, SamplingConfig, StepConfig)


def config() -> ExperimentConfig:
  return ExperimentConfig(
      run_dir="runs/qwen2_5_vl_7b_hpdv2",
      model=ModelConfig(checkpoint="/ckpt/Qwen2.5-VL-7B-Instruct",  # the listener defaults to this base checkpoint
                        dtype="bfloat16",  # computed in bf16 ...
                        param_dtype="float32"),  # ... on fp32 master weights: a bf16 weight drops lr-1e-6 steps
      data=DataConfig(source="hpdv2", path="/data/hpdv2/train.json", image_root="/data/hpdv2",
                      fraction=0.16,  # paper: a ~16% subset of HPDv2
                      # held-out pairs for eval_every and best/: HPDv2's test split, so that the
                      # ImageReward test set (the paper's number) never picks the checkpoint
                      eval_source="hpdv2_test", eval_path="/data/hpdv2/test.json",
                      eval_image_root="/data/hpdv2", eval_pairs=256),
      pipeline=PipelineConfig(
          global_batch=64,  # assumption: 64 pairs x 8 samples = 512 completions per step
          bad_records="skip",  # count and log dirty records instead of stopping a long run
          image=ImageConfig(max_pixels=448 * 448,  # assumption: 256 tokens per image
                            grid_buckets=((448, 448), (392, 504), (504, 392)))),  # bounded compiles
      step=StepConfig(
          sampling=SamplingConfig(max_new_tokens=512,  # assumption: room for a few paragraphs of reasoning
                                  num_samples=8,  # G = 8: DeepSeekMath / TRL default
                                  temperature=1.0),  # TRL default
          # DeepSeekMath's GRPO (sequence-mean, k3 KL at β = 0.04); TRL 1.16 defaults to beta=0.0, loss_type="dapo"
          loss=LossConfig(loss="grpo", beta=0.04, kl="k3",
                          eps_low=0.2, eps_high=0.2),  # PPO/GRPO default clip range
          optim=OptimConfig(learning_rate=1e-6,  # TRL GRPO default
                            schedule="cosine", warmup_steps=10, total_steps=1000,
                            max_grad_norm=1.0, micro_batches=8)),
      loop=LoopConfig(steps=1000, save_every=100, save_every_minutes=30, keep=3, eval_every=100),
      mesh=MeshConfig(fsdp=-1),  # FSDP over every device (docs/sharding.md)
  )
