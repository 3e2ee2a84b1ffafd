"""Convert between Hugging Face Qwen2.5-VL directories and lgrpo_jax (Orbax) checkpoints.

  python -m lgrpo_jax.convert to-jax HF_DIR OUT_DIR [--dtype float32|bfloat16]
  python -m lgrpo_jax.convert to-hf  RUN_DIR|CKPT_DIR OUT_DIR [--step N | --best] [--hf-source HF_DIR]
                                     [--dtype bfloat16|float32] [--max-shard-size 4GB] [--base-model ORG/NAME]

to-jax reads a local HF directory (Hub or transformers-5 key layout, sharded or not; with both a
model.safetensors and an index, model.safetensors, as transformers) and writes an Orbax checkpoint
plus config.json (keeping generation_config.json's end ids). to-hf writes a directory that
`Qwen2_5_VLForConditionalGeneration.from_pretrained` loads, in bfloat16 unless --dtype float32.

From a training run directory, to-hf takes its latest checkpoint (or --step N, or --best: the best
by held-out accuracy), copies the tokenizer, processor, chat template and LICENSE from the run's
base checkpoint (or --hf-source; the run's tokenizer fills in what is missing), writes
generation_config.json (greedy, the run's completion length and end tokens) and a model card
README.md: the base's Hub id (--base-model, or read from a Hugging Face cache path) and licence,
the training summary, the numbers of the run's latest `lgrpo_jax.evaluate` summary, the prompt
format and a transformers usage snippet. From a checkpoint written by to-jax it writes the weights
and config (--hf-source copies the side files). An OUT_DIR that is a source, a run or holds a
checkpoint is refused before anything is read.
"""

from __future__ import annotations

import argparse
import re
import sys

from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
from lgrpo_jax.safetensors_io import CheckpointError


def parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 4GB, 500MB, 1000000)")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
           "GIB": 2**30}[unit]
  return int(float(m.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lgrpo_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-jax", help="HF directory -> Orbax checkpoint + config.json")
  a.add_argument("hf_dir", help="local HF Qwen2.5-VL directory (config.json + safetensors)")
  a.add_argument("out_dir", help="where to write the Orbax checkpoint")
  a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="parameter dtype of the checkpoint (default float32)")
  b = sub.add_parser("to-hf", help="training run or Orbax checkpoint -> HF directory (+ model card)")
  b.add_argument("ckpt_dir", help="a training run directory, or a checkpoint written by `to-jax`")
  b.add_argument("out_dir", help="where to write the HF directory")
  which = b.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="a run's checkpoint at this step (default: the latest)")
  which.add_argument("--best", action="store_true", help="a run's best checkpoint by held-out accuracy")
  b.add_argument("--hf-source", default=None,
                 help="base HF directory to copy tokenizer/processor/chat-template files from "
                      "(default for a run: its model.checkpoint)")
  b.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                 help="tensor dtype on disk (default bfloat16; float32 keeps fp32 weights exactly)")
  b.add_argument("--base-model", default=None, metavar="ORG/NAME",
                 help="the base model's Hub repo id for the model card (default: read from a Hugging Face "
                      "cache path such as .../models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/..., else left out)")
  b.add_argument("--max-shard-size", type=parse_size, default="4GiB",
                 help="largest safetensors shard before splitting, e.g. 4GB (default 4GiB)")
  return p


def check_out_dir(out_dir, cmd: str, sources) -> None:
  """Refuses, before anything is loaded, an OUT_DIR that is one of the `sources` (writing would
  overwrite the files being converted), that already holds a checkpoint (to-jax) or an Orbax
  checkpoint or run (to-hf, whose config.json would replace theirs), or that cannot be made."""
  import os
  from lgrpo_jax import checkpoint, runs
  runs.check_creatable_dir(out_dir, "OUT_DIR", CheckpointError)
  if not os.path.isdir(out_dir):
    return
  for what, src in sources:
    if src is not None and os.path.isdir(src) and os.path.samefile(out_dir, src):
      raise CheckpointError(f"OUT_DIR {out_dir} is the {what}: writing there would overwrite the files "
                            "being converted; choose another folder")
  if os.path.exists(os.path.join(out_dir, checkpoint.PARAMS)):
    held = "a checkpoint" if cmd == "to-jax" else "an lgrpo_jax checkpoint (params/)"
    raise CheckpointError(f"OUT_DIR {out_dir} already holds {held}; choose another folder")
  if runs.is_run_dir(out_dir):
    raise CheckpointError(f"OUT_DIR {out_dir} is a training run directory; choose another folder")
  up = os.path.dirname(os.path.abspath(out_dir))  # RUN/checkpoints, RUN/checkpoints/N, RUN/best/N
  for parent in (up, os.path.dirname(up)):
    if runs.is_run_dir(parent) and os.path.relpath(out_dir, parent).split(os.sep)[0] in ("checkpoints", "best"):
      raise CheckpointError(f"OUT_DIR {out_dir} is inside the training checkpoints of run {parent}; choose "
                            "another folder")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  # Heavy imports after argument parsing, so --help is instant.
  from lgrpo_jax import checkpoint, distributed, runs
  from lgrpo_jax.models.qwen2_5_vl import load_hf, save_hf
  try:
    distributed.initialize()  # joins a multi-host run when the environment says so
    if args.cmd == "to-jax":
      check_out_dir(args.out_dir, "to-jax", [("HF directory being read", args.hf_dir)])
      model = load_hf(args.hf_dir, dtype=args.dtype)
      out = checkpoint.save_model(model, args.out_dir)
      print(f"wrote Orbax checkpoint {out} ({args.dtype})")
      return 0
    sources = [("checkpoint being exported", args.ckpt_dir), ("--hf-source directory", args.hf_source)]
    if runs.is_run_dir(args.ckpt_dir) and args.hf_source is None:  # the run's base gives the side files
      sources.append(("run's base checkpoint (model.checkpoint)", runs.run_config(args.ckpt_dir).model.checkpoint))
    check_out_dir(args.out_dir, "to-hf", sources)
    if runs.is_run_dir(args.ckpt_dir):
      from lgrpo_jax.release import export_run
      got = export_run(args.ckpt_dir, args.out_dir, step=args.step, best=args.best, dtype=args.dtype,
                       hf_source=args.hf_source, max_shard_bytes=args.max_shard_size,
                       base_model=args.base_model)
      print(f"wrote HF directory {args.out_dir} from step {got['step']} ({args.dtype}), with README.md "
            + (f"(evaluation: {got['evaluation']})" if got["evaluation"] else "(no evaluation found)"))
    else:
      if args.step is not None or args.best or args.base_model:
        raise runs.RunError(f"--step/--best/--base-model are for a run directory (its checkpoints, its model "
                            f"card); {args.ckpt_dir} is not one")
      model = checkpoint.load_model(args.ckpt_dir)
      out = save_hf(model, args.out_dir, dtype=args.dtype, hf_source=args.hf_source,
                    max_shard_bytes=args.max_shard_size)
      print(f"wrote HF directory {out}")
  except (CheckpointError, ConfigError, runs.RunError, OSError, distributed.StartupError) as e:  # OSError: a path that is a file, …
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
