"""Held-out evaluation during training: greedy judgements of every pair in both orders.

For each pair shown as given and swapped, the reasoner writes one greedy completion; it is correct
when its parsed answer is the preferred image. Reported: accuracy per order and their mean, the
position-bias gap, the format rate and — with a listener — the contradiction rate among well-formed
completions. The judge is `lgrpo_jax.evaluation.judge` (greedy, one sample, no answer-slot read);
the full evaluation command, with probability scoring, sampling and ranking, is
`python -m lgrpo_jax.evaluate` (docs/evaluation.md).

Its batches are read as the training loop's are (`stopping.Feed`): a read hanging for over
`pipeline.stall_timeout_s` raises `DataStall` on every process instead of leaving the others waiting
in the next collective, and a stop asked for (SIGTERM, Ctrl-C, `Trainer.request_stop`) ends the
evaluation at the next batch (`stopping.EvaluationStopped`), so that the loop saves at once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.evaluation.judge import judge
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import stopping


def judge_greedy(params, listener_params, batch, tables, *, spec: ListenerSpec | None, **kw):
  """Per row: (answer (B,) in {0,1,2}, well-formed (B,), listener choice (B,) in {1,2} or 0)."""
  out = judge(params, listener_params, batch, tables, jax.random.key(0), spec=spec, self_spec=None, **kw)
  choice = jnp.argmax(out.p_listener[:, 0], -1).astype(jnp.int32) + 1 if spec is not None else \
      jnp.zeros(out.answer.shape[:1], jnp.int32)
  return out.answer[:, 0], out.format_ok[:, 0], choice


def judge_fn(graphdef, listener_graphdef, sampling: SamplingConfig, spec: ListenerSpec | None, pair_grid):
  """The jitted `judge_greedy` for one image-grid signature. As the training step's
  (`train.step.make_train_step`), the same arguments give the same function within a process, so an
  Evaluator built again (a notebook cell run twice, a run resumed in-process) does not trace and
  compile its judge again; `train.step.clear_compiled_steps()` forgets them too. Unlike the step,
  the judge reads no registry (a reward replaced in a notebook keeps it), only the sharding rules."""
  from lgrpo_jax.train.step import kept, rules_key
  pair_grid = tuple(map(tuple, pair_grid))
  key = (judge_greedy, graphdef, listener_graphdef, sampling, spec, pair_grid, rules_key())
  return kept(_JUDGES, key, lambda: jax.jit(functools.partial(
      judge_greedy, graphdef=graphdef, listener_graphdef=listener_graphdef, sampling=sampling, spec=spec,
      pair_grid=pair_grid)))


_JUDGES: dict = {}


def gather_rows(x) -> np.ndarray:
  """The whole global batch's values on this host (per-process rows concatenated in process order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Greedy both-orders evaluation of a fixed set of held-out pairs (compiled once per shape): a list,
  or a random-access source (`len` and `[i]`, e.g. `data.tfds_builder.tfds_pairs`) read lazily."""

  def __init__(self, pairs, tokenizer, pipe_cfg: PipelineConfig, sampling: SamplingConfig, graphdef,
               listener_graphdef, spec: ListenerSpec | None, tables, mesh=None):
    random_access = hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__")
    self.pairs = pairs if random_access else list(pairs)
    self.tokenizer, self.tables, self.mesh = tokenizer, tables, mesh
    self.pipe_cfg = dataclasses.replace(pipe_cfg, both_orders=True, num_epochs=1, bad_records="skip")
    self.sampling = dataclasses.replace(sampling, temperature=0.0, num_samples=1)
    self.graphdef, self.listener_graphdef, self.spec = graphdef, listener_graphdef, spec
    self._fns: dict = {}
    self.read_failed = False  # the last call ended on a read failure agreed by every process

  def _fn(self, pair_grid):
    if pair_grid not in self._fns:
      self._fns[pair_grid] = judge_fn(self.graphdef, self.listener_graphdef, self.sampling, self.spec, pair_grid)
    return self._fns[pair_grid]

  def __call__(self, params, listener_params, signals: stopping.StopSignals | None = None,
               step: int | None = None) -> dict:
    """The held-out metrics. Raises `stopping.EvaluationStopped` when `signals` asks for a stop on any
    process, and the read's error (`DataStall` for a hang) when a read fails on any process — on every
    process alike (`read_failed` is then set, whatever the error's type); `step` is the step the
    caller saves before raising it (named in the error)."""
    from lgrpo_jax.train.loop import pair_grid_of, to_device
    correct = {False: [], True: []}
    formed, contra = [], []
    signals = signals if signals is not None else stopping.StopSignals()
    feed = stopping.Feed(make_batches(self.pairs, self.tokenizer, self.pipe_cfg, process_index=jax.process_index(),
                                      process_count=jax.process_count()), self.pipe_cfg.stall_timeout_s,
                         saves=step is not None)
    self.read_failed = False
    while True:
      stop, failed, ended = feed.next(signals)
      if failed:
        self.read_failed = True
        raise feed.error(failed, step)
      if stop:
        raise stopping.EvaluationStopped(stop)
      if ended:
        break
      host = feed.take()
      answer, ok, choice = (gather_rows(a) for a in self._fn(pair_grid_of(host))(
          params, listener_params, to_device(host, self.mesh), self.tables))
      # Every process scores every row of the global batch (its rows follow the process order).
      labels, swapped, valid = (gather_rows(np.asarray(host[k])) for k in ("labels", "swapped", "valid"))
      for r in np.flatnonzero(valid):
        correct[bool(swapped[r])].append(answer[r] == labels[r] + 1)
        formed.append(bool(ok[r]))
        if ok[r] and self.spec is not None:
          contra.append(choice[r] != answer[r])
    a1, a2 = float(np.mean(correct[False] or [0])), float(np.mean(correct[True] or [0]))
    out = {"eval/accuracy": (a1 + a2) / 2, "eval/accuracy_as_given": a1, "eval/accuracy_swapped": a2,
           "eval/position_bias_gap": abs(a1 - a2), "eval/format_rate": float(np.mean(formed or [0])),
           "eval/pairs": len(correct[False])}
    if self.spec is not None:
      out["eval/contradiction_rate"] = float(np.mean(contra)) if contra else float("nan")  # none well-formed
    return out
