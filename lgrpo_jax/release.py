"""Releasing a trained reasoner in Hugging Face format: the weights (`save_hf`), the tokenizer,
processor and LICENSE files of the base checkpoint, a generation config with the run's end tokens and length,
and a model card (README.md) that says how it was trained, how it scored, and how to prompt it.

`python -m lgrpo_jax.convert to-hf RUN_DIR OUT_DIR [--step N | --best] [--base-model ORG/NAME] [--hf-source DIR]
[--dtype …]` calls `export_run`.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from lgrpo_jax.safetensors_io import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json")


def hub_id(path) -> str | None:
  """The Hub repo id of a checkpoint in the Hugging Face cache layout
  (`…/models--ORG--NAME/snapshots/<commit>`), else None: a local folder's name is not a repo id."""
  if not path:
    return None
  parts = os.path.normpath(os.path.abspath(os.fspath(path))).split(os.sep)
  for i, part in enumerate(parts[:-1]):
    if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") >= 2:
      org, name = part[len("models--"):].split("--", 1)
      return f"{org}/{name}"
  return None


def base_license(source) -> list[str]:
  """The `license*` lines of the base model card's front matter (README.md of `source`), to carry
  into ours: a fine-tune keeps its base's licence (e.g. Qwen2.5-VL-3B's `qwen-research`)."""
  path = os.path.join(source, "README.md") if source else None
  if not path or not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  m = re.match(r"---\r?\n(.*?)\r?\n---", text, re.S)
  if not m:
    return []
  out, bare = [], None  # bare: a `license:` key without a value, whose `- item` lines may follow
  for line in m.group(1).splitlines():
    k = re.match(r"(license|license_name|license_link):(.*)", line)
    if k:
      bare = None if k.group(2).strip() else line
      if bare is None:
        out.append(line)
    elif bare is not None and re.match(r"\s*-\s*\S", line):
      if bare:  # the key once, before its first item
        out.append(bare)
        bare = ""
      out.append(line)
    else:
      bare = None
  return out


def _is_hf_dir(path) -> bool:
  from lgrpo_jax import checkpoint
  return bool(path) and os.path.isfile(os.path.join(path, "config.json")) and not checkpoint.is_checkpoint(path)


def export_run(run_dir, out_dir, *, step: int | None = None, best: bool = False, dtype: str = "bfloat16",
               hf_source: str | None = None, max_shard_bytes: int | None = None,
               base_model: str | None = None) -> dict:
  """Writes OUT_DIR from a training run; returns what was written (step, source, evaluation used).
  `base_model`: the base's Hub repo id for the card (default: read from a Hugging Face cache path,
  else left out)."""
  from lgrpo_jax import runs
  from lgrpo_jax.data.prompts import end_of_turn_ids
  from lgrpo_jax.models.qwen2_5_vl import save_hf
  run_dir = os.path.abspath(os.fspath(run_dir))
  cfg = runs.run_config(run_dir)
  model, chosen = runs.policy(run_dir, step, best)
  base = cfg.model.checkpoint
  source = hf_source or (base if _is_hf_dir(base) else None)
  kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
  save_hf(model, out_dir, dtype=dtype, hf_source=source, **kw)
  tok_dir = runs.tokenizer_dir(cfg, run_dir)
  for name in TOKENIZER_FILES:  # the run's tokenizer fills in where the base had none (e.g. the tiny preset)
    src, dst = os.path.join(tok_dir, name), os.path.join(out_dir, name)
    from_base = source is not None and os.path.isfile(os.path.join(source, name))
    if os.path.isfile(src) and not from_base:  # over an earlier export's file, never under it
      shutil.copyfile(src, dst)
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(out_dir)
  write_generation_config(out_dir, cfg, eos_ids=cfg.step.sampling.eos_ids or end_of_turn_ids(tokenizer),
                          pad_id=tokenizer.pad_token_id)
  write_preprocessor_config(out_dir, cfg.pipeline.image)
  evaluation = runs.latest_eval_summary(run_dir)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(model_card(cfg, run_dir, chosen, best, evaluation, dtype, base_model=base_model or hub_id(base),
                       license_lines=base_license(source)))
  return {"step": chosen, "hf_source": source, "evaluation": evaluation[0] if evaluation else None}


def write_generation_config(out_dir, cfg, eos_ids, pad_id) -> None:
  """Greedy decoding (how the reasoner is evaluated) up to the run's completion length, stopping at
  the run's end tokens; keeps other fields a copied base config had."""
  path = os.path.join(out_dir, "generation_config.json")
  gen = read_json(path) if os.path.isfile(path) else {}
  for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
    gen.pop(k, None)  # sampling knobs of the base would contradict do_sample = false
  gen.update({"do_sample": False, "max_new_tokens": cfg.step.sampling.max_new_tokens,
              "eos_token_id": [int(e) for e in eos_ids]})
  if pad_id is not None:
    gen["pad_token_id"] = int(pad_id)
  with open(path, "w") as f:
    json.dump(gen, f, indent=2)


def write_preprocessor_config(out_dir, image_cfg) -> None:
  """preprocessor_config.json with the run's image settings (the resolution it was trained at), so
  that transformers' processor prepares images as training did; a copied base file keeps its
  other fields. Written also where the base had none (the tiny preset), or `AutoProcessor` fails.
  `grid_buckets` (our fixed shapes) have no transformers equivalent: the card says so."""
  path = os.path.join(out_dir, "preprocessor_config.json")
  proc = read_json(path) if os.path.isfile(path) else {
      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
      "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "do_convert_rgb": True}
  c = image_cfg
  proc.update({"min_pixels": c.min_pixels, "max_pixels": c.max_pixels,
               "size": {"shortest_edge": c.min_pixels, "longest_edge": c.max_pixels},
               "patch_size": c.patch_size, "merge_size": c.merge_size, "temporal_patch_size": c.temporal_patch_size,
               "image_mean": list(c.mean), "image_std": list(c.std)})
  with open(path, "w") as f:
    json.dump(proc, f, indent=2)


def _warm_start(cfg, run_dir: str) -> str:
  """The warm start the weights had: RUN_DIR/sft_config.json's when RUN_DIR/sft exists (a resume
  with sft.steps=0 keeps and loads it, while its config.json then says 0), else the config's."""
  from lgrpo_jax.train.sft import read_settings
  steps, teacher = cfg.sft.steps, cfg.sft.teacher
  if os.path.isdir(os.path.join(run_dir, "sft")):
    rec = read_settings(run_dir) or {}
    steps, teacher = rec.get("steps", steps), rec.get("teacher", teacher)
  return f"{steps} steps" + (f", teacher {teacher}" if steps else "")


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(cfg, run_dir: str, step: int, best: bool, evaluation, dtype: str, *,
               base_model: str | None = None, license_lines=()) -> str:
  """README.md for the Hub: front matter, training summary, evaluation, prompt format, usage.
  `base_model`: the base's Hub repo id (front matter and table); `license_lines`: the base card's
  `license*` front-matter lines."""
  from lgrpo_jax.data.prompts import PromptConfig
  m, d, s = cfg.model, cfg.data, cfg.step
  # The table names the base by repo id or folder name: a local path says nothing to readers.
  base = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else
          f"`{os.path.basename(os.path.normpath(m.checkpoint))}` (local)" if m.checkpoint else
          f"random `{m.preset}` preset (lgrpo_jax tests/demo)")
  p: PromptConfig = cfg.pipeline.prompt
  img = cfg.pipeline.image
  lines = ["---", *license_lines, "library_name: transformers", "pipeline_tag: image-text-to-text",
           *([f"base_model: {base_model}"] if base_model else []),
           "tags:", "- lgrpo_jax", "- grpo", "- listener-reward", "- image-preference", "- reward-model", "---", "",
           "# Image-preference reasoner trained with listener-rewarded GRPO", "",
           "Given a text-to-image prompt and two generated images, this Qwen2.5-VL model compares them in "
           f"`<think>…</think>` and answers `<answer>{p.choices[0]}</answer>` (the first image) or "
           f"`<answer>{p.choices[1]}</answer>` (the second). It was "
           "trained with GRPO on rewards for format, accuracy and the confidence of a frozen *listener* that "
           "reads the reasoning with the answer removed (lgrpo_jax).", "",
           f"Exported from `{os.path.basename(run_dir)}` at step {step}" + (" (its best held-out checkpoint)" if best
                                                                            else "") + f", weights in {dtype}.", "",
           "## Training", "", "| | |", "|---|---|",
           f"| base model | {base} |",
           f"| data | {d.source}" + (f" (`{os.path.basename(d.path)}`)" if d.path else "")
           + (f", fraction {d.fraction:g}" if d.fraction < 1 else "") + " |",
           f"| warm start (SFT) | {_warm_start(cfg, run_dir)} |",
           f"| GRPO steps | {step} of {cfg.loop.steps} |",
           f"| pairs per step × completions (G) | {cfg.pipeline.global_batch} × {s.sampling.num_samples} |",
           f"| sampling | temperature {s.sampling.temperature:g}, at most {s.sampling.max_new_tokens} new tokens |",
           f"| objective | {s.loss.objective} surrogate ({s.loss.importance_sampling_level}-level ratio), "
           f"ε = ({s.loss.eps_low:g}, {s.loss.eps_high:g}), β = {s.loss.beta:g} ({s.loss.kl}) |",
           f"| loss aggregation, advantages | {s.loss.loss}, {s.loss.advantage} |",
           f"| learning rate | {s.optim.learning_rate:g} |",
           f"| rewards | {', '.join(f'{w:g}·{n}' for n, w in s.rewards.weights)} |",
           f"| listener | {m.listener or 'the initial policy (frozen)'} |", ""]
  if img.grid_buckets is not None:
    shapes = ", ".join(f"{h}×{w}" for h, w in img.grid_buckets)
    how = "stretched" if img.fit == "stretch" else "scaled and padded with white"
    lines += [f"**Image sizes differ from transformers' processor.** In training every image was {how} to "
              f"the fixed size (height × width, pixels) nearest its aspect ratio: {shapes}. transformers' "
              "processor keeps each image's own aspect ratio instead, so it gives other pixel values and "
              "another number of image tokens than training did. To give the model what it was trained "
              "on, resize images to the nearest of those sizes before the processor.", ""]
  lines += ["## Evaluation", ""]
  if evaluation is None:
    lines += ["No evaluation was run on this checkpoint's run. Run "
              "`python -m lgrpo_jax.evaluate --checkpoint RUN_DIR --data imagereward:test.json --images ROOT`.", ""]
  else:
    path, summ = evaluation
    mt = summ["metrics"]
    evaluated = summ.get("checkpoint", {}).get("step")
    lines += [f"`{summ['settings']['data']}` ({mt['counts']['untied_comparisons']} labelled comparisons, ties left out, "
              f"each judged in both image orders; evaluated {summ.get('date', '')[:10]}"
              + (f", checkpoint step {evaluated}" if evaluated is not None else "") + "):", "",
              "| metric | value |", "|---|---|",
              f"| accuracy (mean of both orders) | {_fmt(mt['accuracy'])} |",
              f"| accuracy, images as given / swapped | {_fmt(mt['accuracy_as_given'])} / "
              f"{_fmt(mt['accuracy_swapped'])} |",
              f"| accuracy, order-debiased probabilities | {_fmt(mt['accuracy_debiased'])} |",
              f"| format rate | {_fmt(mt['format_rate'])} |"]
    if "imagereward_protocol" in mt:
      lines.append(f"| ImageReward-protocol accuracy | {_fmt(mt['imagereward_protocol']['accuracy'])} |")
    if "listener" in mt:
      lis = mt["listener"]
      lines += [f"| reasoning-contradiction rate | {_fmt(lis['contradiction_rate'])} |",
                f"| accuracy when the listener agrees / contradicts | {_fmt(lis['accuracy_when_agree'])} / "
                f"{_fmt(lis['accuracy_when_contradict'])} |"]
    if evaluated is not None and evaluated != step:
      lines += ["", f"Note: these numbers are for step {evaluated}; this export is step {step}."]
    lines += ["", f"(from `{os.path.relpath(path, run_dir)}` in the run directory)", ""]
  example = p.reasoner_instruction.format(prompt="a red fox in the snow, watercolor")
  lines += ["## Prompt format", "",
            f"One user turn: `{p.image_labels[0]}`, the first image, `{p.image_labels[1]}`, the second image, then:",
            "", "```", p.reasoner_instruction, "```", "",
            "with `{prompt}` the text-to-image prompt"
            + (f", after the system turn `{p.system}`" if p.system is not None else
               " (the chat template's default system turn)") + ". The answer is the text inside "
            f"`<answer>…</answer>`: `{p.choices[0]}` or `{p.choices[1]}`. Score both image orders and average to "
            "remove position bias.", "",
            "## Usage with transformers", "", "```python", "import torch",
            "from PIL import Image",
            "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration", "",
            "path = \"path/to/this/directory\"",
            "model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)",
            "processor = AutoProcessor.from_pretrained(path)",
            "images = [Image.open(\"a.png\"), Image.open(\"b.png\")]",
            *([f"messages = [{{\"role\": \"system\", \"content\": {json.dumps(p.system)}}},"] if p.system is not None
              else ["messages = ["]),
            "    {\"role\": \"user\", \"content\": [",
            f"    {{\"type\": \"text\", \"text\": {json.dumps(p.image_labels[0])}}}, {{\"type\": \"image\"}},",
            f"    {{\"type\": \"text\", \"text\": {json.dumps(p.image_labels[1])}}}, {{\"type\": \"image\"}},",
            f"    {{\"type\": \"text\", \"text\": {json.dumps(example)}}}]}}]",
            "text = processor.apply_chat_template(messages, add_generation_prompt=True)",
            "inputs = processor(text=[text], images=images, return_tensors=\"pt\")",
            "out = model.generate(**inputs)  # greedy, up to the trained length (generation_config.json)",
            "answer = processor.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)",
            f"print(answer)  # <think>…</think><answer>{p.choices[0]}</answer>", "```", "",
            "Trained and exported with lgrpo_jax (listener-rewarded GRPO in JAX/Flax); the evaluation "
            "numbers above come from `python -m lgrpo_jax.evaluate`.", ""]
  return "\n".join(lines)
