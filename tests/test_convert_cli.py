"""`python -m lgrpo_jax.convert`: HF -> Orbax -> HF is bit-exact; bad paths give one-line errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import lgrpo_jax
from lgrpo_jax import checkpoint
from hf_tiny import CASES, build_hf, config_dict, make_batch, ours_inputs
from test_hf_io import read_all
from conftest import xla_flags

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}


def run(*args):
  return subprocess.run([sys.executable, "-m", "lgrpo_jax.convert", *map(str, args)],
                        capture_output=True, text=True, env=ENV, timeout=600)


def test_help_explains_both_directions():
  r = run("--help")
  assert r.returncode == 0 and "to-jax" in r.stdout and "to-hf" in r.stdout
  r = run("to-hf", "--help")
  assert r.returncode == 0 and "--hf-source" in r.stdout and "--max-shard-size" in r.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_to_jax_then_to_hf_round_trip(tmp_path, dtype):
  import torch
  hf = build_hf(config_dict("a"), seed=11, dtype=getattr(torch, dtype))
  hf.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer_config.json").write_text('{"x": 1}')
  r = run("to-jax", tmp_path / "hf", tmp_path / "jax", "--dtype", dtype)
  assert r.returncode == 0, r.stderr
  assert checkpoint.is_checkpoint(tmp_path / "jax")
  r = run("to-hf", tmp_path / "jax", tmp_path / "out", "--hf-source", tmp_path / "hf", "--dtype", dtype)
  assert r.returncode == 0, r.stderr
  src, out = read_all(tmp_path / "hf"), read_all(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for k in src:
    assert src[k].dtype == out[k].dtype and src[k].tobytes() == out[k].tobytes(), k
  assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"x": 1}
  # the Orbax checkpoint restores to the same model
  a = lgrpo_jax.load_hf(tmp_path / "hf", dtype=dtype)
  b = checkpoint.load_model(tmp_path / "jax")
  batch = ours_inputs(make_batch(CASES["one_image_windows"]))
  np.testing.assert_array_equal(np.asarray(lgrpo_jax.forward(a, **batch)),
                                np.asarray(lgrpo_jax.forward(b, **batch)))


@pytest.mark.parametrize("args,match", [
    (["to-jax", "/nonexistent/hf", "{tmp}/o"], "/nonexistent/hf: not a directory"),
    (["to-hf", "/nonexistent/ck", "{tmp}/o"], "/nonexistent/ck: not an lgrpo_jax checkpoint"),
    (["to-jax", "{tmp}", "{tmp}/o"], "no such config file"),
])
def test_bad_paths_give_one_line_error(tmp_path, args, match):
  r = run(*[a.format(tmp=tmp_path) for a in args])
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and match in lines[0], r.stderr


def test_damaged_metadata_and_a_file_in_the_way_are_one_line_errors(tmp_path, capsys):
  """A truncated config.json of an Orbax checkpoint or of a run directory, and an output path that
  is a file: one `error:` line naming the file (they were tracebacks)."""
  from lgrpo_jax import convert
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(lgrpo_jax.from_config(config_dict("a")), ckpt)
  (tmp_path / "afile").write_text("x")
  assert convert.main(["to-hf", str(ckpt), str(tmp_path / "afile")]) == 2
  assert "afile" in capsys.readouterr().err
  (ckpt / "config.json").write_text('{"model_type": ')
  assert convert.main(["to-hf", str(ckpt), str(tmp_path / "out")]) == 2
  assert re.search(r"^error: \S+ckpt/config\.json: not valid JSON", capsys.readouterr().err, re.M)
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints" / "1").mkdir(parents=True)
  (run_dir / "config.json").write_text("{")
  from lgrpo_jax import runs
  with pytest.raises(runs.RunError, match=r"run/config\.json: not valid JSON"):
    runs.run_config(run_dir)
  (run_dir / "config.json").unlink()  # a run without its config.json: named as a run, not as "not a checkpoint"
  assert convert.main(["to-hf", str(run_dir), str(tmp_path / "out2")]) == 2
  assert "a training run directory without its config.json" in capsys.readouterr().err
  with pytest.raises(runs.RunError, match=r"run_dir='\S+afile/run' is inside '\S+afile', which is a file"):
    runs.check_creatable_dir(tmp_path / "afile" / "run", "run_dir")


def test_out_dir_that_is_a_source_or_a_checkpoint_is_refused_before_loading(tmp_path, capsys):
  """OUT_DIR equal to --hf-source, to the checkpoint being exported, or holding a checkpoint: one
  `error:` line and nothing written (the export overwrote the source, then failed on copying)."""
  from lgrpo_jax import convert
  hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
  build_hf(config_dict("a"), seed=3).save_pretrained(hf_dir)
  checkpoint.save_model(lgrpo_jax.load_hf(hf_dir), ckpt)
  before = {p: p.read_bytes() for d in (hf_dir, ckpt) for p in d.rglob("*") if p.is_file()}
  for argv, match in [
      (["to-hf", str(ckpt), str(hf_dir), "--hf-source", str(hf_dir)], "is the --hf-source directory"),
      (["to-hf", str(ckpt), str(ckpt)], "is the checkpoint being exported"),
      (["to-hf", str(ckpt), str(tmp_path / "." / "ckpt")], "is the checkpoint being exported"),
      (["to-jax", str(hf_dir), str(hf_dir)], "is the HF directory being read"),
      (["to-jax", str(hf_dir), str(ckpt)], "already holds a checkpoint")]:
    assert convert.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert match in err and err.count("error:") == 1, (argv, err)
  assert before == {p: p.read_bytes() for d in (hf_dir, ckpt) for p in d.rglob("*") if p.is_file()}
  # a run directory, or its training checkpoints, as OUT_DIR (to-jax would replace the run's config.json)
  run = tmp_path / "run"
  (run / "checkpoints" / "4").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  for argv, match in [(["to-jax", str(hf_dir), str(run)], "is a training run directory"),
                      (["to-hf", str(ckpt), str(run / "checkpoints")], "inside the training checkpoints of run"),
                      (["to-hf", str(ckpt), str(run / "checkpoints" / "4")], "inside the training checkpoints of run")]:
    assert convert.main(argv) == 2, argv
    assert match in capsys.readouterr().err, argv
  assert convert.main(["to-hf", str(ckpt), str(run / "hf")]) == 0  # a fresh folder in the run is fine
  capsys.readouterr()
  with pytest.raises(lgrpo_jax.CheckpointError, match="overwrite its own --hf-source"):
    lgrpo_jax.save_hf(lgrpo_jax.load_hf(hf_dir), hf_dir, hf_source=hf_dir)


def test_to_jax_keeps_the_generation_end_ids(tmp_path):
  """generation_config.json's end ids (Qwen-Instruct: two, config.json one) survive to-jax: the
  checkpoint's `generate` default and a later to-hf export keep them."""
  from lgrpo_jax import convert
  hf = build_hf(config_dict("a"), seed=3)
  hf.generation_config.eos_token_id = [2, 5]
  hf.save_pretrained(tmp_path / "hf")
  assert lgrpo_jax.load_hf(tmp_path / "hf").config.generation_eos_token_id == (2, 5)
  assert convert.main(["to-jax", str(tmp_path / "hf"), str(tmp_path / "jax")]) == 0
  assert checkpoint.model_config(tmp_path / "jax").generation_eos_token_id == (2, 5)
  assert convert.main(["to-hf", str(tmp_path / "jax"), str(tmp_path / "out")]) == 0
  assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 5]


def test_model_card_front_matter_base_id_licence_and_buckets(tmp_path):
  """The card's `base_model` is a Hub repo id (from the cache layout or --base-model), never a
  local folder name or a commit hash; the base card's licence lines are carried; grid_buckets runs
  warn that transformers' processor sizes images otherwise."""
  import dataclasses

  from lgrpo_jax.config import ExperimentConfig, ModelConfig
  from lgrpo_jax.release import base_license, hub_id, model_card
  snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / "cc59489813"
  snap.mkdir(parents=True)
  assert hub_id(snap) == "Qwen/Qwen2.5-VL-3B-Instruct"
  assert hub_id(tmp_path / "Qwen2.5-VL-3B-Instruct") is None and hub_id(None) is None
  (snap / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n"
                                  "license_link: https://x/LICENSE\nlanguage:\n- en\n---\n# card\n")
  assert base_license(snap) == ["license: other", "license_name: qwen-research",
                                "license_link: https://x/LICENSE"]
  assert base_license(tmp_path) == []
  (tmp_path / "README.md").write_text("---\nlicense:\n- apache-2.0\nlanguage:\n- en\n---\n")  # the list form
  assert base_license(tmp_path) == ["license:", "- apache-2.0"]
  (tmp_path / "README.md").unlink()
  cfg = ExperimentConfig()
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(ModelConfig(), checkpoint=str(snap)))
  card = model_card(cfg, str(tmp_path / "run"), 3, False, None, "bfloat16",
                    base_model=hub_id(snap), license_lines=base_license(snap))
  front = card.split("---")[1]
  assert "base_model: Qwen/Qwen2.5-VL-3B-Instruct" in front and "license_name: qwen-research" in front
  assert str(tmp_path) not in card and "cc59489813" not in card  # no local path in a public card
  assert "differ from transformers' processor" not in card
  plain = model_card(cfg, str(tmp_path / "run"), 3, False, None, "bfloat16")
  assert "base_model" not in plain and "`cc59489813` (local)" in plain
  image = dataclasses.replace(cfg.pipeline.image, grid_buckets=((448, 448), (336, 560)))
  cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, image=image))
  card = model_card(cfg, str(tmp_path / "run"), 3, False, None, "bfloat16")
  assert "differ from transformers' processor" in card and "448×448, 336×560" in card
  # A run resumed with sft.steps=0 keeps (and loads) its warm start: the card says what the weights had.
  (tmp_path / "run" / "sft").mkdir(parents=True)
  (tmp_path / "run" / "sft_config.json").write_text(json.dumps({"steps": 300, "teacher": "targets"}))
  assert "| warm start (SFT) | 300 steps, teacher targets |" in model_card(cfg, str(tmp_path / "run"), 3, False,
                                                                              None, "bfloat16")
