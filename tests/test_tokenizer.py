"""The tiny tokenizer is built locally, loads like a real Qwen2.5-VL tokenizer, applies the Qwen2-VL
chat template, and gives single-token choices for "Image 1" / "Image 2"."""

import pytest
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, tiny_model_config


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_loads_with_transformers_and_special_tokens_are_single_ids(tok_dir):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
  assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # appended in Qwen's order
  assert len(tok) == ids[-1] + 1
  text = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hello"
  enc = tok(text)["input_ids"]
  assert enc[:4] == [tok.convert_tokens_to_ids(t) for t in
                     ("<|vision_start|>", "<|image_pad|>", "<|image_pad|>", "<|vision_end|>")]
  assert tok.decode(enc) == text
  assert tok.decode(tok("The better image is Image 2.")["input_ids"]) == "The better image is Image 2."


def test_chat_template_matches_qwen2_vl_layout(tok_dir):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                           {"type": "text", "text": "Which is better?"}]}]
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                  "Which is better?<|im_end|>\n<|im_start|>assistant\n")


def test_image_choice_tokens_differ_in_one_token(tok_dir):
  tok = AutoTokenizer.from_pretrained(tok_dir)
  a, b = tok("<answer>Image 1")["input_ids"], tok("<answer>Image 2")["input_ids"]
  assert len(a) == len(b)
  diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
  assert len(diff) == 1 and diff[0] == len(a) - 1


def test_tiny_config_matches_tokenizer_and_builds_a_model(tok_dir):
  cfg = tiny_model_config(tok_dir)
  tok = AutoTokenizer.from_pretrained(tok_dir)
  assert cfg["text_config"]["vocab_size"] == len(tok)
  assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
  model = lgrpo_jax.from_config(cfg)
  ids = tok("hello world")["input_ids"]
  assert lgrpo_jax.forward(model, [ids]).shape == (1, len(ids), len(tok))
