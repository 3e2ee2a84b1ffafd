"""Per-token log-probabilities of completions, from fp32 logits computed in vocabulary chunks.

`token_logprobs` never holds the (…, V) logits: it scans over chunks of C vocabulary rows of the
output head, keeping a running max, a running Σ exp and the target's logit (an online logsumexp),
and the chunk body is rematerialised in the backward pass. Peak logits memory is rows·C·4 bytes
instead of rows·V·4: for 4 pairs × 8 completions × 512 tokens and Qwen's V = 151,936 that is
0.54 GB at C = 8,192 against 9.96 GB unchunked.

`completion_logprobs` is the policy (or reference) pass of the loss: the prompt and its images run
once per pair (`prefill`), the G completions attend to that one prefix (`extend`), and the gradients
of all G completions flow into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lgrpo_jax.models.qwen2_5_vl.layers import precision_for


def token_logprobs(h_re, head_ve, targets_r, chunk: int = 8192, dtype=jnp.float32, with_entropy=False):
  """log softmax(h·Wᵀ)[target] in fp32 for hidden states h (…, E), head W (V, E), targets (…).
  With `with_entropy`, also the entropy of each position's distribution (same pass, no gradient):
  H = m + log s − t/s, where t = Σ exp(l − m)·l is carried alongside s = Σ exp(l − m)."""
  v, e = head_ve.shape
  c = min(chunk, v)
  nc = -(-v // c)
  w = jnp.pad(head_ve, ((0, nc * c - v), (0, 0))).reshape(nc, c, e).astype(dtype)
  h = h_re.astype(dtype)
  lead = h.shape[:-1]
  prec = precision_for(dtype)

  @jax.checkpoint
  def body(carry, xs):
    m, s, t, tgt = carry
    w_ce, k = xs
    logits = jnp.einsum("...e,ce->...c", h, w_ce, precision=prec, preferred_element_type=jnp.float32)
    col = k * c + jnp.arange(c)
    logits = jnp.where(col < v, logits, -jnp.inf)  # padded rows of the last chunk
    m_new = jnp.maximum(m, logits.max(-1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(logits - m_new[..., None])
    s = s * scale + e.sum(-1)
    if with_entropy:
      t = t * scale + jnp.sum(jnp.where(e > 0, e * logits, 0.0), -1)
    in_chunk = (targets_r >= k * c) & (targets_r < (k + 1) * c)
    picked = jnp.take_along_axis(logits, jnp.clip(targets_r - k * c, 0, c - 1)[..., None], -1)[..., 0]
    return (m_new, s, t, jnp.where(in_chunk, picked, tgt)), None

  zeros = jnp.zeros(lead, jnp.float32)
  (m, s, t, tgt), _ = jax.lax.scan(body, (jnp.full(lead, -jnp.inf, jnp.float32), zeros, zeros, zeros),
                                   (w, jnp.arange(nc)))
  logp = tgt - m - jnp.log(s)
  if with_entropy:
    return logp, jax.lax.stop_gradient(m + jnp.log(s) - t / s)
  return logp


def completion_logprobs(model, x_prompt_btd, position_ids, prompt_mask, tokens_bgn, mask_bgn,
                        chunk: int = 8192, temperature: float = 1.0, with_entropy: bool = False):
  """(B, G, N) fp32 log-probs of each completion token given its prompt (embedded, with its M-RoPE
  positions (3, B, P) and mask) and the completion tokens before it. Completion tokens are text,
  whatever their ids. With `temperature`, the log-probs of the tempered distribution (what the
  sampler reports)."""
  b, g, n = tokens_bgn.shape
  h_prompt, k, v = model.prefill(x_prompt_btd, position_ids, prompt_mask)
  start = jnp.max(position_ids, axis=(0, 2)) + 1
  positions = jnp.broadcast_to(start[:, None, None] + jnp.arange(n), (b, g, n))
  h = model.extend(model.embed(tokens_bgn), positions, mask_bgn, k, v, prompt_mask)
  # Token i is predicted by the hidden state before it: the prompt's last for i = 0.
  first = jnp.broadcast_to(h_prompt[:, None, -1:], (b, g, 1, h.shape[-1]))
  h_pred = jnp.concatenate([first, h[:, :, :-1]], axis=2)
  head = model.head_matrix()
  if temperature != 1.0:
    head = head / temperature
  return token_logprobs(h_pred, head, tokens_bgn, chunk, dtype=model.dtype, with_entropy=with_entropy)


def completion_logprobs_copies(model, x_prompt_rtd, position_ids, prompt_mask, tokens_bgn, mask_bgn,
                               chunk: int = 8192, temperature: float = 1.0, with_entropy: bool = False):
  """`completion_logprobs` computed the plain way, as every PyTorch peer does: each completion is
  appended to its own copy of the prompt and the B·G sequences of P + N tokens run as one causal
  forward. The prompt inputs are already per copy — row b·G + g holds pair b's prompt (embedded,
  (B·G, P, E); positions (3, B·G, P); mask (B·G, P)). The comparison path and the test oracle of
  prefix sharing (`StepConfig.prefix_sharing=False`)."""
  b, g, n = tokens_bgn.shape
  r, p = x_prompt_rtd.shape[:2]
  toks, mask = tokens_bgn.reshape(r, n), mask_bgn.reshape(r, n)
  x = jnp.concatenate([x_prompt_rtd, model.embed(toks)], axis=1)
  start = jnp.max(position_ids, axis=(0, 2)) + 1  # completions continue after the prompt, as in extend
  completion_pos = jnp.broadcast_to(start[:, None] + jnp.arange(n), (3, r, n))
  pos = jnp.concatenate([position_ids, completion_pos.astype(position_ids.dtype)], axis=2)
  h, _, _ = model.prefill(x, pos, jnp.concatenate([prompt_mask, mask.astype(prompt_mask.dtype)], axis=1))
  h_pred = h[:, p - 1:p + n - 1].reshape(b, g, n, h.shape[-1])  # token i from the state before it
  head = model.head_matrix()
  if temperature != 1.0:
    head = head / temperature
  return token_logprobs(h_pred, head, tokens_bgn, chunk, dtype=model.dtype, with_entropy=with_entropy)
