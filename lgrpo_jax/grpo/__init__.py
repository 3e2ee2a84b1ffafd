"""The GRPO objective (advantages, KL estimators, surrogate objectives, aggregation modes: registries),
chunked-vocabulary log-probs with the prompt computed once per pair, and the optax update."""

from lgrpo_jax.grpo.core import (ADVANTAGES, KL_ESTIMATORS, LOSSES, OBJECTIVES, LossConfig, advantage_metrics, advantages,
                                 check_loss, grpo_loss,
                                 register_advantage, register_kl, register_loss, register_objective, token_terms,
                                 token_weights, zero_variance_groups)
from lgrpo_jax.grpo.logprobs import completion_logprobs, token_logprobs

__all__ = ["advantage_metrics", "ADVANTAGES", "KL_ESTIMATORS", "LOSSES", "OBJECTIVES", "LossConfig", "advantages", "check_loss", "completion_logprobs",
           "grpo_loss", "token_weights",
           "register_advantage", "register_kl", "register_loss", "register_objective", "token_logprobs", "token_terms",
           "zero_variance_groups"]
