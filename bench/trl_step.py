"""One GRPO step of TRL's `GRPOTrainer` on the shared 74M benchmark model, per phase (the PyTorch peer).

  HF_HUB_OFFLINE=1 .venv/bin/python bench/trl_step.py [--pairs 4] [--samples 8] [--new-tokens 128]
      [--text-tokens 128] [--image 448] [--warmup 1] [--steps 1] [--batch-size B·G]
      [--no-gradient-checkpointing] [--out FILE]
  quick check: ... --pairs 2 --samples 2 --new-tokens 8 --image 56 --text-tokens 16 --warmup 0

Needs the `bench` extra (trl==1.16.0; torch stays 2.13.0+cpu, no torchvision). The same step as
bench/step.py's: B pairs, each a prompt with two --image² images (256 image tokens each at 448²) and
--text-tokens of text — the ids of step.py's `pair_inputs`, checked — G completions of exactly N tokens
(`generation_kwargs={"min_new_tokens": N}`: EOS is masked until N tokens, so no row stops early),
temperature 1, β = 0.04 (a reference model; k3 KL without TRL's default bias correction, as ours), one optimisation pass (num_iterations=1), loss "grpo",
AdamW at 1e-6, fp32, seed 0. One optimizer step takes all B·G completions: per_device_train_batch_size
= --batch-size (default B·G, so gradient_accumulation_steps = 1 and generation_batch_size = B·G, divisible
by G as TRL requires; a smaller --batch-size accumulates B·G/--batch-size micro-batches, TRL still
generates the B·G completions in one `generate`). With TRL's default gradient checkpointing the
full-size step peaks near 10 GiB; without it, 8 completions alone peak at 12 GiB (32 would not fit 24).
TRL's own data path does everything: the chat template, the processor (`Qwen2VLImageProcessorPil`),
`generate`, the per-token log-probs, the rewards, the advantages, the loss, backward and the optimizer
(TRL's defaults otherwise, gradient checkpointing on). Nothing of TRL is subclassed; two local stand-ins
only, since there is no hub and no torchvision:
  - the tokenizer: a WordLevel vocabulary "w0".."w31992" plus Qwen's special tokens at exactly the
    config's ids (<|endoftext|> 31993 = pad, <|im_start|> 31994, <|im_end|> 31995 = EOS, <|vision_start|>
    31996, <|vision_end|> 31997, <|image_pad|> 31998, <|video_pad|> 31999); its chat template writes the
    message contents only (no role headers), so a prompt is exactly `pair_inputs`' row;
  - the processor: `Qwen2_5_VLProcessor` without its video processor (transformers' video processors
    import torchvision) — `__init__` only; every method is transformers' own.
The listener reward is a `reward_funcs` callable running a second frozen copy of the model (no grad) on
[prompt + completion + a 24-token question] for every completion — G copies of each prompt and its two
images, as a PyTorch user writes it — and returning P(choice A) (softmax over the two choice tokens'
logits at the last position); a format reward (cheap, token arithmetic) is the second reward function.

Timing: wrappers around the trainer's methods, exclusive time (a nested phase is not counted twice):
  data        the dataloader batch (`get_batch_samples`: the dataset's PNG images decoded)
  processing  the processor: chat template, tokenizer, image preprocessing (`_tokenize_prompts`, every
              processor call, and the listener's image preprocessing)
  generate    `_generate_single_turn` (`model.generate` of B·G rows, each its own prompt copy)
  old logps   `_get_per_token_logps_and_entropies` of the policy without grad (only when TRL needs it:
              not with num_iterations=1 and no accumulation mismatch, so normally 0)
  ref logps   the same on the reference model
  listener    the listener reward function (model part), `format` the format reward
  loss fwd    `compute_loss` (the policy's log-probs with grad, the loss)
  backward    `accelerator.backward`
  optimizer   gradient clipping + `optimizer.step`
  other       the rest of the step (padding, advantages, metrics, TRL bookkeeping)
A step runs from its `get_batch_samples` to `on_step_end`; --warmup steps first (not reported), then the
median of --steps. A 2048³ fp32 torch matmul is timed before and after. Prints a table, writes --out JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import DEFAULT_CONFIG, median_time  # noqa: E402
from step import pair_inputs  # noqa: E402

PHASES = ("data", "processing", "generate", "old logps", "ref logps", "listener", "format", "loss fwd",
          "backward", "optimizer", "other")

# Qwen's special tokens at the benchmark config's ids.
SPECIAL = {"<|endoftext|>": 31993, "<|im_start|>": 31994, "<|im_end|>": 31995, "<|vision_start|>": 31996,
           "<|vision_end|>": 31997, "<|image_pad|>": 31998, "<|video_pad|>": 31999}
# Contents only, in order; text and image parts (the processor expands the image pad to 256 tokens).
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
                 "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% elif part['text'] %}{{ part['text'] }}{% endif %}"
                 "{% endfor %}{% endif %}{% endfor %}")


def build_processor(cfg: dict, image_px: int):
  """A Qwen2.5-VL processor from local parts: WordLevel tokenizer with the config's special ids, PIL image
  processor that keeps a image_px² image as is (grid image_px/14 squared)."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.processing_utils import ProcessorMixin

  assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"], cfg["image_token_id"], cfg["video_token_id"],
          cfg["text_config"]["eos_token_id"], cfg["text_config"]["pad_token_id"]) == tuple(
              SPECIAL[t] for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                   "<|im_end|>", "<|endoftext|>")), "config special ids differ from SPECIAL"
  vocab = {f"w{i}": i for i in range(min(SPECIAL.values()))} | SPECIAL
  assert len(vocab) == cfg["text_config"]["vocab_size"]
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token="w0", padding_side="left", model_max_length=32768)
  tokenizer.chat_template = CHAT_TEMPLATE

  class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor less the video processor (which needs torchvision); `__init__` only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
      self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
      self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
      ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

  v = cfg["vision_config"]
  assert image_px % (v["patch_size"] * v["spatial_merge_size"]) == 0, "--image must be a multiple of 28"
  images = Qwen2VLImageProcessorPil(min_pixels=image_px * image_px, max_pixels=image_px * image_px,
                                    patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                    temporal_patch_size=v["temporal_patch_size"])
  return ImageOnlyQwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def make_dataset(cfg: dict, processor, pairs: int, text_tokens: int, image_px: int):
  """The B pairs as a conversational VLM dataset (prompt with two image placeholders, `images`, `pair`),
  and each pair's prompt ids (list) — those of step.py's pair_inputs."""
  from datasets import Dataset
  from PIL import Image

  ids, _, _ = pair_inputs(cfg, pairs, text_tokens, image_px)
  third = text_tokens // 3
  rng = np.random.default_rng(2)
  prompts, images = [], []
  for row in ids:
    text = [int(t) for t in row if t not in (cfg["vision_start_token_id"], cfg["image_token_id"],
                                             cfg["vision_end_token_id"])]
    words = lambda ts: " ".join(processor.tokenizer.convert_ids_to_tokens(ts))
    prompts.append([{"role": "user", "content": [
        {"type": "text", "text": words(text[:third])}, {"type": "image"},
        {"type": "text", "text": " " + words(text[third:2 * third]) + " "}, {"type": "image"},
        {"type": "text", "text": " " + words(text[2 * third:])}]}])
    images.append([Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8))
                   for _ in range(2)])
  # The trainer's tokenisation must give exactly pair_inputs' ids (same token counts as ours).
  from trl.data_utils import prepare_multimodal_messages
  for i, (p, im) in enumerate(zip(prompts, images)):
    got = processor.apply_chat_template([prepare_multimodal_messages(p, images=im)], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"][0]
    assert list(got) == ids[i].tolist(), f"pair {i}: prompt ids differ from pair_inputs"
  ds = Dataset.from_dict({"prompt": prompts, "images": images, "pair": list(range(pairs))})
  return ds, [r.tolist() for r in ids]


class PhaseTimer:
  """Exclusive wall time per phase: entering a phase pauses the enclosing one."""

  def __init__(self):
    self.acc: dict[str, float] = {}
    self.stack: list[list] = []  # [phase, start]

  @contextlib.contextmanager
  def phase(self, name: str):
    now = time.perf_counter()
    if self.stack:
      outer = self.stack[-1]
      self.acc[outer[0]] = self.acc.get(outer[0], 0.0) + now - outer[1]
    self.stack.append([name, now])
    try:
      yield
    finally:
      now = time.perf_counter()
      self.acc[name] = self.acc.get(name, 0.0) + now - self.stack.pop()[1]
      if self.stack:
        self.stack[-1][1] = now

  def wrap(self, fn, name):
    @functools.wraps(fn)
    def inner(*a, **k):
      with self.phase(name(*a, **k) if callable(name) else name):
        return fn(*a, **k)
    return inner


def matmul_rate(n: int = 2048) -> float:
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  return 2 * n**3 / median_time(lambda: a @ b, 5, 2)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--text-tokens", type=int, default=128)
  ap.add_argument("--image", type=int, default=448)
  ap.add_argument("--steps", type=int, default=1, help="timed steps (median per phase)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  ap.add_argument("--beta", type=float, default=0.04)
  ap.add_argument("--suffix", type=int, default=24, help="listener question tokens")
  ap.add_argument("--batch-size", type=int, default=None,
                  help="per_device_train_batch_size (default pairs·samples: no gradient accumulation)")
  ap.add_argument("--no-gradient-checkpointing", action="store_true", help="TRL's default is on")
  ap.add_argument("--out", default=None, help="write the results as JSON")
  args = ap.parse_args()

  import torch
  import transformers
  import trl
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  with open(args.config) as f:
    raw = json.load(f)
  cfg = {k: v for k, v in raw.items() if k != "model_type"}
  b, g, n = args.pairs, args.samples, args.new_tokens
  per_device = args.batch_size or b * g
  if (b * g) % per_device:
    sys.exit(f"--batch-size {per_device} must divide pairs·samples = {b * g}")
  accum = b * g // per_device
  tmp = tempfile.mkdtemp(prefix="bench_trl_step_")
  model_dir = os.path.join(tmp, "model")

  torch.manual_seed(0)
  Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).save_pretrained(model_dir)
  processor = build_processor(raw, args.image)
  dataset, prompt_ids = make_dataset(raw, processor, b, args.text_tokens, args.image)
  prompt_len = len(prompt_ids[0])

  # The listener: a second frozen copy of the same weights.
  listener = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
  listener.requires_grad_(False)
  rng = np.random.default_rng(1)
  question = [int(t) for t in rng.integers(0, 1000, args.suffix)]
  choices = (11, 12)
  timer = PhaseTimer()
  lengths: list[int] = []  # this step's completion lengths (the listener sees them all)
  pad_id, image_id = raw["text_config"]["pad_token_id"], raw["image_token_id"]

  def listener_reward(prompts, completions, completion_ids, pair, images, **_):
    """P(choice A) from the frozen listener on [prompt + completion + question] for every completion."""
    lengths.extend(len(c) for c in completion_ids)
    rows = [prompt_ids[p] + list(c) + question for p, c in zip(pair, completion_ids)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding: the last position is every row's last token
      ids[i, width - len(r):] = torch.tensor(r)
      mask[i, width - len(r):] = 1
    with timer.phase("processing"):
      pix = processor.image_processor(images=[im for ims in images for im in ims], return_tensors="pt")
    with torch.no_grad():
      out = listener(input_ids=ids, attention_mask=mask, pixel_values=pix["pixel_values"],
                     image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(ids == image_id).long(),
                     logits_to_keep=1)
    logits = out.logits[:, -1, list(choices)]
    return torch.softmax(logits, dim=-1)[:, 0].tolist()

  def format_reward(completion_ids, **_):
    """A cheap stand-in for a format check: the share of even token ids."""
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]

  config = GRPOConfig(
      output_dir=os.path.join(tmp, "out"), use_cpu=True, bf16=False, fp16=False, seed=0,
      per_device_train_batch_size=per_device, gradient_accumulation_steps=accum, num_generations=g,
      num_iterations=1, max_completion_length=n, temperature=1.0, top_p=1.0, top_k=0, beta=args.beta,
      use_bias_correction_kl=False,  # ours' default (TRL 1.16 defaults to True): the same objective
      loss_type="grpo", learning_rate=1e-6, generation_kwargs={"min_new_tokens": n},
      gradient_checkpointing=not args.no_gradient_checkpointing, max_steps=args.warmup + args.steps,
      logging_steps=10**6, save_strategy="no", report_to="none", dataloader_num_workers=0,
      model_init_kwargs={"dtype": "float32"}, disable_tqdm=True)

  trainer = GRPOTrainer(model=model_dir, reward_funcs=[timer.wrap(listener_reward, "listener"),
                                                       timer.wrap(format_reward, "format")],
                        args=config, train_dataset=dataset, processing_class=processor)
  trainer.reward_func_names = ["listener", "format"]

  # Phase wrappers (instance attributes shadow the class's methods; `self` is bound already).
  t = trainer
  t._tokenize_prompts = timer.wrap(t._tokenize_prompts, "processing")
  t._generate_single_turn = timer.wrap(t._generate_single_turn, "generate")
  t._get_per_token_logps_and_entropies = timer.wrap(
      t._get_per_token_logps_and_entropies,
      lambda model, *a, **k: "loss fwd" if torch.is_grad_enabled() else
      ("ref logps" if model is t.ref_model else "old logps"))
  t.compute_loss = timer.wrap(t.compute_loss, "loss fwd")
  t.accelerator.backward = timer.wrap(t.accelerator.backward, "backward")
  t._clip_grad_norm = timer.wrap(t._clip_grad_norm, "optimizer")
  type(processor).__call__ = timer.wrap(type(processor).__call__, "processing")
  steps: list[dict] = []
  orig_batches = t.get_batch_samples

  def get_batch_samples(*a, **k):
    timer.acc.clear()
    lengths.clear()
    timer.stack[:] = [["other", time.perf_counter()]]
    timer.step_start = time.perf_counter()
    with timer.phase("data"):
      return orig_batches(*a, **k)
  t.get_batch_samples = get_batch_samples

  class Clock(TrainerCallback):
    opt = None

    def on_pre_optimizer_step(self, *_, **__):
      self.opt = timer.phase("optimizer")
      self.opt.__enter__()

    def on_optimizer_step(self, *_, **__):
      self.opt.__exit__(None, None, None)

    def on_step_end(self, *_, **__):
      now = time.perf_counter()
      while timer.stack:  # close "other"
        name, start = timer.stack.pop()
        timer.acc[name] = timer.acc.get(name, 0.0) + now - start
      rec = {p: timer.acc.get(p, 0.0) for p in PHASES}
      rec["step"] = now - timer.step_start
      rec["completion_lengths"] = (min(lengths), max(lengths)) if lengths else None
      steps.append(rec)
      print(f"step {len(steps)}: {rec['step']:.1f} s  (" + ", ".join(
          f"{p} {rec[p]:.1f}" for p in PHASES if rec[p] >= 0.05) + ")", flush=True)

  t.add_callback(Clock())

  rate = matmul_rate()
  t.train()
  rate_after = matmul_rate()

  timed = steps[args.warmup:]
  med = {k: statistics.median(s[k] for s in timed) for k in (*PHASES, "step")}
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  sizes = dict(pairs=b, samples=g, new_tokens=n, text_tokens=args.text_tokens, image=args.image,
               prompt_tokens=prompt_len, listener_suffix=args.suffix, beta=args.beta,
               per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
               steps_per_generation=config.steps_per_generation, generation_batch_size=config.generation_batch_size,
               gradient_checkpointing=config.gradient_checkpointing, loss_type=config.loss_type,
               completion_lengths=timed[-1]["completion_lengths"])
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl "
        f"{trl.__version__}")
  print(f"{b} pairs × {g} completions × {n} tokens (completion lengths min/max {sizes['completion_lengths']}), "
        f"prompt {prompt_len} tokens (two {args.image}² images), listener suffix {args.suffix}, β={args.beta}; "
        f"per_device_train_batch_size {per_device} × gradient_accumulation_steps {accum}, gradient checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}; peak RSS {rss_gib:.1f} GiB")
  print(f"fp32 matmul rate (2048³, torch) before / after: {rate / 1e9:.0f} / {rate_after / 1e9:.0f} GFLOP/s")
  print(f"median of {len(timed)} step(s) after {args.warmup} warm-up\n\n{'phase':12s} {'seconds':>8s} {'share':>6s}")
  for p in (*PHASES, "step"):
    print(f"{p:12s} {med[p]:8.2f} {med[p] / med['step']:6.0%}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(phases={p: med[p] for p in PHASES}, step_s=med["step"], steps=steps, warmup=args.warmup,
                     sizes=sizes, matmul_gflops_before=rate / 1e9, matmul_gflops_after=rate_after / 1e9,
                     peak_rss_gib=rss_gib, torch=torch.__version__, transformers=transformers.__version__,
                     trl=trl.__version__, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     machine=platform.processor() or platform.machine()), f, indent=2)
    print(f"wrote {args.out}")
  shutil.rmtree(tmp, ignore_errors=True)  # the saved model (~300 MB at the default config)


if __name__ == "__main__":
  main()
