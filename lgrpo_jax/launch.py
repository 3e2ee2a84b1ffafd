"""`python -m lgrpo_jax.launch --config configs/NAME.py [--dry-run] [key.path=value …]` — train with GRPO.

Config files are plain Python returning an `ExperimentConfig` (see configs/). Overrides are checked
against the config's typed fields (an unknown key or a wrong type is one clear error). Every input is
checked before anything compiles: checkpoint and data paths, the run directory (no `[ ] * ?`: Orbax
globs under it, and it must take new files), the mesh against the devices, the batch against the
processes, G ≥ 2, the rewards (each traced at the step's shapes: a failing one is named); it warns of
model.param_dtype=bfloat16. `--dry-run` stops there and prints the resolved config. Process 0 then
holds RUN_DIR/.lock while it runs: a second launch into the same directory is refused. An unknown key names the nearest real one. The resolved config is written to RUN_DIR/config.json; an existing
run directory with checkpoints resumes, loading its compiled programs from RUN_DIR/xla_cache
(`compile_cache`: "auto", "off" or a directory). Multi-host start-up (lgrpo_jax.distributed) runs first.

Main knobs: run_dir, model.checkpoint, data.source/path/image_root/fraction, pipeline.global_batch,
sft.steps/teacher/targets_path (optional warm start), step.sampling.num_samples/max_new_tokens/
temperature, step.loss.beta/loss/eps_low/eps_high, step.optim.learning_rate/micro_batches/passes,
step.rewards.weights, loop.steps/save_every/eval_every/tensorboard/wandb_project, mesh.fsdp,
compile_cache.

Prints the held-out accuracy (both orders) and contradiction rate before and after GRPO when
held-out pairs are configured, and writes RUN_DIR/curves.png.

Exit status: 0 when the run reached loop.steps (or its data ran out); 2 for a bad input (config,
checkpoint, data, a run directory in use by another launch: one line naming it); 75 when a data read
hung past pipeline.stall_timeout_s (after saving: a retry resumes), or when the storage refused a
write under run_dir (a full disk, a quota, a read-only mount: one line naming the step a restart
resumes from); 128 + the signal (143 SIGTERM, 130 SIGINT) when stopped by a signal on any
process after saving, so that a scheduler restarts it (docs/training.md, "Stopping").
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys


def build(cfg, mesh=None):
  """(model, listener or None, tokenizer, training pairs, held-out pairs or None) from a checked
  config; with a mesh, the models are created or loaded straight into their shards."""
  import lgrpo_jax
  from lgrpo_jax.data.prompts import check_tokenizer_fits, load_tokenizer

  from lgrpo_jax import checkpoint
  from lgrpo_jax.data import sources
  from lgrpo_jax.data.synthetic import synthetic
  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config

  m = cfg.model
  if m.checkpoint is None:
    if m.preset != "tiny":
      raise ValueError(f"model.preset={m.preset!r}: only 'tiny' is built in; give model.checkpoint")
    tok_dir = m.tokenizer or os.path.join(cfg.run_dir, "tokenizer")
    if not m.tokenizer and not os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
      build_tiny_tokenizer(tok_dir)  # once: a resumed run reads the one it was trained with
    load_tokenizer(tok_dir, "model.tokenizer")  # a bad directory named before the tiny config reads it
    model = lgrpo_jax.from_config(tiny_model_config(tok_dir), dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh)
  else:
    tok_dir = m.tokenizer or m.checkpoint
    # The policy's parameters in param_dtype (the master weights), computed in dtype; the frozen
    # listener below keeps dtype for both.
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh)
    model = (checkpoint.load_model(m.checkpoint, **kw) if checkpoint.is_checkpoint(m.checkpoint)
             else lgrpo_jax.load_hf(m.checkpoint, **kw))
  # set_decode_attention checks the model's head_dim against the kernel (a ConfigError naming it)
  model.set_remat(m.remat).set_attention(m.attention).set_decode_attention(m.decode_attention)
  model.set_decode_matmul(m.decode_matmul)
  tokenizer = load_tokenizer(tok_dir, "model.tokenizer" if m.tokenizer else "model.checkpoint",
                             "" if m.tokenizer else "; set model.tokenizer to a directory with the model's tokenizer")
  check_tokenizer_fits(tokenizer, model.config, f"model.checkpoint={m.checkpoint!r}" if m.checkpoint else "the tiny preset")
  listener = None
  if m.listener is not None and cfg.step.rewards.needs_listener:  # no reward reads it: not loaded
    listener = (checkpoint.load_model(m.listener, dtype=m.dtype, mesh=mesh) if checkpoint.is_checkpoint(m.listener)
                else lgrpo_jax.load_hf(m.listener, dtype=m.dtype, mesh=mesh)).set_attention(m.attention)
  if listener is not None:
    check_tokenizer_fits(tokenizer, listener.config, f"model.listener={m.listener!r}")
  d = cfg.data
  report = sources.Report(cfg.pipeline.bad_records)

  def read(source, path, root, seed, fraction=1.0):
    if source == "synthetic":
      return list(synthetic(d.synthetic_pairs, seed=seed, n_wrong=d.synthetic_n_wrong,
                            image_size=d.synthetic_image_size))
    if source == "hpdv2":
      return list(sources.hpdv2_train(path, root, report, fraction=fraction, seed=cfg.loop.seed))
    readers = {"hpdv2_test": sources.hpdv2_test, "imagereward": sources.imagereward, "rapidata": sources.rapidata}
    got = list(readers[source](path, root, report))
    return [p for p in got if sources.subsample(p.pair_id, fraction, cfg.loop.seed)]

  left_out = lambda: f" (records left out so far: {dict(report.skipped)})" if report.skipped else ""
  pairs = read(d.source, d.path, d.image_root, cfg.loop.seed, d.fraction)
  if not pairs:
    raise sources.DataError(f"no training pairs: data.source={d.source!r}"
                            + (f", data.path={d.path!r}" if d.path else "")
                            + (f", data.fraction={d.fraction}" if d.fraction < 1 else "") + left_out())
  eval_source = d.eval_source or ("synthetic" if d.source == "synthetic" else None)
  eval_pairs = None
  if eval_source is not None:
    eval_pairs = read(eval_source, d.eval_path, d.eval_image_root, cfg.loop.seed + 1000)[:d.eval_pairs]
    if not eval_pairs and cfg.loop.eval_every:
      raise sources.DataError(f"no held-out pairs: data.eval_source={eval_source!r}"
                              + (f", data.eval_path={d.eval_path!r}" if d.eval_path else "") + left_out())
  import jax
  if report.skipped and jax.process_index() == 0:  # every process read the same sources: one report
    examples = {k: v[:2] for k, v in report.summary()["examples"].items()}
    print(f"data: {len(pairs)} training pairs" + (f", {len(eval_pairs)} held-out" if eval_pairs else "")
          + f"; records left out while reading: {dict(report.skipped)}" + (f" (e.g. {examples})" if examples else ""),
          file=sys.stderr, flush=True)
  return model, listener, tokenizer, pairs, eval_pairs


def _model_config(path):
  """The architecture of an Orbax checkpoint or an HF directory (config.json only)."""
  from lgrpo_jax import checkpoint
  from lgrpo_jax.models.qwen2_5_vl import Qwen25VLConfig
  return checkpoint.model_config(path) if checkpoint.is_checkpoint(path) else Qwen25VLConfig.from_json(path)


def check(cfg) -> None:
  """Everything that can be checked before compiling."""
  import jax

  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  for name, path in (("model.checkpoint", cfg.model.checkpoint), ("model.listener", cfg.model.listener),
                     ("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path),
                     ("data.image_root", cfg.data.image_root), ("data.eval_path", cfg.data.eval_path),
                     ("data.eval_image_root", cfg.data.eval_image_root)):
    if path is not None and not os.path.exists(path):
      raise ConfigError(f"{name}={path!r}: not found")
  from lgrpo_jax.runs import check_creatable_dir
  check_creatable_dir(cfg.run_dir, "run_dir", ConfigError)
  from lgrpo_jax.runs import check_run_dir_name, check_writable_dir
  check_run_dir_name(os.path.abspath(cfg.run_dir), "run_dir", ConfigError)
  check_writable_dir(cfg.run_dir, "run_dir", ConfigError)  # a read-only mount: said before a model loads
  import importlib.util
  if cfg.loop.wandb_project and importlib.util.find_spec("wandb") is None:  # before the warm start, not after
    raise ConfigError(f"loop.wandb_project={cfg.loop.wandb_project!r} needs Weights & Biases: pip install wandb "
                      "(or set loop.wandb_project='')")
  if cfg.loop.eval_every:
    if not (cfg.data.eval_source or cfg.data.source == "synthetic"):
      raise ConfigError(f"loop.eval_every={cfg.loop.eval_every} needs held-out pairs: data.source="
                        f"{cfg.data.source!r} has none of its own; set data.eval_source and data.eval_path "
                        "(or loop.eval_every=0)")
    if cfg.data.eval_pairs == 0:
      raise ConfigError(f"loop.eval_every={cfg.loop.eval_every} with data.eval_pairs=0: nothing to evaluate")
  if cfg.sft.steps:
    if cfg.sft.teacher == "synthetic" and cfg.data.source != "synthetic":
      raise ConfigError(f"sft.teacher='synthetic' scripts judgements of synthetic pairs; data.source="
                        f"{cfg.data.source!r} needs sft.teacher='targets' with sft.targets_path")
    if cfg.sft.teacher == "targets" and not os.path.isfile(cfg.sft.targets_path):
      raise ConfigError(f"sft.targets_path={cfg.sft.targets_path!r}: not found")
  from lgrpo_jax.train.step import check_step_code  # rewards and loss pieces traced: named if one fails
  warning = check_step_code(cfg.step, cfg.pipeline.global_batch)
  if warning:
    print(f"warning: {warning}", file=sys.stderr)
  sizes = cfg.mesh.resolve(jax.device_count())  # MeshError if it does not fit
  from lgrpo_jax.sharding import check_parameters_split
  models = [_model_config(p) for p in sorted({cfg.model.checkpoint, cfg.model.listener} - {None})]
  if cfg.model.checkpoint is None:
    from lgrpo_jax.models.qwen2_5_vl import Qwen25VLConfig
    from lgrpo_jax.models.qwen2_5_vl.presets import TINY
    models.append(Qwen25VLConfig.from_hf_dict(TINY))
  for model_cfg in models:  # split, not replicated (shapes only)
    warning = check_parameters_split(model_cfg, sizes)
    if warning:
      print(f"warning: {warning}", file=sys.stderr)
  data_shards = sizes[0] * sizes[1]
  if cfg.pipeline.global_batch % jax.process_count():
    raise ConfigError(f"pipeline.global_batch={cfg.pipeline.global_batch} is not divisible by "
                      f"{jax.process_count()} processes")
  if jax.process_count() > 1:  # each process feeds its rows to its own devices: no replicated batch
    for name, batch in (("pipeline.global_batch", cfg.pipeline.global_batch),
                        ("sft.global_batch", cfg.sft.global_batch if cfg.sft.steps else 0)):
      if batch % data_shards:
        raise ConfigError(f"{name}={batch} does not split over the {data_shards} data shards (mesh.data × "
                          f"mesh.fsdp) of a {jax.process_count()}-process run, where each process feeds "
                          f"its own rows to its own devices; use a multiple of {data_shards}")
  if cfg.pipeline.global_batch * cfg.step.sampling.num_samples % data_shards:
    raise ConfigError(f"pipeline.global_batch × step.sampling.num_samples = "
                      f"{cfg.pipeline.global_batch * cfg.step.sampling.num_samples} completions do not "
                      f"split over {data_shards} data shards (mesh.data × mesh.fsdp)")
  if cfg.pipeline.global_batch % cfg.step.optim.micro_batches:
    raise ConfigError(f"pipeline.global_batch={cfg.pipeline.global_batch} is not divisible by "
                      f"step.optim.micro_batches={cfg.step.optim.micro_batches}")
  o = cfg.step.optim
  if o.schedule == "cosine" and o.total_steps < cfg.loop.steps:
    print(f"warning: step.optim.total_steps={o.total_steps} < loop.steps={cfg.loop.steps}: the cosine "
          f"schedule reaches learning rate 0 at step {o.total_steps} and trains no more after it",
          file=sys.stderr)
  if cfg.model.param_dtype == "bfloat16":
    print("warning: model.param_dtype=bfloat16 keeps the trained weights and AdamW's moments in bf16: an "
          "update below half a weight's bf16 spacing rounds away (most of them at lr 1e-6), and the second "
          "moment stops decaying (0.999·v rounds back to v); float32 (the default) keeps fp32 master weights",
          file=sys.stderr)
  if cfg.model.decode_matmul == "pallas" and sizes[2] > 1:
    raise ConfigError(f"model.decode_matmul='pallas' runs on data/fsdp meshes only; mesh.tensor={sizes[2]} "
                      "(use model.decode_matmul=xla with tensor parallelism)")


def build_parser() -> argparse.ArgumentParser:
  from lgrpo_jax import distributed
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.launch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="a Python file defining config() -> ExperimentConfig")
  ap.add_argument("overrides", nargs="*", help="key.path=value (e.g. loop.steps=20 step.loss.beta=0)")
  ap.add_argument("--dry-run", action="store_true",
                  help="check the config (fields, paths, mesh, the checkpoint's config.json) and print it "
                       "resolved, then exit: nothing is loaded, compiled or kept (a probe file tests that run_dir takes files)")
  distributed.add_args(ap)
  return ap


def main(argv=None) -> int:
  with contextlib.ExitStack() as scope:  # process-wide settings made for the run end with it
    return _main(argv, scope)


def _main(argv, scope) -> int:
  from lgrpo_jax import distributed
  args = build_parser().parse_args(argv)
  from lgrpo_jax.config import apply_overrides, load_config_file, to_record
  from lgrpo_jax.data.sources import DataError
  from lgrpo_jax.models.qwen2_5_vl.config import ConfigError
  from lgrpo_jax.safetensors_io import CheckpointError
  import jax

  from lgrpo_jax.sharding import MeshError
  from lgrpo_jax.train.metrics import CompileCounter
  compiles = CompileCounter()  # every XLA compilation of this run, the warm start's included
  try:
    distributed.initialize_from_args(args)
    cfg = apply_overrides(load_config_file(args.config), args.overrides)
    check(cfg)
    if args.dry_run:
      import json
      print(json.dumps(to_record(cfg), indent=2, default=str))
      print(f"config OK: {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""),
            file=sys.stderr)
      return 0
    lock_refused = None
    if jax.process_index() == 0:  # one run per directory, for as long as this process lives
      from lgrpo_jax.runs import lock_run_dir
      try:
        scope.enter_context(contextlib.closing(lock_run_dir(cfg.run_dir, "run_dir", ConfigError)))
      except ConfigError as e:
        lock_refused = e
    if jax.process_count() > 1:  # every process stops together, not process 0 alone
      import numpy as np
      from jax.experimental import multihost_utils
      if multihost_utils.broadcast_one_to_all(np.int32(lock_refused is not None)) and lock_refused is None:
        lock_refused = ConfigError(f"run_dir={cfg.run_dir!r} is in use by another run (process 0 names it)")
    if lock_refused is not None:
      raise lock_refused
    from lgrpo_jax.train import compile_cache
    # The persistent compilation cache, before anything compiles: a restarted run loads its programs.
    scope.enter_context(compile_cache.use(compile_cache.resolve(cfg.compile_cache, cfg.run_dir)))
    from lgrpo_jax.sharding import make_mesh
    mesh = make_mesh(cfg.mesh) if jax.device_count() > 1 else None
    model, listener, tokenizer, pairs, eval_pairs = build(cfg, mesh)
  except (ConfigError, MeshError, DataError, CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import dataclasses

  from lgrpo_jax.train import Trainer
  if not cfg.step.sampling.eos_ids:  # default: the tokenizer's end-of-turn / end-of-text ids
    from lgrpo_jax.data.prompts import end_of_turn_ids
    cfg = dataclasses.replace(cfg, step=dataclasses.replace(
        cfg.step, sampling=dataclasses.replace(cfg.step.sampling, eos_ids=end_of_turn_ids(tokenizer))))
  os.makedirs(cfg.run_dir, exist_ok=True)
  from lgrpo_jax.train import stopping
  # The warm start; the listener and reference default to its result — also on a resume with
  # sft.steps=0, when the run has one (RUN_DIR/sft): else they would be the base model's weights.
  if cfg.sft.steps or os.path.isdir(os.path.join(cfg.run_dir, "sft")):
    from lgrpo_jax.train.sft import run_sft
    try:
      run_sft(model, tokenizer, pairs, cfg.sft, cfg.pipeline, cfg.run_dir, seed=cfg.loop.seed,
              n_wrong=cfg.data.synthetic_n_wrong, say=lambda m: print(m, file=sys.stderr, flush=True),
              mesh=mesh, tensorboard=cfg.loop.tensorboard)
    except stopping.Stopped as e:  # pre-empted during the warm start: it resumes from its checkpoint
      print(f"\n{e}", file=sys.stderr)
      return stopping.leave(128 + e.signum, "lgrpo_jax.launch: warm start stopped by a signal")
    except Exception as e:  # noqa: BLE001 — a full disk, a read-only mount: said in a line, else re-raised
      if (code := _storage_error(e, cfg, "the warm start")) is None:
        if not isinstance(e, ValueError):
          raise
        # a bad record or target, or a hung read, on any process: every process stops here
        print(f"error: {e}", file=sys.stderr)
        code = stopping.exit_code(e)
      return stopping.leave(code, "lgrpo_jax.launch: warm start stopped on an error")
  try:
    trainer = Trainer(cfg.run_dir, model, tokenizer, pairs, cfg.step, cfg.pipeline, cfg.loop,
                      listener=listener, config_record=to_record(cfg), eval_pairs=eval_pairs, mesh=mesh,
                      compile_counter=compiles)
  except Exception as e:  # noqa: BLE001 — re-raised unless it is ours or the storage's
    if (code := _storage_error(e, cfg, "the Trainer's start")) is not None:
      return code
    if not isinstance(e, ValueError):
      raise
    print(f"error: {e}", file=sys.stderr)  # our errors (RunError, DataError, ImageError, …) name what to change
    return 2
  listener = None  # the Trainer holds its frozen copy: the loaded model's arrays go (~17 GB at 7B)
  if trainer.resumed_from is not None:
    print(f"resumed from step {trainer.resumed_from}", file=sys.stderr)
  from lgrpo_jax.data.images import ImageError
  try:
    trained = trainer.run()
  except (DataError, ImageError) as e:  # a bad record (bad_records='error') or a hung read, on any process
    trainer.close()  # pending checkpoint writes finish
    saved = trainer.manager.latest_step()
    print(f"error: {e}\n(training stopped at step {_step_of(trainer)}; "
          + (f"a restart resumes from the checkpoint of step {saved})" if saved is not None
             else "no checkpoint was saved yet)"), file=sys.stderr)
    return stopping.leave(stopping.exit_code(e), "lgrpo_jax.launch: stopped on a data error")
  except Exception as e:  # noqa: BLE001 — a checkpoint or metrics write that failed: said in a line
    if (code := _storage_error(e, cfg, f"step {_step_of(trainer)}", trainer)) is None:
      trainer.close_quietly()  # the error is the one to see; the Trainer's files and threads go
      from lgrpo_jax.rewards import RewardError
      if not isinstance(e, RewardError):
        raise
      print(f"error: {e}", file=sys.stderr)  # a text reward's function raised: it names itself
      return stopping.leave(2, "lgrpo_jax.launch: stopped on a reward's error")
    return stopping.leave(code, "lgrpo_jax.launch: stopped on a failed write")
  try:
    trainer.close()
  except Exception as e:  # noqa: BLE001 — the last checkpoint's write failed
    if (code := _storage_error(e, cfg, "the last save", trainer)) is None:
      raise
    return stopping.leave(code, "lgrpo_jax.launch: stopped on a failed write")
  if trainer.stopped_by is not None:  # pre-empted: not done, so that a scheduler restarts the run
    return stopping.leave(128 + trainer.stopped_by, "lgrpo_jax.launch: stopped by a signal")
  if jax.process_index() == 0:
    print(summary(cfg.run_dir, trained_here=bool(trained)), flush=True)
  return stopping.leave(0, "lgrpo_jax.launch: done")


def _step_of(trainer) -> str:
  """The step the Trainer's state is at, or "?" when a step's program failed and took it (a raw
  `jax.pure_callback` raising: the state was donated to it)."""
  try:
    return str(int(trainer.state.step))
  except Exception:  # noqa: BLE001 — a deleted array
    return "?"


_WRITE_FAILED = False  # set by `_storage_error`: the command then exits without waiting for Orbax's threads
_AS_COMMAND = False  # run as `python -m lgrpo_jax.launch` (not `main()` from Python)


def _storage_error(e: BaseException, cfg, stage: str, trainer=None) -> int | None:
  """For a write the storage refused (a full disk, a file-size limit, a read-only mount, …): one
  line saying so and where a restart resumes, and `stopping.TEMPFAIL` (fix it, then run the same
  command). None for any other error."""
  from lgrpo_jax.runs import storage_failure
  from lgrpo_jax.train import stopping
  reason = storage_failure(e, cfg.run_dir)
  if reason is None:
    return None
  global _WRITE_FAILED
  _WRITE_FAILED = True
  saved = None
  if trainer is not None:
    try:
      trainer.close()  # what is still pending finishes or fails; the checkpoints listed are whole
    except Exception:  # noqa: BLE001 — the same failure again
      pass
    try:
      trainer.manager.reload()
      saved = trainer.manager.latest_step()
    except Exception:  # noqa: BLE001
      pass
  line = (f"error: cannot write under run_dir={cfg.run_dir!r} during {stage} ({reason}); "
          + (f"a restart resumes from the checkpoint of step {saved}" if saved is not None else
             "no training checkpoint was written yet")
          + ". Free space or fix the permissions, then run the same command.")
  if _AS_COMMAND:  # the error is the last line: Orbax's writer threads print tracebacks until exit
    sys.stderr.flush()
    real = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # from now on theirs go nowhere; ours after all before
    os.write(real, ("\n" + line + "\n").encode())  # on a line of its own (a thread's may be unfinished)
  else:
    print(line, file=sys.stderr, flush=True)
  return stopping.TEMPFAIL


def summary(run_dir: str, trained_here: bool = True) -> str:
  """The run in a few lines, from RUN_DIR/metrics.jsonl: held-out accuracy (both orders) and
  contradiction rate at the first and last evaluation, the last training reward and accuracy."""
  from lgrpo_jax.plot import read_metrics
  rows = read_metrics(run_dir)
  train = [r for r in rows if "reward/total" in r]
  evals = [r for r in rows if "eval/accuracy" in r]
  lines = []
  if train:
    last = train[-1]
    lines.append(f"trained to step {last['step']}: reward {last['reward/total']:.3f}, "
                 f"sampled accuracy {last['accuracy']:.3f}, {last['step_time']:.2f} s/step")
  if evals:
    def contradiction(r):
      if "eval/contradiction_rate" not in r:
        return ""
      c = r["eval/contradiction_rate"]
      return f", contradiction rate {c:.3f}" if math.isfinite(c) else ", contradiction rate – (no well-formed answer)"

    fmt = lambda r: (f"{r['eval/accuracy']:.3f} (as given {r['eval/accuracy_as_given']:.3f}, swapped "
                     f"{r['eval/accuracy_swapped']:.3f})" + contradiction(r))
    first, last = evals[0], evals[-1]
    lines.append(f"held-out accuracy at step {first['step']}: {fmt(first)}")
    if last is not first:
      lines.append(f"held-out accuracy at step {last['step']}: {fmt(last)}")
      lines.append(f"change: {100 * (last['eval/accuracy'] - first['eval/accuracy']):+.1f} points")
  if train and train[-1].get("skipped_records"):
    lines.append(f"records left out while training (pipeline.bad_records='skip'): {int(train[-1]['skipped_records'])}"
                 " — the log's 'skipping' warnings name the first of each kind; metrics.jsonl's skipped_records")
  skipped = [r["step"] for r in train if r.get("skipped_updates")]
  if skipped:
    lines.append(f"steps whose optimiser updates were skipped (non-finite loss or gradients): {len(skipped)} "
                 f"of {len(train)} (first: step {skipped[0]}) — metrics.jsonl's skipped_updates")
  if not trained_here:  # a restart of a finished run: the counts below would be an earlier process's
    lines.append("this process trained no step: the run had already reached loop.steps (or its data's end)")
  elif train and "compiles" in train[-1]:
    last = train[-1]
    hits = last.get("compile_cache_hits", 0)
    lines.append(f"XLA compilations in this run: {last['compiles']} ({last['compile_s']:.1f} s"
                 + (f"; {hits} loaded from the compilation cache" if hits else "")
                 + f"), {last['compiled_programs']} of them training-step programs")
  there = [n for n in ("metrics.jsonl", "tensorboard/", "curves.png", "checkpoints/")
           if os.path.exists(os.path.join(run_dir, n.rstrip("/")))]
  lines.append(f"run directory: {run_dir}" + (f" ({', '.join(there)})" if there else ""))
  return "\n".join(lines)


if __name__ == "__main__":
  from lgrpo_jax.hostmem import reexec_with_hugepages
  reexec_with_hugepages()  # huge-page malloc where the kernel offers it (see lgrpo_jax/hostmem.py)
  _AS_COMMAND = True
  code = main()
  from lgrpo_jax.train.stopping import exit_if_a_read_hangs
  exit_if_a_read_hangs(code)
  if _WRITE_FAILED:  # Orbax's writer threads would print their tracebacks after the error line, at exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
