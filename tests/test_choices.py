"""`prompt.choices` other than "Image 1"/"Image 2" reach every reader of the answer: the parser (in
the step and the judge), the warm start's targets (scripted and swapped), the listener's and the
evaluator's choice tokens; bad choices are one clear error."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.prompts import PromptConfig
from lgrpo_jax.data.synthetic import synthetic, synthetic_pair
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.evaluation.judge import answer_slot_spec
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.rewards import ByteTable, parse
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import StepConfig, Tables, init_state
from lgrpo_jax.train import step as step_module
from lgrpo_jax.train.sft import SFTConfig, Teacher, _swap_images

CHOICES = ("the left one", "the right one")
PROMPT = PromptConfig(
    reasoner_instruction=("Text-to-image prompt: {prompt}\nThe left image and the right image: which is "
                          "better? Think inside <think> </think>, then answer inside <answer> </answer> "
                          "as exactly \"the left one\" or \"the right one\"."),
    listener_question="\nBased on this comparison, which is better, the left one or the right one?",
    choices=CHOICES, image_labels=("Left:", "Right:"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def parsed(tok, texts, choices):
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  arr = np.zeros((len(ids), max(map(len, ids))), np.int32)
  mask = np.zeros_like(arr)
  for i, x in enumerate(ids):
    arr[i, :len(x)], mask[i, :len(x)] = x, 1
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths), choices)
  p = parse(jnp.asarray(arr)[:, None], jnp.asarray(mask)[:, None], tables.byte_table, tables.byte_lengths,
            tables.choices)
  return np.asarray(p.answer)[:, 0].tolist(), np.asarray(p.format_ok)[:, 0].tolist()


def test_the_parser_reads_the_configured_choices(tok):
  texts = ["<think>x</think><answer>the right one</answer>", "<think>x</think><answer> the left one\n</answer>",
           "<think>x</think><answer>Image 1</answer>", "<think>x</think><answer>the left</answer>"]
  assert parsed(tok, texts, CHOICES) == ([2, 1, 0, 0], [True, True, False, False])
  assert parsed(tok, texts, ("Image 1", "Image 2")) == ([0, 0, 1, 0], [False, False, True, False])


def test_the_warm_start_writes_and_swaps_the_configured_choices(tok, tmp_path):
  pair = synthetic_pair(3, seed=5, n_wrong=3)
  scripted = Teacher(SFTConfig(steps=1), 3, choices=CHOICES)
  host = {"pair_ids": [pair.pair_id] * 2, "labels": np.array([0, 1]), "swapped": np.array([False, True])}
  targets = scripted(host)
  assert [t.rsplit("<answer>", 1)[1] for t in targets] == ["the left one</answer>", "the right one</answer>"]
  assert parsed(tok, targets, CHOICES) == ([1, 2], [True, True])
  # A targets file, written for the pair as stored: position mentions and the answer exchanged.
  text = "<think>Image 1 is sharper; the first image wins.</think><answer> the left one </answer>"
  assert _swap_images(text, CHOICES) == ("<think>Image 2 is sharper; the second image wins.</think>"
                                         "<answer> the right one </answer>")
  assert _swap_images(_swap_images(text, CHOICES), CHOICES) == text
  path = tmp_path / "t.jsonl"
  path.write_text('{"pair_id": "a", "target": "<think>x</think><answer>the right one</answer>"}\n')
  from_file = Teacher(SFTConfig(steps=1, teacher="targets", targets_path=str(path)), choices=CHOICES)
  assert from_file({"pair_ids": ["a"], "labels": np.array([0]), "swapped": np.array([True])}) == [
      "<think>x</think><answer>the left one</answer>"]


def test_the_listener_and_the_answer_slot_score_the_configured_choices(tok):
  for spec, prefix in ((ListenerSpec.from_tokenizer(tok, PROMPT), "assistant\n"),
                       (answer_slot_spec(tok, PROMPT), "<answer>")):
    read = [tok.decode(list(spec.suffix_ids) + [c]) for c in spec.choice_ids]
    tails = [r.rsplit(prefix, 1)[1] for r in read]
    assert tails[0] != tails[1] and CHOICES[0].startswith(tails[0]) and CHOICES[1].startswith(tails[1]), read
  assert "the left one or the right one?" in tok.decode(list(ListenerSpec.from_tokenizer(tok, PROMPT).suffix_ids))


@pytest.mark.parametrize("choices,message", [
    (("the left one",), "two texts are needed"),
    (("the left one", ""), "each must be a non-empty text"),
    (("the left one", "the left one"), "they must differ"),
    (("the left one ", "the right one"), "no leading or trailing whitespace"),
    (("<left>", "the right one"), "no '<' or '>'"),
    (("the left one", "the other one"), "reasoner_instruction does not name 'the other one'"),
    (CHOICES, "listener_question does not name 'the left one'"),  # the default question: Image 1 or 2
])
def test_bad_choices_are_one_clear_error(choices, message):
  with pytest.raises(ValueError, match=message):
    PromptConfig(reasoner_instruction=PROMPT.reasoner_instruction, choices=choices)


def test_the_trainer_and_its_step_parse_the_configured_choices(tok, tmp_path, monkeypatch):
  """The Trainer's tables carry the choices, and the step's parser is given them (traced only)."""
  from lgrpo_jax.train import LoopConfig, Trainer
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=6, num_samples=2, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.0), optim=OptimConfig(learning_rate=1e-3))
  pipe = PipelineConfig(global_batch=2, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256,), prompt=PROMPT)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  pairs = list(synthetic(4, seed=1, image_size=56))
  t = Trainer(str(tmp_path / "run"), model, tok, pairs, cfg, pipe, LoopConfig(steps=1))
  assert t.tables.choices == tuple(c.encode() for c in CHOICES)

  seen = []
  real = step_module.parse
  monkeypatch.setattr(step_module, "parse", lambda *a: seen.append(a[4]) or real(*a))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(cfg.optim, params)
  host = next(make_batches(pairs, tok, pipe))
  from test_train_step import device_batch
  jax.eval_shape(functools.partial(step_module.train_step, graphdef=graphdef, listener_graphdef=graphdef, tx=tx,
                                   cfg=cfg, spec=ListenerSpec.from_tokenizer(tok, PROMPT),
                                   pair_grid=((1, 4, 4), (1, 4, 4))),
                 init_state(params, tx, seed=0), params, params, device_batch(host), t.tables)
  assert seen == [t.tables.choices]
  t.close()


def test_the_model_card_names_the_configured_choices(tmp_path):
  import dataclasses

  from lgrpo_jax.config import ExperimentConfig
  from lgrpo_jax.release import model_card
  cfg = ExperimentConfig()
  cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, prompt=PROMPT))
  card = model_card(cfg, str(tmp_path / "run"), 3, False, None, "bfloat16")
  assert "`<answer>the left one</answer>` (the first image) or `<answer>the right one</answer>`" in card
  assert "`the left one` or `the right one`" in card and "Image 1" not in card
