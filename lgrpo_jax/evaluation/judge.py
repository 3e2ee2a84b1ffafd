"""Judging a batch of ordered pairs on device: the reasoner's completions, their parsed answers, the
reasoner's own probability of each choice at the answer slot, and the listener's probabilities.

One jitted program per (image-grid signature, sampling settings):

    vision + prompt ─► k completions (greedy or sampled; the prompt prefilled once per pair)
                    ─► parse (format, answer) on device
                    ─► answer-slot probability: the reasoner re-reads [prompt | its reasoning |
                       "<answer>Image "] and we take the softmax over the two choice tokens — a soft
                       score for every completion, well-formed or not
                    ─► listener: [its prefix | reasoning, answer removed | question] → P(Image 1/2)

The answer-slot read uses the listener's machinery (lgrpo_jax.listener) with the reasoner's own
prompt as prefix and the answer tag as suffix, so the reasoning is what the model wrote (up to the
first answer tag, without the tokens that spell no text: end of turn and every other special token, `listener.unspoken_ids`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lgrpo_jax.data.prompts import PromptConfig, choice_tokens
from lgrpo_jax.listener import ListenerSpec, listener_probs
from lgrpo_jax.listener.listener import listener_logits, unspoken_ids
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index
from lgrpo_jax.parsing import token_variants
from lgrpo_jax.rewards import parse
from lgrpo_jax.sampling import SamplingConfig, sample_from_embeddings


def answer_slot_spec(tokenizer, prompt: PromptConfig = PromptConfig(), answer_tag: str = "<answer>") -> ListenerSpec:
  """The reasoner's self-read: suffix = the answer tag and the choices' common prefix
  ("<answer>Image "), choice ids where "<answer>Image 1" and "<answer>Image 2" first differ."""
  common, choices = choice_tokens(tokenizer, tuple(answer_tag + c for c in prompt.choices))
  return ListenerSpec(tuple(int(t) for t in common), choices, token_variants(tokenizer, answer_tag),
                      unspoken_ids(tokenizer))


class Judged(NamedTuple):
  tokens: jax.Array  # (B, k, N) completions
  lengths: jax.Array  # (B, k)
  answer: jax.Array  # (B, k) 1, 2 or 0 (none)
  format_ok: jax.Array  # (B, k) bool
  p_self: jax.Array  # (B, k, 2) the reasoner's P(Image 1), P(Image 2) at the answer slot (zeros if off)
  p_listener: jax.Array  # (B, k, 2) the listener's (zeros without a listener)
  # (B, k) the answer slot's log-odds of Image 1 (fp32 logits' difference; zeros if off): P saturates
  # to exactly 1 in fp32 past ~17 nats, where a confident judge's anchors scores would then tie
  self_log_odds: jax.Array | None = None


def judge(params, listener_params, batch, tables, key, *, graphdef, listener_graphdef, sampling: SamplingConfig,
          spec: ListenerSpec | None, self_spec: ListenerSpec | None, pair_grid) -> Judged:
  """Traced; see the module docstring. `batch` is a train.step.Batch (listener fields needed when
  `spec` is given); `spec` None skips the listener, `self_spec` None the answer-slot read."""
  b = batch.input_ids.shape[0]
  grid = tuple(pair_grid) * b
  policy = nnx.merge(graphdef, params)
  pixels = batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1])
  pos, _ = get_rope_index(batch.input_ids, batch.attention_mask, grid, policy.config)
  x = policy.embed(batch.input_ids, policy.image_features(pixels, grid))
  out = sample_from_embeddings(policy, x, pos, batch.attention_mask, sampling, key)
  parsed = parse(out.tokens, out.mask, tables.byte_table, tables.byte_lengths, tables.choices)
  zeros = jnp.zeros(out.lengths.shape + (2,), jnp.float32)
  p_self = p_listener = zeros
  log_odds = zeros[..., 0]
  if self_spec is not None:
    logits = jax.lax.stop_gradient(listener_logits(policy, batch.input_ids, batch.attention_mask, pixels, grid,
                                                   out.tokens, out.lengths, self_spec,
                                                   answer_token=parsed.answer_token))
    p_self, log_odds = jax.nn.softmax(logits, axis=-1), logits[..., 0] - logits[..., 1]
  if spec is not None:
    listener = nnx.merge(listener_graphdef, listener_params)
    p_listener = listener_probs(listener, batch.listener_input_ids, batch.listener_attention_mask, pixels, grid,
                                out.tokens, out.lengths, spec, answer_token=parsed.answer_token)
  return Judged(out.tokens, out.lengths, parsed.answer, parsed.format_ok, p_self, p_listener, log_odds)
