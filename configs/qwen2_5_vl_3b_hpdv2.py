"""The 7B recipe (configs/qwen2_5_vl_7b_hpdv2.py) with Qwen2.5-VL-3B-Instruct as reasoner and
listener; fewer micro-batches (a 3B step fits with twice the micro-batch). The paper's listener is
Qwen2.5-VL-7B-Instruct whatever the reasoner: add model.listener=/ckpt/Qwen2.5-VL-7B-Instruct to
follow it (a second frozen copy, no longer shared with the reference).

  python -m lgrpo_jax.launch --config configs/qwen2_5_vl_3b_hpdv2.py \\
      model.checkpoint=/ckpt/Qwen2.5-VL-3B-Instruct data.path=/data/hpdv2/train.json data.image_root=/data/hpdv2 \\
      data.eval_path=/data/hpdv2/test.json data.eval_image_root=/data/hpdv2
"""

import dataclasses
import os

from lgrpo_jax.config import ExperimentConfig, load_config_file


def config() -> ExperimentConfig:
  base = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_vl_7b_hpdv2.py"))
  return dataclasses.replace(
      base, run_dir="runs/qwen2_5_vl_3b_hpdv2",
      model=dataclasses.replace(base.model, checkpoint="/ckpt/Qwen2.5-VL-3B-Instruct"),
      step=dataclasses.replace(base.step, optim=dataclasses.replace(base.step.optim, micro_batches=4)))
