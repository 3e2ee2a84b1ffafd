"""A tiny Qwen-style tokenizer, built locally (no hub) for tests, the demo and notebooks.

`build_tiny_tokenizer(out_dir)` trains a byte-level BPE on a small embedded corpus of
preference-judging text, appends Qwen2.5-VL's special tokens in Qwen's order, and saves it with a
Qwen2-VL chat template, so `AutoTokenizer.from_pretrained(out_dir)` loads it exactly as it loads a
real Qwen2.5-VL checkpoint's tokenizer — the code path a user's checkpoint takes.
`tiny_model_config(out_dir)` gives a matching tiny model config (vocab and special ids).
"""

from __future__ import annotations

import json
import os

# Qwen2.5-VL's added tokens, in id order (151643 ... 151656 in the real vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's chat template: a system turn by default; string or list content; each image item
# becomes <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad later).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = """
You are given a text-to-image prompt and two generated images. Decide which image better matches the
prompt and is of higher quality. Think first, then answer in the format
<think> your reasoning </think><answer>Image 1</answer> or <think> your reasoning </think><answer>Image 2</answer>.
Prompt: a red circle on a blue background. Prompt: a green square next to a yellow triangle.
Image 1 shows a red circle on a blue background, which matches the prompt. Image 2 shows a green
square, which does not match. The colours, the shape, the composition, the lighting and the detail
of the first image are better. The second image is blurry and the objects are distorted.
Which image is better? The better image is Image 1. The better image is Image 2.
a painting of an ocean with clouds and birds, day time, low depth field effect
ultra detailed, cinematic shot, photorealistic, octane render, high definition, fine details
"""


def build_tiny_tokenizer(out_dir, vocab_size: int = 480) -> str:
  """Trains and saves the tiny tokenizer; returns `out_dir`. Deterministic for a given vocab_size."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  out_dir = os.fspath(out_dir)
  tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[])
  tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      model_max_length=32768, clean_up_tokenization_spaces=False)
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return out_dir


def tiny_model_config(tokenizer_dir, **text_overrides) -> dict:
  """A tiny Qwen2.5-VL config (HF layout) whose vocabulary and special ids match the tokenizer."""
  from transformers import AutoTokenizer

  from lgrpo_jax.models.qwen2_5_vl.presets import TINY

  tok = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
  ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
  cfg = json.loads(json.dumps(TINY))
  cfg["text_config"].update(vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                            **text_overrides)
  cfg.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
             vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
  return cfg
