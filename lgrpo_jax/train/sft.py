"""Supervised warm start: teach the reasoner the `<think>…</think><answer>…</answer>` format (and
whatever the targets say) before GRPO, which needs a policy that already emits the format.

The loss is the mean negative log-likelihood of the target completion tokens given the prompt and
the images, computed like the GRPO loss: the prompt once per pair, chunked-vocabulary log-probs.
Targets come from a `teacher(host_batch, row) -> str` (e.g. an instruct model's outputs, or the
demo's scripted, deliberately noisy judge).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lgrpo_jax.grpo.update import policy_logprobs


def target_tokens(tokenizer, texts, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(B, 1, width) token ids of the target completions (right-padded) and their mask."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:width] for t in texts]
  out = np.zeros((len(ids), 1, width), np.int32)
  mask = np.zeros_like(out)
  for r, x in enumerate(ids):
    out[r, 0, :len(x)], mask[r, 0, :len(x)] = x, 1
  return out, mask


def sft_loss(params, graphdef, batch, tokens, mask, pair_grid, chunk: int = 8192):
  """Mean NLL per target token (padding rows of the batch weigh nothing)."""
  model = nnx.merge(graphdef, params)
  logp = policy_logprobs(model, batch.input_ids, batch.attention_mask, batch.pixel_values, pair_grid, tokens,
                         mask, chunk)
  w = mask.astype(jnp.float32) * batch.valid[:, None, None].astype(jnp.float32)
  return -jnp.sum(logp * w) / jnp.maximum(w.sum(), 1)


def make_sft_step(graphdef, tx: optax.GradientTransformation, pair_grid, chunk: int = 8192):
  """jit((params, opt_state, batch, tokens, mask) → (params, opt_state, loss)), params donated."""

  def step(params, opt_state, batch, tokens, mask):
    loss, grads = jax.value_and_grad(sft_loss)(params, graphdef, batch, tokens, mask, pair_grid, chunk)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))
