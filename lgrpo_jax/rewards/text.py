"""Completions as bytes, on device, and the think/answer format parsed on those bytes.

Tags on token ids are fragile (BPE merges "<" with what precedes it), so the parser works on the
*text*: a (V, L) table gives each token's UTF-8 bytes (special tokens → no bytes), a completion's
bytes are gathered and packed on device, and the tags are plain byte patterns. The table is built
once from the tokenizer; nothing leaves the device.

Well-formed (`format_ok`): optional whitespace, exactly one `<think>` … `</think>` with some
non-whitespace inside, optional whitespace, exactly one `<answer>` … `</answer>` whose content is
exactly one of the choices ("Image 1" / "Image 2") up to surrounding whitespace, then only
whitespace (end-of-turn tokens have no bytes). The parsed answer (1, 2, or 0 for none) comes from
the first `<answer>` and the first `</answer>` after it, whether or not the rest is well-formed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WHITESPACE = (0x20, 0x09, 0x0A, 0x0D)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """Inverse of the byte-level BPE alphabet (printable bytes map to themselves, the others to
  256 + k in order), as GPT-2/Qwen tokenizers write token strings."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
  chars, k = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + k)] = b
      k += 1
  return chars


def _special_ids(tokenizer) -> set[int]:
  """Ids that spell no text (special tokens, added ones included)."""
  added = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
  return set(tokenizer.all_special_ids) | added


def _piece_bytes(tokenizer, piece: str, decoder: dict[str, int]) -> bytes:
  """A vocabulary entry's UTF-8 bytes."""
  if all(ch in decoder for ch in piece):
    return bytes(decoder[ch] for ch in piece)
  return tokenizer.convert_tokens_to_string([piece]).encode("utf-8")  # not byte-level BPE: its text


def answer_token_of(tokenizer, ids, tag: bytes = b"<answer>", max_bytes: int = 32) -> int:
  """`Parsed.answer_token` of one completion, on the host: the index of the token holding the first
  byte of the first `tag` in the text `ids` spell (bytes as `ByteTable` has them: special tokens
  none, each token cut at `max_bytes`), `len(ids)` when there is none."""
  ids = [int(i) for i in ids]
  special, decoder = _special_ids(tokenizer), _byte_decoder()
  chunks = [b"" if i in special else _piece_bytes(tokenizer, p, decoder)[:max_bytes]
            for i, p in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
  at = b"".join(chunks).find(tag)
  if at < 0:
    return len(ids)
  return int(np.sum(np.cumsum([len(c) for c in chunks]) <= at))


@dataclasses.dataclass(frozen=True)
class ByteTable:
  """Each token id's bytes (V, L) uint8 and byte counts (V,); special tokens have none."""
  table: np.ndarray
  lengths: np.ndarray
  truncated: int  # tokens longer than L bytes (their tail is cut; reported, not silent)

  @classmethod
  def from_tokenizer(cls, tokenizer, max_bytes: int = 32) -> "ByteTable":
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    special = _special_ids(tokenizer)
    decoder = _byte_decoder()
    table = np.zeros((vocab_size, max_bytes), np.uint8)
    lengths = np.zeros(vocab_size, np.int32)
    truncated = 0
    for piece, i in tokenizer.get_vocab().items():
      if i in special:
        continue
      raw = _piece_bytes(tokenizer, piece, decoder)
      if len(raw) > max_bytes:
        truncated += 1
        raw = raw[:max_bytes]
      table[i, :len(raw)] = np.frombuffer(raw, np.uint8)
      lengths[i] = len(raw)
    return cls(table, lengths, truncated)


def completion_bytes(tokens_bgn, mask_bgn, table_vl, lengths_v):
  """(bytes (B, G, N·L) uint8, byte count (B, G)): each completion's text, packed from byte 0."""
  n, l = tokens_bgn.shape[-1], table_vl.shape[1]
  lens = jnp.where(mask_bgn > 0, lengths_v[tokens_bgn], 0)  # (B, G, N)
  start = jnp.cumsum(lens, axis=-1) - lens
  rows = table_vl[tokens_bgn]  # (B, G, N, L)
  dest = start[..., None] + jnp.arange(l)
  dest = jnp.where(jnp.arange(l) < lens[..., None], dest, n * l)  # out of range: dropped
  lead = tokens_bgn.shape[:-1]
  flat_dest = dest.reshape(-1, n * l)
  flat_rows = rows.reshape(-1, n * l)
  out = jax.vmap(lambda d, r: jnp.zeros(n * l, jnp.uint8).at[d].set(r, mode="drop"))(flat_dest, flat_rows)
  return out.reshape(*lead, n * l), lens.sum(-1)


def occurrences(bytes_m, n_bytes, pattern: bytes):
  """(…, M) bool: `pattern` starts at this byte and ends within the first n_bytes."""
  m = bytes_m.shape[-1]
  k = len(pattern)
  hit = jnp.ones(bytes_m.shape, bool)
  padded = jnp.pad(bytes_m, [(0, 0)] * (bytes_m.ndim - 1) + [(0, k)])
  for i, ch in enumerate(pattern):
    hit &= padded[..., i:i + m] == ch
  return hit & (jnp.arange(m) + k <= n_bytes[..., None])


class Parsed(NamedTuple):
  format_ok: jax.Array  # (B, G) bool
  answer: jax.Array  # (B, G) int32: 1, 2, or 0 (none)
  # (B, G) int32: the token holding the first byte of the first "<answer>", N when there is none —
  # where the listener's view ends, however the sampler spelled the tag.
  answer_token: jax.Array | None = None


def parse(tokens_bgn, mask_bgn, table_vl, lengths_v, choices=(b"Image 1", b"Image 2")) -> Parsed:
  """Format check and parsed answer of every completion (see the module docstring)."""
  b, n = completion_bytes(tokens_bgn, mask_bgn, table_vl, lengths_v)
  m = b.shape[-1]
  pos = jnp.arange(m)
  big = jnp.int32(m + 1)
  nonws = jnp.ones(b.shape, bool)
  for w in WHITESPACE:
    nonws &= b != w
  nonws &= pos < n[..., None]
  cum = jnp.concatenate([jnp.zeros(b.shape[:-1] + (1,), jnp.int32), jnp.cumsum(nonws, -1)], -1)
  at = lambda c, i: jnp.take_along_axis(c, jnp.clip(i, 0, m)[..., None], -1)[..., 0]
  blank = lambda lo, hi: at(cum, hi) - at(cum, lo) == 0  # no non-whitespace byte in [lo, hi)

  def first(hit, after=None):
    ok = hit if after is None else hit & (pos >= after[..., None])
    return jnp.min(jnp.where(ok, pos, big), -1)

  hits = {t: occurrences(b, n, t) for t in (b"<think>", b"</think>", b"<answer>", b"</answer>")}
  count = {t: h.sum(-1) for t, h in hits.items()}
  t0, t1 = first(hits[b"<think>"]), first(hits[b"</think>"])
  a0 = first(hits[b"<answer>"])
  a1 = first(hits[b"</answer>"], a0 + 8)

  def choice_in(lo, hi):
    """1/2 if the bytes in [lo, hi), stripped of whitespace, are exactly a choice, else 0."""
    lo_c = jnp.min(jnp.where(nonws & (pos >= lo[..., None]) & (pos < hi[..., None]), pos, big), -1)
    hi_c = jnp.max(jnp.where(nonws & (pos >= lo[..., None]) & (pos < hi[..., None]), pos, -1), -1) + 1
    out = jnp.zeros(lo.shape, jnp.int32)
    for k, c in enumerate(choices):
      hit = jnp.take_along_axis(occurrences(b, n, c), jnp.clip(lo_c, 0, m - 1)[..., None], -1)[..., 0]
      out = jnp.where(hit & (hi_c - lo_c == len(c)), k + 1, out)
    return out

  answer = jnp.where((a0 < big) & (a1 < big), choice_in(a0 + 8, a1), 0)
  ok = ((count[b"<think>"] == 1) & (count[b"</think>"] == 1) & (count[b"<answer>"] == 1)
        & (count[b"</answer>"] == 1)
        & (t0 + 7 <= t1) & (t1 + 8 <= a0) & (a0 + 8 <= a1)
        & blank(jnp.zeros_like(t0), t0) & ~blank(t0 + 7, t1) & blank(t1 + 8, a0) & blank(a1 + 9, n)
        & (answer > 0))
  # Token k holds bytes [end_k − len_k, end_k): the tag starts in the first token with end_k > a0.
  lens = jnp.where(mask_bgn > 0, lengths_v[tokens_bgn], 0)
  answer_token = jnp.sum(jnp.cumsum(lens, axis=-1) <= a0[..., None], axis=-1).astype(jnp.int32)
  return Parsed(ok, answer, answer_token)
