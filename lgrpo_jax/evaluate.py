"""`python -m lgrpo_jax.evaluate --checkpoint PATH --data SOURCE:PATH [--images ROOT] [--out DIR]` —
judge a human-preference test set with a reasoner and report accuracy, position bias, the
ImageReward-protocol accuracy and the listener's contradiction analysis.

--checkpoint  a training run directory (its latest checkpoint; `--step N` or `--best`), an
              lgrpo_jax Orbax model checkpoint (checkpoint.save_model), or a Hugging Face directory.
              A run directory brings its prompt, image and sampling settings; otherwise `--config`
              (a config file or a run's config.json) or the defaults.
--data        imagereward:test.json | hpdv2_test:test.json | hpdv2:train.json | rapidata:FILE.parquet
              | synthetic:N (N held-out synthetic pairs; a run's synthetic settings)
--ranking     all (default: every pair of a prompt's images, people's ties included, so each image
              gets a score) | untied (only the pairs people ranked) | anchors:K (each image against K
              anchors per prompt: K(N−K) + K(K−1)/2 judgements instead of N(N−1)/2)
--samples K   K completions per ordered pair (greedy when K = 1 unless --temperature is given);
              --aggregate majority (answers) | mean_prob (answer-slot probabilities)

Every comparison is judged in both orders. The listener (default: a run's listener, else the same
checkpoint; `--listener PATH`, `--no-listener`) reads each completion with the answer removed.

Writes to --out (default: RUN_DIR/eval/<data name>, or eval/<data name>):
    predictions.jsonl   one line per comparison and order: pair id, group, images (i, j), order,
                        people's preference, the completions (text, answer, format, answer-slot
                        probabilities, listener probabilities), the aggregated answer, correct?
    summary.json        every metric, counts, skipped comparisons and images by reason, settings
    listener.md, evaluation.png   the accuracy split by listener agreement, and the accuracy bars
    eval_config.json    the settings; a rerun with the same settings skips judgements already in
                        predictions.jsonl (resume), different settings are refused

Missing or undecodable images: `--bad-records error` (default) stops naming the record and file;
`skip` leaves out every comparison with such an image and counts them by reason.

Batches are read in a thread, as in training: a read hanging longer than `--stall-timeout` (default
the run's pipeline.stall_timeout_s) stops the evaluation with exit code 75 on every process, and
SIGTERM or Ctrl-C stops it at the next batch (exit 128 + the signal). Every judgement made is in
predictions.jsonl by then, and the same command resumes from it.

Compiled programs are kept for the next evaluation (`--compile-cache`, as the launcher's
`compile_cache`): by default in the run directory's xla_cache (shared with its training), else in
OUT/xla_cache, or in $JAX_COMPILATION_CACHE_DIR when that is set.

Exit codes: 0 done; 2 a bad argument, config, checkpoint or data record (one `error:` line);
75 a batch read hung (resume with the same command); 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import sys
import time

DATA_SOURCES = ("imagereward", "hpdv2_test", "hpdv2", "rapidata", "synthetic")
ORDERS = ("as_given", "swapped")
# Settings that change judgements: a resumed evaluation must match them.
JUDGEMENT_SETTINGS = ("checkpoint", "listener", "data", "images", "ranking", "samples", "temperature", "top_k",
                      "top_p", "aggregate", "max_new_tokens", "seed", "prompt", "image", "tokenizer", "dtype",
                      "eos_ids", "pad_id", "stop_sequences")


class EvalError(ValueError):
  """A bad argument or input, with what to do about it."""


# ---- the checkpoint --------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
  model: object
  listener: object | None
  tokenizer: object
  cfg: object  # ExperimentConfig (the run's, --config's, or the defaults)
  checkpoint: dict  # what was loaded, for the summary


def load(args, mesh) -> Loaded:
  """The reasoner, the listener and the tokenizer named by the arguments."""
  import lgrpo_jax
  from lgrpo_jax import runs
  from lgrpo_jax.config import ExperimentConfig, load_config_file
  path = os.path.abspath(args.checkpoint)
  if runs.is_run_dir(path):
    cfg = runs.run_config(path)
    m = cfg.model
    tok_dir = runs.tokenizer_dir(cfg, path)
    model_cfg = runs.model_config(cfg, path)
    state, step = runs.run_checkpoint(path, args.step, args.best)
    model = runs.restore_params(model_cfg, state, "params", mesh)
    listener = None
    if not args.no_listener:  # as in training: the configured listener, else the warm start, else the base
      if args.listener or m.listener:
        listener = runs.load_any(args.listener or m.listener, m.dtype, mesh)
      elif os.path.isdir(os.path.join(path, "sft")):
        listener = runs.restore_params(model_cfg, os.path.join(path, "sft"), None, mesh)
      elif m.checkpoint is None:  # the tiny preset's initial weights (seeded, as the launcher made them)
        listener = lgrpo_jax.from_config(model_cfg, mesh=mesh)
      else:
        listener = runs.load_any(m.checkpoint, m.dtype, mesh)
    desc = {"kind": "run", "path": path, "step": step, "state": state}
  else:
    if args.step is not None or args.best:
      raise EvalError(f"--step/--best choose among a run directory's checkpoints; {path} is not one")
    cfg = ExperimentConfig()
    if args.config:  # a .py config or a run's config.json; its loss and reward names are not needed here
      from lgrpo_jax.grpo.core import unregistered_names_allowed
      with unregistered_names_allowed():
        cfg = load_config_file(args.config)
    model = runs.load_any(path, cfg.model.dtype, mesh)
    tok_dir = args.tokenizer or path
    listener = None if args.no_listener else (runs.load_any(args.listener, cfg.model.dtype, mesh) if args.listener
                                               else model)
    desc = {"kind": "checkpoint", "path": path}
  tok_dir = args.tokenizer or tok_dir
  from lgrpo_jax.data.prompts import TokenizerError, check_tokenizer_fits, load_tokenizer
  try:
    tokenizer = load_tokenizer(tok_dir, "--tokenizer" if args.tokenizer else "--checkpoint",
                               "" if args.tokenizer else "; give --tokenizer DIR")
    check_tokenizer_fits(tokenizer, model.config, path)
    if listener is not None and listener is not model:
      check_tokenizer_fits(tokenizer, listener.config, "the listener")
  except TokenizerError as e:
    raise EvalError(str(e)) from None
  desc["tokenizer"] = os.path.abspath(tok_dir)
  desc["listener"] = None if listener is None else (
      os.path.abspath(args.listener) if args.listener else "same as the checkpoint" if listener is model
      else "the run's listener")
  return Loaded(model, listener, tokenizer, cfg, desc)


# ---- the data ----------------------------------------------------------------------------------
def read_groups(data: str, image_root, report, cfg) -> list:
  """`SOURCE:PATH` as a list of groups (a ranked record, or one pair with ranks (1, 2)/(2, 1))."""
  from lgrpo_jax.data import sources
  from lgrpo_jax.data.synthetic import synthetic
  source, sep, path = data.partition(":")
  if source not in DATA_SOURCES or not sep or not path:
    raise EvalError(f"--data {data!r}: expected SOURCE:PATH with SOURCE one of {DATA_SOURCES} "
                    f"(synthetic:N for N synthetic pairs)")
  if source in ("imagereward", "hpdv2_test"):
    return list(sources.ranked_groups(path, source, image_root, report))
  if source == "synthetic":
    if not path.isdigit() or int(path) < 1:
      raise EvalError(f"--data {data!r}: synthetic:N needs a number of pairs")
    pairs = synthetic(int(path), seed=cfg.loop.seed + 1000, n_wrong=cfg.data.synthetic_n_wrong,
                      image_size=cfg.data.synthetic_image_size)  # training's held-out pairs
  else:
    pairs = sources.hpdv2_train(path, image_root, report) if source == "hpdv2" else \
        sources.rapidata(path, image_root, report)
  return [sources.Group(p.pair_id, p.prompt, tuple(p.images), (1, 2) if p.label == 0 else (2, 1)) for p in pairs]


def check_images(groups, image_cfg, policy: str, signals=None, stall_timeout_s: float = 0.0) -> dict:
  """{(group id, image index): skip reason} for images that cannot be used (read from the file
  headers); with policy 'error' the first one stops the evaluation naming the record and file.

  The headers are read in a thread, watched as the batches are: a stop asked for (`signals`), one
  header read hanging for over `stall_timeout_s` (a stalled mount) or an error, on any process,
  ends the check on every process alike (`stopping.agree`). Raises `stopping.EvaluationStopped`,
  this process's own error, or one naming the processes that failed."""
  from lgrpo_jax.data.images import ImageError, image_grid
  from lgrpo_jax.data.sources import DataError, DataStall
  from lgrpo_jax.train import stopping

  def check(tick) -> dict:
    bad = {}
    for g in groups:
      for k, im in enumerate(g.images):
        name = f"group {g.group_id} image {k}" + (f" ({im})" if isinstance(im, str) else "")
        tick(name)
        try:
          image_grid(im, image_cfg, name)
        except ImageError as e:
          if policy == "error":
            raise DataError(f"{e} — use --bad-records skip to leave such images out (counted)") from None
          bad[(g.group_id, k)] = (e.kind, name)
    return bad

  signals = signals if signals is not None else stopping.StopSignals()
  task = stopping.Watched(check)
  finished = task.wait(signals, stall_timeout_s)
  error = task.error if finished else None
  if finished is None:
    what, since = task.current
    import jax
    error = DataStall(f"process {jax.process_index()}: reading the header of {what} did not return in "
                      f"{time.monotonic() - since:.0f} s (--stall-timeout={stall_timeout_s:g}): the image "
                      f"store hangs (a stalled file system?)")
  stop, failed, _, stalled = stopping.agree(signals.signum, error)
  if failed:
    raise error if error is not None else stopping.failure_error(failed, None, stalled, "--stall-timeout")
  if stop:
    raise stopping.EvaluationStopped(stop)
  return task.result



def plan(groups, mode: str, anchors: int, max_pairs: int | None, seed: int) -> tuple[list, list, dict]:
  """(groups kept, comparisons to judge as (group, i, j), counts of comparisons left out by
  --max-pairs / the ranking mode). Whole groups are kept in file order while they fit in
  `max_pairs` (a first group larger than that is cut, and then left out of the ImageReward protocol
  by `summarize`)."""
  from lgrpo_jax.evaluation.protocol import comparisons
  kept, todo, left = [], [], {"max_pairs": 0, "tied_in_human_ranking": 0}
  cut = False
  for g in groups:
    comps = comparisons(g, mode, anchors, seed)
    if mode == "untied" and g.ranks is not None:
      n = len(g.images)
      left["tied_in_human_ranking"] += n * (n - 1) // 2 - len(comps)
    if not cut and max_pairs is not None and len(todo) + len(comps) > max_pairs:
      cut = True
      if not todo:  # one prompt with more comparisons than allowed: its first max_pairs
        kept.append(g)
        todo += [(g, i, j) for i, j in comps[:max_pairs]]
        left["max_pairs"] += len(comps) - max_pairs
        continue
    if cut:
      left["max_pairs"] += len(comps)
      continue
    kept.append(g)
    todo += [(g, i, j) for i, j in comps]
  return kept, todo, left


def pair_of(g, i: int, j: int):
  """The comparison as a PreferencePair (label 0 also for a pair people tied: never scored)."""
  from lgrpo_jax.data.sources import PreferencePair
  preferred = None if g.ranks is None or g.ranks[i] == g.ranks[j] else int(g.ranks[j] < g.ranks[i])
  return PreferencePair(f"{g.group_id}:{i}-{j}", g.prompt, (g.images[i], g.images[j]), preferred or 0), preferred


_RECORD_KEYS = ("pair_id", "order", "answer", "p_image1", "samples")


def read_predictions(path: str) -> list[dict]:
  """The records of an earlier (possibly interrupted) run. A line that is not a whole record (torn
  by a kill while writing, or damaged) is dropped with a warning naming it, and its judgement is
  redone; the lines after it are kept."""
  if not os.path.isfile(path):
    return []
  out, dropped = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        rec = None
      if isinstance(rec, dict) and all(k in rec for k in _RECORD_KEYS):
        out.append(rec)
      else:
        dropped.append(n)
  import jax
  if dropped and jax.process_index() == 0:
    print(f"warning: {path}: line{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped[:10]))}"
          f"{' …' if len(dropped) > 10 else ''} not a whole record (torn or damaged): dropped, "
          "judged again", file=sys.stderr, flush=True)
  return out


# ---- reporting ---------------------------------------------------------------------------------
class Progress:
  """A progress line on stderr (redrawn in place on a terminal, every 10% otherwise)."""

  def __init__(self, total: int, done: int = 0, enabled: bool = True):
    self.total, self.done, self.enabled = total, done, enabled
    self.start, self.start_done = time.perf_counter(), done
    self.tty, self._shown = sys.stderr.isatty(), -1

  def update(self, n: int) -> None:
    self.done += n
    if not self.enabled:
      return
    frac = self.done / max(self.total, 1)
    spent = time.perf_counter() - self.start
    rate = (self.done - self.start_done) / spent if spent > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    width = 30
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    line = f"evaluate [{bar}] {self.done}/{self.total} judgements  {spent:.0f} s, ~{eta:.0f} s left"
    if self.tty:
      print("\r" + line, end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
    elif int(10 * frac) > self._shown:
      self._shown = int(10 * frac)
      print(line, file=sys.stderr, flush=True)


def listener_table(metrics: dict) -> str:
  lis = metrics.get("listener")
  if not lis:
    return "No listener (or no well-formed completion): no contradiction analysis.\n"
  f = lambda v: "–" if v is None else f"{v:.3f}"
  return ("| reasoner vs listener | samples | reasoner accuracy |\n|---|---:|---:|\n"
          f"| agree | {lis['agree']} | {f(lis['accuracy_when_agree'])} |\n"
          f"| contradict | {lis['contradict']} | {f(lis['accuracy_when_contradict'])} |\n\n"
          f"Contradiction rate {f(lis['contradiction_rate'])} over {lis['well_formed_samples']} well-formed "
          f"samples; the listener alone is right on {f(lis['listener_accuracy'])} of them.\n")


def plot_summary(metrics: dict, path: str) -> str:
  from lgrpo_jax.plot import bars
  acc = [("as given", metrics["accuracy_as_given"]), ("swapped", metrics["accuracy_swapped"]),
         ("mean", metrics["accuracy"]), ("debiased", metrics["accuracy_debiased"])]
  if "imagereward_protocol" in metrics:
    acc.append(("IR protocol", metrics["imagereward_protocol"]["accuracy"]))
  panels = [("accuracy (pairs people did not tie)", acc)]
  lis = metrics.get("listener")
  if lis:
    panels.append(("reasoner accuracy by listener agreement; contradiction rate", [
        (f"agree (n={lis['agree']})", lis["accuracy_when_agree"]),
        (f"contradict (n={lis['contradict']})", lis["accuracy_when_contradict"]),
        ("contradiction rate", lis["contradiction_rate"])]))
  return bars(panels, path)


# ---- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  from lgrpo_jax import distributed
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.evaluate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="run directory, lgrpo_jax checkpoint or HF directory")
  ap.add_argument("--data", required=True, help="SOURCE:PATH, SOURCE in " + ", ".join(DATA_SOURCES))
  ap.add_argument("--images", default=None, help="root for relative image paths")
  ap.add_argument("--out", default=None, help="output directory")
  ap.add_argument("--max-pairs", type=int, default=None, help="at most this many comparisons (whole prompts)")
  which = ap.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="a run's checkpoint at this step")
  which.add_argument("--best", action="store_true", help="a run's best checkpoint (by held-out accuracy)")
  ap.add_argument("--listener", default=None, help="listener checkpoint (default: see above)")
  ap.add_argument("--no-listener", action="store_true")
  ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
  ap.add_argument("--config", default=None, help="prompt/image/sampling settings for a non-run checkpoint")
  ap.add_argument("--ranking", default="all", help="all | untied | anchors:K")
  ap.add_argument("--samples", type=int, default=1)
  ap.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) for 1 sample, else 1")
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--aggregate", default="majority", choices=("majority", "mean_prob"))
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's, else 256")
  ap.add_argument("--batch", type=int, default=8, help="ordered pairs per batch, all devices together")
  ap.add_argument("--bad-records", default="error", choices=("error", "skip"))
  ap.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                  help="a batch read hanging longer stops the evaluation (exit 75) on every process; "
                       "0: wait forever (default: the run's pipeline.stall_timeout_s, else 1800)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--quiet", action="store_true", help="no progress line")
  ap.add_argument("--single-device", action="store_true",
                  help="one device even when more are visible (default: a mesh over all, as in training)")
  ap.add_argument("--compile-cache", default="auto",
                  help="persistent compilation cache: auto (the run's RUN_DIR/xla_cache, else OUT/xla_cache), "
                       "off, or a directory")
  distributed.add_args(ap)
  return ap


def _ranking(text: str) -> tuple[str, int]:
  mode, _, k = text.partition(":")
  if mode in ("all", "untied") and not k:
    return mode, 0
  if mode == "anchors" and k.isdigit() and int(k) >= 1:
    return mode, int(k)
  raise EvalError(f"--ranking {text!r}: choose all, untied or anchors:K (K ≥ 1)")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from lgrpo_jax import distributed
  from lgrpo_jax.data.sources import DataError
  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  from lgrpo_jax.safetensors_io import CheckpointError
  from lgrpo_jax.sharding import MeshError
  try:
    distributed.initialize_from_args(args)
    with contextlib.ExitStack() as scope:  # the compilation cache's setting ends with the evaluation
      return evaluate(args, scope)
  except (EvalError, ConfigError, DataError, CheckpointError, MeshError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)  # ImageError and the pipeline's errors are ValueErrors
    return 2


def evaluate(args, scope: contextlib.ExitStack) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
  from lgrpo_jax.data.prompts import end_of_turn_ids
  from lgrpo_jax.data.sources import Report
  from lgrpo_jax.evaluation import answer_slot_spec, judge, summarize
  from lgrpo_jax.listener import ListenerSpec
  from lgrpo_jax.rewards.text import ByteTable
  from lgrpo_jax.sampling import SamplingConfig
  from lgrpo_jax.sharding import make_mesh, on_mesh
  from lgrpo_jax.train.evaluation import gather_rows
  from lgrpo_jax.train.loop import pair_grid_of, to_device
  from lgrpo_jax.train import stopping
  from lgrpo_jax import distributed, runs
  from lgrpo_jax.train.step import Tables
  from flax import nnx

  mode, anchors = _ranking(args.ranking)
  if args.samples < 1 or args.batch < 1 or (args.max_pairs is not None and args.max_pairs < 1):
    raise EvalError("--samples, --batch and --max-pairs must be ≥ 1")
  if args.stall_timeout is not None and not 0 <= args.stall_timeout < float("inf"):
    raise EvalError(f"--stall-timeout {args.stall_timeout}: must be ≥ 0 seconds (0: wait forever)")
  if args.batch % jax.process_count():
    raise EvalError(f"--batch {args.batch} is not divisible by {jax.process_count()} processes")
  source, _, where = args.data.partition(":")
  if source not in DATA_SOURCES or not where:
    read_groups(args.data, None, None, None)  # raises the explanation
  if source != "synthetic" and not os.path.isfile(where):
    raise EvalError(f"--data {args.data}: file {where} not found")
  if not os.path.exists(args.checkpoint):
    raise EvalError(f"--checkpoint {args.checkpoint}: not found")
  if args.images is not None and not os.path.isdir(args.images):
    raise EvalError(f"--images {args.images}: not a directory")
  primary = jax.process_index() == 0
  say = (lambda m: print(m, file=sys.stderr, flush=True)) if primary else (lambda m: None)

  run_cfg = None
  if runs.is_run_dir(os.path.abspath(args.checkpoint)):
    run_cfg = runs.run_config(args.checkpoint)
  name = f"{source}-{os.path.splitext(os.path.basename(where))[0]}"
  out_dir = args.out or (os.path.join(args.checkpoint, "eval", name) if run_cfg is not None
                         else os.path.join("eval", name))
  runs.check_creatable_dir(out_dir, "--out", EvalError)
  from lgrpo_jax.train import compile_cache  # before anything compiles; a run's cache is its training's
  scope.enter_context(compile_cache.use(compile_cache.resolve(
      args.compile_cache, args.checkpoint if run_cfg is not None else out_dir)))

  # The mesh first (models load straight into their shards), from a run's mesh settings.
  mesh = None
  if args.single_device and jax.process_count() > 1:
    raise EvalError("--single-device with several processes: each process must feed the mesh")
  if jax.device_count() > 1 and not args.single_device:
    from lgrpo_jax.sharding import MeshConfig, MeshError
    try:
      mesh = make_mesh(run_cfg.mesh if run_cfg is not None else MeshConfig())
    except MeshError as e:  # the run's explicit sizes, for another device count: the judgements do not depend on it
      if run_cfg is None:
        raise
      mesh = make_mesh(MeshConfig())
      if jax.process_index() == 0:
        print(f"the run's {e}: evaluating on the default mesh ({dict(mesh.shape)})", file=sys.stderr)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % shards:
      raise EvalError(f"--batch {args.batch} does not split over the mesh's {shards} data shards "
                      f"(data × fsdp); use a multiple of {shards}")
  loaded = load(args, mesh)
  cfg, tokenizer = loaded.cfg, loaded.tokenizer
  # Test prompts can be longer than a run's training prompts: the default buckets are added.
  buckets = tuple(sorted(set(cfg.pipeline.length_buckets) | set(PipelineConfig().length_buckets)))
  pipe = dataclasses.replace(cfg.pipeline, global_batch=args.batch, num_epochs=1, shuffle=False, both_orders=False,
                             bad_records=args.bad_records, listener=loaded.listener is not None,
                             length_buckets=buckets)
  stall_timeout = pipe.stall_timeout_s if args.stall_timeout is None else args.stall_timeout
  temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
  run_sampling = cfg.step.sampling  # the run's (or --config's): as training's held-out evaluation samples
  sampling = SamplingConfig(
      max_new_tokens=args.max_new_tokens or (run_sampling.max_new_tokens if run_cfg is not None or args.config
                                             else 256),
      num_samples=args.samples, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
      eos_ids=run_sampling.eos_ids or end_of_turn_ids(tokenizer), pad_id=run_sampling.pad_id,
      stop_sequences=run_sampling.stop_sequences)

  # Data: groups → images checked → comparisons planned → both orders, minus what is done.
  report = Report(args.bad_records)
  groups = read_groups(args.data, args.images, report, cfg)
  if not groups:
    raise EvalError(f"--data {args.data}: no usable records ({report.summary()['skipped']})")
  groups, todo, left_out = plan(groups, mode, anchors, args.max_pairs, args.seed)
  # From here a stop signal only asks: the evaluation stops at the next batch (or image check).
  signals = scope.enter_context(stopping.StopSignals())
  try:
    bad_images = check_images(groups, pipe.image, args.bad_records, signals, stall_timeout)
  except stopping.EvaluationStopped as e:
    say(f"{stopping.signal_name(e.signum)}: stopped while checking the images; nothing was judged")
    distributed.finish("lgrpo_jax.evaluate: stopped by a signal")
    return 128 + e.signum
  except (ValueError, OSError) as e:  # a bad image (--bad-records error) or a hung read, on any process
    print(f"error: {e}", file=sys.stderr, flush=True)
    distributed.finish("lgrpo_jax.evaluate: stopped on an image check")
    return stopping.exit_code(e)
  skipped: dict[str, int] = {}
  meta = {}
  for g, i, j in todo:
    reasons = [bad_images[(g.group_id, k)][0] for k in (i, j) if (g.group_id, k) in bad_images]
    if reasons:
      skipped[reasons[0]] = skipped.get(reasons[0], 0) + 1
      continue
    pair, preferred = pair_of(g, i, j)
    meta[pair.pair_id] = {"group": g.group_id, "i": i, "j": j, "preferred": preferred, "pair": pair}
  os.makedirs(out_dir, exist_ok=True)
  settings = {"checkpoint": loaded.checkpoint["path"], "step": loaded.checkpoint.get("step"),
              "listener": loaded.checkpoint["listener"], "data": args.data,
              "images": os.path.abspath(args.images) if args.images else None, "ranking": args.ranking,
              "samples": args.samples, "temperature": temperature, "top_k": args.top_k, "top_p": args.top_p,
              "aggregate": args.aggregate, "max_new_tokens": sampling.max_new_tokens, "seed": args.seed,
              "prompt": dataclasses.asdict(pipe.prompt), "image": dataclasses.asdict(pipe.image),
              "tokenizer": loaded.checkpoint["tokenizer"], "dtype": cfg.model.dtype,
              "eos_ids": sampling.eos_ids, "pad_id": sampling.pad_id, "stop_sequences": sampling.stop_sequences}
  settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
  cfg_path, pred_path = os.path.join(out_dir, "eval_config.json"), os.path.join(out_dir, "predictions.jsonl")
  if os.path.isfile(cfg_path):
    from lgrpo_jax.safetensors_io import read_json
    before = read_json(cfg_path, EvalError)
    # (a setting an older version did not record is not compared)
    differ = [k for k in JUDGEMENT_SETTINGS + ("step",) if k in before and before[k] != settings.get(k)]
    if differ and os.path.isfile(pred_path):
      raise EvalError(f"{out_dir} holds predictions made with other settings ({', '.join(differ)} differ: "
                      f"{ {k: before.get(k) for k in differ} }); use another --out or remove it")
  previous = read_predictions(pred_path)
  done = {(r["pair_id"], r["order"]) for r in previous if r["pair_id"] in meta}
  if jax.process_count() > 1:  # every process has read the file before process 0 rewrites it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("lgrpo_jax.evaluate: predictions read")
  # Rewrite the file without a torn tail (a new file put in place: a kill meanwhile loses nothing),
  # then append.
  if primary:
    with open(cfg_path, "w") as f:
      json.dump(settings, f, indent=2)
    with open(pred_path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in previous)
    os.replace(pred_path + ".tmp", pred_path)
  items = [(meta[pid]["pair"], swap) for pid in meta for swap in (False, True) if (pid, ORDERS[swap]) not in done]
  total = 2 * len(meta)
  say(f"evaluate: {len(groups)} prompts, {len(meta)} comparisons × 2 orders"
      + (f"; {len(done)} judgements already in {pred_path}, {len(items)} to go" if done else "")
      + (f"; left out: {skipped}" if skipped else ""))

  # The device side: one jitted judge per image-grid signature.
  params = nnx.split(loaded.model, nnx.Param)
  graphdef, params = params
  lgraph, lparams = (nnx.split(loaded.listener, nnx.Param) if loaded.listener is not None else (None, None))
  bt = ByteTable.from_tokenizer(tokenizer)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths), pipe.prompt.choices)
  if mesh is not None:
    tables = on_mesh(tables, mesh)
  spec = ListenerSpec.from_tokenizer(tokenizer, pipe.prompt) if loaded.listener is not None else None
  self_spec = answer_slot_spec(tokenizer, pipe.prompt)
  fns: dict = {}
  key = jax.random.key(args.seed)
  t0 = time.perf_counter()
  progress = Progress(total, total - len(items), enabled=primary and not args.quiet)
  pipe_report = Report(args.bad_records)
  if items:
    index = {(p.pair_id, swap): k for k, (p, swap) in enumerate(items)}
    # Read as training reads (`stopping.Feed`): each batch in a thread, and agreed by every process,
    # so that a hung read (past the stall timeout), a bad record or a stop on one process ends the
    # evaluation on all of them at the same batch; what was judged is in predictions.jsonl already.
    feed = stopping.Feed(make_batches(items, tokenizer, pipe, process_index=jax.process_index(),
                                      process_count=jax.process_count(), report=pipe_report),
                         stall_timeout, saves=False, setting="--stall-timeout")
    with open(pred_path, "a") if primary else open(os.devnull, "w") as out, \
        (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
      for b in itertools.count():
        stop, failed, ended = feed.next(signals)
        if failed:
          error = feed.error(failed, None)
          if not isinstance(error, (ValueError, OSError)):
            raise error  # not a read failure but a bug in the pipeline: its traceback
          print(f"error: {error}\n(the {progress.done} judgements made are in {pred_path}; the same "
                "command resumes from there)", file=sys.stderr, flush=True)
          distributed.finish("lgrpo_jax.evaluate: stopped on a read failure")
          return stopping.exit_code(error)
        if stop:
          say(f"\n{stopping.signal_name(stop)}: stopped with {progress.done} of {total} judgements made, in "
              f"{pred_path}; the same command resumes from there")
          distributed.finish("lgrpo_jax.evaluate: stopped by a signal")
          return 128 + stop
        if ended:
          break
        host = feed.take()
        grid = pair_grid_of(host)
        if grid not in fns:
          fns[grid] = jax.jit(functools.partial(judge, graphdef=graphdef, listener_graphdef=lgraph,
                                                sampling=sampling, spec=spec, self_spec=self_spec, pair_grid=grid))
        res = fns[grid](params, lparams, to_device(host, mesh), tables, jax.random.fold_in(key, b))
        res = jax.tree.map(gather_rows, res)
        rows = gather_rows(np.asarray([index[(p, bool(s))] for p, s in zip(host["pair_ids"], host["swapped"])],
                                      np.int64))
        valid = gather_rows(np.asarray(host["valid"]))
        n = 0
        for r in np.flatnonzero(valid):
          out.write(json.dumps(_record(items[rows[r]], meta, res, r, tokenizer, args.aggregate, spec is not None))
                    + "\n")
          n += 1
        out.flush()
        progress.update(n)
  seconds = time.perf_counter() - t0

  # Metrics over every judgement of the planned comparisons (this run's and earlier ones').
  records = [r for r in read_predictions(pred_path) if r["pair_id"] in meta]
  metrics = summarize(records, groups, mode, anchors, args.seed)
  for reason, n in pipe_report.skipped.items():  # decoded badly after a good header: per judgement
    skipped[f"{reason}_judgements"] = skipped.get(f"{reason}_judgements", 0) + n
  examples = {}
  for (gid, k), (reason, where) in bad_images.items():
    examples.setdefault(reason, [])
    if len(examples[reason]) < 5:
      examples[reason].append(where)
  image_counts = {}
  for reason, _ in bad_images.values():
    image_counts[reason] = image_counts.get(reason, 0) + 1
  summary = {
      "metrics": metrics, "settings": settings, "checkpoint": loaded.checkpoint,
      "planned": {"prompts": len(groups), "comparisons": len(todo), "judged_comparisons": len(meta),
                  "left_out": {k: v for k, v in left_out.items() if v}},
      "skipped": {"comparisons": skipped, "images": image_counts, "examples": examples,
                  "records": report.summary()["skipped"], "record_examples": report.summary()["examples"]},
      "seconds": round(seconds, 2), "devices": jax.device_count(), "processes": jax.process_count(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if primary:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "listener.md"), "w") as f:
      f.write(listener_table(metrics))
    plot_summary(metrics, os.path.join(out_dir, "evaluation.png"))
    print(report_lines(summary, out_dir), flush=True)
  distributed.finish("lgrpo_jax.evaluate: done")
  return 0


def _sigmoid(x: float) -> float:
  return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _record(item, meta, res, r: int, tokenizer, aggregate: str, with_listener: bool) -> dict:
  """One prediction line for row r of a judged batch."""
  import numpy as np

  from lgrpo_jax.evaluation.protocol import aggregate_samples, shown_label
  pair, swap = item
  m = meta[pair.pair_id]
  samples = []
  for s in range(res.answer.shape[1]):
    n = int(res.lengths[r, s])
    # P(Image 1) from the log-odds in float64, unrounded: a confident judge's P is 1 − 1e-7 or
    # closer, and rounded (or fp32) it would read 1, tying the images it ranks above every anchor
    log_odds = float(res.self_log_odds[r, s])
    samples.append({"text": tokenizer.decode(res.tokens[r, s, :n].tolist(), skip_special_tokens=True),
                    "answer": int(res.answer[r, s]), "format_ok": bool(res.format_ok[r, s]),
                    "p": [_sigmoid(log_odds), _sigmoid(-log_odds)], "log_odds": log_odds,
                    "listener": [round(float(v), 6) for v in res.p_listener[r, s]] if with_listener else None})
  answer, p1 = aggregate_samples([x["answer"] for x in samples], [x["p"][0] for x in samples], aggregate)
  rec = {"pair_id": pair.pair_id, "group": m["group"], "i": m["i"], "j": m["j"], "order": ORDERS[int(swap)],
         "preferred": m["preferred"],
         "images": [im if isinstance(im, str) else None for im in (pair.images[::-1] if swap else pair.images)],
         "answer": answer, "p_image1": float(p1), "samples": samples}
  label = shown_label(rec)
  rec["correct"] = None if label is None else answer == label + 1
  if with_listener and label is not None:
    rec["listener_p_correct"] = round(float(np.mean([x["listener"][label] for x in samples])), 6)
  return rec


def report_lines(summary: dict, out_dir: str) -> str:
  m = summary["metrics"]
  f = lambda v: "–" if v is None else f"{v:.3f}"
  c = m["counts"]
  first = summary.get("settings", {}).get("prompt", {}).get("choices", ["Image 1"])[0]
  lines = [f"accuracy {f(m['accuracy'])} (as given {f(m['accuracy_as_given'])}, swapped "
           f"{f(m['accuracy_swapped'])}; position-bias gap {f(m['position_bias_gap'])}; debiased "
           f"{f(m['accuracy_debiased'])}) over {c['untied_comparisons']} comparisons people did not tie",
           f"format rate {f(m['format_rate'])}; answered {first!r} (the first image) {f(m['image1_answer_rate'])} of the time"]
  if "imagereward_protocol" in m:
    ir = m["imagereward_protocol"]
    cut = ir.get("partial_prompts_left_out", 0)
    lines.append(f"ImageReward-protocol accuracy {f(ir['accuracy'])} ({ir['pairs']} pairs, {ir['prompts']} prompts"
                 + (f"; {cut} prompt cut by --max-pairs left out" if cut else "") + ")")
  if "listener" in m:
    lis = m["listener"]
    lines.append(f"contradiction rate {f(lis['contradiction_rate'])}; accuracy when the listener agrees "
                 f"{f(lis['accuracy_when_agree'])}, when it contradicts {f(lis['accuracy_when_contradict'])}")
  sk = summary["skipped"]
  if sk["comparisons"] or sk["images"] or sk["records"]:
    lines.append(f"skipped: comparisons {sk['comparisons']}, images {sk['images']}, records {sk['records']}")
  lines.append(f"written to {out_dir} (summary.json, predictions.jsonl, listener.md, evaluation.png)")
  return "\n".join(lines)


if __name__ == "__main__":
  from lgrpo_jax.hostmem import reexec_with_hugepages
  reexec_with_hugepages()  # huge-page malloc where the kernel offers it (see lgrpo_jax/hostmem.py)
  code = main()
  from lgrpo_jax.train import stopping
  stopping.exit_if_a_read_hangs(code)  # (not in main: the tests call it in-process)
  sys.exit(code)
