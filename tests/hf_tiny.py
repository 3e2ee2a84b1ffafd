"""Tiny random transformers Qwen2.5-VL models and inputs, built locally (no hub).

Configs are chosen to exercise what matters: images that span several (partial) vision windows,
full-attention blocks at different depths, GQA, different mrope sections, tied and untied heads.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VS, VE, IMG, VID, PAD = 120, 121, 122, 123, 0  # special ids inside the tiny vocab
PATCH, MERGE, TPATCH = 14, 2, 2

BASE = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD,
    },
    "vision_config": {
        "depth": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "hidden_act": "silu",
        "in_channels": 3, "patch_size": PATCH, "spatial_merge_size": MERGE,
        "temporal_patch_size": TPATCH, "tokens_per_second": 2,
        # 56 px windows = 2x2 merged tokens: a 84x140 image spans 2x3 windows, some partial.
        "window_size": 56, "fullatt_block_indexes": [1, 3], "out_hidden_size": 64,
        "initializer_range": 0.1,
    },
    "image_token_id": IMG, "video_token_id": VID, "vision_start_token_id": VS,
    "vision_end_token_id": VE, "tie_word_embeddings": False,
}

# Second setting: tied head, other mrope split, full attention only in the first block.
VARIANT_B = {
    "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [4, 2, 2]}},
    "vision_config": {"depth": 3, "fullatt_block_indexes": [0]},
    "tie_word_embeddings": True,
}


def merged(base: dict, over: dict) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = merged(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def config_dict(variant: str = "a", **over) -> dict:
  d = copy.deepcopy(BASE) if variant == "a" else merged(BASE, VARIANT_B)
  return merged(d, over)


def build_hf(cfg: dict, seed: int = 0, dtype=torch.float32):
  """A transformers model with every parameter (biases and norms too) randomised."""
  torch.manual_seed(seed)
  hf_cfg = Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
  model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lm_head.weight") and cfg.get("tie_word_embeddings"):
        continue
      p.add_(0.05 * torch.randn(p.shape, generator=g))
    # Cast parameters only: rotary inv_freq buffers stay fp32, as from_pretrained(dtype=...) keeps them.
    for p in model.parameters():
      p.data = p.data.to(dtype)
  return model


def grid_of(h_px: int, w_px: int, t: int = 1) -> tuple[int, int, int]:
  assert h_px % (PATCH * MERGE) == 0 and w_px % (PATCH * MERGE) == 0
  return (t, h_px // PATCH, w_px // PATCH)


def make_batch(rows: list[dict], seed: int = 0) -> dict:
  """rows: [{"text": [n0, n1, ...], "images": [(h_px, w_px), ...], "pad": k}] — text runs between
  images (len(text) == len(images) + 1); left padding of `pad` tokens. Returns numpy arrays as a
  transformers processor would (input_ids, attention_mask, pixel_values, image_grid_thw) plus
  mm_token_type_ids for the reference."""
  rng = np.random.default_rng(seed)
  seqs, grids = [], []
  for row in rows:
    ids: list[int] = []
    for i, n in enumerate(row["text"]):
      ids += rng.integers(3, 100, n).tolist()
      if i < len(row["images"]):
        grid = grid_of(*row["images"][i])
        grids.append(grid)
        ids += [VS] + [IMG] * (int(np.prod(grid)) // MERGE**2) + [VE]
    seqs.append((row.get("pad", 0), ids))
  length = max(p + len(s) for p, s in seqs)
  input_ids = np.full((len(rows), length), PAD, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for b, (pad, ids) in enumerate(seqs):
    extra = length - pad - len(ids)
    input_ids[b, pad + extra:] = ids  # left padding
    mask[b, pad + extra:] = 1
  out = {"input_ids": input_ids, "attention_mask": mask,
         "mm_token_type_ids": (input_ids == IMG).astype(np.int64)}
  if grids:
    n_patch = sum(int(np.prod(g)) for g in grids)
    out["pixel_values"] = rng.standard_normal((n_patch, 3 * TPATCH * PATCH * PATCH)).astype(np.float32)
    out["image_grid_thw"] = np.asarray(grids, np.int64)
  return out


def hf_positions(model, batch: dict):
  t = {k: torch.from_numpy(v) for k, v in batch.items()}
  pos, deltas = model.model.get_rope_index(
      t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"],
      image_grid_thw=t.get("image_grid_thw"), attention_mask=t["attention_mask"])
  return pos, deltas


def hf_logits(model, batch: dict) -> np.ndarray:
  """Reference logits, with explicit 3-D position ids (transformers 5 would otherwise fall back to
  1-D positions without images)."""
  pos, _ = hf_positions(model, batch)
  dtype = next(model.parameters()).dtype
  kw = {"input_ids": torch.from_numpy(batch["input_ids"]),
        "attention_mask": torch.from_numpy(batch["attention_mask"]), "position_ids": pos}
  if "pixel_values" in batch:
    kw["pixel_values"] = torch.from_numpy(batch["pixel_values"]).to(dtype)
    kw["image_grid_thw"] = torch.from_numpy(batch["image_grid_thw"])
  with torch.no_grad():
    return model(**kw).logits.float().numpy()


def ours_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
          if k in batch}


def traced_forward(model, batch: dict):
  """`model(**ours_inputs(batch))` as one newly traced jitted program. Unlike `lgrpo_jax.forward`
  (cached per shapes), module settings a test changed (attention blocks, sharding rules) are read
  afresh; unlike the eager call it compiles one program, not hundreds of small ones."""
  from flax import nnx
  from lgrpo_jax.models.qwen2_5_vl.layers import static_grid
  x = ours_inputs(batch)
  grid = static_grid(x["image_grid_thw"]) if "image_grid_thw" in x else None
  return nnx.jit(lambda m, i, a, p: m(i, a, p, grid))(model, x["input_ids"], x.get("attention_mask"),
                                                          x.get("pixel_values"))


def hf_generate(hf, batch: dict, n: int, eos=None) -> np.ndarray:
  """transformers' greedy continuation of a `make_batch` batch: the n new tokens (B, n)."""
  kw = {k: torch.from_numpy(v) for k, v in batch.items()}
  with torch.no_grad():
    out = hf.generate(**kw, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
  return out[:, batch["input_ids"].shape[1]:].numpy()


def our_generate(model, batch: dict, **kw):
  """`lgrpo_jax.generate` on a `make_batch` batch (no EOS ids unless given)."""
  import lgrpo_jax  # here, not at the top: bench/gpu.py's PyTorch process imports this module without jax
  kw.setdefault("eos_token_id", [])
  return lgrpo_jax.generate(model, **ours_inputs(batch), pad_token_id=PAD, **kw)


def assert_same_adam_step(got, want, what: str = "") -> None:
  """Parameters after the same Adam update from two differently fused programs. Adam's m/√v turns
  fp32 rounding in a near-zero gradient into a visible step (at the tests' -O0: up to ~8e-5 on 1–2
  of 4,096–16,384 entries), while a pass skipped or run twice moves every entry by ~lr = 1e-2."""
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert diff.max() < 1e-3 and diff.mean() < 1e-6, (what, diff.max(), diff.mean())


def assert_same_samples(got, want, atol: float = 1e-5) -> None:
  """Two `generate` results: the same tokens, log-probs within atol."""
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=atol)


def rel_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
  """max |ours - ref| / max |ref| over the attended positions."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    sel = np.asarray(mask, bool)
    ours, ref = ours[sel], ref[sel]
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


CASES = {
    "text_only": [{"text": [7], "images": []}, {"text": [5], "images": [], "pad": 0}],
    "one_image_windows": [{"text": [3, 4], "images": [(84, 140)]}],
    "two_images_sizes": [{"text": [3, 2, 4], "images": [(84, 140), (56, 112)]}],
    "left_padded_batch": [{"text": [2, 3], "images": [(112, 56)]},
                          {"text": [4, 5], "images": [(84, 84)]}],
    # Several rows with several images each: the vectorised rope index counts images across rows.
    "two_rows_two_images": [{"text": [2, 3, 1], "images": [(84, 140), (56, 56)]},
                            {"text": [5, 1, 4], "images": [(112, 56), (84, 84)]}],
    # Positions past 300: rotary angle errors (e.g. angles in the compute dtype) grow with position.
    "long_300": [{"text": [300, 4], "images": [(84, 140)]}, {"text": [20, 3], "images": [(56, 112)]}],
}
