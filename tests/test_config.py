"""config.json parsing: every layout transformers has used, and clear errors for bad ones."""

import copy
import json

import pytest

from lgrpo_jax.models.qwen2_5_vl import ConfigError, Qwen25VLConfig
from hf_tiny import config_dict


def flat_hub_style(nested: dict) -> dict:
  """The original Hub layout: text fields at the top level, old `rope_scaling` with type mrope,
  `in_chans` in the vision config, `tie_word_embeddings` inside text_config (pre-v5 saves)."""
  d = copy.deepcopy(nested)
  text = d.pop("text_config")
  rp = text.pop("rope_parameters")
  d.update(text)
  d["rope_theta"] = rp["rope_theta"]
  d["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
  d["vision_config"]["in_chans"] = d["vision_config"].pop("in_channels")
  return d


def test_flat_and_nested_layouts_agree():
  nested = config_dict("b")
  a = Qwen25VLConfig.from_hf_dict(nested)
  b = Qwen25VLConfig.from_hf_dict(flat_hub_style(nested))
  assert a == b
  assert a.text.mrope_section == (4, 2, 2) and a.text.rope_theta == 1e6
  assert a.tie_word_embeddings and a.vision.fullatt_block_indexes == (0,)


def test_tie_inside_text_config_is_honoured():
  d = config_dict("a")
  d["text_config"]["tie_word_embeddings"] = True
  assert Qwen25VLConfig.from_hf_dict(d).tie_word_embeddings


def test_round_trip_through_hf_dict_and_transformers():
  from transformers import Qwen2_5_VLConfig
  ours = Qwen25VLConfig.from_hf_dict(config_dict("b"))
  raw = ours.to_hf_dict()
  assert Qwen25VLConfig.from_hf_dict(raw) == ours
  theirs = Qwen2_5_VLConfig(**{k: v for k, v in raw.items() if k != "model_type"})
  assert theirs.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
  assert theirs.vision_config.fullatt_block_indexes == [0]
  assert theirs.tie_word_embeddings is True


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("kv", ["absent", "null"])
def test_absent_optional_text_fields_take_transformers_defaults(layout, kv):
  """A config.json without num_key_value_heads / bos / eos / pad ids reads as transformers reads it:
  absent KV heads are 8, an explicit null is one per query head; BOS/EOS are Qwen's ids."""
  from transformers import Qwen2_5_VLConfig
  d = config_dict("a")
  t = d["text_config"]
  t.update(num_attention_heads=16, hidden_size=16 * 8)  # head_dim 8
  t["rope_parameters"]["mrope_section"] = [2, 1, 1]
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    t.pop(k, None)
    d.pop(k, None)
  if kv == "absent":
    t.pop("num_key_value_heads")
  else:
    t["num_key_value_heads"] = None
  d["vision_config"]["out_hidden_size"] = t["hidden_size"]
  if layout == "flat":
    d.update(d.pop("text_config"))
  ours = Qwen25VLConfig.from_hf_dict(d).text
  theirs = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k != "model_type"}).text_config
  assert ours.num_key_value_heads == theirs.num_key_value_heads == (8 if kv == "absent" else 16)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (151643, 151645, None)


def test_plain_vision_rope_theta_and_absent_full_attention_blocks_read_as_transformers_reads_them():
  """A vision `rope_theta` outside rope_parameters is used (transformers moves it there); absent
  `fullatt_block_indexes` on a tower of fewer than 32 blocks keeps only the default blocks that exist."""
  from transformers import Qwen2_5_VLConfig
  d = config_dict("a")
  d["vision_config"].pop("rope_parameters", None)
  d["vision_config"]["rope_theta"] = 500.0
  d["vision_config"].pop("fullatt_block_indexes")
  d["vision_config"]["depth"] = 9
  ours = Qwen25VLConfig.from_hf_dict(d).vision
  theirs = Qwen2_5_VLConfig(**{k: v for k, v in d.items() if k != "model_type"}).vision_config
  assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500.0
  assert [i for i in theirs.fullatt_block_indexes if i < theirs.depth] == list(ours.fullatt_block_indexes) == [7]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(model_type="qwen2_vl"), "model_type='qwen2_vl' is not supported"),
    (lambda d: d.pop("model_type"), "model_type=None is not supported"),
    (lambda d: d["text_config"].pop("hidden_size"), "missing required field 'text_config.hidden_size'"),
    (lambda d: d["vision_config"].pop("depth"), "missing required field 'vision_config.depth'"),
    (lambda d: d.pop("vision_config"), "missing required field 'vision_config'"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
     r"mrope_section=\[2, 2, 2\] must be 3 numbers summing to head_dim/2=8"),
    (lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_parameters.rope_type'='yarn' is not supported"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "not divisible by num_key_value_heads=3"),
    (lambda d: d["vision_config"].update(fullatt_block_indexes=[9]), r"fullatt_block_indexes \[9\] outside"),
    (lambda d: d["text_config"].update(hidden_act="relu2"), "hidden_act='relu2' is not supported"),
    (lambda d: d["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda d: d["text_config"].update(num_hidden_layers=2.5), "'text_config.num_hidden_layers'=2.5 must be an integer"),
    (lambda d: d["vision_config"].update(patch_size="14"), "'vision_config.patch_size'='14' must be an integer"),
    (lambda d: d["vision_config"].update(depth=True), "'vision_config.depth'=True must be an integer"),
    # bare ZeroDivisionError / ValueError / TypeError, or silently accepted, before
    (lambda d: d["text_config"].update(num_attention_heads=0), "text_config.num_attention_heads=0 must be at least 1"),
    (lambda d: d["vision_config"].update(spatial_merge_size=0), "vision_config.spatial_merge_size=0 must be at least 1"),
    (lambda d: d["vision_config"].update(window_size=0), "vision_config.window_size=0 must be at least 1"),
    (lambda d: d["text_config"].update(num_hidden_layers=-1), "text_config.num_hidden_layers=-1 must be at least 1"),
    (lambda d: d["text_config"].update(max_position_embeddings=-1), "max_position_embeddings=-1 must be at least 1"),
    (lambda d: d["text_config"].update(rms_norm_eps="abc"), "'text_config.rms_norm_eps'='abc' must be a number"),
    (lambda d: d["text_config"].update(rms_norm_eps=0), "text_config.rms_norm_eps=0.0 must be a positive number"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section="16,24,24"), "mrope_section'='16,24,24' must be a list"),
    (lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[4.7, 6, 6]), r"mrope_section'=4\.7 must be an integer"),
    (lambda d: d["vision_config"].update(fullatt_block_indexes="0,1"), "fullatt_block_indexes'='0,1' must be a list"),
    (lambda d: d.update(image_token_id="abc"), "'image_token_id'='abc' must be an integer"),
    (lambda d: d.update(tie_word_embeddings="false"), "'tie_word_embeddings'='false' must be true or false"),
    (lambda d: d["text_config"].update(eos_token_id=[2, "x"]), "'text_config.eos_token_id'='x' must be an integer"),
])
def test_bad_configs_name_the_field(edit, match):
  d = config_dict("a")
  edit(d)
  with pytest.raises(ConfigError, match=match):
    Qwen25VLConfig.from_hf_dict(d, source="x/config.json")


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="no such config file"):
    Qwen25VLConfig.from_json(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json: not valid JSON"):
    Qwen25VLConfig.from_json(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ConfigError, match="expected a JSON object"):
    Qwen25VLConfig.from_json(tmp_path / "config.json")


def test_dtype_override_validated():
  cfg = Qwen25VLConfig.from_hf_dict(config_dict("a"))
  assert cfg.replace(dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ConfigError, match="dtype='float16' must be one of"):
    cfg.replace(dtype="float16")


def test_real_7b_shaped_config_parses():
  """The layout of the released Qwen2.5-VL-7B-Instruct config.json (flat, rope_scaling, in_chans)."""
  raw = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
      "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
      "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
      "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "use_cache": True, "use_sliding_window": False,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                        "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
  }
  cfg = Qwen25VLConfig.from_hf_dict(raw)
  assert cfg.text.head_dim == 128 and cfg.text.num_key_value_heads == 4
  assert cfg.text.mrope_section == (16, 24, 24) and cfg.vision.patch_dim == 1176
  assert cfg.vision.head_dim == 80 and not cfg.tie_word_embeddings


def test_configuration_reference_is_generated_from_the_code():
  """docs/configuration.md is `python -m lgrpo_jax.config --write docs/configuration.md`: every field,
  its type, default and source comment — regenerate it when a config changes."""
  import os

  from lgrpo_jax.config import ExperimentConfig, reference
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")
  text = reference()
  assert open(path).read() == text, "docs/configuration.md is stale: python -m lgrpo_jax.config --write docs/configuration.md"
  for key in ("`run_dir`", "`step.loss.beta`", "`pipeline.image.max_pixels`", "`mesh.fsdp`", "`sft.teacher`"):
    assert key in text
  # every leaf field of the config appears, described
  def leaves(cfg, prefix=""):
    import dataclasses
    for f in dataclasses.fields(cfg):
      v = getattr(cfg, f.name)
      yield from leaves(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{f.name}"]
  rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
  for key in leaves(ExperimentConfig()):
    assert key in rows and not rows[key].rstrip().endswith("|  |"), key


def test_a_setting_added_since_a_run_started_is_no_change_at_its_default(tmp_path):
  # An old run's config.json lacks settings added later: resuming warned "pipeline.image.
  # max_decoded_pixels: null → 89478485" and set the run's config.json aside as changed.
  import dataclasses
  import json

  from lgrpo_jax.config import ExperimentConfig, to_record
  from lgrpo_jax.train.loop import config_diffs
  record = json.loads(json.dumps(to_record(ExperimentConfig()), default=str))
  old = json.loads(json.dumps(record))
  del old["pipeline"]["image"]["max_decoded_pixels"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert config_diffs(str(tmp_path / "config.json"), record) == []
  cfg = ExperimentConfig()
  changed = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, image=dataclasses.replace(
      cfg.pipeline.image, max_decoded_pixels=1000)))
  assert config_diffs(str(tmp_path / "config.json"), to_record(changed)) == [
      ("pipeline.image.max_decoded_pixels", None, 1000)]
