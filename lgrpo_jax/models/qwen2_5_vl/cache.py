"""The KV cache of a rollout: one prefix per prompt, shared by its G samples, plus G suffixes.

    prefix_k, prefix_v   (L, B, P, K, D)      the prompt's keys/values, written once by the prefill
    prefix_mask          (B, P) bool          which prompt slots are real (left padding is not)
    suffix_k, suffix_v   (L, B, G, N, K, D)   the samples' generated tokens, slot i at decode step i

Nothing is repeated G times: the G samples' queries read the one prefix (see
`layers.attention_decode`), so prefix memory and prefix reads are 1/G of a repeated cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lgrpo_jax.sharding import constrain

PREFIX_NAMES = ("layers", "batch", "length", "kv_heads", "head_dim")
# B and G both carry "batch": whichever the data axes divide is split (B=4 pairs on 8 devices → G).
SUFFIX_NAMES = ("layers", "batch", "batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
  prefix_k: jax.Array
  prefix_v: jax.Array
  prefix_mask: jax.Array
  suffix_k: jax.Array
  suffix_v: jax.Array

  @classmethod
  def from_prefill(cls, k_lbpkd, v_lbpkd, attention_mask_bp, num_samples: int, max_new_tokens: int):
    l, b, _, kh, d = k_lbpkd.shape
    zeros = jnp.zeros((l, b, num_samples, max_new_tokens, kh, d), k_lbpkd.dtype)
    suffix = constrain(zeros, SUFFIX_NAMES)
    return cls(constrain(k_lbpkd, PREFIX_NAMES), constrain(v_lbpkd, PREFIX_NAMES),
               jnp.asarray(attention_mask_bp).astype(bool), suffix, suffix)

  def write(self, step, k_lbgkd, v_lbgkd) -> "KVCache":
    """Suffix slot `step` of every sample ← the new token's keys/values (in place in a loop)."""
    start = (0, 0, 0, step, 0, 0)
    return self._replace(
        suffix_k=jax.lax.dynamic_update_slice(self.suffix_k, k_lbgkd[:, :, :, None], start),
        suffix_v=jax.lax.dynamic_update_slice(self.suffix_v, v_lbgkd[:, :, :, None], start))
