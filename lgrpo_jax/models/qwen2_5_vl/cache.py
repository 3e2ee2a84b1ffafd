"""The KV cache of a rollout: one prefix per prompt, shared by its G samples, plus G suffixes.

    prefix_k, prefix_v   L × (B, K, P, D)      the prompt's keys/values, written once by the prefill
    prefix_mask          (B, P) bool           which prompt slots are real (left padding is not)
    suffix_k, suffix_v   L × (B, K, G, N, D)   the samples' generated tokens, slot i at decode step i

One array per layer (tuples), not a stacked (L, …) array: the decode loop runs its layers
unrolled, and slicing a layer out of a stacked array inside the loop copies it every step.

Batch-like axes lead (B, K[, G]) so a decode step's attention reads the caches as they lie: no
per-step transposes (measured: with (…, P, K, D) layouts XLA transposed every layer's cache every
step, ~10× the attention's own cost on CPU).

Nothing is repeated G times: the G samples' queries read the one prefix (see
`layers.attention_decode`), so prefix memory and prefix reads are 1/G of a repeated cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lgrpo_jax.sharding import constrain

PREFIX_NAMES = ("batch", "kv_heads", "length", "head_dim")
# B and G both carry "batch": whichever the data axes divide is split (B=4 pairs on 8 devices → G).
SUFFIX_NAMES = ("batch", "kv_heads", "batch", "length", "head_dim")


class KVCache(NamedTuple):
  prefix_k: tuple[jax.Array, ...]
  prefix_v: tuple[jax.Array, ...]
  prefix_mask: jax.Array
  suffix_k: tuple[jax.Array, ...]
  suffix_v: tuple[jax.Array, ...]

  @classmethod
  def from_prefill(cls, k_lbpkd, v_lbpkd, attention_mask_bp, num_samples: int, max_new_tokens: int):
    """From `Qwen25VL.prefill`'s (L, B, P, K, D) keys/values (transposed once, here)."""
    l, b, _, kh, d = k_lbpkd.shape
    suffix = tuple(constrain(jnp.zeros((b, kh, num_samples, max_new_tokens, d), k_lbpkd.dtype),
                             SUFFIX_NAMES) for _ in range(l))
    per_layer = lambda a: tuple(constrain(jnp.swapaxes(a[i], 1, 2), PREFIX_NAMES) for i in range(l))
    return cls(per_layer(k_lbpkd), per_layer(v_lbpkd), jnp.asarray(attention_mask_bp).astype(bool),
               suffix, suffix)
