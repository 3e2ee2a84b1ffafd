"""Finding fixed texts (tags, choices) in generated token ids, on device.

A tag such as `<answer>` is not one token sequence: byte-level BPE merges it with what comes before
(">" + "<answer>" may start with the single token "><"). `token_variants` tokenises the tag after a
few likely contexts and keeps, for each, the tokens from the one where the tag starts. When that
first token also holds the end of the context (">" of "><"), the variant carries the id of that
context remainder, so a caller that cuts the text at the tag can put the remainder back (the text
before the tag then reads exactly as it was written: "…</think>"). `find_first` finds the earliest
occurrence of any variant in each row, on device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

# Punctuation too: Qwen's vocabulary has ".<", ":<", ")<" … as single tokens.
CONTEXTS = ("", " ", "\n", "\n\n", ">", ">\n", ". ", ".\n", ".", ":", ")", "!", "?", '"', "*", "`")


class Variant(NamedTuple):
  ids: tuple[int, ...]  # the tag's tokens as they appear after some context
  remainder: int  # id of the context text merged into ids[0] (-1: nothing merged, or not one token)


def token_variants(tokenizer, text: str, contexts=CONTEXTS) -> tuple[Variant, ...]:
  """The token sequences `text` can appear as after each context (duplicates removed)."""
  enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
  out: list[Variant] = []
  for c in contexts:
    full, pre = enc(c + text), enc(c)
    k = 0
    while k < min(len(full), len(pre)) and full[k] == pre[k]:
      k += 1
    remainder = -1
    if k < len(pre):  # the context's last tokens merged with the tag's first
      rest = enc(tokenizer.decode(pre[k:]))
      remainder = int(rest[0]) if len(rest) == 1 else -1
    v = Variant(tuple(int(t) for t in full[k:]), remainder)
    if v.ids and v not in out:
      out.append(v)
  return tuple(out)


def find_first(tokens_bn, lengths_b, variants):
  """(index, remainder) of the earliest occurrence of any variant lying wholly within the first
  `lengths` tokens of each row: index = its first token (`N`, the row width, where there is none),
  remainder = that variant's context remainder id (-1 if none). tokens (..., N), lengths (...)."""
  n = tokens_bn.shape[-1]
  pos = jnp.arange(n)
  first = jnp.full(tokens_bn.shape[:-1], n, jnp.int32)
  remainder = jnp.full(tokens_bn.shape[:-1], -1, jnp.int32)
  for ids, rem in variants:
    m = len(ids)
    if m > n:
      continue
    match = jnp.ones(tokens_bn.shape[:-1] + (n - m + 1,), bool)
    for i, t in enumerate(ids):
      match &= tokens_bn[..., i:n - m + 1 + i] == t
    match &= (pos[:n - m + 1] + m) <= lengths_b[..., None]
    at = jnp.min(jnp.where(match, pos[:n - m + 1], n), axis=-1).astype(jnp.int32)
    earlier = at < first
    first = jnp.where(earlier, at, first)
    remainder = jnp.where(earlier, rem, remainder)
  return first, remainder
