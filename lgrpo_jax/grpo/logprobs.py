"""Per-token log-probabilities of completions, from fp32 logits computed in vocabulary chunks.

`token_logprobs` never holds the (…, V) logits: it goes over chunks of C vocabulary rows of the
output head, keeping a running max and a running Σ exp (an online logsumexp). Peak logits memory is
rows·C·4 bytes instead of rows·V·4: for 4 pairs × 8 completions × 512 tokens and Qwen's V = 151,936
that is 0.54 GB at C = 8,192 against 9.96 GB unchunked.

Its backward pass is written by hand (a custom VJP): with L = log softmax(z)[y], z = h·Wᵀ,
dL/dz = g·(onehot(y) − softmax(z)). The forward keeps only h, W, the targets and each row's
logsumexp; the backward recomputes each chunk's logits once and forms its gradient in one pass,
  dh = g·W[y] − Σ_chunks (g·p_c)·W_c,   dW_c = −(g·p_c)ᵀ·h,   dW[y] += g·h,
so the one-hot part is a gather and a scatter of R rows, not a comparison over R × V entries. The
target logit is the row product h·W[y] (no pick from the chunk). Under a gradient on CPU
(`layers.UNROLL_BACKENDS`) the chunks are a Python loop over exact slices of W (no padding of the
head, no stacked gradient to zero-fill) and dW_cᵀ = hᵀ·(g·p_c) is computed as (E, C) blocks, transposed once at the end: XLA's
CPU matmul takes no transposed left operand, and transposing each (R, C) chunk gradient instead,
fused into its elementwise producer, was the slow part (measured: 1,024 rows × V = 32,000, E = 512,
C = 8,192: 630 ms forward + backward against 938 ms with autodiff through a rematerialised scan).
Elsewhere, and without a gradient, the chunks are a `lax.scan` over the padded head (compile time
does not grow with V).

`completion_logprobs` is the policy (or reference) pass of the loss: the prompt and its images run
once per pair (`prefill`), the G completions attend to that one prefix (`extend`), and the gradients
of all G completions flow into it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lgrpo_jax.models.qwen2_5_vl import layers
from lgrpo_jax.models.qwen2_5_vl.layers import precision_for

F32 = jnp.float32


def token_logprobs(h_re, head_ve, targets_r, chunk: int = 8192, dtype=jnp.float32, with_entropy=False,
                   entropy_grad=False, temperature: float = 1.0):
  """log softmax(h·Wᵀ / T)[target] in fp32 for hidden states h (…, E), head W (V, E), targets (…),
  with h and W in `dtype` and fp32 accumulation. The temperature divides the fp32 logits, as the
  sampler does (`sampling.choose`): dividing the head before a bf16 matmul would round W/T to bf16
  and move every log-prob (~5e-3 at T = 0.7). With `with_entropy`, also the entropy of each
  position's distribution (same pass): H = lse − t/s, where t = Σ exp(l − m)·l is carried
  alongside s = Σ exp(l − m). The entropy is differentiated only with `entropy_grad` (an entropy
  bonus); otherwise its cotangent is dropped and the backward pass does no work for it."""
  lead = h_re.shape[:-1]
  h = h_re.astype(dtype).reshape(-1, h_re.shape[-1])
  t = targets_r.reshape(-1).astype(jnp.int32)
  logp, ent = _logprobs(min(chunk, head_ve.shape[0]), bool(with_entropy or entropy_grad), bool(entropy_grad),
                        float(temperature), h, head_ve.astype(dtype), t)
  logp = logp.reshape(lead)
  return (logp, ent.reshape(lead)) if with_entropy or entropy_grad else logp


def _chunk_slices(v: int, c: int) -> list[tuple[int, int]]:
  return [(a, min(a + c, v)) for a in range(0, v, c)]


def _tempered(logits, temperature: float):
  return logits if temperature == 1.0 else logits / temperature


def _logits(h_re, w_ce, temperature: float = 1.0):
  return _tempered(jnp.einsum("re,ce->rc", h_re, w_ce, precision=precision_for(w_ce.dtype),
                              preferred_element_type=F32), temperature)


def _target_logits(h_re, w_ve, t_r, temperature: float = 1.0):
  return _tempered(jnp.einsum("re,re->r", h_re, w_ve[t_r], precision=precision_for(w_ve.dtype),
                              preferred_element_type=F32), temperature)


def _stats_update(carry, logits_rc, with_entropy):
  """Fold one chunk's logits into the running max m, Σ exp(l − m) and Σ exp(l − m)·l."""
  m, s, ts = carry
  m_new = jnp.maximum(m, logits_rc.max(-1))
  scale = jnp.exp(m - m_new)
  e = jnp.exp(logits_rc - m_new[:, None])
  s = s * scale + e.sum(-1)
  if with_entropy:
    ts = ts * scale + jnp.sum(jnp.where(e > 0, e * logits_rc, 0.0), -1)
  return m_new, s, ts


def _padded_chunks(w_ve, c):
  """W as (n, C, E) chunks, the last padded with zero rows, and the valid-column mask of each chunk."""
  v, e = w_ve.shape
  n = -(-v // c)
  w = jnp.pad(w_ve, ((0, n * c - v), (0, 0))).reshape(n, c, e)
  return w, (jnp.arange(n)[:, None] * c + jnp.arange(c)) < v


def _forward(c, with_entropy, temperature, h_re, w_ve, t_r, unrolled: bool):
  """→ log-probs, entropies (zeros without `with_entropy`) and each row's logsumexp."""
  r = h_re.shape[0]
  carry = (jnp.full((r,), -jnp.inf, F32), jnp.zeros((r,), F32), jnp.zeros((r,), F32))
  if unrolled:
    for a, b in _chunk_slices(w_ve.shape[0], c):
      carry = _stats_update(carry, _logits(h_re, w_ve[a:b], temperature), with_entropy)
  else:
    def body(carry, xs):
      w_ce, valid_c = xs
      return _stats_update(carry, jnp.where(valid_c, _logits(h_re, w_ce, temperature), -jnp.inf), with_entropy), None
    carry, _ = jax.lax.scan(body, carry, _padded_chunks(w_ve, c))
  m, s, ts = carry
  lse = m + jnp.log(s)
  ent = lse - ts / s if with_entropy else jnp.zeros_like(lse)
  return _target_logits(h_re, w_ve, t_r, temperature) - lse, ent, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _logprobs(c, with_entropy, entropy_grad, temperature, h_re, w_ve, t_r):
  """Without a gradient (e.g. the reference pass): the scan on every backend. On CPU the Python loop
  kept every chunk's logits alive at once there (measured, the 74M benchmark model's reference pass
  over 4 pairs: +140k page faults, ~+8% time); under a gradient the loop is the faster one."""
  logp, ent, _ = _forward(c, with_entropy, temperature, h_re, w_ve, t_r, unrolled=False)
  return logp, ent


def _logprobs_fwd(c, with_entropy, entropy_grad, temperature, h_re, w_ve, t_r):
  logp, ent, lse = _forward(c, with_entropy, temperature, h_re, w_ve, t_r, unrolled=layers._unrolled())
  return (logp, ent), (h_re, w_ve, t_r, lse, ent if entropy_grad else None)


def _logprobs_bwd(c, with_entropy, entropy_grad, temperature, res, cotangents):
  """Without `entropy_grad` the entropy's cotangent is dropped: it is reported, not trained on.
  With it, dH/dz = −p·(z − lse + H) joins the log-prob's −g·p in the same pass over the chunks.
  z = h·Wᵀ/T: every gradient with respect to h·Wᵀ carries 1/T, folded into the cotangents."""
  h_re, w_ve, t_r, lse, ent = res
  g = _tempered(cotangents[0].astype(F32), temperature)
  v, e = w_ve.shape
  dt, prec = w_ve.dtype, precision_for(w_ve.dtype)
  if entropy_grad:
    g_ent = _tempered(cotangents[1].astype(F32), temperature)

    def neg_gp(logits_rc):  # −p·(g + g_H·(z − lse + H)); 0 where p = 0 (the padded head's −inf)
      z = logits_rc - lse[:, None]
      p = jnp.exp(z)
      return jnp.where(p > 0, -p * (g[:, None] + g_ent[:, None] * (z + ent[:, None])), 0.0).astype(dt)
  else:
    # The softmax part of each chunk's logit gradient, −g·p (R, C), in the matmul dtype.
    neg_gp = lambda logits_rc: (-g[:, None] * jnp.exp(logits_rc - lse[:, None])).astype(dt)
  mm = lambda x, y, spec: jnp.einsum(spec, x, y, precision=prec, preferred_element_type=F32)
  dh = g[:, None] * w_ve[t_r].astype(F32)  # the one-hot part
  if layers._unrolled():
    h_er = h_re.T  # small (E × R): every weight-gradient product below is then a plain one
    dw_blocks = []
    for a, b in _chunk_slices(v, c):
      dz = neg_gp(_logits(h_re, w_ve[a:b], temperature))
      dh = dh + mm(dz, w_ve[a:b], "rc,ce->re")
      dw_blocks.append(mm(h_er, dz, "er,rc->ec"))
    dw = jnp.concatenate(dw_blocks, axis=1).T
  else:
    def body(dh, xs):
      w_ce, valid_c = xs
      dz = neg_gp(jnp.where(valid_c, _logits(h_re, w_ce, temperature), -jnp.inf))
      return dh + mm(dz, w_ce, "rc,ce->re"), mm(dz, h_re, "rc,re->ce")
    dh, dw = jax.lax.scan(body, dh, _padded_chunks(w_ve, c))
    dw = dw.reshape(-1, e)[:v]
  dw = dw.at[t_r].add(g[:, None] * h_re.astype(F32))  # the one-hot part
  return dh.astype(h_re.dtype), dw.astype(dt), None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def completion_logprobs(model, x_prompt_btd, position_ids, prompt_mask, tokens_bgn, mask_bgn,
                        chunk: int = 8192, temperature: float = 1.0, with_entropy: bool = False,
                        entropy_grad: bool = False):
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
  return token_logprobs(h_pred, model.head_matrix(), tokens_bgn, chunk, dtype=model.dtype, with_entropy=with_entropy,
                        entropy_grad=entropy_grad, temperature=temperature)


def completion_logprobs_copies(model, x_prompt_rtd, position_ids, prompt_mask, tokens_bgn, mask_bgn,
                               chunk: int = 8192, temperature: float = 1.0, with_entropy: bool = False,
                        entropy_grad: bool = False):
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
  return token_logprobs(h_pred, model.head_matrix(), tokens_bgn, chunk, dtype=model.dtype, with_entropy=with_entropy,
                        entropy_grad=entropy_grad, temperature=temperature)
