"""Training: the one-program GRPO step (the loop, checkpoints and launcher arrive in issue 7)."""

from lgrpo_jax.train.step import Batch, StepConfig, Tables, TrainState, init_state, make_train_step, train_step

__all__ = ["Batch", "StepConfig", "Tables", "TrainState", "init_state", "make_train_step", "train_step"]
