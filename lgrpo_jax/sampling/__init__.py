"""Rollouts: prefill once per prompt, G samples decoded on device over a shared-prefix KV cache."""

from lgrpo_jax.sampling.sampler import (Rollout, SamplingConfig, choose, filter_logits, generate, sample,
                                        sample_from_embeddings)

__all__ = ["Rollout", "SamplingConfig", "choose", "filter_logits", "generate", "sample",
           "sample_from_embeddings"]
