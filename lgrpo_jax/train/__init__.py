"""Training: the one-program GRPO step and the loop with Orbax checkpoints and exact resume."""

from lgrpo_jax.train.loop import LoopConfig, Trainer
from lgrpo_jax.train.step import Batch, StepConfig, Tables, TrainState, init_state, make_train_step, train_step

__all__ = ["LoopConfig", "Trainer", "Batch", "StepConfig", "Tables", "TrainState", "init_state", "make_train_step", "train_step"]
