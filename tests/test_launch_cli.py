"""`python -m lgrpo_jax.launch`: typed overrides with clear errors, input checks before compiling,
and a short real run that writes its config and metrics."""

import json
import os
import re
from dataclasses import replace as dataclass_replace

import pytest

from lgrpo_jax import launch
from lgrpo_jax.config import apply_overrides, load_config_file
from lgrpo_jax.models.qwen2_5_vl.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "configs", "demo.py")


def test_overrides_are_typed_and_checked():
  cfg = load_config_file(DEMO)
  cfg = apply_overrides(cfg, ["loop.steps=7", "step.loss.beta=0.1", "step.loss.loss=dapo",
                              "pipeline.image.grid_buckets=[[56,56],[56,112]]", "model.tokenizer=none",
                              'step.rewards.weights=[["format",1],["accuracy",0.25]]', "pipeline.listener=false"])
  assert cfg.loop.steps == 7 and cfg.step.loss.beta == 0.1 and cfg.step.loss.loss == "dapo"
  assert cfg.pipeline.image.grid_buckets == ((56, 56), (56, 112)) and cfg.pipeline.listener is False
  assert cfg.step.rewards.weights == (("format", 1.0), ("accuracy", 0.25))
  with pytest.raises(ConfigError, match=r"unknown config key 'loop.stepz'.*'steps'"):
    apply_overrides(cfg, ["loop.stepz=3"])
  with pytest.raises(ConfigError, match=r"loop.steps='three': expected int"):
    apply_overrides(cfg, ["loop.steps=three"])
  with pytest.raises(ConfigError, match=r"step.sampling.num_samples='1'.*G ≥ 2"):
    apply_overrides(cfg, ["step.sampling.num_samples=1"])
  with pytest.raises(ConfigError, match=r"step.loss.loss='ppo'.*choose one of"):
    apply_overrides(cfg, ["step.loss.loss=ppo"])
  with pytest.raises(ConfigError, match="step is a section"):
    apply_overrides(cfg, ["step=3"])
  # What a shell leaves of an unquoted list (`freeze=["vision"]` arrives as `freeze=[vision]`),
  # parentheses, bare words; a whole number as a float; a typo named with its likely key.
  cfg = apply_overrides(cfg, ["step.optim.freeze=[vision]", "step.rewards.weights=[[format,1],[accuracy,0.5]]",
                              "pipeline.length_buckets=(128,256)", "loop.steps=1e3"])
  assert cfg.step.optim.freeze == ("vision",) and cfg.pipeline.length_buckets == (128, 256)
  assert cfg.step.rewards.weights == (("format", 1.0), ("accuracy", 0.5)) and cfg.loop.steps == 1000
  assert apply_overrides(cfg, ["step.optim.freeze=vision,embeddings"]).step.optim.freeze == ("vision", "embeddings")
  with pytest.raises(ConfigError, match=r"pipeline.length_buckets='\[128': expected a list"):
    apply_overrides(cfg, ["pipeline.length_buckets=[128"])
  with pytest.raises(ConfigError, match=r"loop.steps='2.5': expected int"):
    apply_overrides(cfg, ["loop.steps=2.5"])
  with pytest.raises(ConfigError, match=r"'step.optim.learnig_rate'; did you mean 'step.optim.learning_rate'\?"):
    apply_overrides(cfg, ["step.optim.learnig_rate=1"])
  with pytest.raises(ConfigError, match=r"'step.los.beta'; did you mean 'step.loss.beta'\?"):
    apply_overrides(cfg, ["step.los.beta=0"])
  # a bare comma list keeps brackets inside its values; quotes that are not JSON's go; a missing comma is refused
  assert apply_overrides(cfg, ["pipeline.prompt.image_labels=Left (A):,Right (B):"]).pipeline.prompt.image_labels == \
      ("Left (A):", "Right (B):")
  assert apply_overrides(cfg, ["step.optim.freeze=['vision']"]).step.optim.freeze == ("vision",)
  with pytest.raises(ConfigError, match=r"step.sampling.eos_ids='\[1\]\[2\]': expected a list"):
    apply_overrides(cfg, ["step.sampling.eos_ids=[1][2]"])
  with pytest.raises(ConfigError, match=r"grid_buckets='\[\[56,56\]': expected a list.*\(or None\)"):
    apply_overrides(cfg, ["pipeline.image.grid_buckets=[[56,56]"])


def test_overrides_that_complete_each_other_work_in_any_order():
  # A source and its path (or a teacher and its file) are checked together: the section is rebuilt
  # once with all of its overrides, so neither order is rejected half-way.
  cfg = load_config_file(DEMO)
  for overrides in (["data.source=hpdv2", "data.path=train.json"], ["data.path=train.json", "data.source=hpdv2"]):
    got = apply_overrides(cfg, overrides)
    assert (got.data.source, got.data.path) == ("hpdv2", "train.json")
  got = apply_overrides(cfg, ["sft.teacher=targets", "loop.steps=3", "sft.targets_path=t.jsonl", "loop.steps=5"])
  assert (got.sft.teacher, got.sft.targets_path, got.loop.steps) == ("targets", "t.jsonl", 5)
  got = apply_overrides(cfg, ["data.eval_source=imagereward", "data.eval_path=test.json"])
  assert (got.data.eval_source, got.data.eval_path) == ("imagereward", "test.json")
  with pytest.raises(ConfigError, match=r"sft.teacher='targets': sft.targets_path is required"):
    apply_overrides(cfg, ["sft.teacher=targets", "data.path=train.json"])


@pytest.mark.parametrize("override,message", [
    ("model.checkpoint=/nonexistent/ckpt", "model.checkpoint='/nonexistent/ckpt': not found"),
    ("mesh.fsdp=3", "mesh (data=1, fsdp=3, tensor=1): 1×3×1 = 3 devices, but 8 are available"),
    ("step.optim.micro_batches=3", "not divisible by step.optim.micro_batches=3"),
    ("data.source=hpdv2", "data.path is required"),
    ("sft.teacher=targets", "sft.targets_path is required for sft.teacher='targets'"),
    ("sft.teacher_accuracy=1.5", "sft.teacher_accuracy=1.5 must be in [0, 1]"),
    ("model.decode_matmul=cublas", "model.decode_matmul='cublas': choose one of"),
    ("model.decode_matmul=pallas mesh.tensor=2", "model.decode_matmul='pallas' runs on data/fsdp meshes only"),
    (f"compile_cache={DEMO}", "demo.py exists and is not a directory"),
    (f"run_dir={DEMO}", "demo.py' is a file, not a directory"),
    ("pipeline.global_batch=0", "PipelineConfig.global_batch=0: must be ≥ 1"),  # it used to hang
    ("pipeline.length_buckets=[]", "need at least one positive length"),
    ("pipeline.stall_timeout_s=-1", "PipelineConfig.stall_timeout_s=-1.0: must be ≥ 0 (0: wait forever)"),
    ("pipeline.image.max_pixels=0", "need 0 < min_pixels ≤ max_pixels"),
    ("data.synthetic_pairs=0", "data.synthetic_pairs=0 must be ≥ 1"),
    ("step.optim.learning_rate=nan", "learning_rate must be finite and > 0 (got nan)"),
    ("step.loss.objective=cispo step.loss.delta=1.5", "LossConfig.delta caps the clip objective's ratio; "
                                                      "objective='cispo' does not use it"),
    ("step.loss.importance_sampling_level=seq", "LossConfig.importance_sampling_level='seq': choose one of"),
    ("step.loss.objective=vespo step.loss.importance_sampling_level=sequence",
     "objective='vespo' forms its own sequence weight"),
    ("step.loss.top_entropy_quantile=1.5", "LossConfig.top_entropy_quantile=1.5 must be in [0, 1]"),
    ("step.loss.entropy_coef=0.01 step.loss.top_entropy_quantile=0.2", "entropy_coef=0.01 with top_entropy_quantile"
                                                                        "=0.2: not supported"),
    (f"data.source=hpdv2 data.path={DEMO}", "loop.eval_every=25 needs held-out pairs"),
    ("data.eval_pairs=0", "loop.eval_every=25 with data.eval_pairs=0"),
    # (fields that failed late, deep inside JAX, or were accepted)
    ("model.dtype=fp32", "model.dtype='fp32': choose one of ('float32', 'bfloat16')"),
    ("loop.seed=-1", "LoopConfig.seed=-1 must be in [0, 2**32)"),
    ("step.logprob_chunk=0", "StepConfig.logprob_chunk=0 must be ≥ 1"),
    ("step.rewards.weights=[]", "RewardConfig.weights is empty"),
    ("step.optim.b2=1.5", "OptimConfig.b2=1.5 is out of range"),
    ("sft.learning_rate=-1", "sft.learning_rate=-1.0 must be finite and > 0"),
    ("step.sampling.temperature=inf", "SamplingConfig.temperature=inf is out of range"),
    ("pipeline.image.std=[0,0,0]", "std > 0"),
    ('pipeline.prompt.choices=["A","B"]', "prompt.reasoner_instruction does not name 'A'"),
    ('pipeline.prompt.choices=["X","X"]', "they must differ"),
    ("pipeline.prompt.reasoner_instruction=Prompt:{text}", "{prompt} is its only placeholder"),
    ("run_dir=/dev/null/run", "run_dir='/dev/null/run' is inside '/dev/null', which is a file"),
    ("run_dir=/tmp/runs/lr[1e-3]", "holds [ ]: Orbax reads checkpoints back through a glob"),
    ('pipeline.prompt.choices=["X\\t","Y"]', "no leading or trailing whitespace"),
])
def test_bad_input_is_one_clear_error_before_compiling(tmp_path, capsys, override, message):
  rc = launch.main(["--config", DEMO, f"run_dir={tmp_path}", *override.split()])
  assert rc == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("body,message", [
    ("ExperimentConfig(loop=LoopConfig(stepz=3))", r"cfg\.py:4: TypeError: .*unexpected keyword argument 'stepz'"),
    ("ExperimentConfig(model=ModelConfig(tokenizer=5))", r"cfg\.py: model\.tokenizer=5: expected str \| None"),
    ("ExperimentConfig(loop=LoopConfig(steps=True))", r"cfg\.py: loop\.steps=True: expected int"),
    ("ExperimentConfig(data=DataConfig(eval_path=['a.json']))",
     r"cfg\.py: data\.eval_path=\['a\.json'\]: expected str \| None"),
    ("ExperimentConfig(loop=LoopConfig(steps=-1))", r"cfg\.py:4: ValueError: .*steps"),
    ("ExperimentConfig(", r"cfg\.py:4: SyntaxError"),
])
def test_a_config_file_mistake_is_one_error_naming_the_file(tmp_path, capsys, body, message):
  path = tmp_path / "cfg.py"
  path.write_text("from lgrpo_jax.config import *\n\ndef config():\n  return " + body + "\n")
  assert launch.main(["--config", str(path)]) == 2
  assert re.search(message, capsys.readouterr().err)


def test_a_config_file_may_give_lists_for_tuples_and_a_run_config_json_is_a_config(tmp_path):
  import json

  from lgrpo_jax.config import to_record
  path = tmp_path / "cfg.py"
  path.write_text("from lgrpo_jax.config import *\n\ndef config():\n"
                  "  return ExperimentConfig(pipeline=PipelineConfig(length_buckets=[256, 512]))\n")
  cfg = load_config_file(str(path))
  assert cfg.pipeline.length_buckets == (256, 512) and hash(cfg.pipeline)  # hashable: keys compiled programs
  record = tmp_path / "config.json"
  record.write_text(json.dumps(to_record(load_config_file(DEMO))))
  assert load_config_file(str(record)) == load_config_file(DEMO)
  wrong = to_record(load_config_file(DEMO))
  wrong["loop"]["tensorboard"] = "no"  # a JSON config is type-checked too (this turned TensorBoard on)
  record.write_text(json.dumps(wrong))
  with pytest.raises(ValueError, match=r"config.json: loop.tensorboard='no': expected bool"):
    load_config_file(str(record))
  record.write_text('{"loop": ')
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    load_config_file(str(record))
  with pytest.raises(ValueError, match="a config file is a Python file"):
    load_config_file(os.path.join(os.path.dirname(DEMO), "README.md"))


def test_a_mesh_that_would_replicate_the_model_is_refused(tmp_path, monkeypatch, capsys):
  """fsdp sizes that do not divide the model's widths left every parameter (and Adam state) whole
  on every device — the default mesh on 3 nodes × 8 GPUs put all of 3B on each — and the run ran
  out of memory without saying why. A model that fits anyway (the tiny preset), tensor parallelism
  (which leaves the embedding widths whole by design) and a mesh that divides are accepted."""
  import jax

  from lgrpo_jax.models.qwen2_5_vl import Qwen25VLConfig
  from lgrpo_jax.sharding import MeshError
  three_b = {"model_type": "qwen2_5_vl",
             "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                             "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": [16, 24, 24]}},
             "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                               "out_hidden_size": 2048}}
  ckpt = tmp_path / "qwen3b"  # check() reads its config.json only
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps(three_b))
  Qwen25VLConfig.from_json(ckpt)  # a valid config
  cfg = apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path / 'run'}", f"model.checkpoint={ckpt}",
                                                 "sft.steps=0", "pipeline.global_batch=24", "step.sampling.num_samples=2"])
  monkeypatch.setattr(jax, "device_count", lambda: 24)
  with pytest.raises(MeshError, match=r"fsdp=24, tensor=1\): mesh.fsdp would leave 100% of the model's parameters "
                                      r"whole on every device: 1\d\.\d\d GiB per device instead of 0\.\d\d GiB .* text "
                                      r"hidden_size 2048 and vision hidden_size 1280 are not divisible by mesh.fsdp=24; "
                                      r".* e.g. mesh.fsdp=8 mesh.data=3"):
    launch.check(cfg)
  launch.check(apply_overrides(cfg, ["mesh.fsdp=8", "mesh.data=3"]))
  launch.check(apply_overrides(cfg, ["mesh.fsdp=1", "mesh.data=12", "mesh.tensor=2"]))
  assert "warning" not in capsys.readouterr().err
  # tensor=8 does not divide 3B's 2 key/value heads or its vision MLP width: said as such (the warning
  # used to blame fsdp, and a pure tensor-parallel mesh was not checked at all)
  launch.check(apply_overrides(cfg, ["mesh.fsdp=1", "mesh.data=3", "mesh.tensor=8"]))
  err = capsys.readouterr().err
  assert re.search(r"tensor=8\) puts 3\.\d\d GiB of parameters on every device, 1\.\d\d GiB split evenly: "
                   r"vision MLP width 3420 not divisible by mesh.tensor=8 \(1\.57 GiB not split\)", err), err
  assert "key/value heads 2 not divisible by mesh.tensor=8" in err and "mesh.fsdp" not in err
  tiny = apply_overrides(load_config_file(DEMO), ["pipeline.global_batch=12", "step.sampling.num_samples=2"])
  monkeypatch.setattr(jax, "device_count", lambda: 6)
  launch.check(tiny)  # the tiny model's widths (128, 64) do not divide by 6, but it fits whole


def test_wandb_missing_is_found_before_the_warm_start(tmp_path, monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
  with pytest.raises(ConfigError, match="loop.wandb_project='x' needs Weights & Biases"):
    launch.check(apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path}", "loop.wandb_project=x"]))


def test_a_hung_read_exits_75_a_bad_record_2():
  # The launcher's and `lgrpo_jax.evaluate`'s exit codes. A scheduler retries a temporary failure (sysexits' EX_TEMPFAIL); a bad record needs fixing first.
  from lgrpo_jax.data.images import ImageError
  from lgrpo_jax.data.sources import DataError, DataStall
  from lgrpo_jax.train.stopping import TEMPFAIL, exit_code, failure_error
  assert exit_code(DataStall("process 0: no batch")) == TEMPFAIL == 75
  assert exit_code(failure_error([1], 3, stalled=[1])) == 75
  for e in (DataError("bad"), ImageError("/x.png", "truncated"), failure_error([1, 2], 3, stalled=[1])):
    assert exit_code(e) == 2, e
  assert "process 2 of" in str(failure_error([1, 2], 3, stalled=[1]))  # the one with a record to fix


def test_a_second_launch_into_a_running_runs_directory_is_refused(tmp_path, capsys):
  """Two launches into one run directory (a scheduler restarting a job that still runs) used to
  interleave their checkpoints and metrics.jsonl and both exit 0. The first holds RUN_DIR/.lock
  while it lives; the second is refused naming the holder, before loading anything."""
  from lgrpo_jax import runs
  lock = runs.lock_run_dir(str(tmp_path / "run"))
  try:
    assert launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run'}"]) == 2
    assert f"is in use by pid {os.getpid()} on " in capsys.readouterr().err
  finally:
    lock.close()
  # Which errors are the storage's: a refused write under the run directory, not a data file the user named
  import errno
  run = str(tmp_path / "run")
  assert runs.storage_failure(OSError(errno.ENOSPC, "No space left on device", f"{run}/metrics.jsonl"), run)
  assert runs.storage_failure(ValueError(f"OUT_OF_RANGE: writing {run}/checkpoints/2: File too large"), run)
  assert runs.storage_failure(PermissionError(errno.EACCES, "Permission denied", "/data/a.png"), run) is None
  assert runs.storage_failure(PermissionError(errno.EACCES, "Permission denied", f"{run}2/x"), run) is None
  assert runs.storage_failure(FileNotFoundError(errno.ENOENT, "No such file", f"{run}/x"), run) is None
  # Where no file can be made (a read-only mount; this test runs as root, which chmod does not stop):
  (tmp_path / "file.txt").write_text("x")
  with pytest.raises(runs.RunError, match=r"run_dir=.*: cannot write in .*file.txt' \(Not a directory\)"):
    runs.check_writable_dir(str(tmp_path / "file.txt" / "run"), "run_dir")


def test_a_write_the_storage_refuses_is_one_line_and_exits_75(tmp_path):
  """A full disk (here: a file-size limit, EFBIG) during a checkpoint save ended in pages of
  Orbax/TensorStore tracebacks and exit 1; it is one line saying what failed and where a restart
  resumes, and exit 75 (a temporary failure: fix it, run the same command)."""
  import shlex
  import subprocess
  import sys
  command = [sys.executable, "-m", "lgrpo_jax.launch", "--config", DEMO, f"run_dir={tmp_path / 'run'}",
             "sft.steps=0", "loop.steps=2", "loop.save_every=1", "loop.eval_every=0", "compile_cache=off",
             "data.synthetic_pairs=8", "step.sampling.max_new_tokens=8", "step.sampling.num_samples=2"]
  r = subprocess.run(["bash", "-c", "ulimit -f 300 && exec " + shlex.join(command)],  # 300 KiB per file
                     capture_output=True, text=True, timeout=600)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 75, r.stderr[-3000:]
  assert last.startswith(f"error: cannot write under run_dir={str(tmp_path / 'run')!r} during ") and (
      "File too large" in last or "file too large" in last), last


def test_model_listener_is_the_frozen_listener(tmp_path):
  # model.listener=DIR: the listener is that checkpoint, not a copy of the policy; the reference
  # stays the initial policy (β > 0 here), so the Trainer keeps two frozen copies.
  import jax
  import numpy as np
  from flax import nnx

  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  from lgrpo_jax.train import Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  other = lgrpo_jax.from_config(tiny_model_config(tok_dir), seed=7)
  lgrpo_jax.save_hf(other, tmp_path / "listener", dtype="float32")
  cfg = apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path / 'run'}", f"model.tokenizer={tok_dir}",
                                                 f"model.listener={tmp_path / 'listener'}", "data.synthetic_pairs=4",
                                                 "step.loss.beta=0.04"])
  launch.check(cfg)
  model, listener, tokenizer, pairs, _ = launch.build(cfg)
  params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  equal = lambda xs, ys: all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(xs, ys))
  assert equal(params(listener), params(other)) and not equal(params(model), params(other))
  t = Trainer(tmp_path / "run", model, tokenizer, pairs, cfg.step, cfg.pipeline, cfg.loop, listener=listener)
  assert not t.listener_is_reference
  assert equal(jax.tree.leaves(t.listener_params), params(other))
  assert t.ref_params is not None and equal(jax.tree.leaves(t.ref_params), params(model))
  t.close()
  # No reward reads the listener: model.listener is not loaded (a second model's memory for nothing).
  no_listener = apply_overrides(cfg, ['step.rewards.weights=[["format",1],["accuracy",1]]'])
  assert launch.build(no_listener)[1] is None


def test_bf16_compute_keeps_the_policys_master_weights_in_fp32(tmp_path):
  """model.dtype=bfloat16 computes in bf16; the trained policy's parameters (and so its optimizer
  state) stay fp32 (model.param_dtype), else an AdamW step at lr 1e-6 rounds away in bf16. The
  frozen listener is kept in bf16."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  lgrpo_jax.save_hf(lgrpo_jax.from_config(tiny_model_config(tok_dir)), tmp_path / "base", dtype="float32")
  base = [f"run_dir={tmp_path / 'run'}", f"model.tokenizer={tok_dir}", "data.synthetic_pairs=4",
          "model.dtype=bfloat16"]
  dtypes = lambda m: {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}
  for extra in ([], [f"model.checkpoint={tmp_path / 'base'}", f"model.listener={tmp_path / 'base'}"]):
    cfg = apply_overrides(load_config_file(DEMO), base + extra)
    launch.check(cfg)
    model, listener, *_ = launch.build(cfg)
    assert model.config.dtype == "bfloat16" and dtypes(model) == {jnp.dtype("float32")}
    assert listener is None if not extra else dtypes(listener) == {jnp.dtype("bfloat16")}
  cfg = apply_overrides(load_config_file(DEMO), base + ["model.param_dtype=bfloat16"])
  model, *_ = launch.build(cfg)
  assert dtypes(model) == {jnp.dtype("bfloat16")}
  for field in ("dtype", "param_dtype"):
    with pytest.raises(ConfigError, match=rf"model.{field}='fp32': choose one of"):
      apply_overrides(load_config_file(DEMO), [f"model.{field}=fp32"])


def test_a_short_cosine_is_warned_of_and_a_mixed_grid_batch_is_a_data_error(tmp_path, capsys):
  import numpy as np

  from lgrpo_jax.data.sources import DataError
  from lgrpo_jax.train.loop import pair_grid_of
  cfg = apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path}", "loop.steps=10", "step.optim.schedule=cosine",
                                                 "step.optim.total_steps=5"])
  launch.check(cfg)
  assert "total_steps=5 < loop.steps=10" in capsys.readouterr().err
  launch.check(dataclass_replace(cfg, step=dataclass_replace(cfg.step, optim=dataclass_replace(
      cfg.step.optim, total_steps=10))))
  assert "warning" not in capsys.readouterr().err
  launch.check(dataclass_replace(cfg, model=dataclass_replace(cfg.model, param_dtype="bfloat16")))
  assert "model.param_dtype=bfloat16 keeps the trained weights and AdamW's moments in bf16" in (
      capsys.readouterr().err)
  # pipeline.group_by_grid=false on mixed sizes: a DataError (the launcher saves and exits 2), not a crash
  grids = np.asarray([[1, 2, 2], [1, 2, 4], [1, 4, 4], [1, 2, 4]])
  assert pair_grid_of({"image_grid_thw": np.tile(grids[:2], (2, 1))}) == ((1, 2, 2), (1, 2, 4))
  with pytest.raises(DataError, match="group_by_grid=true"):
    pair_grid_of({"image_grid_thw": grids})


def test_a_checkpoint_without_its_tokenizer_is_one_clear_error(tmp_path, capsys):
  # transformers builds an empty tokenizer from a weights-only directory without a word; the run
  # used to die later inside the chat template.
  import lgrpo_jax
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  weights = tmp_path / "weights_only"
  lgrpo_jax.save_hf(lgrpo_jax.from_config(tiny_model_config(build_tiny_tokenizer(tmp_path / "tok"))), weights)
  assert launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run'}", f"model.checkpoint={weights}",
                      "sft.steps=0"]) == 2
  err = capsys.readouterr().err
  assert f"model.checkpoint='{weights}': no tokenizer files there" in err
  assert "set model.tokenizer" in err
  # The tiny preset's model.tokenizer is checked before the tiny config reads it (it was
  # transformers' five-line message naming no setting).
  (tmp_path / "empty").mkdir()
  assert launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run2'}", f"model.tokenizer={tmp_path / 'empty'}"]) == 2
  assert f"model.tokenizer='{tmp_path / 'empty'}': no tokenizer files there" in capsys.readouterr().err
  # A tokenizer_config.json alone (no vocabulary): transformers builds an empty tokenizer, named here.
  (tmp_path / "cfg_only").mkdir()
  (tmp_path / "cfg_only" / "tokenizer_config.json").write_text("{}")
  from lgrpo_jax.data.prompts import TokenizerError, load_tokenizer
  with pytest.raises(TokenizerError, match=r"model.checkpoint='\S+cfg_only': (cannot load a tokenizer|the tokenizer there)"):
    load_tokenizer(tmp_path / "cfg_only", "model.checkpoint")
  from lgrpo_jax.data.prompts import TokenizerError, load_tokenizer
  assert len(load_tokenizer(tmp_path / "tok", "model.tokenizer")) > 100  # the same check passes a real one
  # A tokenizer.json of another structure (valid JSON): the tokenizers library's own exception, named.
  import shutil
  shutil.copytree(tmp_path / "tok", tmp_path / "bad_tok")
  (tmp_path / "bad_tok" / "tokenizer.json").write_text('{"model": "oops"}')
  with pytest.raises(TokenizerError, match=r"model.tokenizer='\S+bad_tok': cannot load a tokenizer"):
    load_tokenizer(tmp_path / "bad_tok", "model.tokenizer")
  # A chat template that does not render, or drops the images: named at load (it was jinja2's bare
  # error, or "text has 0 image placeholders", at the first batch)
  cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
  for template, message in (("{% for m in messages %}", "does not render a prompt .*TemplateSyntaxError"),
                            ("{{ raise_exception('no images here') }}", "does not render a prompt .*no images here"),
                            ("{% for m in messages %}{{ m.role }}{% endfor %}", r"writes 0 <\|image_pad\|> for a message with 2 images")):
    shutil.rmtree(tmp_path / "bad_tok")
    shutil.copytree(tmp_path / "tok", tmp_path / "bad_tok")
    for f in ("chat_template.jinja", "chat_template.json"):
      (tmp_path / "bad_tok" / f).unlink(missing_ok=True)
    (tmp_path / "bad_tok" / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))
    with pytest.raises(TokenizerError, match=r"model.tokenizer='\S+bad_tok': its chat template " + message):
      load_tokenizer(tmp_path / "bad_tok", "model.tokenizer")


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, capsys):
  # A checkpoint whose config's image_token_id is not the tokenizer's <|image_pad|>: it loaded and
  # trained without a word, the images placed where no prompt token was (the logits equal with real
  # and with blank pixels) and ordinary text tokens overwritten.
  import lgrpo_jax
  from lgrpo_jax.data.prompts import TokenizerError, check_tokenizer_fits, load_tokenizer
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
  from lgrpo_jax.train import Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = load_tokenizer(tok_dir, "model.tokenizer")
  good = tiny_model_config(tok_dir)
  check_tokenizer_fits(tok, lgrpo_jax.from_config(good).config)  # its own tokenizer passes
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  for over, message in ((dict(image_token_id=5), rf"<\|image_pad\|> is {pad} in the tokenizer, image_token_id=5"),
                        (dict(vision_start_token_id=6), r"<\|vision_start\|> is \d+ in the tokenizer, vision_start_token_id=6"),
                        (dict(text_config=dict(good["text_config"], vocab_size=100)),
                         rf"the tokenizer has {len(tok)} tokens, .*vocab_size is 100")):
    bad = dict(good, **over)
    bad.pop("vocab_size", None)
    ckpt = tmp_path / f"ckpt_{len(list(tmp_path.iterdir()))}"
    model = lgrpo_jax.from_config(bad)
    lgrpo_jax.save_hf(model, ckpt)
    assert launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run'}", f"model.checkpoint={ckpt}",
                        f"model.tokenizer={tok_dir}", "sft.steps=0"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"model.checkpoint='{ckpt}'.*" + message, err), err
    assert "Traceback" not in err
    with pytest.raises(TokenizerError, match=message):  # a notebook's Trainer says the same
      Trainer(tmp_path / "nb", model, tok, [])


def test_a_missing_image_found_while_training_is_one_clear_error(tmp_path, capsys, monkeypatch):
  # A read an earlier run in this process left hung (a stalled file system): main() called from
  # Python returns (it used to end the whole process with os._exit; only the command does that).
  from lgrpo_jax.train import stopping
  monkeypatch.setattr(stopping.Watched, "_unfinished", {object()})
  assert stopping.read_in_flight()
  records = [{"prompt": f"a cat {k}", "human_preference": [1, 0], "image_path": [f"a{k}.png", f"b{k}.png"]}
             for k in range(4)]
  (tmp_path / "train.json").write_text(json.dumps(records))
  rc = launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run'}", "data.source=hpdv2",
                    f"data.path={tmp_path / 'train.json'}", f"data.image_root={tmp_path}", "sft.steps=0",
                    "loop.eval_every=0", "loop.steps=2"])
  err = capsys.readouterr().err
  assert rc == 2 and "Traceback" not in err
  assert f"({tmp_path / 'a'}" in err and "image file not found" in err


def test_a_text_reward_raising_while_training_is_one_line(tmp_path, capsys, monkeypatch):
  # It went out as a traceback (exit 1); the Trainer has already saved the step before it.
  from lgrpo_jax.rewards import RewardError
  from lgrpo_jax.train import Trainer

  def run(self, on_metrics=None):
    raise RewardError("text reward 'mine' failed: ZeroDivisionError: x (at step 1; the update was not applied, "
                      "step 0 is saved and a new run() or restart reads that batch again)")

  monkeypatch.setattr(Trainer, "run", run)
  rc = launch.main(["--config", DEMO, f"run_dir={tmp_path / 'run'}", "sft.steps=0", "loop.eval_every=0",
                    "loop.steps=2"])
  err = capsys.readouterr().err
  assert rc == 2 and "Traceback" not in err
  assert "error: text reward 'mine' failed: ZeroDivisionError: x (at step 1;" in err


def test_records_left_out_under_skip_are_reported_not_only_counted(tmp_path, capsys):
  """bad_records=skip: what the source reader left out is printed once the data is read, what the
  pipeline leaves out while training is `skipped_records` in every metrics line (all processes
  together) and a line of the run's summary. Both used to be counted but never shown."""
  from PIL import Image

  from lgrpo_jax.launch import summary
  from lgrpo_jax.train import Trainer
  records = [{"prompt": f"a cat {k}", "human_preference": [1, 0], "image_path": [f"a{k}.png", f"b{k}.png"]}
             for k in range(4)]
  records.append({"prompt": "x", "human_preference": [2, 0], "image_path": ["a0.png", "b0.png"]})
  for k in range(4):
    for side in "ab":
      if (k, side) != (1, "a"):  # one missing image: found by the pipeline
        Image.new("RGB", (56, 56), (k * 40, 0, 0)).save(tmp_path / f"{side}{k}.png")
  (tmp_path / "train.json").write_text(json.dumps(records))
  cfg = apply_overrides(load_config_file(DEMO), [
      f"run_dir={tmp_path / 'run'}", "data.source=hpdv2", f"data.path={tmp_path / 'train.json'}",
      f"data.image_root={tmp_path}", "pipeline.bad_records=skip", "sft.steps=0", "loop.eval_every=0",
      "pipeline.global_batch=4", "pipeline.shuffle=false"])
  launch.check(cfg)
  model, listener, tok, pairs, _ = launch.build(cfg)
  assert "data: 4 training pairs; records left out while reading: {'bad_label': 1}" in capsys.readouterr().err
  t = Trainer(cfg.run_dir, model, tok, pairs, cfg.step, cfg.pipeline, cfg.loop)
  next(t.batches)
  assert t.skipped_records() == 1
  t.save()
  t.close()
  # The checkpoint keeps the run's total: with several processes, the data position (and its counts)
  # is process 0's alone, so a resume must not take those counts for everyone's (it over-counted).
  data = tmp_path / "run" / "checkpoints" / "0" / "data" / "metadata"  # Orbax's JSON item
  assert json.loads(data.read_text())["skipped_records"] == 1
  record = json.loads(data.read_text())
  data.write_text(json.dumps({**record, "skipped_records": 4}))  # as if the other processes skipped 3
  again = Trainer(cfg.run_dir, model, tok, pairs, cfg.step, cfg.pipeline, cfg.loop)
  assert again.resumed_from == 0 and again.skipped_records() == 4
  again.close()
  os.makedirs(tmp_path / "run2")
  (tmp_path / "run2" / "metrics.jsonl").write_text(json.dumps(
      {"step": 1, "reward/total": 1.0, "accuracy": 0.5, "step_time": 1.0, "skipped_records": 1}) + "\n")
  assert "records left out while training (pipeline.bad_records='skip'): 1" in summary(str(tmp_path / "run2"))
  # A restart of a finished run: not the earlier process's compile counts as this one's.
  (tmp_path / "run2" / "metrics.jsonl").write_text(json.dumps(
      {"step": 1, "reward/total": 1.0, "accuracy": 0.5, "step_time": 1.0, "compiles": 22, "compile_s": 30.0,
       "compiled_programs": 1}) + "\n")
  assert "XLA compilations in this run: 22" in summary(str(tmp_path / "run2"))
  again = summary(str(tmp_path / "run2"), trained_here=False)
  assert "XLA compilations" not in again and "this process trained no step" in again


def test_a_multi_process_batch_must_split_over_the_data_shards(monkeypatch):
  # Each process feeds its own rows to its own devices: 2 pairs over 8 data shards cannot be laid
  # out (one process fine: replicated). It used to pass the checks and fail at step 1 deep in JAX.
  import jax
  cfg = apply_overrides(load_config_file(DEMO), ["pipeline.global_batch=2", "step.sampling.num_samples=4"])
  launch.check(cfg)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match=r"pipeline.global_batch=2 does not split over the 8 data shards .* "
                                        r"2-process run.*use a multiple of 8"):
    launch.check(cfg)
  launch.check(apply_overrides(load_config_file(DEMO), ["pipeline.global_batch=8", "sft.global_batch=16"]))
  with pytest.raises(ConfigError, match=r"sft.global_batch=4 does not split over the 8 data shards"):
    launch.check(apply_overrides(load_config_file(DEMO), ["pipeline.global_batch=8", "sft.global_batch=4"]))


@pytest.mark.parametrize("stage", ["warm start", "grpo"])
def test_a_run_stopped_by_a_signal_saves_and_exits_128_plus_it(tmp_path, monkeypatch, capsys, stage):
  # A pre-empted run is not finished: exit 128 + signal (130 for SIGINT, 143 for SIGTERM), so that a
  # scheduler (Kubernetes, JobSet) restarts it; it used to exit 0, as a finished run does.
  from conftest import SignalOnRead
  from lgrpo_jax.data import pipeline
  from lgrpo_jax.train import loop
  module = pipeline if stage == "warm start" else loop  # where each stage's pipeline is made
  make_batches = module.make_batches
  monkeypatch.setattr(module, "make_batches", lambda *a, **k: SignalOnRead(make_batches(*a, **k)))
  rc = launch.main(["--config", DEMO, f"run_dir={tmp_path}", "loop.eval_every=0", "data.synthetic_pairs=8",
                    f"sft.steps={2 if stage == 'warm start' else 0}"])
  err = capsys.readouterr().err
  assert rc == 130 and "Traceback" not in err
  if stage == "warm start":
    assert f"SIGINT: saved warm start step 0 to {tmp_path}/sft_checkpoints, stopping" in err
    assert os.listdir(tmp_path / "sft_checkpoints") == ["0"]
  else:
    assert "SIGINT: saved step 0, stopping" in err and "0" in os.listdir(tmp_path / "checkpoints")


def test_hpdv2_test_split_as_the_held_out_pairs(tmp_path):
  # The 7B config picks best/ on HPDv2's test split (ImageReward's test set stays out of selection).
  from lgrpo_jax.data.sources import hpdv2_test
  records = [{"prompt": "p", "image_path": ["a.png", "b.png", "c.png"], "rank": [2, 1, 3]},
             {"prompt": "q", "image_path": ["d.png", "e.png"], "rank": [1, 2]}]
  (tmp_path / "test.json").write_text(json.dumps(records))
  cfg = apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path / 'run'}", "data.synthetic_pairs=4",
                                                 "data.eval_source=hpdv2_test", f"data.eval_path={tmp_path / 'test.json'}",
                                                 f"data.eval_image_root={tmp_path}", "data.eval_pairs=3"])
  launch.check(cfg)
  *_, eval_pairs = launch.build(cfg)
  assert eval_pairs == list(hpdv2_test(tmp_path / "test.json", str(tmp_path)))[:3]
  assert [(p.images[0][-5:], p.label) for p in eval_pairs] == [("a.png", 1), ("a.png", 0), ("b.png", 0)]
  seven_b = load_config_file(os.path.join(HERE, "..", "configs", "qwen2_5_vl_7b_hpdv2.py"))
  assert seven_b.loop.eval_every and seven_b.data.eval_source == "hpdv2_test"


def test_data_fraction_follows_loop_seed_for_every_source(tmp_path):
  # hpdv2's subset was always seed 0's while the other sources' followed loop.seed: a multi-seed
  # study changed the training subset for some sources only.
  from lgrpo_jax.data.sources import subsample
  records = [{"prompt": f"p{k}", "human_preference": [1, 0], "image_path": [f"a{k}.png", f"b{k}.png"]}
             for k in range(24)]
  (tmp_path / "train.json").write_text(json.dumps(records))
  kept = {}
  for seed in (0, 1):
    cfg = apply_overrides(load_config_file(DEMO), [f"run_dir={tmp_path / 'run'}", "data.source=hpdv2",
                                                   f"data.path={tmp_path / 'train.json'}", f"data.image_root={tmp_path}",
                                                   "data.fraction=0.5", f"loop.seed={seed}", "loop.eval_every=0"])
    _, _, _, pairs, _ = launch.build(cfg)
    kept[seed] = [p.pair_id for p in pairs]
    assert kept[seed] and all(subsample(pid, 0.5, seed) for pid in kept[seed])
  assert kept[0] != kept[1]


def test_short_run_writes_config_and_metrics(tmp_path, monkeypatch):
  import jax
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # compile_cache=auto: RUN_DIR/xla_cache
  cache_setting = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  # In this process (8 simulated devices): the launcher trains on the default FSDP mesh.
  rc = launch.main(["--config", DEMO, f"run_dir={tmp_path}", "loop.steps=2", "step.sampling.max_new_tokens=8",
                    "step.sampling.num_samples=2", "sft.steps=1", "sft.log_every=1", "data.synthetic_pairs=16",
                    "data.eval_pairs=2"])
  assert rc == 0
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["loop"]["steps"] == 2 and cfg["step"]["sampling"]["max_new_tokens"] == 8
  assert cfg["step"]["sampling"]["eos_ids"]  # filled from the tokenizer
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [m["step"] for m in lines] == [0, 1, 2]  # held-out evaluation before the first step
  assert "eval/accuracy" in lines[0] and "eval/accuracy" in lines[-1] and (tmp_path / "curves.png").is_file()
  assert [json.loads(x)["step"] for x in open(tmp_path / "sft_metrics.jsonl")] == [1]
  # The run used its own compilation cache (a fresh run: nothing loaded) and left the process as it was.
  assert cfg["compile_cache"] == "auto" and (tmp_path / "xla_cache").is_dir()
  assert lines[-1]["compile_cache_hits"] == 0 and lines[-1]["compiles"] > 0
  assert (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache) == cache_setting
  evaluate_the_run(tmp_path, lines[-1])


def evaluate_the_run(run_dir, last_eval):
  """`python -m lgrpo_jax.evaluate --checkpoint RUN_DIR`: the latest policy parameters, the warm start
  as listener, the run's prompt and sampling settings — the held-out numbers of training's last
  evaluation come out again."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from flax import nnx

  from lgrpo_jax import evaluate
  args = evaluate.build_parser().parse_args(["--checkpoint", str(run_dir), "--data", "synthetic:2"])
  loaded = evaluate.load(args, mesh=None)
  saved = ocp.PyTreeCheckpointer().restore(str(run_dir / "checkpoints" / "2" / "state"))
  sft = ocp.PyTreeCheckpointer().restore(str(run_dir / "sft"))
  unwrap = lambda t: t["value"] if set(t) == {"value"} else {k: unwrap(v) for k, v in t.items()}
  for model, ref in ((loaded.model, unwrap(saved["params"])), (loaded.listener, unwrap(sft))):
    ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, ref)
  assert loaded.checkpoint["step"] == 2
  # --best: the run's best/ checkpoint (here the evaluation at its last step, 2)
  best = evaluate.load(evaluate.build_parser().parse_args(["--checkpoint", str(run_dir), "--data", "synthetic:2",
                                                           "--best"]), mesh=None)
  assert best.checkpoint["state"] == str(run_dir / "best" / "2" / "state")
  assert evaluate.main(["--checkpoint", str(run_dir), "--data", "synthetic:2", "--quiet"]) == 0
  assert not (run_dir / "eval" / "synthetic-2" / "xla_cache").exists()  # a run's evaluation uses the run's cache
  m = json.load(open(run_dir / "eval" / "synthetic-2" / "summary.json"))["metrics"]
  for k in ("accuracy", "accuracy_as_given", "accuracy_swapped", "format_rate"):
    assert m[k] == pytest.approx(last_eval[f"eval/{k}"])
  assert evaluate.main(["--checkpoint", str(run_dir), "--data", "synthetic:2", "--step", "1"]) == 2
  # A run trained with explicit mesh sizes, evaluated on another device count: the default mesh (it
  # was an error naming a mesh the command was never given, with no way to give another)
  import contextlib
  import io
  record = (run_dir / "config.json").read_text()
  cfg = json.loads(record)
  cfg["mesh"].update(data=2, fsdp=2)  # 4 devices; the tests have 8
  (run_dir / "config.json").write_text(json.dumps(cfg))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert evaluate.main(["--checkpoint", str(run_dir), "--data", "synthetic:2", "--quiet",
                          "--out", str(run_dir / "eval" / "other_mesh")]) == 0
  (run_dir / "config.json").write_text(record)
  assert "the run's mesh (data=2, fsdp=2, tensor=1): 2×2×1 = 4 devices, but 8 are available: evaluating on the " \
         "default mesh" in err.getvalue(), err.getvalue()
  again = json.load(open(run_dir / "eval" / "other_mesh" / "summary.json"))["metrics"]
  assert again["accuracy"] == pytest.approx(m["accuracy"]) and again["format_rate"] == pytest.approx(m["format_rate"])
  release_the_run(run_dir, loaded.model, m)


def release_the_run(run_dir, policy, metrics):
  """`python -m lgrpo_jax.convert to-hf RUN_DIR OUT`: transformers loads the export and gives our
  policy's logits; the tokenizer, generation config and model card (with the evaluated accuracy) are there."""
  import numpy as np
  import torch
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

  import lgrpo_jax
  from lgrpo_jax import convert
  from lgrpo_jax.config import ExperimentConfig
  from lgrpo_jax.data.pipeline import make_batches
  from lgrpo_jax.data.synthetic import synthetic
  from hf_tiny import hf_logits
  out = run_dir / "hf_fp32"
  assert convert.main(["to-hf", str(run_dir), str(out), "--dtype", "float32"]) == 0
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(out)
  pipe = dataclass_replace(ExperimentConfig().pipeline, global_batch=2, listener=False, num_epochs=1,
                           image=dataclass_replace(ExperimentConfig().pipeline.image, max_pixels=56 * 84))
  batch = next(iter(make_batches(list(synthetic(2, seed=5, image_size=84)), tok, pipe)))
  arrays = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
  ours = np.asarray(lgrpo_jax.forward(policy, **arrays))
  ref = hf_logits(hf, {**{k: np.asarray(v, np.int64 if k != "pixel_values" else np.float32)
                          for k, v in arrays.items()},
                       "mm_token_type_ids": (batch["input_ids"] == hf.config.image_token_id).astype(np.int64)})
  keep = batch["attention_mask"].astype(bool)
  assert np.abs(ours - ref)[keep].max() <= 1e-4 * np.abs(ref)[keep].max()
  # transformers' image processor, from the export's preprocessor_config.json (the tiny preset has no
  # base file to copy: AutoProcessor failed), prepares images as the run did: its pixel limits.
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  from lgrpo_jax import runs
  from lgrpo_jax.data import process_images
  import io

  from PIL import Image
  images = [Image.open(io.BytesIO(b)) if isinstance(b, bytes) else b
            for b in next(iter(synthetic(1, seed=5, image_size=84))).images]
  got = Qwen2VLImageProcessorPil.from_pretrained(out)(images=images, return_tensors="np")
  want_pv, want_grid = process_images(images, runs.run_config(run_dir).pipeline.image)
  np.testing.assert_array_equal(got["image_grid_thw"], want_grid)
  np.testing.assert_array_equal(got["pixel_values"], want_pv)
  # Default: bf16, greedy generation config, the card with the evaluated accuracy; into a folder
  # holding an earlier export's tokenizer file, which the run's tokenizer replaces.
  (run_dir / "hf").mkdir()
  (run_dir / "hf" / "tokenizer_config.json").write_text('{"stale": true}')
  assert convert.main(["to-hf", str(run_dir), str(run_dir / "hf"), "--step", "2"]) == 0
  assert "stale" not in (run_dir / "hf" / "tokenizer_config.json").read_text()
  assert json.load(open(run_dir / "hf" / "config.json"))["dtype"] == "bfloat16"
  gen = json.load(open(run_dir / "hf" / "generation_config.json"))
  assert gen["do_sample"] is False and gen["max_new_tokens"] == 8 and gen["eos_token_id"]
  card = (run_dir / "hf" / "README.md").read_text()
  assert f"| accuracy (mean of both orders) | {metrics['accuracy']:.3f} |" in card
  assert "step 2" in card and "Qwen2_5_VLForConditionalGeneration" in card and "<answer>" in card
  # the surrogate and the aggregation apart (the card called the aggregation the objective)
  assert "| objective | clip surrogate (token-level ratio)" in card and "| loss aggregation, advantages | grpo, grpo |" in card
  assert convert.main(["to-hf", str(run_dir), str(run_dir / "x"), "--step", "9"]) == 2
  assert convert.main(["to-hf", str(run_dir), str(run_dir / "hf_best"), "--best"]) == 0
  assert "at step 2 (its best held-out checkpoint)" in (run_dir / "hf_best" / "README.md").read_text()


@pytest.mark.parametrize("name", ["demo.py", "qwen2_5_vl_3b_hpdv2.py", "qwen2_5_vl_7b_hpdv2.py"])
def test_shipped_configs_load(name):
  cfg = load_config_file(os.path.join(HERE, "..", "configs", name))
  assert cfg.step.sampling.num_samples >= 2


def test_dry_run_checks_and_prints_the_config_and_writes_nothing(tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert launch.main(["--config", DEMO, "--dry-run", f"run_dir={run_dir}", "loop.steps=3"]) == 0
  out = capsys.readouterr()
  assert json.loads(out.out)["loop"]["steps"] == 3 and "config OK" in out.err
  assert not run_dir.exists()
  assert launch.main(["--config", DEMO, "--dry-run", f"run_dir={run_dir}", "model.checkpoint=/nonexistent"]) == 2
  assert "model.checkpoint='/nonexistent': not found" in capsys.readouterr().err


def test_dry_run_traces_the_configs_own_loss_pieces(tmp_path, capsys):
  """A config file's registered KL estimator of the wrong shape is named by the checks (exit 2),
  before a model loads or the warm start runs (it was a bare broadcasting error after the warm
  start, exit 1); a KL estimator set with β = 0 is said to do nothing."""
  from lgrpo_jax.grpo.core import KL_ESTIMATORS
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import dataclasses\n"
      "from lgrpo_jax.grpo import register_kl\n"
      f"exec(open({DEMO!r}).read())\n"
      "register_kl('t_per_pair_kl', lambda logp, ref: (ref - logp).sum(-1), replace=True)\n"
      "_demo = config\n"
      "def config():\n"
      "  c = _demo()\n"
      "  return dataclasses.replace(c, step=dataclasses.replace(c.step, loss=dataclasses.replace(\n"
      "      c.step.loss, kl='t_per_pair_kl', beta=0.04)))\n")
  try:
    assert launch.main(["--config", str(cfg), "--dry-run", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "LossConfig.kl='t_per_pair_kl' returned shape" in capsys.readouterr().err
    assert launch.main(["--config", DEMO, "--dry-run", f"run_dir={tmp_path / 'run'}", "step.loss.kl=k2"]) == 0
    assert "warning: step.loss.kl='k2' has no effect: step.loss.beta=0" in capsys.readouterr().err
  finally:
    KL_ESTIMATORS.pop("t_per_pair_kl", None)


def test_a_config_file_imports_the_module_beside_it_from_any_directory(tmp_path, monkeypatch):
  """As `python file.py` would: a config file's own directory is importable while it loads (the
  module registering its reward sits beside it), wherever the launch runs from; not afterwards."""
  import sys

  from lgrpo_jax.rewards.core import REWARDS
  (tmp_path / "conf").mkdir()
  (tmp_path / "conf" / "t_beside_rewards.py").write_text(
      "from lgrpo_jax.rewards import register_reward\n"
      "register_reward('t_beside', lambda inputs: inputs.lengths * 0.0, replace=True)\n")
  (tmp_path / "conf" / "cfg.py").write_text(
      "import dataclasses\n"
      "import t_beside_rewards  # noqa: F401\n"
      "from lgrpo_jax.config import ExperimentConfig\n"
      "from lgrpo_jax.rewards import RewardConfig\n"
      "def config():\n"
      "  c = ExperimentConfig()\n"
      "  return dataclasses.replace(c, step=dataclasses.replace(c.step, rewards=RewardConfig(\n"
      "      weights=(('format', 1.0), ('t_beside', 0.5)))))\n")
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  path_before = list(sys.path)
  try:
    cfg = load_config_file(os.path.join("..", "conf", "cfg.py"))
    assert cfg.step.rewards.weights[1] == ("t_beside", 0.5) and "t_beside" in REWARDS
    assert sys.path == path_before
  finally:
    REWARDS.pop("t_beside", None)
    sys.modules.pop("t_beside_rewards", None)
