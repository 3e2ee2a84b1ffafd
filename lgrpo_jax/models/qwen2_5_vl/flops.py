"""Counted matmul FLOPs of a Qwen2.5-VL forward (2·m·k·n per matmul), for benchmarks and MFU.

`forward_matmuls` lists every matmul of a forward as (name, count, m, k, n); FLOPs are their sum.
Names ending in ".attn" are the attention score/weighted-sum products; the rest are weight matmuls.
Attention is counted as computed: each vision group (window or frame) attends densely within itself,
and the decoder computes the full T×T score matrix (the causal mask does not skip work). Element-wise
ops (norms, rotary, softmax, activations) are not counted; they are a few percent at these sizes.
"""

from __future__ import annotations

from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from lgrpo_jax.models.qwen2_5_vl.vision import block_runs, vision_layout

Grid = tuple[tuple[int, int, int], ...]
Matmul = tuple[str, int, int, int, int]  # (name, count, m, k, n)


def vision_matmuls(cfg: Qwen25VLConfig, grid: Grid) -> list[Matmul]:
  if not grid:
    return []
  v = cfg.vision
  layout = vision_layout(tuple(map(tuple, grid)), v)
  n, d, hd, heads = layout.num_patches, v.hidden_size, v.head_dim, v.num_heads
  out: list[Matmul] = [("vision.patch_embed", 1, n, v.patch_dim, d)]
  for start, stop, full in block_runs(v):
    g = layout.frames if full else layout.windows
    depth, groups = stop - start, (stop - start) * g.num_groups * heads
    out += [("vision.qkv", depth, n, d, 3 * d), ("vision.proj", depth, n, d, d),
            ("vision.gate_up", 2 * depth, n, d, v.intermediate_size),
            ("vision.down", depth, n, v.intermediate_size, d),
            ("vision.attn", groups, g.length, hd, g.length),  # scores
            ("vision.attn", groups, g.length, g.length, hd)]  # weighted sum
  m = n // v.spatial_merge_size**2
  dm = d * v.spatial_merge_size**2
  return out + [("vision.merger", 1, m, dm, dm), ("vision.merger", 1, m, dm, v.out_hidden_size)]


def text_matmuls(cfg: Qwen25VLConfig, batch: int, seq_len: int, *, lm_head: bool = True) -> list[Matmul]:
  t = cfg.text
  e, hd, layers = t.hidden_size, t.head_dim, t.num_hidden_layers
  q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
  tok = batch * seq_len
  heads = layers * batch * t.num_attention_heads
  out: list[Matmul] = [
      ("text.q", layers, tok, e, q_out), ("text.kv", 2 * layers, tok, e, kv_out),
      ("text.o", layers, tok, q_out, e), ("text.gate_up", 2 * layers, tok, e, t.intermediate_size),
      ("text.down", layers, tok, t.intermediate_size, e),
      ("text.attn", heads, seq_len, hd, seq_len),  # scores
      ("text.attn", heads, seq_len, seq_len, hd),  # weighted sum
  ]
  return out + ([("text.lm_head", 1, tok, e, t.vocab_size)] if lm_head else [])


def forward_matmuls(cfg: Qwen25VLConfig, batch: int, seq_len: int, grid: Grid = ()) -> list[Matmul]:
  return vision_matmuls(cfg, grid) + text_matmuls(cfg, batch, seq_len)


def matmul_flops(matmuls: list[Matmul]) -> int:
  return sum(2 * c * m * k * n for _, c, m, k, n in matmuls)


def forward_flops(cfg: Qwen25VLConfig, batch: int, seq_len: int, grid: Grid = ()) -> int:
  """One forward of `batch` sequences of `seq_len` tokens holding the images of `grid`."""
  return matmul_flops(forward_matmuls(cfg, batch, seq_len, grid))


def rollout_matmuls(cfg: Qwen25VLConfig, batch: int, prompt_len: int, grid: Grid, samples: int,
                    new_tokens: int, decode_steps: int | None = None) -> list[Matmul]:
  """A rollout as `lgrpo_jax.sampling` runs it: the vision tower and the prompt prefill once per
  prompt (head only at the last position), then `decode_steps - 1` decode steps (default
  `new_tokens`: none stopped early) of batch·samples tokens, each attending to the prompt's P keys
  and its sample's N = `new_tokens` suffix slots (all computed, masked; the new token's own slot
  among them)."""
  t = cfg.text
  out = vision_matmuls(cfg, grid) + text_matmuls(cfg, batch, prompt_len, lm_head=False)
  out.append(("text.lm_head", 1, batch, t.hidden_size, t.vocab_size))
  steps, rows = (new_tokens if decode_steps is None else decode_steps) - 1, batch * samples
  if steps <= 0:
    return out
  e, hd, layers = t.hidden_size, t.head_dim, t.num_hidden_layers
  q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
  keys = prompt_len + new_tokens
  heads = steps * layers * rows * t.num_attention_heads
  out += [("decode.q", steps * layers, rows, e, q_out), ("decode.kv", 2 * steps * layers, rows, e, kv_out),
          ("decode.o", steps * layers, rows, q_out, e),
          ("decode.gate_up", 2 * steps * layers, rows, e, t.intermediate_size),
          ("decode.down", steps * layers, rows, t.intermediate_size, e),
          ("decode.attn", heads, 1, hd, keys), ("decode.attn", heads, 1, keys, hd),
          ("decode.lm_head", steps, rows, e, t.vocab_size)]
  return out


def extend_matmuls(cfg: Qwen25VLConfig, batch: int, prefix_len: int, samples: int, chunk: int, *,
                   lm_head: bool, name: str = "extend") -> list[Matmul]:
  """`samples` continuations of `chunk` tokens per prompt over a cached `prefix_len` prefix (as
  `Qwen25VL.extend` computes them): weight matmuls on batch·samples·chunk tokens, each token
  attending to the prefix and its own chunk (all computed, masked)."""
  t = cfg.text
  e, hd, layers = t.hidden_size, t.head_dim, t.num_hidden_layers
  q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
  tok, keys = batch * samples * chunk, prefix_len + chunk
  heads = layers * batch * samples * t.num_attention_heads
  out = [(f"{name}.q", layers, tok, e, q_out), (f"{name}.kv", 2 * layers, tok, e, kv_out),
         (f"{name}.o", layers, tok, q_out, e), (f"{name}.gate_up", 2 * layers, tok, e, t.intermediate_size),
         (f"{name}.down", layers, tok, t.intermediate_size, e),
         (f"{name}.attn", heads, chunk, hd, keys), (f"{name}.attn", heads, chunk, keys, hd)]
  return out + ([(f"{name}.lm_head", 1, tok, e, t.vocab_size)] if lm_head else [])


def grpo_step_flops(cfg: Qwen25VLConfig, batch: int, prompt_len: int, grid: Grid, samples: int,
                    new_tokens: int, *, listener_len: int = 0, listener_suffix: int = 0, passes: int = 1,
                    recompute_old: bool = False, reference: bool = False, shared_frozen_vision: bool = False,
                    decode_steps: int | None = None, frozen_vision: bool = False,
                    listener_cfg: Qwen25VLConfig | None = None) -> int:
  """Counted FLOPs of one GRPO step as `lgrpo_jax.train.step` runs it (for the MFU metric):

    rollout (vision + prefill once per pair, `decode_steps` decode steps of batch·samples rows:
             fewer than N = `new_tokens` when every row stopped early)
    + listener (vision + its prefix once per pair, then samples·(N + suffix) tokens; its own
                model's sizes, `listener_cfg`)
    + 3 × policy forward (forward + backward ≈ 2 × forward) per optimiser pass
    + one policy forward each for recomputed old log-probs and for the reference (β > 0),
  where a policy forward is vision + prompt once per pair + samples·N tokens with the head (every
  pass after the rollout runs the full width N). The vision tower is not run again where the step
  reuses the rollout's image features: in the recomputed old log-probs always, in the passes when
  it is frozen (`frozen_vision`); `shared_frozen_vision` (the listener is the reference model):
  their two vision passes are one."""
  lcfg = listener_cfg or cfg
  mm = rollout_matmuls(cfg, batch, prompt_len, grid, samples, new_tokens, decode_steps)
  if listener_len:
    mm += vision_matmuls(lcfg, grid) + text_matmuls(lcfg, batch, listener_len, lm_head=False)
    mm += extend_matmuls(lcfg, batch, listener_len, samples, new_tokens + listener_suffix, lm_head=False,
                         name="listener")
  vision = matmul_flops(vision_matmuls(cfg, grid))
  text = matmul_flops(text_matmuls(cfg, batch, prompt_len, lm_head=False)
                      + extend_matmuls(cfg, batch, prompt_len, samples, new_tokens, lm_head=True, name="policy"))
  passes_f = 3 * passes * (text + (0 if frozen_vision else vision))
  recompute_f = text if recompute_old else 0  # on the rollout's image features
  reference_f = text + vision if reference else 0
  shared = vision if shared_frozen_vision and listener_len and reference else 0
  return matmul_flops(mm) + passes_f + recompute_f + reference_f - shared
