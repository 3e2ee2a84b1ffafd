"""Reasoner and listener prompts, built with the tokenizer's chat template; wording lives in config.

The reasoner sees one user turn: "Image 1:" <image> "Image 2:" <image> and the instruction with the
text-to-image prompt; it answers `<think>…</think><answer>Image 1|Image 2</answer>`. The listener
prefix is the same images and prompt with the listener's instruction; its suffix (after the
reasoner's chain of thought, answer removed) is `listener_question`, whose next token is the choice.
The paper's exact wording is not public (arXiv 2506.22832 gives none); these defaults are ours, and every string
is a config field.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

IMAGE_PAD = "<|image_pad|>"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  # the reasoner's user text after the two images; {prompt} is the text-to-image prompt
  reasoner_instruction: str = (
      "Text-to-image prompt: {prompt}\n"
      "Which image matches the prompt better and has higher quality? Compare them step by step "
      "inside <think> </think>, then give the final answer inside <answer> </answer> as exactly "
      "\"Image 1\" or \"Image 2\".")
  # the listener's user text before the reasoning it judges
  listener_instruction: str = (
      "Text-to-image prompt: {prompt}\n"
      "Here is someone's comparison of the two images:\n")
  # after the reasoning: the question whose next token is the listener's choice
  listener_question: str = "\nBased on this comparison, which image is better, Image 1 or Image 2?"
  # the two answers, for the first and the second image shown: what the parser accepts inside
  # <answer></answer> (format and accuracy rewards), what the warm start's targets answer, and, at the
  # first tokens where they differ, what the listener and the evaluator's answer slot score.
  # Other texts than these must be named in reasoner_instruction and listener_question (change them together).
  choices: tuple[str, str] = ("Image 1", "Image 2")
  image_labels: tuple[str, str] = ("Image 1:", "Image 2:")  # text before each image
  system: str | None = None  # None: the chat template's default system turn

  def __post_init__(self):
    object.__setattr__(self, "choices", tuple(self.choices))
    for name in ("reasoner_instruction", "listener_instruction"):  # {prompt} is the only placeholder
      try:
        getattr(self, name).format(prompt="")
      except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"prompt.{name}: {{prompt}} is its only placeholder (a literal brace is written "
                         f"{{{{ or }}}}); formatting it failed: {type(e).__name__}: {e}") from None
    c = self.choices
    bad = (len(c) != 2 and "two texts are needed"
           or not all(isinstance(x, str) and x for x in c) and "each must be a non-empty text"
           or c[0] == c[1] and "they must differ"
           or any(x != x.strip() for x in c) and "no leading or trailing whitespace (the parser strips it)"
           or any(ch in x for x in c for ch in "<>") and "no '<' or '>' (the answer's tags are parsed)")
    if bad:
      raise ValueError(f"prompt.choices={c!r}: {bad}")
    # Other answers than the defaults with an instruction that does not name them: most likely the
    # default instruction kept, which asks for "Image 1"/"Image 2" — every completion would fail the format.
    if c != ("Image 1", "Image 2"):
      for name, why in (("reasoner_instruction", "the reasoner would not know which answers the format reward accepts"),
                        ("listener_question", "the listener would be asked for answers other than those it is scored on")):
        missing = [x for x in c if x not in getattr(self, name)]
        if missing:
          raise ValueError(f"prompt.choices={c!r}: prompt.{name} does not name {missing[0]!r}; {why} (set them together)")


def user_content(prompt_text: str, cfg: PromptConfig) -> list[dict]:
  return [{"type": "text", "text": cfg.image_labels[0]}, {"type": "image"},
          {"type": "text", "text": cfg.image_labels[1]}, {"type": "image"},
          {"type": "text", "text": prompt_text}]


def _chat(tokenizer, content, cfg: PromptConfig, generation_prompt: bool) -> str:
  messages = ([{"role": "system", "content": cfg.system}] if cfg.system is not None else []) + \
      [{"role": "user", "content": content}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def expand_image_pads(text: str, grids, merge_size: int) -> str:
  """Each `<|image_pad|>`, in order, becomes t·h·w/merge² pads (what the Qwen2.5-VL processor does)."""
  parts = text.split(IMAGE_PAD)
  if len(parts) - 1 != len(grids):
    raise ValueError(f"text has {len(parts) - 1} image placeholders but {len(grids)} images were given")
  out = [parts[0]]
  for (t, h, w), rest in zip(grids, parts[1:]):
    out.append(IMAGE_PAD * (int(t) * int(h) * int(w) // merge_size**2) + rest)
  return "".join(out)


def reasoner_ids(tokenizer, prompt: str, grids, cfg: PromptConfig = PromptConfig(),
                 merge_size: int = 2) -> np.ndarray:
  """Token ids of the reasoner's prompt (ending with the assistant turn header), pads expanded."""
  text = _chat(tokenizer, user_content(cfg.reasoner_instruction.format(prompt=prompt), cfg), cfg, True)
  return np.asarray(tokenizer(expand_image_pads(text, grids, merge_size))["input_ids"], np.int32)


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
  """The ids that end a completion by default: the tokenizer's EOS and `<|im_end|>`."""
  ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
  return tuple(sorted(ends))


def choice_tokens(tokenizer, choices=("Image 1", "Image 2")) -> tuple[np.ndarray, tuple[int, int]]:
  """(ids of the common prefix of the two answers, (choice id 1, choice id 2)): tokenise both and
  take the first token where they differ, which must also be where each of them continues alone."""
  a, b = (tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices)
  k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
  if k is None:
    raise ValueError(f"prompt.choices {choices} tokenise to the same ids" if a == b else
                     f"prompt.choices {choices}: the tokens of one begin the other's ({len(a)} and {len(b)} "
                     "tokens), so no token tells them apart; choose two that differ in a token (e.g. 'Image 1', "
                     "'Image 2')")
  # P(choice) is read from these two tokens alone: neither may also begin the other choice's text, or
  # its probability would count the other choice too (" " against " 1" in "Image B"/"Image 1").
  from lgrpo_jax.rewards.text import _byte_decoder, _piece_bytes  # bytes: a token may hold part of a character
  decoder = _byte_decoder()
  as_bytes = lambda ids: b"".join(_piece_bytes(tokenizer, p, decoder) for p in tokenizer.convert_ids_to_tokens(ids))
  if as_bytes(b[k:]).startswith(as_bytes([a[k]])) or as_bytes(a[k:]).startswith(as_bytes([b[k]])):
    first = [tokenizer.decode([t]) for t in (a[k], b[k])]
    rest = [tokenizer.decode(t[k:]) for t in (a, b)]
    raise ValueError(f"prompt.choices {choices}: where they first differ they tokenise as {first[0]!r} and "
                     f"{first[1]!r}, and one of these also begins the other ({rest[0]!r}, {rest[1]!r}), so "
                     "its probability would count both; choose choices whose differing tokens begin differently "
                     "(e.g. 'Image 1', 'Image 2')")
  return np.asarray(a[:k], np.int32), (int(a[k]), int(b[k]))


def listener_parts(tokenizer, prompt: str, grids, cfg: PromptConfig = PromptConfig(),
                   merge_size: int = 2) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """(prefix ids, suffix ids, choice ids). The listener reads prefix + the reasoner's chain of
  thought (answer removed) + suffix; its next-token logits at the end, restricted to the two choice
  ids, give P(Image 1), P(Image 2). The prefix ends inside the user turn where the reasoning goes;
  the suffix asks the question, opens the assistant turn and writes the answers' common prefix."""
  marker = cfg.listener_instruction.format(prompt=prompt)
  text = _chat(tokenizer, user_content(marker, cfg), cfg, True)
  cut = text.index(marker) + len(marker)
  prefix = tokenizer(expand_image_pads(text[:cut], grids, merge_size))["input_ids"]
  common, choice_ids = choice_tokens(tokenizer, cfg.choices)
  suffix = tokenizer(cfg.listener_question + text[cut:], add_special_tokens=False)["input_ids"]
  return (np.asarray(prefix, np.int32), np.concatenate([np.asarray(suffix, np.int32), common]),
          choice_ids)


class TokenizerError(ValueError):
  """A tokenizer directory that cannot give the prompts (names the setting and the path)."""


def load_tokenizer(path, setting: str, hint: str = ""):
  """The local tokenizer at `path`, checked for what the prompts need: a chat template and the
  `<|image_pad|>` token. transformers builds an empty tokenizer from a weights-only directory
  without a word; here that is a `TokenizerError` naming `setting` (e.g. "model.tokenizer"), then
  `hint` (what to do)."""
  from transformers import AutoTokenizer
  where = f"{setting}={os.fspath(path)!r}"
  if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in (
      "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
    raise TokenizerError(f"{where}: no tokenizer files there (tokenizer.json, tokenizer_config.json){hint}")
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except Exception as e:  # noqa: BLE001 — transformers/tokenizers raise many kinds for damaged files
    raise TokenizerError(f"{where}: cannot load a tokenizer ({type(e).__name__}: {e}){hint}") from None
  missing = [] if getattr(tokenizer, "chat_template", None) else ["no chat template"]
  pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
  if pad is None or pad == tokenizer.unk_token_id:
    missing.append(f"no {IMAGE_PAD} token")
  if missing:
    raise TokenizerError(f"{where}: the tokenizer there has {' and '.join(missing)} (a weights-only "
                         f"directory?){hint}")
  # The chat template renders a prompt with two images (a broken or another model's template failed
  # at the first batch, naming no directory)
  try:
    text = _chat(tokenizer, user_content("x", PromptConfig()), PromptConfig(), True)
  except Exception as e:  # noqa: BLE001 — jinja2's and the template's own (raise_exception) errors
    raise TokenizerError(f"{where}: its chat template does not render a prompt ({type(e).__name__}: {e}){hint}") from None
  if text.count(IMAGE_PAD) != 2:
    raise TokenizerError(f"{where}: its chat template writes {text.count(IMAGE_PAD)} {IMAGE_PAD} for a message "
                         f"with 2 images (Qwen2.5-VL's writes one per image){hint}")
  return tokenizer


# The model config's token ids that the prompts' tokens must be (the vision tower's output goes
# where the ids say `image_token_id`; 3-D positions start at `vision_start_token_id`).
_MODEL_TOKENS = (("image_token_id", IMAGE_PAD), ("vision_start_token_id", "<|vision_start|>"),
                 ("vision_end_token_id", "<|vision_end|>"))


def check_tokenizer_fits(tokenizer, model_config, what: str = "the model") -> None:
  """A `TokenizerError` unless `tokenizer` writes the ids `model_config` reads: `<|image_pad|>`,
  `<|vision_start|>`, `<|vision_end|>` as its `image_token_id`, … and no id past its vocabulary.
  A mismatch is otherwise silent: the images go where no prompt token is (the model never sees
  them) and ordinary text tokens are overwritten; an id past the embedding table is clamped by XLA."""
  wrong = []
  for field, token in _MODEL_TOKENS:
    want, got = getattr(model_config, field), tokenizer.convert_tokens_to_ids(token)
    if got != want:
      wrong.append(f"{token} is {got} in the tokenizer, {field}={want} in {what}'s config")
  size, vocab = len(tokenizer), model_config.text.vocab_size
  if size > vocab:
    wrong.append(f"the tokenizer has {size} tokens, {what}'s vocab_size is {vocab}")
  if wrong:
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    raise TokenizerError(f"{name}: the tokenizer does not belong to {what}: " + "; ".join(wrong)
                         + " (give the tokenizer saved with the checkpoint: model.tokenizer / --tokenizer)")
