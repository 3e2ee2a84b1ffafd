"""The GRPO step's phases with and without prefix sharing, on the shared 74M benchmark model.

  .venv/bin/python bench/step.py [--pairs 4] [--samples 8] [--new-tokens 128] [--runs 1] [--micro-batches 1]

B pairs, each a prompt with two 448² images (256 image tokens each) and --text-tokens of text; G
completions of N tokens per pair (every row generates N tokens: no EOS); the listener's prefix is as
long as the prompt, its question 24 tokens. Phases, each its own jitted program, timed after a
compile run (median of --runs):

  rollout     sampling (prefill once per pair, G rows decoded from the shared cache) — the same in
              both modes (the sampler always shares the prefix)
  listener    P(Image 1/2) for every completion
  reference   the reference model's per-token log-probs (β > 0); the listener is the reference model
              (the training default), so this phase reuses the listener phase's image features —
              one vision pass for both, as the training step runs it (--separate-vision: each its own)
  update      loss + backward + AdamW (one pass, one micro-batch)

`shared`: `step.prefix_sharing=True` (each pair's images and prompt once, the G completions attend
to that one pass); `copies`: every completion with its own copy of the prompt and images, as the
PyTorch peers compute it. Checks first that both modes give the same log-probs and listener
probabilities. Prints per phase: seconds, counted matmul FLOPs, the measured/predicted saving, and
the achieved fraction of the fp32 matmul rate measured in the same run. Like the entry points, it
re-executes itself with huge-page malloc where that applies (lgrpo_jax/hostmem.py;
LGRPO_HOST_HUGEPAGES=0 to measure without).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import DEFAULT_CONFIG  # noqa: E402


def pair_inputs(cfg: dict, pairs: int, text_tokens: int, image_px: int, seed: int = 0):
  """Prompt ids with two images per pair, and the pixels (pairs, 2·g², patch_dim)."""
  v = cfg["vision_config"]
  p, m = v["patch_size"], v["spatial_merge_size"]
  g = image_px // p
  n_img = g * g // (m * m)
  rng = np.random.default_rng(seed)
  special = min(cfg["vision_start_token_id"], cfg["image_token_id"], cfg["video_token_id"])
  image = [cfg["vision_start_token_id"], *[cfg["image_token_id"]] * n_img, cfg["vision_end_token_id"]]
  third = text_tokens // 3
  rows = []
  for _ in range(pairs):
    text = rng.integers(0, special, text_tokens).tolist()
    rows.append(text[:third] + image + text[third:2 * third] + image + text[2 * third:])
  ids = np.asarray(rows, np.int32)
  patch_dim = v["in_channels"] * v["temporal_patch_size"] * p * p
  pixels = rng.standard_normal((pairs, 2 * g * g, patch_dim)).astype(np.float32)
  return ids, pixels, ((1, g, g), (1, g, g))


def timed(fn, runs: int) -> float:
  import jax
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def build(raw: dict, model, *, pairs: int, samples: int, new_tokens: int, text_tokens: int, image_px: int,
          beta: float = 0.04, chunk: int = 8192, micro_batches: int = 1, suffix: int = 24,
          share_frozen_vision: bool = True, freeze_vision: bool = False):
  """The step's phases on `model` (any mesh it lives on) as jitted programs, and their counted FLOPs.

  Returns a namespace: params, opt_state, prompt_len, and for each mode (True = prefix sharing):
  `logp(mode)`, `listen(mode)` (params → out), `update(mode)` ((params, opt_state) → params),
  `rollout()` (params → tokens), `flops[phase] = (shared, copies)`.

  `share_frozen_vision` (as the training step does when the listener is the reference model, the
  default): the listener phase runs the vision tower and the reference phase reuses its image
  features (handed in as an argument, not recomputed); False: each phase runs its own.
  `freeze_vision` (`optim.freeze=("vision",)`): the update gets the rollout's image features, as the
  training step hands them on (no vision pass, no backward through it)."""
  import functools
  import types

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lgrpo_jax.grpo import LossConfig, token_weights
  from lgrpo_jax.grpo.update import OptimConfig, PolicyBatch, make_optimizer, policy_logprobs, update
  from lgrpo_jax.listener import ListenerSpec, listener_probs
  from lgrpo_jax.models.qwen2_5_vl import flops as F
  from lgrpo_jax.models.qwen2_5_vl.rope import get_rope_index
  from lgrpo_jax.sampling import SamplingConfig, sample_from_embeddings

  cfg = model.config
  b, g, n = pairs, samples, new_tokens
  ids_np, pixels_np, pair_grid = pair_inputs(raw, b, text_tokens, image_px)
  p = ids_np.shape[1]
  ids, mask = jnp.asarray(ids_np), jnp.ones(ids_np.shape, jnp.int32)
  pixels = jnp.asarray(pixels_np)
  grid = pair_grid * b
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 1000, (b, g, n)), jnp.int32)
  tmask = jnp.ones((b, g, n), jnp.int32)
  lengths = jnp.full((b, g), n, jnp.int32)
  spec = ListenerSpec(tuple(int(t) for t in rng.integers(0, 1000, suffix)), (11, 12), (), ())
  graphdef, params = nnx.split(model, nnx.Param)
  loss_cfg = LossConfig(beta=beta)
  optim_cfg = OptimConfig(learning_rate=1e-6, micro_batches=micro_batches, freeze=("vision",) if freeze_vision else ())
  tx = make_optimizer(optim_cfg, params)
  opt_state = tx.init(params)
  flat = pixels.reshape(-1, pixels.shape[-1])
  ref_logp = jnp.asarray(-rng.random((b, g, n)), jnp.float32)
  pb = PolicyBatch(ids, mask, pixels, tokens, tmask, ref_logp, jnp.asarray(rng.standard_normal((b, g)), jnp.float32),
                   token_weights(tmask, loss_cfg), ref_logp if beta > 0 else None)

  # The listener's image features, for the reference phase when they are shared (the same weights),
  # and the rollout's, for the update when the tower is frozen (the same weights again, here).
  feats = jax.jit(lambda prm: nnx.merge(graphdef, prm).image_features(flat, grid))(params) \
      if share_frozen_vision or freeze_vision else None
  frozen_feats = feats if share_frozen_vision else None
  rollout_feats = feats.reshape(b, -1, cfg.text.hidden_size) if freeze_vision else None

  @functools.cache  # one compiled program per mode (the check and the timing share it)
  def logp(prefix_sharing):
    fn = jax.jit(lambda prm, feats: policy_logprobs(nnx.merge(graphdef, prm), ids, mask, pixels, pair_grid, tokens,
                                                    tmask, chunk, prefix_sharing=prefix_sharing, image_embeds=feats))
    f = lambda prm: fn(prm, frozen_feats)
    f.lower = lambda prm: fn.lower(prm, frozen_feats)
    return f

  @functools.cache
  def listen(prefix_sharing):
    return jax.jit(lambda prm: listener_probs(nnx.merge(graphdef, prm), ids, mask, flat, grid, tokens, lengths, spec,
                                              prefix_sharing))

  @functools.cache
  def step_update(prefix_sharing):
    # The batch is an argument, not a closure constant: XLA would constant-fold through it.
    fn = jax.jit(lambda prm, st, batch: update(prm, st, graphdef, tx, batch, pair_grid, loss_cfg, optim_cfg, chunk,
                                               prefix_sharing)[0])
    f = lambda prm, st: fn(prm, st, pb._replace(image_embeds=rollout_feats))
    f.lower = lambda prm, st: fn.lower(prm, st, pb._replace(image_embeds=rollout_feats))
    return f

  @functools.cache
  def rollout():
    sampling = SamplingConfig(max_new_tokens=n, num_samples=g, temperature=1.0)

    def run(prm):
      policy = nnx.merge(graphdef, prm)
      pos, _ = get_rope_index(ids, mask, grid, policy.config)
      x = policy.embed(ids, policy.image_features(flat, grid))
      return sample_from_embeddings(policy, x, pos, mask, sampling, jax.random.key(0)).tokens
    return jax.jit(run)

  # Counted matmul FLOPs of each phase in each mode.
  vis1, vis_g = F.vision_matmuls(cfg, grid), F.vision_matmuls(cfg, pair_grid * (b * g))
  t_head = [("head", 1, b * g * n, cfg.text.hidden_size, cfg.text.vocab_size)]
  fl = {
      "rollout": (F.matmul_flops(F.rollout_matmuls(cfg, b, p, grid, g, n)),) * 2,
      "listener": (F.matmul_flops(vis1 + F.text_matmuls(cfg, b, p, lm_head=False)
                                  + F.extend_matmuls(cfg, b, p, g, n + suffix, lm_head=False)),
                   F.matmul_flops(vis_g + F.text_matmuls(cfg, b * g, p + n + suffix, lm_head=False))),
  }
  policy_shared = F.matmul_flops(vis1 + F.text_matmuls(cfg, b, p, lm_head=False)
                                 + F.extend_matmuls(cfg, b, p, g, n, lm_head=True))
  policy_copies = F.matmul_flops(vis_g + F.text_matmuls(cfg, b * g, p + n, lm_head=False) + t_head)
  # Shared frozen vision: the reference phase's vision tower is the listener's (counted there).
  fl["reference"] = ((policy_shared - F.matmul_flops(vis1), policy_copies - F.matmul_flops(vis_g))
                     if share_frozen_vision else (policy_shared, policy_copies))
  fl["update"] = (3 * policy_shared, 3 * policy_copies)
  if freeze_vision:  # the tower is neither run nor differentiated in the update
    fl["update"] = (3 * (policy_shared - F.matmul_flops(vis1)), 3 * (policy_copies - F.matmul_flops(vis_g)))
  return types.SimpleNamespace(params=params, opt_state=opt_state, prompt_len=p, logp=logp, listen=listen,
                               update=step_update, rollout=rollout, flops=fl, suffix=suffix,
                               parts=types.SimpleNamespace(graphdef=graphdef, tx=tx, batch=pb, pair_grid=pair_grid,
                                                           loss_cfg=loss_cfg, optim_cfg=optim_cfg, chunk=chunk))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--text-tokens", type=int, default=128)
  ap.add_argument("--image", type=int, default=448)
  ap.add_argument("--runs", type=int, default=1)
  ap.add_argument("--beta", type=float, default=0.04)
  ap.add_argument("--chunk", type=int, default=8192)
  ap.add_argument("--micro-batches", type=int, default=1,
                  help="the update's gradient-accumulation micro-batches (both modes; bounds activation memory)")
  ap.add_argument("--modes", choices=("both", "shared"), default="both",
                  help="shared: time prefix sharing only (the G-copies mode is still run once for the check)")
  ap.add_argument("--separate-vision", action="store_true",
                  help="the reference phase runs its own vision tower (a listener that is not the reference model)")
  ap.add_argument("--freeze-vision", action="store_true",
                  help="optim.freeze=vision: the update reuses the rollout's image features (no vision pass or backward)")
  ap.add_argument("--out", default=None, help="write the results as JSON")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  import lgrpo_jax
  from lgrpo_jax.train.metrics import measured_matmul_tflops

  with open(args.config) as f:
    raw = json.load(f)
  model = lgrpo_jax.from_config(raw, seed=0)
  b, g, n = args.pairs, args.samples, args.new_tokens
  s = build(raw, model, pairs=b, samples=g, new_tokens=n, text_tokens=args.text_tokens, image_px=args.image,
            beta=args.beta, chunk=args.chunk, micro_batches=args.micro_batches,
            share_frozen_vision=not args.separate_vision, freeze_vision=args.freeze_vision)
  params, opt_state, p, fl, suffix = s.params, s.opt_state, s.prompt_len, s.flops, s.suffix
  logp, listen, step_update, rollout = s.logp, s.listen, s.update, s.rollout

  # Correctness first: both modes agree.
  a, c = np.asarray(logp(True)(params)), np.asarray(logp(False)(params))
  la, lc = np.asarray(listen(True)(params)), np.asarray(listen(False)(params))
  err_logp = float(np.abs(a - c).max() / np.abs(c).max())
  err_listener = float(np.abs(la - lc).max())
  print(f"check: log-probs shared vs copies, max rel. diff {err_logp:.2e}; listener probs max abs. diff "
        f"{err_listener:.2e}", flush=True)
  if err_logp > 1e-4 or err_listener > 1e-4:
    sys.exit("the two modes disagree: not timing")

  rate = measured_matmul_tflops(jnp.float32) * 1e12
  sample = rollout()
  times = {"rollout": (timed(lambda: sample(params), args.runs),) * 2}
  for mode, sharing in ((0, True), (1, False))[:1 if args.modes == "shared" else 2]:
    lp, li, up = logp(sharing), listen(sharing), step_update(sharing)
    for phase, fn in (("listener", lambda: li(params)), ("reference", lambda: lp(params)),
                      ("update", lambda: up(params, opt_state))):
      try:
        t = timed(fn, args.runs)
      except jax.errors.JaxRuntimeError as e:  # e.g. the copies update out of memory: report, go on
        t = None
        print(f"{phase:9s} {'shared' if sharing else 'copies'}: failed ({str(e).splitlines()[0][:120]})",
              flush=True)
      times.setdefault(phase, [None, None])[mode] = t
      if t is not None:
        print(f"{phase:9s} {'shared' if sharing else 'copies'}: {t:7.2f} s", flush=True)
  rate_before, rate_after = rate, measured_matmul_tflops(jnp.float32) * 1e12

  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; {b} pairs × {g} completions × {n} tokens, prompt {p} tokens "
        f"(two {args.image}² images), listener suffix {suffix}, β={args.beta}, update in {args.micro_batches} "
        f"micro-batch(es)")
  print(f"fp32 matmul rate (2048³) before / after: {rate_before / 1e9:.0f} / {rate_after / 1e9:.0f} GFLOP/s "
        "(the higher one is the floor's rate: a disturbed measurement only reads lower)")
  rate = max(rate_before, rate_after)
  print(f"{'phase':10s} {'shared s':>9s} {'copies s':>9s} {'saving':>7s} {'shared TF':>10s} {'copies TF':>10s} "
        f"{'predicted':>9s} {'shared %rate':>12s} {'copies %rate':>12s}")
  total = [0.0, 0.0, 0, 0]

  def row(name, ts, tc, fs, fc):
    sec = lambda t: f"{t:9.2f}" if t is not None else f"{'–':>9s}"
    frac = lambda f, t: f"{f / t / rate:11.0%}" if t else f"{'–':>11s}"
    saving = f"{tc / ts:6.2f}×" if ts and tc else f"{'–':>7s}"
    print(f"{name:10s} {sec(ts)} {sec(tc)} {saving} {fs / 1e12:10.3f} {fc / 1e12:10.3f} {fc / fs:8.2f}× "
          f"{frac(fs, ts)} {frac(fc, tc)}")

  for phase in ("rollout", "listener", "reference", "update"):
    (ts, tc), (fs, fc) = times[phase], fl[phase]
    add = lambda a, b: None if a is None or b is None else a + b
    total = [add(total[0], ts), add(total[1], tc), total[2] + fs, total[3] + fc]
    row(phase, ts, tc, fs, fc)
  row("step", *total)
  floor_ratio = total[0] * rate / total[2] if total[0] else None
  if floor_ratio:
    print(f"step / FLOP floor: {total[0]:.2f} s / {total[2] / rate:.2f} s = {floor_ratio:.2f}×")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(phases={ph: times[ph][0] for ph in ("rollout", "listener", "reference", "update")},
                     phases_copies={ph: times[ph][1] for ph in ("rollout", "listener", "reference", "update")},
                     step_s=total[0], step_copies_s=total[1],
                     flops={ph: fl[ph][0] for ph in fl}, flops_copies={ph: fl[ph][1] for ph in fl},
                     matmul_gflops_before=rate_before / 1e9, matmul_gflops_after=rate_after / 1e9,
                     floor_ratio=floor_ratio,
                     sizes=dict(pairs=b, samples=g, new_tokens=n, prompt_tokens=p, image=args.image,
                                listener_suffix=suffix, beta=args.beta, micro_batches=args.micro_batches,
                                shared_frozen_vision=not args.separate_vision, freeze_vision=args.freeze_vision),
                     check=dict(logp_rel=err_logp, listener_abs=err_listener), runs=args.runs,
                     jax=jax.__version__, cores=os.cpu_count()), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  from lgrpo_jax.hostmem import reexec_with_hugepages
  reexec_with_hugepages()  # as the entry points do: huge-page malloc (lgrpo_jax/hostmem.py)
  main()
