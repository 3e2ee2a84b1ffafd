"""Supervised warm start: teach the reasoner the `<think>…</think><answer>…</answer>` format (and
whatever the targets say) before GRPO, which needs a policy that already emits the format.

The loss is the mean negative log-likelihood of the target completion tokens given the prompt and
the images, computed like the GRPO loss: the prompt once per pair, chunked-vocabulary log-probs.
Targets come from a `Teacher` (`teacher(host_batch, step) -> list[str]`: a targets file, e.g. an
instruct model's outputs, checked before the first step; or the demo's scripted, deliberately noisy
judge). The optimizer is AdamW after global-norm clipping (defaults: TRL SFTTrainer's lr 2e-5, clip
1.0, no weight decay); the settings are kept in RUN_DIR/sft_config.json.

With `listener_spec`, the same step also teaches the *listener* role on the same targets: the
listener prefix, the target's reasoning with its answer removed and the listener's question, then
cross-entropy of the true label over the two choice tokens (`listener_logits`). The listener is by
default the policy's initial weights, so a warm start that should leave a useful listener teaches
both roles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lgrpo_jax.grpo.update import all_finite, policy_logprobs
from lgrpo_jax.listener import ListenerSpec, listener_logits


def target_tokens(tokenizer, texts, width: int, pair_ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B, 1, width) token ids of the target completions (right-padded), their mask, and (B, 1) where
  each one's first "<answer>" starts (`rewards.text.answer_token_of`: what the listener-role loss
  hides, exactly as the GRPO step's parser finds it). A target longer than `width` is an error
  naming its pair: cut, it would lose its answer and end-of-turn token, and the warm start would
  teach a policy that never closes the format."""
  from lgrpo_jax.rewards.text import answer_token_of
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  for r, x in enumerate(ids):
    if len(x) > width:
      which = f"pair {pair_ids[r]!r}" if pair_ids is not None else f"row {r}"
      raise ValueError(f"the warm-start target of {which} is {len(x)} tokens, more than sft.max_target_tokens="
                       f"{width}: cut, it would lose its answer and end-of-turn token; raise sft.max_target_tokens")
  out = np.zeros((len(ids), 1, width), np.int32)
  mask = np.zeros_like(out)
  answer_at = np.zeros((len(ids), 1), np.int32)
  for r, x in enumerate(ids):
    out[r, 0, :len(x)], mask[r, 0, :len(x)] = x, 1
    answer_at[r, 0] = answer_token_of(tokenizer, x)
  return out, mask, answer_at


def sft_loss(params, graphdef, batch, tokens, mask, pair_grid, chunk: int = 8192,
             listener_spec: ListenerSpec | None = None, listener_weight: float = 1.0, answer_at=None):
  """(loss, parts): mean NLL per target token (padding rows of the batch weigh nothing), plus
  `listener_weight` × the listener's mean cross-entropy of the labels when `listener_spec` is given."""
  model = nnx.merge(graphdef, params)
  logp = policy_logprobs(model, batch.input_ids, batch.attention_mask, batch.pixel_values, pair_grid, tokens,
                         mask, chunk)
  valid = batch.valid.astype(jnp.float32)
  w = mask.astype(jnp.float32) * valid[:, None, None]
  nll = -jnp.sum(logp * w) / jnp.maximum(w.sum(), 1)
  parts = {"sft/nll": nll}
  loss = nll
  if listener_spec is not None:
    b = batch.input_ids.shape[0]
    pixels = batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1])
    logits = listener_logits(model, batch.listener_input_ids, batch.listener_attention_mask, pixels,
                             tuple(pair_grid) * b, tokens, mask.sum(-1), listener_spec,
                             answer_token=answer_at)[:, 0]  # (B, 2): the view cut as the GRPO step cuts it
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.labels[:, None].astype(jnp.int32), -1)[:, 0]
    listener_ce = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
    parts["sft/listener_ce"] = listener_ce
    loss = loss + listener_weight * listener_ce
  return loss, parts


def make_sft_step(graphdef, tx: optax.GradientTransformation, pair_grid, chunk: int = 8192,
                  listener_spec: ListenerSpec | None = None, listener_weight: float = 1.0):
  """jit((params, opt_state, batch, tokens, mask, answer_at) → (params, opt_state, loss, parts)), params and
  optimizer state donated. `parts` adds `grad_norm` (before clipping) and `skipped`: a step whose loss or
  gradients are not finite leaves the parameters and the optimizer state as they were. As the GRPO step, the same arguments give the same function within a
  process (a warm start run again in a notebook does not compile again); keyed by the sharding
  rules too, and forgotten by `train.step.clear_compiled_steps()`."""
  from lgrpo_jax.train.step import kept, rules_key
  pair_grid = tuple(map(tuple, pair_grid))

  def step(params, opt_state, batch, tokens, mask, answer_at=None):
    (loss, parts), grads = jax.value_and_grad(sft_loss, has_aux=True)(
        params, graphdef, batch, tokens, mask, pair_grid, chunk, listener_spec, listener_weight, answer_at)
    ok = jnp.isfinite(loss) & all_finite(grads)  # a NaN/inf step changes nothing, as in the GRPO update

    def apply(args):
      p, s = args
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    params, opt_state = jax.lax.cond(ok, apply, lambda args: args, (params, opt_state))
    return params, opt_state, loss, dict(parts, grad_norm=optax.tree.norm(grads), skipped=~ok)

  key = (graphdef, tx, pair_grid, chunk, listener_spec, listener_weight, rules_key())
  return kept(_SFT_STEPS, key, lambda: jax.jit(step, donate_argnums=(0, 1)))


_SFT_STEPS: dict = {}


@functools.lru_cache(maxsize=8)
def sft_optimizer(learning_rate: float, max_grad_norm: float = 1.0,
                  weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The warm start's AdamW (after clipping the global gradient norm to `max_grad_norm`, when > 0):
  one object per setting, so that its kept step is found again."""
  adamw = optax.adamw(learning_rate, weight_decay=weight_decay)
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm > 0 else adamw


# ---- the warm-start stage of the launcher -------------------------------------------------------

TEACHERS = ("synthetic", "targets")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """The optional supervised stage before GRPO (`python -m lgrpo_jax.launch … sft.steps=N`)."""
  steps: int = 0  # 0: no warm start (an existing RUN_DIR/sft is still loaded; the 7B recipe starts from the instruct checkpoint)
  # AdamW at a constant rate, as TRL's SFTTrainer's defaults for a pretrained model: lr 2e-5, the
  # global gradient norm clipped to 1, no weight decay (the demo's tiny random model sets its own)
  learning_rate: float = 2e-5  # AdamW, constant
  max_grad_norm: float = 1.0  # the global gradient norm is clipped to this; 0: no clipping
  weight_decay: float = 0.0  # AdamW's decoupled weight decay
  global_batch: int = 0  # pairs per step; 0: pipeline.global_batch
  # the longest target in tokens (the end-of-turn token included); a longer one is an error naming
  # its pair (cut, it would lose its answer) — with teacher="targets", found before the first step
  max_target_tokens: int = 64
  # "synthetic": a scripted judge for data.source=synthetic (its descriptions are right; it answers
  # right with probability `teacher_accuracy`, otherwise "Image 1" — a position-biased judge).
  # "targets": a JSONL file of {"pair_id", "target"} (e.g. a stronger model's judgements), written
  # for the pair as stored; "Image 1"/"Image 2" are exchanged when the pipeline swapped the images.
  teacher: str = "synthetic"
  targets_path: str | None = None  # teacher="targets": the JSONL file
  # teacher="synthetic": how often the judge answers from its verdicts; otherwise it says "Image 1",
  # right anyway when the preferred image is first (accuracy p + (1 − p)/2 over both orders)
  teacher_accuracy: float = 1.0
  listener_weight: float = 0.0  # > 0: also teach the listener role on the same targets (see sft_loss)
  log_every: int = 25  # steps between lines of RUN_DIR/sft_metrics.jsonl (means over those steps) and, with loop.tensorboard, TensorBoard's run sft
  # Steps between RUN_DIR/sft_checkpoints saves (params, optimizer, data position), from which an
  # interrupted warm start resumes; 0: only when stopped by a signal. Removed once RUN_DIR/sft is saved.
  save_every: int = 100

  def __post_init__(self):
    if (self.steps < 0 or self.global_batch < 0 or self.max_target_tokens < 2 or self.log_every < 1
        or self.save_every < 0):
      raise ValueError(f"sft: steps={self.steps}, global_batch={self.global_batch} and save_every={self.save_every} "
                       f"must be ≥ 0, max_target_tokens={self.max_target_tokens} ≥ 2, log_every={self.log_every} ≥ 1")
    if self.teacher not in TEACHERS:
      raise ValueError(f"sft.teacher={self.teacher!r}: choose one of {TEACHERS}")
    if self.steps and self.teacher == "targets" and not self.targets_path:
      raise ValueError("sft.targets_path is required for sft.teacher='targets'")
    if not 0 < self.learning_rate < math.inf:
      raise ValueError(f"sft.learning_rate={self.learning_rate} must be finite and > 0")
    for name in ("max_grad_norm", "weight_decay"):
      if not 0 <= getattr(self, name) < math.inf:
        raise ValueError(f"sft.{name}={getattr(self, name)} must be finite and ≥ 0")
    if not 0 <= self.listener_weight < math.inf:
      raise ValueError(f"sft.listener_weight={self.listener_weight} must be finite and ≥ 0")
    if not 0 <= self.teacher_accuracy <= 1:
      raise ValueError(f"sft.teacher_accuracy={self.teacher_accuracy} must be in [0, 1]")


DESCRIBED = ("quality", "background", "colour", "shape")  # the first attribute that tells them apart


def synthetic_target(pair_id: str, label: int, n_wrong: int, correct: bool,
                     choices: tuple[str, str] = ("Image 1", "Image 2")) -> str:
  """The scripted judge's completion for a synthetic pair as shown (label = the preferred image's
  position): "<think>Image 1: black background, yes. Image 2: white background, no.</think>
  <answer>Image 1</answer>" (for n_wrong=0: "Image 1: clean, yes. Image 2: tinted, no.") — the
  descriptions and verdicts are right; the answer is right when `correct`, else "Image 1". The
  answer is written as `choices` (`prompt.choices`) has it."""
  from lgrpo_jax.data.synthetic import pair_attributes
  try:
    _, seed, index = pair_id.rsplit("-", 2)
    good, bad = pair_attributes(int(index), int(seed), n_wrong)
  except ValueError:
    raise ValueError(f"sft.teacher='synthetic' needs synthetic pairs; got pair id {pair_id!r}") from None
  attr = next(a for a in DESCRIBED if a in good and good[a] != bad[a])
  shown = (good, bad) if label == 0 else (bad, good)
  verdict = ("yes", "no") if label == 0 else ("no", "yes")
  answer = label + 1 if correct else 1
  what = (lambda a: a[attr]) if attr == "quality" else (lambda a: f"{a[attr]} {attr}")
  return (f"<think>Image 1: {what(shown[0])}, {verdict[0]}. Image 2: {what(shown[1])}, "
          f"{verdict[1]}.</think><answer>{choices[answer - 1]}</answer>")


def read_targets(path: str) -> dict[str, str]:
  """{pair_id: target} from a UTF-8 JSONL file; a bad line (not an object, a pair_id that is not a
  string or a number, a target that is not a string, a pair_id given twice) is an error naming the
  file and line."""
  out, line_of = {}, {}
  try:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          pid, target = rec["pair_id"], rec["target"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: expected a JSON object with pair_id and target ({e})") from None
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not isinstance(target, str):
          raise ValueError(f"{path}:{n}: pair_id must be a string (or a number) and target a string; got "
                           f"pair_id={pid!r}, target of type {type(target).__name__}")
        if str(pid) in out:
          raise ValueError(f"{path}:{n}: pair_id {pid!r} again (first on line {line_of[str(pid)]})")
        out[str(pid)], line_of[str(pid)] = target, n
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  return out


_POSITIONS = re.compile(r"\b(image)(\s*)([12])\b|\b(first|second)(\s+image)\b", re.IGNORECASE)
_OTHER = {"1": "2", "2": "1", "first": "second", "second": "first"}


_ANSWER = re.compile(r"(<answer>)(\s*)(.*?)(\s*)(</answer>)", re.DOTALL)


def _swap_images(text: str, choices: tuple[str, str] = ("Image 1", "Image 2")) -> str:
  """The target as written for the other order: every mention of a position exchanged — "Image 1"
  ↔ "Image 2" in any case ("image 1", "IMAGE 2"), and "first image" ↔ "second image" — the words'
  capitalisation kept; and an answer that is one of `choices` (other texts than "Image 1/2")
  becomes the other."""
  def swap(m):
    if m.group(1):
      return m.group(1) + m.group(2) + _OTHER[m.group(3)]
    word = _OTHER[m.group(4).lower()]
    word = word.upper() if m.group(4).isupper() else word.capitalize() if m.group(4)[0].isupper() else word
    return word + m.group(5)

  def swap_answer(m):  # on the text before the position swap, which may have rewritten a choice
    other = {choices[0]: choices[1], choices[1]: choices[0]}.get(m.group(3))
    return m.group(0) if other is None else m.group(1) + m.group(2) + other + m.group(4) + m.group(5)

  if tuple(choices) == ("Image 1", "Image 2"):
    return _POSITIONS.sub(swap, text)
  pieces, at = [], 0  # position mentions swapped outside the answers; the answers swapped as choices
  for m in _ANSWER.finditer(text):
    pieces += [_POSITIONS.sub(swap, text[at:m.start()]), swap_answer(m)]
    at = m.end()
  return "".join(pieces) + _POSITIONS.sub(swap, text[at:])


SETTINGS = "sft_config.json"  # RUN_DIR/: the settings the warm start (finished or under way) runs with
_NOT_COMPARED = ("steps", "log_every", "save_every")  # a longer stage, other logging: the same warm start


# What a field added to the record later meant before it existed (a run directory written by an
# earlier version): the optimizer was optax.adamw(lr) — no clipping, optax's weight decay 1e-4.
_BEFORE_RECORDED = {"max_grad_norm": 0.0, "weight_decay": 1e-4}


def read_settings(run_dir: str) -> dict | None:
  """RUN_DIR/sft_config.json (None when absent or unreadable)."""
  try:
    with open(os.path.join(run_dir, SETTINGS)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _settings_record(cfg: SFTConfig, pipe_cfg, seed: int) -> dict:
  """The settings a warm start's weights depend on: the `sft` section, the batch it actually ran
  (`sft.global_batch` 0 means the pipeline's), the seed, the choices; the targets file by its
  absolute path (the same file named two ways is the same)."""
  rec = json.loads(json.dumps(dataclasses.asdict(cfg)))
  rec["global_batch"] = cfg.global_batch or pipe_cfg.global_batch
  if cfg.targets_path:
    rec["targets_path"] = os.path.abspath(cfg.targets_path)
  rec.update(seed=seed, choices=list(pipe_cfg.prompt.choices))
  return rec


def _write_settings(run_dir: str, record: dict) -> None:
  with open(os.path.join(run_dir, SETTINGS), "w") as f:
    json.dump(record, f, indent=2)


def _settings_changed(recorded: dict | None, now: dict, with_steps: bool = False) -> str:
  """"key: old → new, …" for the recorded keys whose value `now` differs ("" when nothing is
  recorded); a key recorded by an earlier version is compared, one added since reads as its value
  before it existed (`_BEFORE_RECORDED`) or is not compared."""
  if recorded is None:
    return ""
  recorded = {**_BEFORE_RECORDED, **recorded}
  skip = set(_NOT_COMPARED) - ({"steps"} if with_steps else set())
  name = lambda k: k if k in ("seed", "choices") else f"sft.{k}"
  return ", ".join(f"{name(k)}: {json.dumps(recorded[k])} → {json.dumps(v)}" for k, v in now.items()
                   if k not in skip and k in recorded and recorded[k] != v)


def check_targets(targets: dict[str, str], pair_ids, tokenizer, cfg: SFTConfig, choices, end_token: str) -> None:
  """Every target of `pair_ids`, as written and with the images swapped, checked before the first
  step (a bad one used to stop the stage when its batch came, hours in): its answer must be one of
  `choices` (else the warm start teaches what the format reward scores 0), and it must fit
  `sft.max_target_tokens`. One error lists the first few offenders and how many there are."""
  bad_answer, too_long = [], []
  texts, owners = [], []

  def measure():  # in chunks, keeping lengths only: 100k targets' token lists would take GBs
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]
    for pid, n in zip(owners, lengths):
      if n > cfg.max_target_tokens and (not too_long or too_long[-1][0] != pid):
        too_long.append((pid, n))
    texts.clear()
    owners.clear()

  for pid in dict.fromkeys(pair_ids):
    t = targets[pid]
    m = _ANSWER.search(t)
    if m is None or m.group(3) not in choices:
      bad_answer.append(f"{pid!r} ({'no <answer>…</answer>' if m is None else 'answer ' + repr(m.group(3))})")
    swapped = _swap_images(t, choices)
    for text in (t,) if swapped == t else (t, swapped):
      texts.append(text + end_token)
      owners.append(pid)
    if len(texts) >= 4096:
      measure()
  if texts:
    measure()
  problems = []
  if bad_answer:
    problems.append(f"{len(bad_answer)} target(s) whose answer is not one of {list(choices)} (the format reward "
                    f"would score it 0): {', '.join(bad_answer[:3])}")
  if too_long:
    problems.append(f"{len(too_long)} target(s) longer than sft.max_target_tokens={cfg.max_target_tokens} "
                    f"(longest {max(n for _, n in too_long)} tokens; raise it): "
                    + ", ".join(f"{pid!r} ({n})" for pid, n in too_long[:3]))
  if problems:
    raise ValueError(f"{cfg.targets_path}: " + "; ".join(problems))


class Teacher:
  """Target completions for a host batch (as the pipeline shows the pairs)."""

  def __init__(self, cfg: SFTConfig, n_wrong: int = 1, seed: int = 0,
               choices: tuple[str, str] = ("Image 1", "Image 2")):
    self.cfg, self.n_wrong, self.seed, self.choices = cfg, n_wrong, seed, tuple(choices)
    self.targets = read_targets(cfg.targets_path) if cfg.teacher == "targets" else None

  def __call__(self, host: dict, step: int = 0) -> list[str]:
    texts = []
    for pid, label, swapped in zip(host["pair_ids"], host["labels"], host["swapped"]):
      if self.targets is None:
        # The judge's coin depends on (seed, step, pair) only: the same on any number of processes.
        coin = np.random.default_rng([self.seed, step, zlib.crc32(pid.encode())]).random()
        texts.append(synthetic_target(pid, int(label), self.n_wrong, bool(coin < self.cfg.teacher_accuracy),
                                      self.choices))
      elif pid not in self.targets:
        raise ValueError(f"{self.cfg.targets_path}: no target for pair {pid!r}")
      else:
        texts.append(_swap_images(self.targets[pid], self.choices) if swapped else self.targets[pid])
    return texts


def _log_row(step: int, window: list[dict], learning_rate: float, seconds: float) -> dict:
  """One line of sft_metrics.jsonl from the steps since the last one, as TRL's trainer logs: the loss
  (and its parts) averaged over those steps — skipped (non-finite) ones left out, NaN if all were
  — the last step's gradient norm, before clipping, and the updates skipped in the window."""
  window = jax.device_get([{k: v.addressable_data(0) for k, v in w.items()} for w in window])  # one read
  ok = np.array([not bool(w["skipped"]) for w in window])
  row = {"step": step}
  for k in window[-1]:
    if k not in ("skipped", "grad_norm"):
      v = np.array([float(w[k]) for w in window])[ok]
      row[k] = float(v.mean()) if v.size else math.nan
  row.update(grad_norm=float(window[-1]["grad_norm"]), learning_rate=learning_rate,
             skipped_updates=int((~ok).sum()), time=seconds)
  return row


def run_sft(model, tokenizer, pairs, cfg: SFTConfig, pipe_cfg, run_dir: str, *, seed: int = 0,
            n_wrong: int = 1, end_token: str = "<|im_end|>", say=print, mesh=None, tensorboard: bool = False):
  """The warm-start stage: `cfg.steps` steps on the teacher's targets, then the parameters are saved
  to RUN_DIR/sft (Orbax) with RUN_DIR/sft_metrics.jsonl. A run directory that already has RUN_DIR/sft
  loads it instead (so a resumed run does not repeat the stage). Updates `model` in place.

  Interruptions: every `cfg.save_every` steps the stage state (parameters, optimizer state, data
  position) goes to RUN_DIR/sft_checkpoints, and an interrupted stage resumes from there exactly.
  SIGTERM or SIGINT on any process saves there on every process and raises `stopping.Stopped`; a
  data error on any process saves, then raises on every process (as the GRPO loop does).

  Logging: every `cfg.log_every` steps one line of RUN_DIR/sft_metrics.jsonl (see `_log_row`), also
  to TensorBoard under RUN_DIR/tensorboard/sft with `tensorboard`. A step whose loss or gradients are
  not finite changes nothing and is said on stderr."""
  import orbax.checkpoint as ocp

  from lgrpo_jax.data.pipeline import make_batches
  from lgrpo_jax.runs import first_line, keep_jsonl_through, sync_file
  from lgrpo_jax.sharding import global_batch_array
  from lgrpo_jax.train import stopping
  from lgrpo_jax.train.loop import pair_grid_of, to_device

  from lgrpo_jax.data.prompts import check_tokenizer_fits
  check_tokenizer_fits(tokenizer, model.config)
  run_dir = os.path.abspath(run_dir)
  path = os.path.join(run_dir, "sft")
  graphdef, params = nnx.split(model, nnx.Param)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  recorded = read_settings(run_dir)
  record = _settings_record(cfg, pipe_cfg, seed)
  if os.path.isdir(path):
    try:
      restored = ocp.StandardCheckpointer().restore(path, abstract(params))
    except Exception as e:  # noqa: BLE001 — damaged: said in a line, not TensorStore's pages
      raise ValueError(f"{path} (the warm start's weights, which the reference and listener start from) "
                       f"cannot be read ({type(e).__name__}: {first_line(e)}); put back a good copy, or delete "
                       f"it and {os.path.join(run_dir, SETTINGS)} to run the warm start again") from None
    nnx.update(model, restored)
    changed = _settings_changed(recorded, record, with_steps=True) if cfg.steps else ""
    say(f"warm start: loaded {path}" + (
        " (sft.steps=0 here: the run's warm start stays, and the reference and listener start from it)"
        if not cfg.steps else f"; warning: it was trained with other settings ({changed}) and is not run again "
        f"— delete {path} and {os.path.join(run_dir, SETTINGS)} to redo it" if changed else ""))
    return model
  if not cfg.steps:
    return model
  pipe = dataclasses.replace(pipe_cfg, seed=seed, global_batch=cfg.global_batch or pipe_cfg.global_batch,
                             listener=pipe_cfg.listener or cfg.listener_weight > 0)
  spec = ListenerSpec.from_tokenizer(tokenizer, pipe.prompt) if cfg.listener_weight > 0 else None
  tx = sft_optimizer(cfg.learning_rate, cfg.max_grad_norm, cfg.weight_decay)
  from lgrpo_jax.sharding import init_like
  opt_state = init_like(tx.init, params, mesh)  # one program; moments laid out as their parameters
  teacher = Teacher(cfg, n_wrong, seed, pipe_cfg.prompt.choices)
  if teacher.targets is not None and isinstance(pairs, (list, tuple)):  # before hours of steps, not at the batch
    missing = [p.pair_id for p in pairs if p.pair_id not in teacher.targets]
    if missing:
      raise ValueError(f"{cfg.targets_path}: no target for {len(missing)} of the {len(pairs)} training pairs "
                       f"(first: {missing[:3]})")
    check_targets(teacher.targets, [p.pair_id for p in pairs], tokenizer, cfg, pipe_cfg.prompt.choices, end_token)
  steps: dict = {}
  batches = make_batches(pairs, tokenizer, pipe, process_index=jax.process_index(),
                         process_count=jax.process_count())
  manager = ocp.CheckpointManager(os.path.join(run_dir, "sft_checkpoints"), options=ocp.CheckpointManagerOptions(
      max_to_keep=1, enable_async_checkpointing=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="sft")))
  try:  # on any error, the manager's threads and files are not left open (a notebook goes on)
    primary = jax.process_index() == 0
    metrics_path = os.path.join(run_dir, "sft_metrics.jsonl")
    done = 0
    latest = manager.latest_step()
    # Interrupted before this version recorded its settings: what it ran with (its optimizer) is known.
    changed = _settings_changed(recorded if recorded is not None or latest is None else {}, record)
    if latest == 0 and changed:  # stopped before its first step: nothing trained, start afresh
      say(f"warm start: {manager.directory}/0 (nothing trained yet) was saved with other settings; starting afresh")
      manager.delete(0)  # else a stop at step 0 would keep it, and the next resume would read it
      latest = None
    if latest is not None:  # an interrupted warm start: go on from where it stopped
      done = latest
      if changed or cfg.steps < done:  # one warm start of two settings would be neither
        raise ValueError(f"the interrupted warm start in {manager.directory} (step {done}) was run with other "
                         f"settings: " + (changed or f"sft.steps={cfg.steps} < the {done} steps done") +
                         f"; give the same sft settings to resume it, or delete {manager.directory} and "
                         f"{os.path.join(run_dir, SETTINGS)} to start it again")
      try:
        restored = manager.restore(done, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract({"params": params, "opt_state": opt_state})),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 — damaged: said in a line
        raise ValueError(f"{manager.directory}/{done} (the interrupted warm start's state) cannot be read "
                         f"({type(e).__name__}: {first_line(e)}); delete {manager.directory} to run the warm "
                         "start again from its first step") from None
      params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
      batches.set_state(restored["data"])
      say(f"warm start: resumed from {manager.directory}/{done}")
    if primary:  # the lines of the steps done, each once
      keep_jsonl_through(metrics_path, done)
      _write_settings(run_dir, record)
    put = (lambda a: jnp.asarray(a)) if mesh is None else (lambda a: global_batch_array(np.asarray(a), mesh))
    feed = stopping.Feed(batches, pipe.stall_timeout_s)
    texts, arrays = [], []  # the teacher's targets of the batch read, and as token arrays

    def save(step: int):
      if step not in manager.all_steps():
        if primary:
          sync_file(metrics_path)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonSave(feed.position())), force=True)
      manager.wait_until_finished()

    def targets(host):  # a missing or too long target fails like a bad record: on every process at once
      texts[:] = [t + end_token for t in teacher(host, s)]
      arrays[:] = target_tokens(tokenizer, texts, cfg.max_target_tokens, host["pair_ids"])

    window: list[dict] = []  # the steps since the last logged line
    skipped = 0
    tb = None
    if primary and tensorboard:  # its own TensorBoard run: the GRPO run's restarts purge by step
      from lgrpo_jax.train.tensorboard import EventWriter
      tb = EventWriter(os.path.join(run_dir, "tensorboard", "sft"))
      if done:
        tb.restart_at(done + 1)
    t0 = time.perf_counter()
    try:
      with open(metrics_path if primary else os.devnull, "a") as log_file, stopping.StopSignals() as stop:
        for s in range(done + 1, cfg.steps + 1):
          signum, failed, ended = feed.next(stop, check=targets)
          if failed or ended:
            save(s - 1)
            if failed:
              raise feed.error(failed, s - 1)
            raise ValueError(f"the warm start's data ran out after step {s - 1} of sft.steps={cfg.steps} "
                             f"(pipeline.num_epochs={pipe.num_epochs})")
          if signum:
            save(s - 1)
            manager.close()
            raise stopping.Stopped(signum, f"warm start step {s - 1}", manager.directory)
          host = feed.take()
          grid = pair_grid_of(host)
          if grid not in steps:
            steps[grid] = make_sft_step(graphdef, tx, grid, listener_spec=spec, listener_weight=cfg.listener_weight)
          tokens, mask, answer_at = arrays
          with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            params, opt_state, loss, parts = steps[grid](params, opt_state, to_device(host, mesh), put(tokens),
                                                         put(mask), put(answer_at))
          window.append(dict(parts, loss=loss))  # device scalars: read once per logged line
          if s % cfg.log_every == 0 or s == cfg.steps:
            row = _log_row(s, window, cfg.learning_rate, time.perf_counter() - t0)
            n_skipped = row["skipped_updates"]
            window.clear()
            skipped += n_skipped
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            if tb is not None:
              tb.scalars(s, {k: v for k, v in row.items() if k != "step"})
            if primary:
              say(f"warm start {s}/{cfg.steps}  loss {row['loss']:.4f}  ({row['time']:.0f} s)")
            if n_skipped and primary:
              print(f"warm start: {n_skipped} update(s) before step {s} skipped: the loss or the gradients were "
                    f"not finite (NaN/inf), the parameters not changed by them; {skipped} in this stage so far",
                    file=sys.stderr, flush=True)
          if cfg.save_every and s % cfg.save_every == 0 and s < cfg.steps:
            save(s)
    finally:  # the model holds the parameters reached, also when stopped or failed (they were donated)
      if tb is not None:
        tb.close()
      try:
        nnx.update(model, params)
      except Exception:  # noqa: BLE001 — a step that failed mid-way left nothing to hand back
        pass
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, params)
    ckpt.wait_until_finished()
    manager.close()
    if primary:  # the stage's result is in RUN_DIR/sft: its optimizer state is no longer needed
      import shutil
      shutil.rmtree(manager.directory, ignore_errors=True)
    nnx.update(model, params)
    return model
  except BaseException:
    try:
      manager.close()
    except Exception:  # noqa: BLE001 — the error being raised is the one to see
      pass
    raise
