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

Keys transposed (`keys_transposed=True`, the XLA decode path on CPU: `KEYS_TRANSPOSED_BACKENDS`):
prefix_k (B, K, D, P) and suffix_k (B, K, G, D, N), so both q·kᵀ products read the keys with the slot
axis minor — XLA's CPU dot then runs them as plain (rows × D)·(D × slots) products instead of
transposed-operand ones (measured: one layer's decode attention 0.85–0.94 vs 1.70 ms per step on
the benchmark model's shapes). Values keep (…, slots, D): p·v already reads them that way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lgrpo_jax.sharding import constrain

PREFIX_NAMES = ("batch", "kv_heads", "length", "head_dim")
# B and G both carry "batch": whichever the data axes divide is split (B=4 pairs on 8 devices → G).
SUFFIX_NAMES = ("batch", "kv_heads", "batch", "length", "head_dim")
PREFIX_KT_NAMES = ("batch", "kv_heads", "head_dim", "length")
SUFFIX_KT_NAMES = ("batch", "kv_heads", "batch", "head_dim", "length")
# Backends whose XLA decode path stores keys transposed (see above). Not GPUs: unmeasured there.
KEYS_TRANSPOSED_BACKENDS = ("cpu",)


class KVCache(NamedTuple):
  prefix_k: tuple[jax.Array, ...]
  prefix_v: tuple[jax.Array, ...]
  prefix_mask: jax.Array
  suffix_k: tuple[jax.Array, ...]
  suffix_v: tuple[jax.Array, ...]

  @classmethod
  def from_prefill(cls, k_lbpkd, v_lbpkd, attention_mask_bp, num_samples: int, max_new_tokens: int,
                   keys_transposed: bool = False):
    """From `Qwen25VL.prefill`'s (L, B, P, K, D) keys/values (transposed once, here)."""
    l, b, _, kh, d = k_lbpkd.shape
    g, n, dt = num_samples, max_new_tokens, k_lbpkd.dtype
    zeros = lambda shape, names: tuple(constrain(jnp.zeros(shape, dt), names) for _ in range(l))
    suffix_v = zeros((b, kh, g, n, d), SUFFIX_NAMES)
    if keys_transposed:
      suffix_k = zeros((b, kh, g, d, n), SUFFIX_KT_NAMES)
      prefix_k = tuple(constrain(jnp.transpose(k_lbpkd[i], (0, 2, 3, 1)), PREFIX_KT_NAMES) for i in range(l))
    else:
      suffix_k = zeros((b, kh, g, n, d), SUFFIX_NAMES)
      prefix_k = tuple(constrain(jnp.swapaxes(k_lbpkd[i], 1, 2), PREFIX_NAMES) for i in range(l))
    prefix_v = tuple(constrain(jnp.swapaxes(v_lbpkd[i], 1, 2), PREFIX_NAMES) for i in range(l))
    return cls(prefix_k, prefix_v, jnp.asarray(attention_mask_bp).astype(bool), suffix_k, suffix_v)
