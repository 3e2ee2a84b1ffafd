"""Supervised warm start: the NLL of formatted targets falls; the synthetic teacher's attributes
describe the drawn pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.synthetic import pair_attributes, synthetic, synthetic_pair
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.train.loop import pair_grid_of, to_device
from lgrpo_jax.train.sft import make_sft_step, target_tokens


def test_pair_attributes_describe_the_pair():
  for k in range(5):
    good, bad = pair_attributes(k, seed=2, n_wrong=3)
    pair = synthetic_pair(k, seed=2, n_wrong=3)
    assert pair.prompt == f"a {good['colour']} {good['shape']} on a {good['background']} background"
    assert all(good[a] != bad[a] for a in good)


def test_sft_lowers_the_loss_of_formatted_targets(tmp_path):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  graphdef, params = nnx.split(lgrpo_jax.from_config(tiny_model_config(tok_dir)), nnx.Param)
  pipe = PipelineConfig(global_batch=4, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  host = next(make_batches(list(synthetic(8, seed=0, image_size=56)), tok, pipe))
  texts = [f"<think>ok</think><answer>Image {l + 1}</answer><|im_end|>" for l in host["labels"]]
  tokens, mask, _ = (jnp.asarray(x) for x in target_tokens(tok, texts, 16))
  tx = optax.adamw(3e-3)
  step = make_sft_step(graphdef, tx, pair_grid_of(host))
  opt_state = tx.init(params)
  losses = []
  for _ in range(25):
    params, opt_state, loss, _ = step(params, opt_state, to_device(host), tokens, mask)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.3 * losses[0], losses


def test_sft_listener_term_is_the_listener_reward_cross_entropy_and_falls(tmp_path):
  """The listener part of the warm start is −log P(true image) as the reward path computes it
  (`listener_probs` on the same completions), and training lowers it."""
  from lgrpo_jax.listener import ListenerSpec, listener_probs
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  graphdef, params = nnx.split(model, nnx.Param)
  pipe = PipelineConfig(global_batch=4, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  host = next(make_batches(list(synthetic(8, seed=0, image_size=56)), tok, pipe))
  # One target spells its tag a character at a time: no token variant finds it, the parser does.
  texts = [f"<think>pick {l + 1}</think><answer>Image {l + 1}</answer><|im_end|>" for l in host["labels"]]
  tokens, mask, answer_at = (jnp.asarray(x) for x in target_tokens(tok, texts, 20))
  by_char = [i for c in "<answer>" for i in tok(c, add_special_tokens=False)["input_ids"]]
  row = tok("<think>pick 1</think>", add_special_tokens=False)["input_ids"] + by_char + tok(
      "Image 1</answer><|im_end|>", add_special_tokens=False)["input_ids"]
  assert len(row) <= 26
  tokens = jnp.zeros((4, 1, 26), jnp.int32).at[:, :, :20].set(tokens).at[0, 0, :len(row)].set(jnp.asarray(row))
  mask = jnp.zeros((4, 1, 26), jnp.int32).at[:, :, :20].set(mask).at[0, 0, :].set(jnp.arange(26) < len(row))
  from lgrpo_jax.rewards.text import answer_token_of
  answer_at = answer_at.at[0, 0].set(answer_token_of(tok, row))
  spec = ListenerSpec.from_tokenizer(tok)
  batch = to_device(host)
  grid = pair_grid_of(host)
  probs = jax.jit(lambda *a: listener_probs(model, *a[:3], grid * 4, *a[3:5], spec, answer_token=a[5]))(
      batch.listener_input_ids, batch.listener_attention_mask,  # one program, not ~300
      batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1]), tokens, mask.sum(-1), answer_at)[:, 0]
  expected = -np.mean(np.log(np.asarray(probs)[np.arange(4), host["labels"]]))
  tx = optax.adamw(3e-3)
  step = make_sft_step(graphdef, tx, grid, listener_spec=spec, listener_weight=1.0)
  opt_state = tx.init(params)
  params, opt_state, loss, parts = step(params, opt_state, batch, tokens, mask, answer_at)
  np.testing.assert_allclose(float(parts["sft/listener_ce"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(parts["sft/nll"] + parts["sft/listener_ce"]), rtol=1e-6)
  for _ in range(20):  # it falls below half at ~15 steps and to ~5% by 20 (seed 0)
    params, opt_state, loss, parts = step(params, opt_state, batch, tokens, mask, answer_at)
  assert float(parts["sft/listener_ce"]) < 0.5 * expected, (float(parts["sft/listener_ce"]), expected)


def test_teachers_targets_file_and_scripted_judge(tmp_path):
  from lgrpo_jax.train.sft import SFTConfig, Teacher, synthetic_target
  path = tmp_path / "targets.jsonl"
  path.write_text('{"pair_id": "a", "target": "<think>Image 1 fits.</think><answer>Image 1</answer>"}\n\n'
                  '{"pair_id": "b", "target": "<answer>Image 2</answer>"}\n')
  t = Teacher(SFTConfig(steps=1, teacher="targets", targets_path=str(path)))
  host = {"pair_ids": ["a", "b"], "labels": np.array([1, 1]), "swapped": np.array([True, False])}
  assert t(host) == ["<think>Image 2 fits.</think><answer>Image 2</answer>", "<answer>Image 2</answer>"]
  with pytest.raises(ValueError, match="no target for pair 'c'"):
    t({"pair_ids": ["c"], "labels": np.array([0]), "swapped": np.array([False])})
  path.write_text('{"pair_id": "a"}\n')
  with pytest.raises(ValueError, match=r"targets.jsonl:1: expected a JSON object with pair_id and target"):
    Teacher(SFTConfig(steps=1, teacher="targets", targets_path=str(path)))
  for text, match in (('{"pair_id": "a", "target": null}\n', r"targets.jsonl:1: pair_id must be a string .* target of "
                       "type NoneType"),
                      ('{"pair_id": "a", "target": "x"}\n\n{"pair_id": "a", "target": "y"}\n',
                       r"targets.jsonl:3: pair_id 'a' again \(first on line 1\)")):
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
      Teacher(SFTConfig(steps=1, teacher="targets", targets_path=str(path)))
  path.write_bytes('{"pair_id": "a", "target": "caf\u00e9"}\n'.encode("latin-1"))
  with pytest.raises(ValueError, match=r"targets.jsonl: not UTF-8 text"):
    Teacher(SFTConfig(steps=1, teacher="targets", targets_path=str(path)))
  # The scripted judge: right descriptions and verdicts; a wrong answer is always "Image 1".
  pair = synthetic_pair(3, seed=5, n_wrong=3)
  good, bad = pair_attributes(3, 5, 3)
  right = synthetic_target(pair.pair_id, 1, 3, correct=True)
  assert right == (f"<think>Image 1: {bad['background']} background, no. Image 2: {good['background']} "
                   f"background, yes.</think><answer>Image 2</answer>")
  assert synthetic_target(pair.pair_id, 1, 3, correct=False).endswith("<answer>Image 1</answer>")
  coins = [Teacher(SFTConfig(teacher_accuracy=0.4), 3)({"pair_ids": [pair.pair_id], "labels": np.array([1]),
                                                        "swapped": np.array([False])}, step)[0] for step in range(200)]
  assert 0.3 < np.mean([c.endswith("Image 2</answer>") for c in coins]) < 0.5
  with pytest.raises(ValueError, match="needs synthetic pairs"):
    synthetic_target("hpdv2:17", 0, 3, True)


def test_a_swapped_target_names_every_position_the_other_way():
  from lgrpo_jax.train.sft import _swap_images
  text = ("<think>image 1 is blurry; Image 2 is sharp. The first image has a cat, the Second Image "
          "none; IMAGE 1 loses.</think><answer>Image 2</answer>")
  assert _swap_images(text) == ("<think>image 2 is blurry; Image 1 is sharp. The second image has a cat, the "
                                "First Image none; IMAGE 2 loses.</think><answer>Image 1</answer>")
  assert _swap_images(_swap_images(text)) == text
  assert _swap_images("first step, image 12, second place") == "first step, image 12, second place"


def test_a_target_too_long_for_max_target_tokens_is_an_error_naming_its_pair(tmp_path):
  tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
  text = "<think>" + "long reasoning " * 20 + "</think><answer>Image 1</answer><|im_end|>"
  n = len(tok(text, add_special_tokens=False)["input_ids"])
  tokens, mask, _ = target_tokens(tok, [text], n)
  assert int(mask.sum()) == n
  with pytest.raises(ValueError, match=rf"target of pair 'p-3' is {n} tokens, more than sft.max_target_tokens="
                                       rf"{n - 1}: cut, it would lose its answer"):
    target_tokens(tok, [text], n - 1, ["p-3"])


def test_pairs_without_a_target_are_found_before_the_first_step(tmp_path):
  import json

  from lgrpo_jax.train.sft import SFTConfig, run_sft
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  pairs = list(synthetic(4, seed=0, image_size=56))
  path = tmp_path / "targets.jsonl"
  path.write_text("".join(json.dumps({"pair_id": p.pair_id, "target": "<answer>Image 1</answer>"}) + "\n"
                          for p in pairs[:2]))
  (tmp_path / "run").mkdir()
  cfg = SFTConfig(steps=1000, teacher="targets", targets_path=str(path))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  with pytest.raises(ValueError, match=rf"no target for 2 of the 4 training pairs \(first: \['{pairs[2].pair_id}'"):
    run_sft(lgrpo_jax.from_config(tiny_model_config(tok_dir)), AutoTokenizer.from_pretrained(tok_dir), pairs, cfg,
            pipe, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "sft_metrics.jsonl").exists()  # no step was run


def test_an_interrupted_warm_start_resumes_exactly(tmp_path, monkeypatch):
  """SIGINT (SIGTERM alike) during the warm start's third batch read: the stage saves its state
  (parameters, optimizer state, data position before the unread batch) to RUN_DIR/sft_checkpoints
  and raises `Stopped`. It used to exit at once and redo the stage from step 0. The next call
  resumes there and ends with the parameters of an uninterrupted stage, bit for bit; its metrics
  have each step once, and its checkpoints go once RUN_DIR/sft is saved."""
  import json
  import os

  from conftest import SignalOnRead, check_saves_follow_a_sync, no_min_compile_time
  from lgrpo_jax.data import pipeline
  from lgrpo_jax.train import compile_cache, stopping
  from lgrpo_jax.train.sft import SFTConfig, run_sft
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  pairs = list(synthetic(8, seed=0, image_size=56))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  cfg = SFTConfig(steps=4, log_every=1, save_every=3, max_target_tokens=40)

  def stage(run, said=None):  # the three stages compile one program: loaded from a cache after the first
    with no_min_compile_time(), compile_cache.use(str(tmp_path / "xla")):
      return run_sft(lgrpo_jax.from_config(tiny_model_config(tok_dir)), tok, pairs, cfg, pipe, str(tmp_path / run),
                     say=([] if said is None else said).append)

  params = lambda m: [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]
  straight = params(stage("a"))

  make_batches = pipeline.make_batches
  monkeypatch.setattr(pipeline, "make_batches", lambda *a, **k: SignalOnRead(make_batches(*a, **k), read=3))
  import orbax.checkpoint as ocp
  # the state is saved after its steps' lines are on the disk (a resume keeps the lines up to it)
  saves = check_saves_follow_a_sync(monkeypatch, tmp_path / "b" / "sft_metrics.jsonl", ocp.CheckpointManager)
  with pytest.raises(stopping.Stopped, match="SIGINT: saved warm start step 2 to .*sft_checkpoints"):
    stage("b")
  assert sorted(os.listdir(tmp_path / "b" / "sft_checkpoints")) == ["2"] and not (tmp_path / "b" / "sft").exists()
  assert saves == [2]
  monkeypatch.setattr(pipeline, "make_batches", make_batches)
  said = []
  resumed = params(stage("b", said))
  assert said[0] == f"warm start: resumed from {tmp_path / 'b' / 'sft_checkpoints'}/2"
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)
  assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "sft_metrics.jsonl")] == [1, 2, 3, 4]
  assert (tmp_path / "b" / "sft").is_dir() and not (tmp_path / "b" / "sft_checkpoints").exists()


def test_the_warm_start_logs_the_mean_since_its_last_line_and_skips_a_non_finite_step(tmp_path, monkeypatch,
                                                                                         capsys):
  """As TRL's trainer logs: a line's loss is the mean over the steps since the last line, with the
  last step's gradient norm (before clipping) and the learning rate; the lines also go to
  TensorBoard (RUN_DIR/tensorboard/sft). A step whose loss is NaN (here: NaN pixels) changes nothing,
  is counted in `skipped_updates` and said on stderr; it used to write NaN into every parameter."""
  import json

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from conftest import no_min_compile_time
  from lgrpo_jax.train import compile_cache, sft
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  pairs = list(synthetic(8, seed=0, image_size=56))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  params = lambda m: [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]

  def stage(run, **kw):  # one program for all three: loaded from the cache after the first
    with no_min_compile_time(), compile_cache.use(str(tmp_path / "xla")):
      model = sft.run_sft(lgrpo_jax.from_config(tiny_model_config(tok_dir)), tok, pairs,
                          sft.SFTConfig(**{"steps": 2, "max_target_tokens": 40, "save_every": 0, **kw}), pipe,
                          str(tmp_path / run), tensorboard=True)
    return model, [json.loads(x) for x in open(tmp_path / run / "sft_metrics.jsonl")]

  _, every = stage("a", log_every=1)
  _, two = stage("b", log_every=2)
  assert [r["step"] for r in every] == [1, 2] and [r["step"] for r in two] == [2]
  np.testing.assert_allclose(two[0]["loss"], (every[0]["loss"] + every[1]["loss"]) / 2, rtol=1e-6)
  np.testing.assert_allclose(two[0]["sft/nll"], two[0]["loss"], rtol=1e-6)
  assert two[0]["grad_norm"] == every[1]["grad_norm"] > 0 and two[0]["learning_rate"] == 2e-5
  assert two[0]["skipped_updates"] == 0 and "skipped" not in capsys.readouterr().err
  acc = EventAccumulator(str(tmp_path / "b" / "tensorboard" / "sft"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(2, float(np.float32(two[0]["loss"])))]

  make_step = sft.make_sft_step
  monkeypatch.setattr(sft, "make_sft_step", lambda *a, **k: (lambda p, o, batch, *rest: make_step(*a, **k)(
      p, o, batch._replace(pixel_values=batch.pixel_values * jnp.nan), *rest)))
  model, rows = stage("c", steps=1)
  for a, b in zip(params(lgrpo_jax.from_config(tiny_model_config(tok_dir))), params(model)):
    np.testing.assert_array_equal(a, b)  # the initial parameters, bit for bit
  assert rows[0]["skipped_updates"] == 1 and np.isnan(rows[0]["loss"])
  assert "warm start: 1 update(s) before step 1 skipped: the loss or the gradients were not finite" in (
      capsys.readouterr().err)


def test_the_warm_start_step_is_kept_for_the_same_arguments():
  # As the GRPO step: a warm start run again in the same process (a notebook) reuses its jitted step;
  # another optimizer, grid or listener weight, or a cleared cache, gives a new one. (Nothing is traced.)
  from lgrpo_jax.train import sft
  from lgrpo_jax.train.step import clear_compiled_steps
  tx = sft.sft_optimizer(1e-3)
  assert sft.sft_optimizer(1e-3) is tx and sft.sft_optimizer(2e-3) is not tx
  first = sft.make_sft_step(None, tx, [[1, 4, 4], [1, 4, 4]])
  assert sft.make_sft_step(None, tx, ((1, 4, 4),) * 2) is first
  for other in (sft.make_sft_step(None, sft.sft_optimizer(2e-3), ((1, 4, 4),) * 2),
                sft.make_sft_step(None, tx, ((1, 4, 6),) * 2),
                sft.make_sft_step(None, tx, ((1, 4, 4),) * 2, listener_weight=0.5)):
    assert other is not first
  clear_compiled_steps()
  assert sft.make_sft_step(None, tx, ((1, 4, 4),) * 2) is not first


def test_targets_are_checked_before_the_first_step(tmp_path):
  """A target whose answer is not a choice, or too long (as written or swapped), is found before
  any step (it stopped the stage when its batch came), all offenders in one error."""
  import json

  from lgrpo_jax.train.sft import SFTConfig, run_sft
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  pairs = list(synthetic(6, seed=0, image_size=56))
  path = tmp_path / "targets.jsonl"
  good = "<think>Image 1 fits.</think><answer>Image 1</answer>"
  bad = {pairs[2].pair_id: "<think>x</think><answer>Image 3</answer>", pairs[3].pair_id: "<think>no answer</think>",
         pairs[5].pair_id: "<think>" + "Image 1 is good. " * 30 + "</think><answer>Image 2</answer>"}
  path.write_text("".join(json.dumps({"pair_id": p.pair_id, "target": bad.get(p.pair_id, good)}) + "\n"
                          for p in pairs))
  cfg = SFTConfig(steps=10, teacher="targets", targets_path=str(path), max_target_tokens=40)
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  (tmp_path / "run").mkdir()
  with pytest.raises(ValueError) as e:
    run_sft(lgrpo_jax.from_config(tiny_model_config(tok_dir)), AutoTokenizer.from_pretrained(tok_dir), pairs, cfg,
            pipe, str(tmp_path / "run"))
  msg = str(e.value)
  assert "2 target(s) whose answer is not one of ['Image 1', 'Image 2']" in msg
  assert f"{pairs[2].pair_id!r} (answer 'Image 3')" in msg and f"{pairs[3].pair_id!r} (no <answer>" in msg
  assert "1 target(s) longer than sft.max_target_tokens=40" in msg and repr(pairs[5].pair_id) in msg
  assert not (tmp_path / "run" / "sft_metrics.jsonl").exists()  # no step was run


def test_a_warm_start_keeps_its_settings(tmp_path, monkeypatch):
  """An interrupted warm start resumed with other settings is refused (one stage of two settings
  would be neither); a finished one is loaded — also by a resume saying sft.steps=0 — and a changed
  setting is said, not silently taken for what the weights were trained with."""
  import json

  from lgrpo_jax.train.sft import SFTConfig, run_sft
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  pairs = list(synthetic(8, seed=0, image_size=56))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,))
  run = tmp_path / "run"
  run.mkdir()
  model = lambda: lgrpo_jax.from_config(tiny_model_config(tok_dir))
  cfg = SFTConfig(steps=2, save_every=1, max_target_tokens=40)
  said = []
  run_sft(model(), tok, pairs, cfg, pipe, str(run), say=said.append)
  assert json.loads((run / "sft_config.json").read_text())["learning_rate"] == cfg.learning_rate
  # finished: loaded; another learning rate is said; sft.steps=0 loads it too
  for other, words in ((SFTConfig(steps=2, learning_rate=1e-3, max_target_tokens=40), "trained with other settings"),
                       (SFTConfig(steps=0), "sft.steps=0 here: the run's warm start stays")):
    said.clear()
    run_sft(model(), tok, pairs, other, pipe, str(run), say=said.append)
    assert said[0].startswith(f"warm start: loaded {run / 'sft'}") and words in said[0], said
  # interrupted (stopped at its third batch read: saved at step 2), resumed with another rate: refused
  from conftest import SignalOnRead
  from lgrpo_jax.data import pipeline
  from lgrpo_jax.train import stopping
  make_batches_ = pipeline.make_batches

  def stopped_at_read(read, run_dir, cfg):  # SIGINT during that batch read: the stage saves and stops
    run_dir.mkdir()
    with monkeypatch.context() as m:
      m.setattr(pipeline, "make_batches", lambda *a, **k: SignalOnRead(make_batches_(*a, **k), read=read))
      with pytest.raises(stopping.Stopped):
        run_sft(model(), tok, pairs, cfg, pipe, str(run_dir))

  run2 = tmp_path / "run2"
  cfg4 = SFTConfig(steps=4, max_target_tokens=40)
  stopped_at_read(3, run2, cfg4)
  with pytest.raises(ValueError, match=r"was run with other settings: sft.learning_rate: 2e-05 → 0.001"):
    run_sft(model(), tok, pairs, SFTConfig(steps=4, learning_rate=1e-3, max_target_tokens=40), pipe, str(run2))
  with pytest.raises(ValueError, match=r"sft.steps=1 < the 2 steps done"):
    run_sft(model(), tok, pairs, SFTConfig(steps=1, max_target_tokens=40), pipe, str(run2))
  # One interrupted by an earlier version (no sft_config.json) ran optax.adamw(lr): no clipping,
  # weight decay 1e-4 — resuming it with today's defaults is refused naming them (it was Orbax's
  # "tree structures do not match").
  (run2 / "sft_config.json").rename(run2 / "kept.json")
  with pytest.raises(ValueError, match=r"sft.max_grad_norm: 0.0 → 1.0, sft.weight_decay: 0.0001 → 0.0"):
    run_sft(model(), tok, pairs, cfg4, pipe, str(run2))
  (run2 / "kept.json").rename(run2 / "sft_config.json")
  run_sft(model(), tok, pairs, cfg4, pipe, str(run2))  # the same settings resume it
  assert (run2 / "sft").is_dir()
  # Stopped before its first step (a step-0 checkpoint, nothing trained): other settings start afresh.
  run3 = tmp_path / "run3"
  stopped_at_read(1, run3, cfg4)
  said = []
  run_sft(model(), tok, pairs, SFTConfig(steps=2, learning_rate=1e-3, max_target_tokens=40), pipe, str(run3),
          say=said.append)
  assert "nothing trained yet" in said[0] and (run3 / "sft").is_dir()
