"""The GRPO objective against an independent float64 NumPy reference; clipping gradients; chunked
log-probs; micro-batch accumulation; μ passes; non-finite updates skipped; frozen parts; and a tiny
end-to-end learning run."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lgrpo_jax
from lgrpo_jax.grpo import LossConfig, advantages, grpo_loss, token_weights
from lgrpo_jax.grpo import token_logprobs as grpo_token_logprobs
from lgrpo_jax.grpo.update import OptimConfig, PolicyBatch, accumulate_grads, make_optimizer, update
from lgrpo_jax.models.qwen2_5_vl import layers
from lgrpo_jax.rewards import RewardConfig, RewardInputs, compute_rewards, register_reward
from lgrpo_jax.rewards.text import Parsed
from lgrpo_jax.sampling import SamplingConfig, sample
from hf_tiny import assert_same_adam_step, config_dict, make_batch


# ---- independent float64 reference ---------------------------------------------------------------
def ref_loss(logp, old, ref, rewards, mask, loss="grpo", adv_mode="grpo", eps_low=0.2, eps_high=0.2, beta=0.04,
             kl="k3", eps=1e-6, objective="clip", level="token", delta=None, tau=(1.0, 1.05), bias_kl=False,
             opsm=None, top_q=1.0, entropy=None, valid=None, ent_coef=0.0, vespo=(2.0, 3.0, 3.0, 2.0)):
  r = rewards.astype(np.float64)
  valid = np.ones(len(r)) if valid is None else np.asarray(valid, np.float64)
  a = r - r.mean(-1, keepdims=True)
  a[np.all(r == r[:, :1], -1)] = 0
  if adv_mode == "grpo":
    a = a / (r.std(-1, ddof=1, keepdims=True) + eps)
  elif adv_mode == "batch":
    a = a / (r[valid > 0].std(ddof=1) + eps)
  m = mask.astype(np.float64) * valid[:, None, None]
  A = a[..., None]
  log_ratio = logp - old
  if level == "sequence":
    log_ratio = np.broadcast_to(((log_ratio * m).sum(-1) / np.maximum(m.sum(-1), 1))[..., None], logp.shape)
  rho = np.exp(log_ratio)
  if objective == "clip":
    rho1 = rho if delta is None else np.minimum(rho, delta)
    pg = -np.minimum(rho1 * A, np.clip(rho, 1 - eps_low, 1 + eps_high) * A)
  elif objective == "cispo":
    pg = -np.minimum(rho, 1 + eps_high) * A * logp
  elif objective == "vespo":
    log_w = np.clip((np.clip(log_ratio, -20, 20) * m).sum(-1, keepdims=True), np.log(1e-8), 20)
    k, lam = np.where(A >= 0, vespo[0], vespo[2]), np.where(A >= 0, vespo[1], vespo[3])
    pg = -np.exp(lam + k * log_w - lam * np.exp(log_w)) * A * logp
  else:
    t = np.where(A > 0, tau[0], tau[1])
    pg = -4 / t / (1 + np.exp(-t * (rho - 1))) * A
  keep = np.ones(logp.shape, bool)
  if opsm is not None:
    drift = ((old - logp) * m).sum(-1) / np.maximum(m.sum(-1), 1)
    keep &= (A >= 0) | (drift[..., None] <= opsm)
  if top_q < 1:
    keep &= entropy >= np.quantile(entropy[m > 0], 1 - top_q)
  d = ref - logp
  k = {"k1": -d, "k2": d * d / 2, "k3": np.exp(d) - d - 1}[kl]
  if bias_kl:
    k = k * rho
  tok = pg * keep + beta * k
  bonus = 0.0 if ent_coef == 0 else ent_coef * (entropy * m).sum() / m.sum()
  if loss == "grpo":
    n = m.sum(-1)
    seq = (tok * m).sum(-1) / np.maximum(n, 1)
    return seq[n > 0].mean() - bonus
  if loss == "dapo":
    return (tok * m).sum() / m.sum() - bonus
  if loss == "luspo":
    return (tok * m).sum() / (m.sum(-1) > 0).sum() - bonus
  return (tok * m).sum() / ((m.sum(-1) > 0).sum() * m.shape[-1]) - bonus


def random_problem(seed=0, b=3, g=4, n=6):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3, (b, g, n))
  old = logp + rng.normal(0, 0.3, (b, g, n))  # ratios on both sides of the clip range
  ref = logp + rng.normal(0, 0.2, (b, g, n))
  rewards = rng.normal(size=(b, g))
  rewards[1] = 0.5  # a zero-variance group
  lengths = rng.integers(0, n + 1, (b, g))
  lengths[0, 0] = 0  # an empty completion
  mask = (np.arange(n) < lengths[..., None]).astype(np.float64)
  return logp, old, ref, rewards, mask


def our_loss(logp, old, ref, rewards, mask, cfg, entropy=None, valid=None):
  valid = None if valid is None else jnp.asarray(valid, jnp.float32)
  adv = advantages(jnp.asarray(rewards), cfg, valid)
  w = token_weights(jnp.asarray(mask), cfg, valid)
  return grpo_loss(jnp.asarray(logp), jnp.asarray(old), adv, w, cfg, jnp.asarray(ref),
                   None if entropy is None else jnp.asarray(entropy))[0]


def assert_matches_reference(cfg, problem, want, entropy=None, valid=None):
  with jax.enable_x64(True):
    got64 = float(our_loss(*problem, cfg, entropy, valid))
  assert abs(got64 - want) <= 1e-6 * abs(want), (got64, want)
  f32 = lambda x: None if x is None else np.asarray(x, np.float32)
  got32 = float(our_loss(*(f32(x) for x in problem), cfg, f32(entropy), valid))
  assert abs(got32 - want) <= 1e-5 * max(abs(want), 1e-3), (got32, want)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo", "luspo"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("adv", ["grpo", "dr_grpo", "batch"])
def test_losses_match_float64_reference(loss, kl, adv):
  problem = random_problem()
  cfg = LossConfig(loss=loss, advantage=adv, kl=kl, eps_low=0.2, eps_high=0.28, beta=0.04)
  assert_matches_reference(cfg, problem, ref_loss(*problem, loss, adv, 0.2, 0.28, 0.04, kl))


# The surrogates and the TRL options, each against the reference; every case changes the loss (checked
# below against the plain clip objective), so a field that did nothing would fail.
OPTION_CASES = {
    "cispo": dict(objective="cispo", eps_high=0.1),
    "sapo": dict(objective="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
    "gspo": dict(importance_sampling_level="sequence", eps_low=0.05, eps_high=0.05),
    "gspo_luspo": dict(importance_sampling_level="sequence", loss="luspo", eps_low=0.05, eps_high=0.05),
    "gspo_cispo": dict(importance_sampling_level="sequence", objective="cispo", eps_high=0.05),
    "vespo": dict(objective="vespo", loss="dapo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
    "delta": dict(delta=1.1, eps_high=0.28),
    "bias_corrected_kl": dict(use_bias_correction_kl=True, beta=0.3),
    "bias_corrected_kl_gspo": dict(use_bias_correction_kl=True, beta=0.3, importance_sampling_level="sequence"),
    "off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "top_entropy": dict(top_entropy_quantile=0.3),
    "top_entropy_dapo_sapo": dict(top_entropy_quantile=0.5, loss="dapo", objective="sapo"),
    "batch_advantage_with_padding": dict(advantage="batch", valid=(1, 1, 0)),
    "entropy_bonus": dict(entropy_coef=0.1, valid=(1, 0, 1)),
    "all_masks_dr_grpo": dict(loss="dr_grpo", off_policy_mask_threshold=0.0, top_entropy_quantile=0.6,
                              use_bias_correction_kl=True),
}
TO_REF = {"loss": "loss", "advantage": "adv_mode", "objective": "objective", "importance_sampling_level": "level",
          "eps_low": "eps_low", "eps_high": "eps_high", "delta": "delta", "beta": "beta",
          "use_bias_correction_kl": "bias_kl", "off_policy_mask_threshold": "opsm", "top_entropy_quantile": "top_q",
          "entropy_coef": "ent_coef"}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_objectives_and_trl_options_match_float64_reference(case):
  fields = dict(OPTION_CASES[case])
  valid = fields.pop("valid", None)
  cfg = LossConfig(**fields)
  problem = random_problem(seed=2)
  logp, old, ref, rewards, mask = problem
  if valid is not None:  # the padding row's rewards are far off: counted, they would move the batch std
    rewards = rewards.copy()
    rewards[2] *= 100
    problem = (logp, old, ref, rewards, mask)
  entropy = np.random.default_rng(3).uniform(0, 4, logp.shape)
  ref_kw = {TO_REF[k]: v for k, v in fields.items() if k in TO_REF}
  ref_kw.setdefault("beta", cfg.beta)
  if cfg.objective == "sapo":
    ref_kw["tau"] = (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
  ref_kw["vespo"] = (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg)
  want = ref_loss(*problem, entropy=entropy, valid=valid, **ref_kw)
  assert_matches_reference(cfg, problem, want, entropy, valid)
  plain = ref_loss(*problem, beta=cfg.beta, loss=cfg.loss, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                   valid=valid, adv_mode="grpo")
  assert abs(want - plain) > 1e-4 * abs(plain), "the option does not change this problem's loss"


@pytest.mark.parametrize("adv", ["grpo", "dr_grpo"])
def test_a_group_of_equal_rewards_has_exactly_zero_advantage(adv):
  # 0.7 is not a binary fraction: the fp32 mean of G copies misses it in the last bit, and dividing
  # by the ~1e-7 std made advantages of ±0.06 (G = 8) and ±0.1 (G = 16) for identical completions.
  for g in (2, 8, 16):
    for value in (0.7, 1.1, 1 / 3):
      a = advantages(jnp.full((3, g), value, jnp.float32), LossConfig(advantage=adv))
      assert np.all(np.asarray(a) == 0), (g, value, a)
  # A group with any spread keeps its ddof-1 standardisation, next to a flat one.
  r = np.asarray([[0.7] * 8, [0.7] * 7 + [0.8]], np.float32)
  a = np.asarray(advantages(jnp.asarray(r), LossConfig(advantage=adv)))
  assert np.all(a[0] == 0)
  c = r[1].astype(np.float64) - r[1].mean()
  np.testing.assert_allclose(a[1], c / (c.std(ddof=1) + 1e-6) if adv == "grpo" else c, rtol=1e-4)
  # One completion per group: no std to divide by (it was NaN), a clear error; Dr. GRPO's A = 0.
  one = jnp.asarray([[0.3], [1.0]], jnp.float32)
  if adv == "grpo":
    with pytest.raises(ValueError, match="needs G ≥ 2"):
      advantages(one, LossConfig(advantage=adv))
  else:
    assert np.all(np.asarray(advantages(one, LossConfig(advantage=adv))) == 0)


@pytest.mark.parametrize("fields", [dict(), dict(importance_sampling_level="sequence", loss="luspo"),
                                    dict(objective="sapo"), dict(delta=1.05, use_bias_correction_kl=True),
                                    dict(importance_sampling_level="sequence", use_bias_correction_kl=True)],
                         ids=["clip", "gspo_luspo", "sapo", "delta_bias_kl", "gspo_bias_kl"])
def test_gradient_matches_finite_differences(fields):
  logp, old, ref, rewards, mask = random_problem(seed=1, b=2, g=3, n=4)
  cfg = LossConfig(**{"loss": "grpo", "kl": "k3", "beta": 0.1, **fields})
  with jax.enable_x64(True):
    f = lambda lp: our_loss(lp, old, ref, rewards, mask, cfg)
    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    h = 1e-6
    for idx in [(0, 0, 1), (0, 1, 0), (1, 2, 3), (1, 0, 2)]:
      e = np.zeros_like(logp)
      e[idx] = h
      fd = (float(f(logp + e)) - float(f(logp - e))) / (2 * h)
      assert abs(fd - g[idx]) <= 1e-6 + 1e-5 * abs(fd), (idx, fd, g[idx])
    assert np.all(g[mask == 0] == 0)  # padding gets no gradient
    assert np.any(g[mask > 0] != 0)


def test_cispo_keeps_every_tokens_gradient_with_a_capped_constant_weight():
  # CISPO's weight is a constant (stop-gradient), so finite differences do not apply: its gradient is
  # −min(ρ, 1 + ε_high)·A·w per token, even where PPO's clip would give none.
  logp, old, ref, rewards, mask = random_problem(seed=4)
  cfg = LossConfig(objective="cispo", loss="dapo", eps_high=0.1, beta=0.0)
  with jax.enable_x64(True):
    g = np.asarray(jax.grad(lambda lp: our_loss(lp, old, ref, rewards, mask, cfg))(jnp.asarray(logp)))
    a = np.asarray(advantages(jnp.asarray(rewards), cfg))[..., None]
    w = np.asarray(token_weights(jnp.asarray(mask), cfg))
  want = -np.minimum(np.exp(logp - old), 1.1) * a * w
  np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15)
  ppo_zero = (np.exp(logp - old) > 1.2) & (a > 0) & (mask > 0)  # tokens the clip objective would drop
  assert ppo_zero.any() and np.all(g[ppo_zero] != 0)


def test_clipped_tokens_get_no_gradient():
  cfg = LossConfig(loss="dapo", beta=0.0, eps_low=0.2, eps_high=0.2)
  old = np.zeros((1, 2, 4))
  # ratios 0.5, 0.9, 1.1, 1.5 for a positive advantage (row 0) and a negative one (row 1)
  logp = np.log(np.array([[[0.5, 0.9, 1.1, 1.5]] * 2]))
  rewards = np.array([[1.0, -1.0]])
  g = np.asarray(jax.grad(lambda lp: our_loss(lp, old, old, rewards, np.ones((1, 2, 4)), cfg))(
      jnp.asarray(logp, jnp.float32)))
  # A > 0: ρ above 1 + ε is clipped (no push further up); below 1 − ε still pushed up.
  assert g[0, 0, 3] == 0 and g[0, 0, 0] < 0 and g[0, 0, 1] < 0 and g[0, 0, 2] < 0
  # A < 0: ρ below 1 − ε is clipped (no push further down); above 1 + ε still pushed down.
  assert g[0, 1, 0] == 0 and g[0, 1, 3] > 0 and g[0, 1, 1] > 0
  adv = advantages(jnp.asarray(rewards), cfg)
  _, m = grpo_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), adv,
                   token_weights(jnp.ones((1, 2, 4)), cfg), cfg)
  assert float(m["clip_fraction_high"]) == 1 / 8 and float(m["clip_fraction_low"]) == 1 / 8
  assert float(m["ratio_max"]) == pytest.approx(1.5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backends", [("cpu",), ()], ids=["loop", "scan"])
def test_chunked_logprobs_equal_full_logsoftmax_and_gradients(backends, temperature, monkeypatch):
  """Both ways over the chunks (the CPU's Python loop over exact slices, the scan over the padded
  head elsewhere) against the unchunked log-softmax of logits / T: values, entropy, and the
  hand-written gradients, including repeated targets (the one-hot part is a scatter-add)."""
  monkeypatch.setattr(layers, "UNROLL_BACKENDS", backends)
  token_logprobs = functools.partial(grpo_token_logprobs, temperature=temperature)
  einsum = lambda *a, **k: jnp.einsum(*a, **k) / temperature
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 3, 5, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(203, 16)), jnp.float32)  # V not a multiple of the chunk
  t = jnp.asarray(rng.integers(0, 203, (2, 3, 5))).at[1, 2, :3].set(202)  # repeated, in the last (partial) chunk
  full = lambda h, w: jnp.take_along_axis(jax.nn.log_softmax(
      einsum("...e,ve->...v", h, w, precision="highest"), -1), t[..., None], -1)[..., 0]
  chunked = lambda h, w: token_logprobs(h, w, t, chunk=64)
  np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5, atol=1e-5)
  _, ent = token_logprobs(h, w, t, chunk=64, with_entropy=True)
  logp_all = jax.nn.log_softmax(einsum("...e,ve->...v", h, w, precision="highest"), -1)
  np.testing.assert_allclose(ent, -(jnp.exp(logp_all) * logp_all).sum(-1), rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.normal(size=t.shape), jnp.float32)  # a cotangent that is not all ones
  ga = jax.grad(lambda h, w: (chunked(h, w) * weights).sum(), argnums=(0, 1))(h, w)
  gb = jax.grad(lambda h, w: (full(h, w) * weights).sum(), argnums=(0, 1))(h, w)
  for a, b in zip(ga, gb):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # With `entropy_grad` the entropy is differentiated too (an entropy bonus), in the same pass.
  ent_w = jnp.asarray(rng.normal(size=t.shape), jnp.float32)
  def both(h, w):
    logp, ent = token_logprobs(h, w, t, chunk=64, entropy_grad=True)
    return (logp * weights).sum() + (ent * ent_w).sum()
  def both_full(h, w):
    logp_all = jax.nn.log_softmax(einsum("...e,ve->...v", h, w, precision="highest"), -1)
    return (full(h, w) * weights).sum() + (-(jnp.exp(logp_all) * logp_all).sum(-1) * ent_w).sum()
  ga, gb = (jax.grad(f, argnums=(0, 1))(h, w) for f in (both, both_full))
  for a, b, plain in zip(ga, gb, jax.grad(lambda h, w: (chunked(h, w) * weights).sum(), argnums=(0, 1))(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(a - plain).max()) > 1e-2  # the entropy's part is there


@pytest.mark.parametrize("cfg", [LossConfig(beta=0.04), LossConfig(beta=0.04, use_bias_correction_kl=True,
                                                                     importance_sampling_level="sequence"),
                                 LossConfig(beta=0.04, objective="cispo", entropy_coef=0.01)], ids=["k3", "gspo", "cispo"])
def test_a_non_finite_value_off_the_loss_changes_nothing(cfg):
  """Slots the loss does not count (padding after a completion's end, invalid rows) may hold any
  log-prob: exp(logp_ref − logp) overflowing there made 0·inf = NaN of the loss and its gradient."""
  rng = np.random.default_rng(0)
  shape = (2, 3, 5)
  logp = jnp.asarray(rng.uniform(-3, -0.1, shape), jnp.float32)
  old, ref = logp + 0.01, logp - 0.02
  ent = jnp.asarray(rng.uniform(0.1, 2, shape), jnp.float32)
  mask = jnp.ones(shape).at[0, 1, 3:].set(0).at[1, 2, 1:].set(0)
  w = token_weights(mask, cfg)
  adv = jnp.asarray(rng.normal(size=shape[:2]), jnp.float32)
  f = lambda lp, o, r, e: grpo_loss(lp, o, adv, w, cfg, logp_ref=r, entropy=e)
  (want, m_want), g_want = jax.value_and_grad(f, has_aux=True)(logp, old, ref, ent)
  bad = lambda x, v: x.at[0, 1, 4].set(v).at[1, 2, 2].set(v)
  (got, m_got), g_got = jax.value_and_grad(f, has_aux=True)(bad(logp, -95.0), bad(old, jnp.inf), bad(ref, -1.0),
                                                            bad(ent, jnp.nan))
  assert np.isfinite(float(got)) and np.isfinite(np.asarray(g_got)).all()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-6, atol=1e-9)
  for k in m_want:
    np.testing.assert_allclose(float(m_got[k]), float(m_want[k]), rtol=1e-6, err_msg=k)
  _, empty = grpo_loss(logp, old, adv, jnp.zeros(shape), cfg, logp_ref=ref, entropy=ent)
  assert float(empty["ratio_max"]) == 0.0 and all(np.isfinite(float(v)) for v in empty.values())


def test_bf16_logprobs_at_a_temperature_are_the_samplers():
  """In bf16 the temperature divides the fp32 logits, as the sampler does (`sampling.choose`):
  dividing the head first rounded W/T to bf16 and moved the log-probs by ~5e-3 at T = 0.7, so the
  first pass's ratio was not 1 (the default old log-probs are the sampler's)."""
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(64, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(500, 128)) * 0.3, jnp.bfloat16)
  logits = jnp.einsum("re,ve->rv", h, w, preferred_element_type=jnp.float32)
  t = jnp.argmax(logits, -1)  # likely tokens, as sampled
  for temperature in (0.7, 0.9, 1.3):
    sampler = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature, -1), t[:, None], -1)[:, 0]
    ours = grpo_token_logprobs(h, w, t, chunk=128, dtype=jnp.bfloat16, temperature=temperature)
    np.testing.assert_allclose(ours, sampler, atol=2e-5, err_msg=str(temperature))  # W/T in bf16: ~5e-3


# ---- on the tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout():
  """A tiny untied model and 2 pairs × 3 samples × 6 tokens of real rollouts (same image grid per
  pair, as the grouped pipeline gives)."""
  model = lgrpo_jax.from_config(config_dict("a"))
  rows = [{"text": [3, 4], "images": [(56, 84)], "pad": 2}, {"text": [5, 2], "images": [(56, 84)]}]
  batch = make_batch(rows, seed=3)
  grid = tuple(map(tuple, batch["image_grid_thw"].tolist()))
  cfg = SamplingConfig(max_new_tokens=6, num_samples=3, temperature=1.0, eos_ids=(7,))
  out = nnx.jit(lambda m, i, a, p: sample(m, i, a, p, grid, cfg, jax.random.key(0)))(
      model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
      jnp.asarray(batch["pixel_values"]))
  return model, batch, grid[:1], out


def policy_batch(batch, out, rewards, loss_cfg, logp_ref=None):
  b = batch["input_ids"].shape[0]
  return PolicyBatch(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                     jnp.asarray(batch["pixel_values"]).reshape(b, -1, batch["pixel_values"].shape[-1]),
                     out.tokens, out.mask, out.logprobs, advantages(jnp.asarray(rewards), loss_cfg),
                     token_weights(out.mask, loss_cfg), logp_ref)


def test_prefix_shared_logprobs_equal_the_samplers(rollout):
  model, batch, pair_grid, out = rollout
  from lgrpo_jax.grpo.update import policy_logprobs
  b = batch["input_ids"].shape[0]
  logp = nnx.jit(lambda m, *a: policy_logprobs(m, *a[:3], pair_grid, *a[3:], chunk=50))(  # as the step runs it
      model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
      jnp.asarray(batch["pixel_values"]).reshape(b, -1, batch["pixel_values"].shape[-1]), out.tokens, out.mask)
  m = np.asarray(out.mask, bool)
  np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out.logprobs)[m], atol=1e-5)


@pytest.mark.parametrize("variant,param_dtype,n,temperature,atol", [
    ("a", "bfloat16", 6, 1.0, 1e-5), ("b", "bfloat16", 6, 1.0, 1e-5), ("a", "float32", 16, 1.0, 2e-6),
    ("b", "float32", 16, 0.7, 2e-6), ("a", "bfloat16", 16, 0.7, 1e-3)],
    ids=["untied", "tied", "fp32_master_weights", "fp32_master_weights_T0.7", "bf16_weights_16_tokens"])
def test_bf16_sampler_logprobs_are_the_updates(variant, param_dtype, n, temperature, atol):
  """In bf16 the sampler's head accumulates and returns fp32, as the log-prob pass does, so the
  first pass's ratio is 1: rounding the logits to bf16 put 8e-4 between them here, and more on a
  trained model's larger logits (~0.1). With fp32 master weights (model.param_dtype, the default),
  which the decode loop's fused weights and the passes both cast to bf16, they agree to ~1e-6 over
  16 tokens, also at T = 0.7 (the temperature divides fp32 logits in both). With bf16 weights the
  two programs' different fusions (XLA's excess precision) leave up to ~6e-4 at some positions
  from the 2nd on (measured over 16 tokens); 6 tokens happen to agree to 1e-5."""
  from lgrpo_jax.grpo.update import policy_logprobs
  model = lgrpo_jax.from_config(config_dict(variant), dtype="bfloat16", param_dtype=param_dtype)
  batch = make_batch([{"text": [3, 4], "images": [(56, 84)], "pad": 2}, {"text": [5, 2], "images": [(56, 84)]}],
                     seed=3)
  grid = tuple(map(tuple, batch["image_grid_thw"].tolist()))
  ids, mask, pixels = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values"))
  cfg = SamplingConfig(max_new_tokens=n, num_samples=3, temperature=temperature, eos_ids=(7,))
  out = nnx.jit(lambda m: sample(m, ids, mask, pixels, grid, cfg, jax.random.key(0)))(model)
  logp = nnx.jit(lambda m: policy_logprobs(m, ids, mask, pixels.reshape(2, -1, pixels.shape[-1]), grid[:1],
                                           out.tokens, out.mask, chunk=50, temperature=temperature))(model)
  m = np.asarray(out.mask, bool)
  assert m.sum() >= m.size // 2
  np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out.logprobs)[m], atol=atol)


def test_the_schedule_counts_grpo_steps_whatever_the_passes():
  # μ = passes optimizer updates per GRPO step: warm-up and cosine length are in GRPO steps, so a
  # cosine of total_steps = loop.steps spans the run (counting updates, it reached 0 halfway at μ = 2).
  from lgrpo_jax.grpo.update import schedule
  for kind in ("cosine", "constant"):
    one = schedule(OptimConfig(learning_rate=1e-3, schedule=kind, warmup_steps=3, total_steps=10))
    two = schedule(OptimConfig(learning_rate=1e-3, schedule=kind, warmup_steps=3, total_steps=10, passes=2))
    for step in range(12):
      assert float(two(2 * step)) == float(two(2 * step + 1)) == float(one(step))
    if kind == "cosine":
      assert float(one(9)) > 0 and float(two(19)) > 0 and float(two(20)) == 0.0


def jitted_accumulate(graphdef, pair_grid, cfg):
  """`accumulate_grads` jitted as the step runs it, micro-batches static (op by op it compiled ~640
  small programs: 45 s of a 47 s test)."""
  return jax.jit(lambda p, b, k: accumulate_grads(p, graphdef, b, pair_grid, cfg, k), static_argnums=2)


@pytest.mark.parametrize("valid", [(1, 1), (1, 0)])
def test_micro_batch_metrics_are_the_batch_metrics(rollout, valid):
  # Token means weigh each micro-batch by its tokens: completions of different lengths, and a
  # micro-batch holding only a padding row (valid = 0), which once halved the KL and the ratio mean.
  model, batch, pair_grid, out = rollout
  cfg = LossConfig(loss="dapo", beta=0.04)
  rng = np.random.default_rng(1)
  mask = jnp.asarray(np.arange(6) < np.asarray([[6, 3, 4], [2, 6, 5]])[..., None], jnp.int32)
  noise = lambda: jnp.asarray(rng.normal(0, 0.2, out.logprobs.shape), jnp.float32) * mask
  pb = policy_batch(batch, out, rng.normal(size=(2, 3)), cfg, logp_ref=out.logprobs + noise())
  pb = pb._replace(mask=mask, logp_old=out.logprobs + noise(),
                   weights=token_weights(mask, cfg, jnp.asarray(valid, jnp.int32)))
  graphdef, params = nnx.split(model, nnx.Param)
  acc = jitted_accumulate(graphdef, pair_grid, cfg)
  _, _, m1 = acc(params, pb, 1)
  _, _, m2 = acc(params, pb, 2)
  assert set(m1) == set(m2) and float(m1["ratio_mean"]) != pytest.approx(1.0, abs=1e-3)
  for k in m1:
    assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-6), k


def test_micro_batches_equal_one_batch(rollout):
  # The sum over micro-batches is the batch's loss and gradient, also with GSPO's ratio, the
  # off-policy mask, the batch-scaled advantages (per sequence, or computed before the split) and the
  # entropy bonus (a mean over the whole batch's tokens, differentiated through the chunked head).
  # The entropy quantile is taken over each micro-batch's tokens (as TRL's): checked on one, through
  # the real log-prob pass.
  model, batch, pair_grid, out = rollout
  rng = np.random.default_rng(5)
  noise = lambda: jnp.asarray(rng.normal(0, 0.2, out.logprobs.shape), jnp.float32) * out.mask
  rewards = rng.normal(size=(2, 3))
  graphdef, params = nnx.split(model, nnx.Param)
  cfg = LossConfig(importance_sampling_level="sequence", objective="sapo", loss="luspo", advantage="batch",
                   off_policy_mask_threshold=0.02, use_bias_correction_kl=True, beta=0.04, entropy_coef=0.01)
  pb = policy_batch(batch, out, rewards, cfg, logp_ref=out.logprobs + noise())._replace(
      logp_old=out.logprobs + noise())
  acc = jitted_accumulate(graphdef, pair_grid, cfg)
  (l1, g1, m1), (l2, g2, m2) = acc(params, pb, 1), acc(params, pb, 2)
  assert float(l2) == pytest.approx(float(l1), rel=1e-5, abs=1e-7)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0
  assert 0 < float(m1["policy_kept_fraction"]) < 1  # the off-policy mask dropped some sequences, not all
  assert float(m2["policy_kept_fraction"]) == pytest.approx(float(m1["policy_kept_fraction"]))

  top = dataclasses.replace(cfg, top_entropy_quantile=0.5, off_policy_mask_threshold=None, entropy_coef=0.0)
  _, _, mt = jitted_accumulate(graphdef, pair_grid, top)(params, pb, 1)
  n = float(mt["loss_tokens"])
  assert float(mt["policy_kept_fraction"]) * n == pytest.approx(np.ceil(n / 2), abs=1)  # ≥ the median


def run_update(model, pb, pair_grid, loss_cfg, optim_cfg, state=None, _programs={}):
  graphdef, params = nnx.split(model, nnx.Param)
  key = (graphdef, pair_grid, loss_cfg, optim_cfg)
  if key not in _programs:  # one jitted update per config: the same config's calls reuse its program
    tx = make_optimizer(optim_cfg, params)
    _programs[key] = tx, jax.jit(lambda p, s, b: update(p, s, graphdef, tx, b, pair_grid, loss_cfg, optim_cfg))
  tx, fn = _programs[key]
  params, opt_state = state if state is not None else (params, tx.init(params))
  return fn(params, opt_state, pb)


def test_passes_nan_skip_and_frozen_vision(rollout):
  model, batch, pair_grid, out = rollout
  loss_cfg = LossConfig(beta=0.0)
  pb = policy_batch(batch, out, np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.2]]), loss_cfg)
  opt = OptimConfig(learning_rate=1e-2)
  # μ = 2 is two optimiser steps on the same rollouts, the old log-probs held fixed.
  p2, s2, m2 = run_update(model, pb, pair_grid, loss_cfg, dataclasses.replace(opt, passes=2))
  p1, s1, _ = run_update(model, pb, pair_grid, loss_cfg, opt)
  p11, _, m11 = run_update(model, pb, pair_grid, loss_cfg, opt, state=(p1, s1))
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p11)):  # one scan of two passes, two programs
    assert_same_adam_step(a, b)
  assert float(m2["loss_last_pass"]) != float(m2["loss"])
  assert float(m2["logprob_drift"]) < 1e-4 and float(m2["entropy"]) > 0  # first pass: trainer = sampler
  # A NaN in the advantages: the update is skipped, parameters bit-identical.
  bad = pb._replace(advantages=pb.advantages.at[0, 1].set(jnp.nan))
  params0 = nnx.state(model, nnx.Param)
  p, _, m = run_update(model, bad, pair_grid, loss_cfg, opt)
  assert int(m["skipped_updates"]) == 1
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Frozen vision tower and embeddings: their parameters do not move, the decoder layers' do
  # (freezing the tower alone: test_shared_frozen_vision).
  p, s, _ = run_update(model, pb, pair_grid, loss_cfg, dataclasses.replace(opt, freeze=("vision", "embeddings")))
  moved = {}
  for (k, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree_util.tree_leaves_with_path(params0)):
    name = jax.tree_util.keystr(k)
    moved[name] = not np.array_equal(np.asarray(a), np.asarray(b))
    if "visual" in name or "embed_tokens" in name:
      assert not moved[name], name
  assert any(v for k, v in moved.items() if "layers" in k and "visual" not in k)
  # Frozen parts carry no Adam moments.
  n_moments = sum(x.size for x in jax.tree.leaves(s))
  n_trainable = sum(x.size for (k, x) in jax.tree_util.tree_leaves_with_path(params0)
                    if "visual" not in jax.tree_util.keystr(k) and "embed_tokens" not in jax.tree_util.keystr(k))
  assert n_moments < 2 * n_trainable + 100
  # grad_norm (the norm max_grad_norm clips) counts the trainable parameters only: it counted the
  # frozen embeddings' gradients too, reading far above the clip while nothing was clipped.
  from lgrpo_jax.grpo.update import accumulate_grads
  graphdef, params = nnx.split(model, nnx.Param)
  _, grads, _ = jax.jit(lambda p: accumulate_grads(p, graphdef, pb, pair_grid, loss_cfg, 1))(params)
  leaves = [(jax.tree_util.keystr(k), np.asarray(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)]
  trainable = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for k, g in leaves if "embed_tokens" not in k))
  everything = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for _, g in leaves))
  _, _, m = run_update(model, pb, pair_grid, loss_cfg, dataclasses.replace(opt, freeze=("embeddings",)))
  assert float(m["grad_norm"]) == pytest.approx(trainable, rel=1e-4) and trainable < everything * (1 - 1e-3)


def test_optim_config_errors_name_the_field():
  with pytest.raises(ValueError, match="freeze"):
    OptimConfig(freeze=("lm_head",))
  with pytest.raises(ValueError, match="schedule"):
    OptimConfig(schedule="linear")
  with pytest.raises(ValueError, match="LossConfig.loss"):
    LossConfig(loss="ppo")


def test_grpo_learns_a_toy_task():
  """Reward = fraction of completion tokens equal to 9; a few dozen GRPO steps raise it clearly."""
  model = lgrpo_jax.from_config(config_dict("b", text_config={"vocab_size": 16}))
  rows = [{"text": [4], "images": [], "pad": 0}] * 4
  batch = make_batch(rows, seed=0)
  batch["input_ids"] = np.minimum(batch["input_ids"], 15)
  target = 9

  @register_reward("toy_count_9", replace=True)
  def toy(inputs):
    return ((inputs.tokens == target) * inputs.mask).sum(-1) / inputs.tokens.shape[-1]

  reward_cfg = RewardConfig(weights=(("toy_count_9", 1.0),))
  loss_cfg = LossConfig(beta=0.0)
  opt = OptimConfig(learning_rate=3e-3)
  samp = SamplingConfig(max_new_tokens=8, num_samples=8, temperature=1.0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(opt, params)
  opt_state = tx.init(params)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

  @jax.jit
  def step(params, opt_state, key):
    m = nnx.merge(graphdef, params)
    out = sample(m, ids, mask, None, (), samp, key)
    parsed = Parsed(jnp.zeros(out.lengths.shape, bool), jnp.zeros(out.lengths.shape, jnp.int32))
    total, _ = compute_rewards(RewardInputs(out.tokens, out.mask, out.lengths, jnp.zeros(4, jnp.int32),
                                            parsed), reward_cfg)
    pb = PolicyBatch(ids, mask, None, out.tokens, out.mask, out.logprobs, advantages(total, loss_cfg),
                     token_weights(out.mask, loss_cfg))
    params, opt_state, _ = update(params, opt_state, graphdef, tx, pb, (), loss_cfg, opt)
    return params, opt_state, total.mean()

  means = []
  for s in range(25):
    params, opt_state, r = step(params, opt_state, jax.random.key(s))
    means.append(float(r))
  first, last = np.mean(means[:5]), np.mean(means[-5:])
  print("toy rewards", [round(m, 2) for m in means])
  assert last > first + 0.25 and last > 0.4, (first, last, means)


def test_several_passes_report_the_ratios_mean_and_the_first_passs_other_metrics():
  """optim.passes > 1: the ratio's metrics (1 and 0 on a first pass with the update's own old
  log-probs) are averaged over the passes, as TRL averages its clip ratios over the iterations;
  ratio_max is the max; the rest is the first pass's, with the last pass's loss beside it."""
  from lgrpo_jax.grpo.update import PASS_MEAN_METRICS, combine_pass_metrics
  stacked = {"clip_fraction_low": jnp.array([0.0, 0.3, 0.6]), "clip_fraction_high": jnp.array([0.0, 0.1, 0.2]),
             "ratio_mean": jnp.array([1.0, 1.2, 1.4]), "policy_kept_fraction": jnp.array([1.0, 0.5, 0.0]),
             "ratio_max": jnp.array([1.0, 3.0, 2.0]), "kl": jnp.array([0.1, 0.2, 0.3]),
             "loss": jnp.array([0.5, 0.4, 0.3]), "grad_norm": jnp.array([2.0, 1.0, 1.0]),
             "loss_tokens": jnp.array([7.0, 7.0, 7.0])}
  out = {k: float(v) for k, v in combine_pass_metrics(stacked).items()}
  for k in PASS_MEAN_METRICS:
    assert out[k] == pytest.approx(float(jnp.mean(stacked[k]))), k
  assert out["ratio_max"] == 3.0 and out["kl"] == pytest.approx(0.1) and out["grad_norm"] == 2.0
  assert out["loss"] == 0.5 and out["loss_last_pass"] == pytest.approx(0.3)
  # No token carried loss (every completion truncated and masked): the token means are NaN, not 0
  none = {k: float(v) for k, v in combine_pass_metrics(dict(stacked, loss_tokens=jnp.zeros(3))).items()}
  assert all(np.isnan(none[k]) for k in ("ratio_mean", "ratio_max", "kl", "clip_fraction_low"))
  assert none["loss"] == 0.5 and none["grad_norm"] == 2.0


def test_registered_loss_pieces_are_checked_and_named_before_the_first_step():
  """`check_loss` (the launcher's checks, the Trainer's start) traces the configured pieces and the
  loss's gradient at the step's shapes: a KL estimator or objective of the wrong shape, weights of
  shape (B, G, 1) (which broadcast onto the wrong tokens, silently), Python control flow on traced
  values — each an error naming the field and the name, saying what the piece takes."""
  from lgrpo_jax.grpo import check_loss, register_kl, register_loss, register_objective
  from lgrpo_jax.grpo.core import KL_ESTIMATORS, LOSSES, OBJECTIVES

  def branchy(logp, ratio, adv, on, cfg):
    return -ratio * adv if adv.sum() > 0 else ratio * adv

  try:
    register_kl("t_per_seq_kl", lambda logp, ref: (ref - logp).sum(-1))
    register_loss("t_keepdims", lambda m: m.sum(-1, keepdims=True) / m.sum())
    register_objective("t_branchy", branchy)
    register_kl("t_per_sequence_kl", lambda logp, ref: (ref - logp).mean(-1, keepdims=True))
    assert check_loss(LossConfig(), 2, 4, 8) is None
    assert check_loss(LossConfig(kl="t_per_sequence_kl"), 2, 4, 8) is None  # (B, G, 1): each token's
    for cfg, match in ((LossConfig(kl="t_per_seq_kl"), r"LossConfig.kl='t_per_seq_kl' returned shape \(2, 4\); "
                        r"A KL estimator is fn\(logp, logp_ref\)"),
                       (LossConfig(loss="t_keepdims"), r"LossConfig.loss='t_keepdims' returned shape \(2, 4, 1\)"),
                       (LossConfig(objective="t_branchy"), r"LossConfig.objective='t_branchy' failed: "
                        r"TracerBoolConversionError")):
      with pytest.raises(ValueError, match=match):
        check_loss(cfg, 2, 4, 8)
  finally:
    for table, name in ((KL_ESTIMATORS, "t_per_seq_kl"), (KL_ESTIMATORS, "t_per_sequence_kl"), (LOSSES, "t_keepdims"),
                        (OBJECTIVES, "t_branchy")):
      table.pop(name, None)


def test_a_kl_setting_without_beta_is_said_once():
  from lgrpo_jax.grpo import check_loss
  assert check_loss(LossConfig(beta=0.0), 2, 2, 4) is None
  warning = check_loss(LossConfig(beta=0.0, kl="k1"), 2, 2, 4)
  assert warning == "step.loss.kl='k1' has no effect: step.loss.beta=0 turns the KL term off"
  assert check_loss(LossConfig(beta=0.0, kl="k1"), 2, 2, 4) is None  # the launcher said it; its Trainer does not
  assert "use_bias_correction_kl=True has no effect" in check_loss(
      LossConfig(beta=0.0, use_bias_correction_kl=True), 2, 2, 4)


def test_registration_forms_and_built_in_names():
  """`register_kl("name", fn)` as `register_reward` takes it; a bare `@register_kl` (no name) is an
  error, not a silent no-op; built-in names keep their meaning (config.json records only names)."""
  from lgrpo_jax.grpo import register_advantage, register_kl
  from lgrpo_jax.grpo.core import KL_ESTIMATORS
  fn = lambda logp, ref: ref - logp  # noqa: E731
  try:
    assert register_kl("t_two_args", fn) is fn and KL_ESTIMATORS["t_two_args"] is fn
  finally:
    KL_ESTIMATORS.pop("t_two_args", None)
  with pytest.raises(ValueError, match=r'register_kl takes the name first: @register_kl\("my_name"\)'):
    register_kl(fn)
  with pytest.raises(ValueError, match="not callable"):
    register_kl("t_number", 3)
  for register, name in ((register_kl, "k3"), (register_advantage, "grpo")):
    with pytest.raises(ValueError, match=f"'{name}' is built in: register yours under another name"):
      register(name, fn, replace=True)


def test_an_objective_undefined_off_the_loss_tokens_does_not_poison_the_loss():
  """A custom objective normalised per sequence is 0/0 on a completion without loss tokens (e.g.
  under mask_truncated_completions): its weight there is 0, but 0·NaN is NaN, so the whole update was
  skipped. Only the loss tokens' policy terms are read."""
  from lgrpo_jax.grpo import register_objective
  from lgrpo_jax.grpo.core import OBJECTIVES

  def per_sequence(logp, ratio, adv, on, cfg):
    return -(ratio * adv) / on.sum(-1, keepdims=True)

  try:
    register_objective("t_per_sequence", per_sequence)
    cfg = LossConfig(objective="t_per_sequence", beta=0.0)
    logp = jax.random.normal(jax.random.key(0), (1, 2, 3)) - 2.0
    mask = jnp.array([[[1, 1, 0], [0, 0, 0]]], bool)  # the second completion carries no loss
    w = token_weights(mask, cfg)
    f = lambda lp: grpo_loss(lp, jax.lax.stop_gradient(lp), jnp.array([[1.0, -1.0]]), w, cfg)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(f)(logp)
    assert float(loss) == pytest.approx(-0.5)  # ρ = 1: −A/2 on each of the first completion's tokens, mean
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[0, 1]).sum()) == 0
  finally:
    OBJECTIVES.pop("t_per_sequence", None)
