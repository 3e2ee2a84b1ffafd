"""HF import/export: bit-exact round trips, both key layouts, sharding, and clear errors."""

import functools
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file
from transformers import Qwen2_5_VLForConditionalGeneration

import lgrpo_jax
from lgrpo_jax.models.qwen2_5_vl.hf import normalize_key
from hf_tiny import CASES, build_hf, config_dict, hf_logits, make_batch, ours_inputs, rel_err


def read_all(path) -> dict[str, np.ndarray]:
  """Every tensor of an HF directory, keys in Hub layout, as raw numpy (bf16 kept as bf16)."""
  files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  out = {}
  for f in files:
    with safe_open(os.path.join(path, f), framework="np") as h:
      for k in h.keys():
        out[normalize_key(k)] = h.get_tensor(k)
  return out


@pytest.mark.parametrize("variant,dtype", [("a", "float32"), ("b", "float32"), ("a", "bfloat16")])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, variant, dtype):
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  hf = build_hf(config_dict(variant), seed=7, dtype=tdtype)
  hf.save_pretrained(tmp_path / "src")
  ours = lgrpo_jax.load_hf(tmp_path / "src", dtype=dtype)
  lgrpo_jax.save_hf(ours, tmp_path / "out")

  src, out = read_all(tmp_path / "src"), read_all(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for k in src:
    assert src[k].dtype == out[k].dtype, k
    assert src[k].shape == out[k].shape, k
    assert src[k].tobytes() == out[k].tobytes(), f"{k} differs after round trip"

  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=tdtype).eval()
  batch = make_batch(CASES["two_images_sizes"], seed=9)
  np.testing.assert_array_equal(hf_logits(back, batch), hf_logits(hf, batch))
  if dtype == "float32":
    ours_logits = np.asarray(lgrpo_jax.forward(ours, **ours_inputs(batch)))
    assert rel_err(ours_logits, hf_logits(back, batch)) <= 1e-4


def test_in_memory_key_layout_loads_identically(tmp_path):
  hf = build_hf(config_dict("a"), seed=2)
  hf.save_pretrained(tmp_path / "hub")
  # transformers-5 in-memory names: model.visual.*, model.language_model.*, lm_head.weight
  os.makedirs(tmp_path / "mem")
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in state)
  torch_save_file(state, str(tmp_path / "mem" / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "mem" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
  a = lgrpo_jax.load_hf(tmp_path / "hub")
  b = lgrpo_jax.load_hf(tmp_path / "mem")
  sa, sb = read_state(a), read_state(b)
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(sa[k], sb[k])


def read_state(model):
  from flax import nnx
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def test_sharded_export_with_index_loads_everywhere(tmp_path):
  hf = build_hf(config_dict("a"), seed=4)
  hf.save_pretrained(tmp_path / "src")
  ours = lgrpo_jax.load_hf(tmp_path / "src")
  lgrpo_jax.save_hf(ours, tmp_path / "out", max_shard_bytes=60_000)
  files = sorted(os.listdir(tmp_path / "out"))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors.index.json" in files
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  # our own loader reads the sharded layout, and so does transformers
  again = lgrpo_jax.load_hf(tmp_path / "out")
  for k, v in read_state(ours).items():
    np.testing.assert_array_equal(v, read_state(again)[k])
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  batch = make_batch(CASES["one_image_windows"])
  np.testing.assert_array_equal(hf_logits(back, batch), hf_logits(hf, batch))

  # Exported again into the same folder, as one file then sharded: an earlier export's weights go
  # (transformers prefers model.safetensors, we the index: a leftover would split the two loaders).
  other = build_hf(config_dict("a"), seed=5)
  other.save_pretrained(tmp_path / "src2")
  weight_files = lambda: sorted(f for f in os.listdir(tmp_path / "out") if "safetensors" in f)
  lgrpo_jax.save_hf(lgrpo_jax.load_hf(tmp_path / "src2"), tmp_path / "out", max_shard_bytes=10**9)
  assert weight_files() == ["model.safetensors"]
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_equal(hf_logits(back, batch), hf_logits(other, batch))
  want = read_state(lgrpo_jax.load_hf(tmp_path / "src2"))
  for k, v in read_state(lgrpo_jax.load_hf(tmp_path / "out")).items():
    np.testing.assert_array_equal(v, want[k])
  lgrpo_jax.save_hf(ours, tmp_path / "out", max_shard_bytes=60_000)
  assert weight_files() == sorted(shards + ["model.safetensors.index.json"])


def test_folder_with_single_file_and_index_reads_what_transformers_reads(tmp_path):
  # A single-file save copied over a sharded one: transformers reads model.safetensors first.
  build_hf(config_dict("a"), seed=1).save_pretrained(tmp_path / "d", max_shard_size="100KB")
  single = build_hf(config_dict("a"), seed=2)
  single.save_pretrained(tmp_path / "single")
  assert (tmp_path / "d" / "model.safetensors.index.json").exists()
  (tmp_path / "d" / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "d").eval()
  want = back.model.language_model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(want, single.model.language_model.embed_tokens.weight.detach().numpy())
  got = read_state(lgrpo_jax.load_hf(tmp_path / "d"))
  key = next(k for k in got if "embed_tokens" in k)
  np.testing.assert_array_equal(got[key], want)


def test_errors_in_a_sharded_checkpoint_name_the_shard(tmp_path):
  hf = build_hf(config_dict("a"), seed=4)
  hf.save_pretrained(tmp_path / "src")
  lgrpo_jax.save_hf(lgrpo_jax.load_hf(tmp_path / "src"), tmp_path / "out", max_shard_bytes=60_000)
  index_path = tmp_path / "out" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  key = "model.norm.weight"
  shard = tmp_path / "out" / index["weight_map"][key]
  with safe_open(str(shard), framework="pt") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors[key] = torch.zeros(7)
  torch_save_file(tensors, str(shard), metadata={"format": "pt"})
  with pytest.raises(lgrpo_jax.CheckpointError,
                     match=rf"{shard.name}: tensor '{key}' has shape \(7,\), expected \(64,\) for .*config.json"):
    lgrpo_jax.load_hf(tmp_path / "out")
  # An index that sends a key to a shard without it: the error names the shard and the key.
  wrong = next(v for v in index["weight_map"].values() if v != shard.name)
  index["weight_map"][key] = wrong
  index_path.write_text(json.dumps(index))
  with pytest.raises(lgrpo_jax.CheckpointError, match=rf"{wrong}: cannot read tensor '{key}'"):
    lgrpo_jax.load_hf(tmp_path / "out")
  # Index files of another shape: one error naming the index (bare AttributeError/TypeError/
  # UnicodeDecodeError/RecursionError before)
  for bad in (b'{"weight_map": ["a"]}', b'{"weight_map": {"k": null}}', b'{"weight_map": {"k": 3}}', b"[1]",
              b'{"weight_map": {"k": "\xff.safetensors"}}',
              b"[" * 100000 + b"]" * 100000):
    index_path.write_bytes(bad)
    with pytest.raises(lgrpo_jax.CheckpointError, match=r"model\.safetensors\.index\.json: not"):
      lgrpo_jax.load_hf(tmp_path / "out")


def test_export_copies_tokenizer_files_and_writes_generation_config(tmp_path):
  hf = build_hf(config_dict("b"), seed=1)
  hf.save_pretrained(tmp_path / "src")
  (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 8}')
  (tmp_path / "src" / "chat_template.jinja").write_text("{{ messages }}")
  ours = lgrpo_jax.load_hf(tmp_path / "src")
  lgrpo_jax.save_hf(ours, tmp_path / "out", hf_source=tmp_path / "src")
  assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
  assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"model_max_length": 8}
  lgrpo_jax.save_hf(ours, tmp_path / "bare")
  gen = json.loads((tmp_path / "bare" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


# ---- bad checkpoints -------------------------------------------------------------------------
@pytest.fixture()
def hf_dir(tmp_path):
  hf = build_hf(config_dict("a"), seed=0)
  hf.save_pretrained(tmp_path / "ckpt")
  return tmp_path / "ckpt"


def rewrite(path, edit):
  with safe_open(str(path / "model.safetensors"), framework="pt") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  torch_save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(hf_dir):
  rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(lgrpo_jax.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(96, 64\)\)"):
    lgrpo_jax.load_hf(hf_dir)


def test_unexpected_key_is_named(hf_dir):
  rewrite(hf_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
  with pytest.raises(lgrpo_jax.CheckpointError, match="unexpected tensors.*model.layers.0.extra.weight"):
    lgrpo_jax.load_hf(hf_dir)


def test_wrong_shape_names_key_and_both_shapes(hf_dir):
  rewrite(hf_dir, lambda t: t.__setitem__("visual.blocks.2.attn.qkv.weight", torch.zeros(96, 31)))
  with pytest.raises(lgrpo_jax.CheckpointError,
                     match=r"'visual.blocks.2.attn.qkv.weight' has shape \(96, 31\), expected \(96, 32\)"):
    lgrpo_jax.load_hf(hf_dir)


def test_integer_weight_is_refused_not_cast(hf_dir):
  rewrite(hf_dir, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight",
                                          t["model.layers.0.self_attn.q_proj.weight"].to(torch.int32)))
  with pytest.raises(lgrpo_jax.CheckpointError,
                     match=r"'model.layers.0.self_attn.q_proj.weight' is I32, expected a floating-point weight"):
    lgrpo_jax.load_hf(hf_dir)


@pytest.mark.parametrize("key,dtype,value", [("model.layers.1.mlp.down_proj.weight", torch.bfloat16, float("nan")),
                                               ("model.embed_tokens.weight", torch.float32, float("-inf"))])
def test_non_finite_weight_is_named(hf_dir, key, dtype, value):
  # A diverged or corrupted checkpoint: refused with the tensor named, not trained on silently
  # (every update would be skipped as non-finite). One value in a stacked layer, two in the embedding.
  def poison(t):
    t[key] = t[key].to(dtype)
    t[key][3, 5] = value
    if dtype == torch.float32:
      t[key][-1, -1] = value
  rewrite(hf_dir, poison)
  count = 1 if dtype == torch.bfloat16 else 2
  with pytest.raises(lgrpo_jax.CheckpointError,
                     match=rf"model.safetensors: tensor '{key}' holds {count} non-finite values .*first at index \(3, 5\)"):
    lgrpo_jax.load_hf(hf_dir)


def test_all_finite_reads_every_float_format_by_its_bits():
  import ml_dtypes
  from lgrpo_jax.safetensors_io import all_finite
  for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
    x = np.random.default_rng(0).standard_normal((3, 50, 7)).astype(dtype)
    x[0, 0, :2] = [ml_dtypes.finfo(dtype).max, -ml_dtypes.finfo(dtype).max]  # the largest finite values
    x[1, 0, 0] = -0.0
    assert all_finite(x) and all_finite(x, chunk=4)
    for where in ((0, 0, 0), (2, 49, 6), (1, 20, 3)):  # first, last, inside a chunk of 4
      for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[where] = bad
        assert not all_finite(y) and not all_finite(y, chunk=4), (dtype, where, bad)
  assert all_finite(np.zeros((0, 4), np.float32)) and all_finite(np.arange(6))


def test_no_safetensors_and_pickle_refused(tmp_path, hf_dir):
  os.remove(hf_dir / "model.safetensors")
  (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(lgrpo_jax.CheckpointError, match="pickle checkpoints .* are not read"):
    lgrpo_jax.load_hf(hf_dir)
  with pytest.raises(lgrpo_jax.CheckpointError, match="not a directory"):
    lgrpo_jax.load_hf(tmp_path / "nope")


def test_corrupt_safetensors_is_named(hf_dir):
  (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
  with pytest.raises(lgrpo_jax.CheckpointError, match="model.safetensors: cannot read safetensors header"):
    lgrpo_jax.load_hf(hf_dir)


def test_image_token_count_mismatch_is_clear(hf_dir):
  ours = lgrpo_jax.load_hf(hf_dir)
  batch = ours_inputs(make_batch(CASES["one_image_windows"]))
  ids = batch["input_ids"].copy()
  ids[0, ids[0].tolist().index(122)] = 5  # drop one <|image_pad|>
  with pytest.raises(ValueError, match=r"input_ids holds 14 <\|image_pad\|> tokens .* gives 15 merged patches"):
    ours(ids, batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
  with pytest.raises(ValueError, match="gives 15 merged patches"):
    lgrpo_jax.forward(ours, ids, batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
  with pytest.raises(ValueError, match=r"pixel_values has shape \(59, 1176\)"):
    ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:59], batch["image_grid_thw"])
  # Token ids outside the vocabulary (a gather clamps them silently) and a mask of another shape.
  vocab = ours.config.text.vocab_size
  for bad in (vocab, -1):
    ids = batch["input_ids"].copy()
    ids[0, 0] = bad
    for call in (ours, functools.partial(lgrpo_jax.forward, ours)):
      with pytest.raises(ValueError, match=rf"token ids in \[-?\d+, \d+\], outside the vocabulary \[0, {vocab}\)"):
        call(ids, batch["attention_mask"])
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), input_ids \(1, 4\)"):
    lgrpo_jax.forward(ours, batch["input_ids"][:1, :4], batch["attention_mask"][:1, :3])
  ids = batch["input_ids"].copy()
  ids[0, 0] = ours.config.video_token_id  # a video placeholder would run as a plain text token
  with pytest.raises(ValueError, match="video inputs are not supported"):
    lgrpo_jax.forward(ours, ids, batch["attention_mask"])


def test_a_field_the_config_leaves_out_defaults_as_in_transformers():
  from transformers import Qwen2_5_VLConfig

  from lgrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
  d = config_dict("a")
  d["text_config"].pop("rms_norm_eps")
  theirs = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k != "model_type"})
  assert Qwen25VLConfig.from_hf_dict(d).text.rms_norm_eps == theirs.text_config.rms_norm_eps == 1e-5


def test_a_sweep_over_model_shapes_keeps_a_bounded_number_of_initialisers(monkeypatch):
  # One compiled initialiser per config was kept for the process's life (~20 MB each on the tiny
  # model, ~21 MB of RSS per shape in a review's sweep, released by nothing).
  from lgrpo_jax.models.qwen2_5_vl import hf
  monkeypatch.setattr(hf, "_INITIALIZERS", {})
  monkeypatch.setattr(hf, "_KEEP_INITIALIZERS", 2)
  for layers in (1, 2, 1, 3):  # the least recently used goes
    lgrpo_jax.from_config(config_dict("a", text_config={"num_hidden_layers": layers}))
  assert [k[0].text.num_hidden_layers for k in hf._INITIALIZERS] == [1, 3]
