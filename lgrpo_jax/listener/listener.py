"""The listener: a frozen VLM reads the prompt, the two images and the reasoner's chain of thought
with the answer removed, and gives P(Image 1), P(Image 2) by a softmax over the two choice tokens.

Layout, with no dynamic shapes (docs/architecture.md):

    [listener prefix: system, images, prompt, "Here is someone's comparison:"]   once per pair
    [completion slots (N): the reasoning; the answer's and every special token's (EOS, …) are holes | suffix]

The prefix (vision tower included) runs once per pair and is cached; each sample's slots attend to
it and causally to their own non-hole tokens, and positions count only the non-hole tokens, so the
model sees exactly the contiguous text [prefix | reasoning | suffix] (tested against transformers).
The probability is read at the last suffix slot, from the two choice rows of the head only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lgrpo_jax.data.images import ImageConfig, process_image
from lgrpo_jax.data.prompts import PromptConfig, listener_parts
from lgrpo_jax.models.qwen2_5_vl.layers import precision_for, static_grid
from lgrpo_jax.models.qwen2_5_vl.model import Qwen25VL
from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index
from lgrpo_jax.parsing import Variant, find_first, token_variants
from lgrpo_jax.rewards.text import answer_token_of

def unspoken_ids(tokenizer) -> tuple[int, ...]:
  """The ids the listener is never shown: every token that spells no text (end of turn, and the
  special tokens a policy may emit, e.g. `<|image_pad|>` outside an image, which the format parser
  and the text rewards read as nothing — shown, they would be a channel no reward sees)."""
  from lgrpo_jax.rewards.text import _special_ids
  return tuple(sorted(int(i) for i in _special_ids(tokenizer)))


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
  """Token ids the listener needs, found once from the tokenizer (hashable: a static jit arg)."""
  suffix_ids: tuple[int, ...]  # the question, the assistant header, the choices' common prefix
  choice_ids: tuple[int, int]  # first tokens where "Image 1" and "Image 2" differ
  answer_variants: tuple[Variant, ...]  # the answer tag as it can appear in completions
  drop_ids: tuple[int, ...] = ()

  @classmethod
  def from_tokenizer(cls, tokenizer, prompt: PromptConfig = PromptConfig(), answer_tag: str = "<answer>"
                     ) -> "ListenerSpec":
    _, suffix, choices = listener_parts(tokenizer, "", [(1, 2, 2), (1, 2, 2)], prompt, merge_size=2)
    return cls(tuple(int(t) for t in suffix), choices, token_variants(tokenizer, answer_tag),
               unspoken_ids(tokenizer))


def reasoning_view(tokens_bgn, lengths_bg, spec: ListenerSpec, answer_token=None):
  """(tokens, keep) of shape (B, G, N), the kept tokens first: what the listener may see of each completion — the tokens
  before the first answer tag (the answer, and anything after it, is removed), without the tokens
  that spell no text (`spec.drop_ids`: end of turn, other special tokens). Where the tag's first token had swallowed the end of the reasoning (">" in "><", "." in
  Qwen's ".<"), that slot is kept and holds the swallowed text alone, so the reasoning reads as
  written — for the contexts `parsing.CONTEXTS` lists; after any other merge the merged token goes
  with the tag.

  The tag is found among its usual tokenisations (`spec.answer_variants`); `answer_token` (B, G),
  from `parse` (`Parsed.answer_token`), is where the text's first "<answer>" starts however it was
  spelled — a sampler may emit it a character at a time — and the view never reaches past it."""
  n = tokens_bgn.shape[-1]
  answer_at, remainder = find_first(tokens_bgn, lengths_bg, spec.answer_variants)
  idx = jnp.arange(n)
  cut = jnp.minimum(answer_at, lengths_bg)
  swallowed = remainder >= 0
  if answer_token is not None:
    swallowed &= answer_at <= answer_token  # the variant found is the text's first tag
    cut = jnp.minimum(cut, answer_token)
  cut = cut[..., None]
  at_tag = (idx == answer_at[..., None]) & swallowed[..., None] & (idx < lengths_bg[..., None])
  tokens = jnp.where(at_tag, remainder[..., None], tokens_bgn)
  keep = (idx < cut) | at_tag
  if spec.drop_ids:
    keep &= ~jnp.isin(tokens, jnp.asarray(spec.drop_ids, tokens.dtype))
  # The kept tokens first, in order: the same text is the same slots, so it scores bit-identically
  # wherever a dropped token sat (with the holes in place, ~1e-7 apart: a near-tie in a group)
  order = jnp.argsort(~keep, axis=-1, stable=True)
  return jnp.take_along_axis(tokens, order, -1), jnp.take_along_axis(keep, order, -1)


def listener_logits(model: Qwen25VL, prefix_ids, prefix_mask, pixel_values, grid, tokens_bgn, lengths_bg,
                    spec: ListenerSpec, prefix_sharing: bool = True, image_embeds=None, answer_token=None):
  """(B, G, 2) fp32 logits of (Image 1, Image 2) for every completion (traced; differentiable, for
  training a listener — `listener_probs` is what rewards use).

  prefix_ids / prefix_mask (B, P): the left-padded listener prefix of each pair, whose image pads
  take `pixel_values` / `grid` (the pair's two images, as for the reasoner); tokens (B, G, N) and
  lengths (B, G): the G completions of each pair (e.g. a `Rollout`). `prefix_sharing=False`: the
  same values the plain way (`_listener_logits_copies`). `image_embeds`: `model.image_features(
  pixel_values, grid)` when the caller already has them (the training step, when the listener is
  the reference model: one vision pass for both). `answer_token`: `Parsed.answer_token` of the
  completions, so that no spelling of the answer tag shows the listener the answer
  (`reasoning_view`)."""
  if not prefix_sharing:
    return _listener_logits_copies(model, prefix_ids, prefix_mask, pixel_values, grid, tokens_bgn, lengths_bg,
                                   spec, image_embeds, answer_token)
  b, g, n = tokens_bgn.shape
  if image_embeds is None and grid:
    image_embeds = model.image_features(pixel_values, grid)
  pos, _ = get_rope_index(prefix_ids, prefix_mask, grid, model.config)
  _, pk, pv = model.prefill(model.embed(prefix_ids, image_embeds), pos, prefix_mask)
  suffix = jnp.broadcast_to(jnp.asarray(spec.suffix_ids, jnp.int32), (b, g, len(spec.suffix_ids)))
  seen, keep = reasoning_view(tokens_bgn.astype(jnp.int32), lengths_bg, spec, answer_token)
  chunk = jnp.concatenate([seen, suffix], axis=-1)
  valid = jnp.concatenate([keep, jnp.ones(suffix.shape, bool)], -1)
  start = jnp.max(pos, axis=(0, 2)) + 1  # the position after the prefix, per pair
  positions = start[:, None, None] + jnp.cumsum(valid, axis=-1) - 1
  h = model.extend(model.embed(chunk), positions, valid, pk, pv, prefix_mask)
  w = model.head_weights(spec.choice_ids)  # (2, E)
  # fp32 accumulation and result, as `Qwen25VL.logits`: a bf16 result is a step of 0.125 at
  # logits of 16–32, which would quantise P(correct) by up to ~0.02
  return jnp.einsum("bge,ce->bgc", h[:, :, -1].astype(model.dtype), w.astype(model.dtype),
                    precision=precision_for(model.dtype), preferred_element_type=jnp.float32)


def _listener_logits_copies(model: Qwen25VL, prefix_ids, prefix_mask, pixel_values, grid, tokens_bgn, lengths_bg,
                            spec: ListenerSpec, pair_embeds=None, answer_token=None):
  """`listener_logits` computed the plain way: the prefix and its images once per completion, each
  copy followed by that completion's slots and the question, one causal forward over B·G sequences
  (holes masked, positions counting the kept tokens as in the shared layout). The comparison path
  and the test oracle of prefix sharing."""
  b, g, n = tokens_bgn.shape
  r = b * g
  rep = lambda a: jnp.repeat(a, g, axis=0)  # row b·G + g: pair b's prefix, for its completion g
  ids, mask = rep(prefix_ids), rep(prefix_mask)
  image_embeds = None
  if grid:
    grid_r = tuple(gr for i in range(b) for _ in range(g) for gr in grid[2 * i:2 * i + 2])
    if pair_embeds is not None:  # the pairs' features, given: repeated, not recomputed
      image_embeds = model.repeat_image_features(pair_embeds, grid, b, g)
    else:
      per_pair = pixel_values.reshape(b, -1, pixel_values.shape[-1])
      image_embeds = model.image_features(rep(per_pair).reshape(-1, pixel_values.shape[-1]), grid_r)
  else:
    grid_r = grid
  pos, _ = get_rope_index(ids, mask, grid_r, model.config)
  suffix = jnp.broadcast_to(jnp.asarray(spec.suffix_ids, jnp.int32), (b, g, len(spec.suffix_ids)))
  seen, keep = reasoning_view(tokens_bgn.astype(jnp.int32), lengths_bg, spec, answer_token)
  chunk = jnp.concatenate([seen, suffix], axis=-1).reshape(r, -1)
  valid = jnp.concatenate([keep, jnp.ones(suffix.shape, bool)], -1).reshape(r, -1)
  start = jnp.max(pos, axis=(0, 2)) + 1
  chunk_pos = jnp.broadcast_to(start[:, None] + jnp.cumsum(valid, axis=-1) - 1, (3, *valid.shape))
  x = jnp.concatenate([model.embed(ids, image_embeds), model.embed(chunk)], axis=1)
  h, _, _ = model.prefill(x, jnp.concatenate([pos, chunk_pos.astype(pos.dtype)], axis=2),
                          jnp.concatenate([mask, valid.astype(mask.dtype)], axis=1))
  w = model.head_weights(spec.choice_ids)  # (2, E)
  last = h[:, -1].reshape(b, g, h.shape[-1])  # the last question slot, always kept
  return jnp.einsum("bge,ce->bgc", last.astype(model.dtype), w.astype(model.dtype),
                    precision=precision_for(model.dtype), preferred_element_type=jnp.float32)


def listener_probs(model: Qwen25VL, prefix_ids, prefix_mask, pixel_values, grid, tokens_bgn, lengths_bg,
                   spec: ListenerSpec, prefix_sharing: bool = True, image_embeds=None, answer_token=None):
  """(B, G, 2) fp32 probabilities of (Image 1, Image 2) for every completion (traced; call in jit).
  Arguments as for `listener_logits`; no gradient flows through them."""
  logits = listener_logits(model, prefix_ids, prefix_mask, pixel_values, grid, tokens_bgn, lengths_bg, spec,
                           prefix_sharing, image_embeds, answer_token)
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


@functools.partial(nnx.jit, static_argnames=("grid", "spec"))
def _probs_jit(model, prefix_ids, prefix_mask, pixel_values, tokens, lengths, answer_token, grid, spec):
  return listener_probs(model, prefix_ids, prefix_mask, pixel_values, grid, tokens, lengths, spec,
                        answer_token=answer_token)


def score(model: Qwen25VL, tokenizer, examples, prompt: PromptConfig = PromptConfig(),
          image: ImageConfig = ImageConfig(), spec: ListenerSpec | None = None) -> np.ndarray:
  """P(Image 1), P(Image 2) for each (prompt text, (image 1, image 2), reasoning text) — images as
  paths, bytes or PIL images. The reasoning may include its answer: it is removed exactly as in
  training (the view ends where the text's first "<answer>" starts, `rewards.text.answer_token_of`,
  the host twin of the parser's `answer_token`). Returns (n, 2) float32. One compiled call per
  distinct (prefix length, grids) shape."""
  spec = spec or ListenerSpec.from_tokenizer(tokenizer, prompt)
  prefixes, pixels, grids, texts = [], [], [], []
  for k, (text, images, reasoning) in enumerate(examples):
    out = [process_image(im, image, source=f"example {k} image {i + 1}") for i, im in enumerate(images)]
    pixels += [p for p, _ in out]
    grids += [gr for _, gr in out]
    prefixes.append(listener_parts(tokenizer, text, [gr for _, gr in out], prompt, image.merge_size)[0])
    texts.append(tokenizer(reasoning, add_special_tokens=False)["input_ids"])
  width_p, width_t = max(map(len, prefixes)), max(1, max(map(len, texts)))
  ids = np.zeros((len(examples), width_p), np.int32)
  mask = np.zeros_like(ids)
  toks = np.zeros((len(examples), 1, width_t), np.int32)
  lengths = np.zeros((len(examples), 1), np.int32)
  answer_at = np.zeros((len(examples), 1), np.int32)
  for r, (pre, t) in enumerate(zip(prefixes, texts)):
    ids[r, width_p - len(pre):], mask[r, width_p - len(pre):] = pre, 1  # left-padded prefix
    toks[r, 0, :len(t)], lengths[r, 0] = t, len(t)
    answer_at[r, 0] = answer_token_of(tokenizer, t)
  probs = _probs_jit(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(np.concatenate(pixels)),
                     jnp.asarray(toks), jnp.asarray(lengths), jnp.asarray(answer_at), static_grid(grids), spec)
  return np.asarray(probs[:, 0])
