"""Reasoner and listener prompts from the chat template, with image pads expanded per grid."""

import numpy as np
import pytest
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data.prompts import (PromptConfig, choice_tokens, expand_image_pads, listener_parts,
                                    reasoner_ids)
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config

GRIDS = [(1, 8, 12), (1, 6, 6)]  # 24 and 9 merged tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def runs_of(ids, token):
  """Lengths of the consecutive runs of `token` in ids."""
  out, n = [], 0
  for t in list(ids) + [None]:
    if t == token:
      n += 1
    elif n:
      out, n = out + [n], 0
  return out


def test_reasoner_prompt_layout(tok):
  ids = reasoner_ids(tok, "a red circle", GRIDS)
  pad, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
  assert runs_of(ids, pad) == [24, 9]
  text = tok.decode(ids)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nImage 1:<|vision_start|>")
  assert "Text-to-image prompt: a red circle\n" in text
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert list(ids).count(vs) == list(ids).count(ve) == 2


def test_listener_parts_end_at_the_choice(tok):
  prefix, suffix, (c1, c2) = listener_parts(tok, "a red circle", GRIDS)
  assert runs_of(prefix, tok.convert_tokens_to_ids("<|image_pad|>")) == [24, 9]
  assert tok.decode(prefix).endswith("Here is someone's comparison of the two images:\n")
  full = tok.decode(np.concatenate([suffix, [c1]]))
  assert full.endswith("<|im_end|>\n<|im_start|>assistant\nImage 1")
  assert tok.decode(np.concatenate([suffix, [c2]])).endswith("assistant\nImage 2")
  common, ids = choice_tokens(tok)
  assert ids == (c1, c2) and c1 != c2


def test_choices_the_two_choice_tokens_cannot_tell_apart_are_refused(tok):
  """P(choice) is a softmax over the first tokens where the two choices differ: one choice whose
  tokens begin the other's has no such token (it was called "the same ids"), and a differing token
  that also begins the other choice's text would count both (the tiny vocabulary has " 1" but
  spells " B" as " ", "B")."""
  with pytest.raises(ValueError, match=r"prompt.choices \('Image 1', 'Image 12'\): the tokens of one begin"):
    choice_tokens(tok, ("Image 1", "Image 12"))
  with pytest.raises(ValueError, match=r"prompt.choices \('Image 1', 'Image B'\): where they first differ they "
                                       r"tokenise as ' 1' and ' '"):
    choice_tokens(tok, ("Image 1", "Image B"))
  with pytest.raises(ValueError, match="tokenise to the same ids"):
    choice_tokens(tok, ("Image 1", "Image 1"))
  with pytest.raises(ValueError, match="'et' and 'e'"):
    choice_tokens(tok, ("better", "best"))
  common, ids = choice_tokens(tok, ("yes", "no"))  # differing tokens that begin differently: kept
  choice_tokens(tok, ("🐱", "🐶"))  # a byte token each, differing bytes (as text both are "�"): kept
  assert len(common) == 0 and tok.convert_ids_to_tokens(list(ids)) == ["y", "n"]


def test_templates_are_config(tok):
  cfg = PromptConfig(reasoner_instruction="Judge: {prompt}", system="Be brief.")
  text = tok.decode(reasoner_ids(tok, "x", GRIDS, cfg))
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Judge: x" in text


def test_pad_count_mismatch_is_clear():
  with pytest.raises(ValueError, match="text has 1 image placeholders but 2 images were given"):
    expand_image_pads("a<|image_pad|>b", GRIDS, 2)


def test_prompt_runs_through_the_model_with_real_image_processing(tok, tmp_path):
  """The same path as a real checkpoint: tokenizer + processor outputs into the model."""
  from lgrpo_jax.data import process_images
  from lgrpo_jax.data.synthetic import synthetic_pair
  pair = synthetic_pair(0, image_size=112)
  pv, grid = process_images(list(pair.images))
  ids = reasoner_ids(tok, pair.prompt, grid)
  model = lgrpo_jax.from_config(tiny_model_config(build_tiny_tokenizer(tmp_path)))
  logits = lgrpo_jax.forward(model, ids[None], np.ones((1, len(ids)), np.int32), pv, grid)
  assert logits.shape == (1, len(ids), len(tok)) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("system", [None, "You judge generated images."])
def test_reasoner_inputs_equal_transformers_processor(tok, system):
  # What a transformers user would feed the model: Qwen2_5_VLProcessor on the same chat messages
  # (its PIL image processor; the video processor needs torchvision, which is not installed, and is
  # not used). Our token ids, pixel values and grids are equal to its, exactly.
  from PIL import Image
  from transformers import Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from lgrpo_jax.data import process_images
  from lgrpo_jax.data.prompts import user_content

  class Processor(Qwen2_5_VLProcessor):
    def check_argument_for_proper_class(self, name, arg):  # video_processor=None is fine here
      return None

  proc = Processor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok, video_processor=None,
                   chat_template=tok.chat_template)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 160), (223, 90)]]
  pixels, grids = process_images(images)
  cfg = PromptConfig(system=system)
  ours = reasoner_ids(tok, "a red circle", [tuple(g) for g in grids], cfg)
  messages = ([{"role": "system", "content": system}] if system else []) + \
      [{"role": "user", "content": user_content(cfg.reasoner_instruction.format(prompt="a red circle"), cfg)}]
  text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ref = proc(text=[text], images=images, return_tensors="np")
  np.testing.assert_array_equal(ref["input_ids"][0], ours)
  np.testing.assert_array_equal(ref["pixel_values"], pixels)
  np.testing.assert_array_equal(ref["image_grid_thw"], grids)
