"""Our GRPO objective against TRL's own `GRPOTrainer._compute_loss` (TRL 1.16, the `bench` extra),
loss and gradient (in the log-probs and in the entropies), for every surrogate and TRL option we
mirror. TRL's method runs on a stand-in
trainer object holding exactly the attributes it reads; its per-token log-probs and entropies are
handed in as leaf tensors, so the comparison is of the objective alone.

Skipped where TRL is not installed (`pip install -e .[bench]`); the float64 NumPy reference in
tests/test_grpo.py checks the same formulas everywhere."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgrpo_jax.grpo import LossConfig, advantages, grpo_loss, token_weights

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
torch = pytest.importorskip("torch")


class _Accelerator:
  num_processes = 1
  sync_gradients = True

  def gather(self, x):
    return x

  gather_for_metrics = gather

  def reduce(self, x, reduction="sum"):
    return x

  def pad_across_processes(self, x, dim=0, pad_index=0):
    return x


def trl_loss_and_grad(logp, old, ref, adv, mask, entropy, trl_args: dict):
  """TRL's loss and d loss / d (logp, entropy) for rows of completions (R, N), advantages (R,)."""
  logp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
  ent_t = torch.tensor(entropy, dtype=torch.float64, requires_grad=True)
  coef = trl_args.get("entropy_coef", 0.0)
  args = types.SimpleNamespace(delta=trl_args.get("delta"),
                               use_bias_correction_kl=trl_args.get("use_bias_correction_kl", False),
                               sapo_temperature_pos=trl_args.get("sapo_temperature_pos", 1.0),
                               sapo_temperature_neg=trl_args.get("sapo_temperature_neg", 1.05),
                               **{k: trl_args.get(k, d) for k, d in (("vespo_k_pos", 2.0), ("vespo_lambda_pos", 3.0),
                                                                     ("vespo_k_neg", 3.0), ("vespo_lambda_neg", 2.0))},
                               steps_per_generation=1)
  trainer = types.SimpleNamespace(
      args=args, loss_type=trl_args["loss_type"], beta=trl_args["beta"],
      epsilon_low=trl_args["epsilon"], epsilon_high=trl_args["epsilon_high"],
      importance_sampling_level=trl_args.get("importance_sampling_level", "token"),
      top_entropy_quantile=trl_args.get("top_entropy_quantile", 1.0),
      off_policy_mask_threshold=trl_args.get("off_policy_mask_threshold"),
      use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=coef != 0, entropy_coef=coef,
      use_adaptive_entropy=False,
      current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
      model=types.SimpleNamespace(training=True),
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
  trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp_t, ent_t, None)
  trainer.get_high_entropy_mask = types.MethodType(trl_grpo.GRPOTrainer.get_high_entropy_mask, trainer)
  trainer.get_off_policy_mask = trl_grpo.GRPOTrainer.get_off_policy_mask
  trainer.get_gamma_weights = trl_grpo.GRPOTrainer.get_gamma_weights
  r, n = logp.shape
  m = torch.tensor(mask, dtype=torch.int64)
  inputs = {"prompt_ids": torch.zeros((r, 1), dtype=torch.int64), "prompt_mask": torch.ones((r, 1), dtype=torch.int64),
            "completion_ids": torch.zeros((r, n), dtype=torch.int64), "completion_mask": m,
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": m.sum().double()}
  trainer.max_completion_length = n
  loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
  loss.backward()
  return float(loss.detach()), logp_t.grad.numpy(), (np.zeros_like(entropy) if ent_t.grad is None
                                                     else ent_t.grad.numpy())


# (our LossConfig fields, TRL's GRPOConfig fields). TRL's cispo caps the ratio at `epsilon_high`,
# ours at 1 + eps_high; TRL's defaults differ from ours (loss "dapo", bias-corrected KL on), so
# every case names them.
CASES = {
    "grpo": (dict(loss="grpo"), dict(loss_type="grpo")),
    "dapo_clip_higher": (dict(loss="dapo", eps_high=0.28), dict(loss_type="dapo", epsilon_high=0.28)),
    "dr_grpo": (dict(loss="dr_grpo"), dict(loss_type="dr_grpo")),
    "gspo": (dict(importance_sampling_level="sequence", eps_low=0.05, eps_high=0.05),
             dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.05)),
    "luspo": (dict(loss="luspo", importance_sampling_level="sequence", eps_low=0.05, eps_high=0.05),
              dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.05)),
    "cispo": (dict(objective="cispo", loss="dapo", eps_high=0.1), dict(loss_type="cispo", epsilon_high=1.1)),
    "sapo": (dict(objective="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
             dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)),
    "vespo": (dict(objective="vespo", loss="dapo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
              dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5)),
    "delta": (dict(loss="dapo", delta=1.1), dict(loss_type="dapo", delta=1.1)),
    "bias_corrected_kl": (dict(use_bias_correction_kl=True, beta=0.3),
                          dict(loss_type="grpo", use_bias_correction_kl=True, beta=0.3)),
    "off_policy_mask": (dict(off_policy_mask_threshold=0.05), dict(loss_type="grpo", off_policy_mask_threshold=0.05)),
    "top_entropy": (dict(loss="dapo", top_entropy_quantile=0.3), dict(loss_type="dapo", top_entropy_quantile=0.3)),
    "everything": (dict(loss="dr_grpo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
                        use_bias_correction_kl=True, delta=1.2, eps_high=0.28, beta=0.1),
                   dict(loss_type="dr_grpo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
                        use_bias_correction_kl=True, delta=1.2, epsilon_high=0.28, beta=0.1)),
    "entropy_bonus": (dict(loss="dapo", entropy_coef=0.05, importance_sampling_level="sequence"),
                      dict(loss_type="dapo", entropy_coef=0.05, importance_sampling_level="sequence")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient_equal_trls(case):
  ours, theirs = CASES[case]
  cfg = LossConfig(**{"beta": 0.04, **ours})
  theirs = {"beta": cfg.beta, "epsilon": cfg.eps_low, "epsilon_high": cfg.eps_high, **theirs}
  rng = np.random.default_rng(0)
  b, g, n = 3, 4, 7
  logp = -rng.uniform(0.1, 3, (b, g, n))
  old = logp + rng.normal(0, 0.3, (b, g, n))
  ref = logp + rng.normal(0, 0.2, (b, g, n))
  rewards = rng.normal(size=(b, g))
  # TRL averages over every completion, ours over the non-empty ones: no empty completion here.
  mask = (np.arange(n) < rng.integers(1, n + 1, (b, g))[..., None]).astype(np.int64)
  # TRL takes the entropy quantile in float32: float32 values make that exact, as ours in float64.
  entropy = rng.uniform(0, 4, (b, g, n)).astype(np.float32).astype(np.float64)
  with jax.enable_x64(True):
    adv = advantages(jnp.asarray(rewards), cfg)
    w = token_weights(jnp.asarray(mask), cfg)
    f = lambda lp, ent: grpo_loss(lp, jnp.asarray(old), adv, w, cfg, jnp.asarray(ref), ent)[0]
    loss, (grad, grad_ent) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(logp), jnp.asarray(entropy))
    adv = np.asarray(adv)
  flat = lambda x: x.reshape(b * g, *x.shape[2:])
  want_loss, want_grad, want_grad_ent = trl_loss_and_grad(flat(logp), flat(old), flat(ref), flat(adv), flat(mask), flat(entropy),
                                           theirs)
  rtol = 1e-7 if cfg.objective == "sapo" else 1e-12  # TRL's sapo temperatures are float32 tensors
  assert float(loss) == pytest.approx(want_loss, rel=rtol, abs=1e-14)
  np.testing.assert_allclose(flat(np.asarray(grad)), want_grad, rtol=100 * rtol, atol=1e-15)
  np.testing.assert_allclose(flat(np.asarray(grad_ent)), want_grad_ent, rtol=1e-12, atol=1e-15)
  assert (np.abs(want_grad_ent).max() > 0) == (cfg.entropy_coef != 0)
  assert np.abs(want_grad).max() > 0


def trl_advantages(rewards_per_func, weights, g, scale_rewards):
  """TRL 1.16's advantages (GRPOTrainer._generate_and_score_completions, sum_then_normalize), in
  float64: a reward function's None is NaN; the weighted nansum over functions; a completion
  that no function scored is NaN, left out of the nan-aware mean and std, and gets advantage 0."""
  from trl.trainer.utils import nanstd
  rpf = torch.tensor(rewards_per_func, dtype=torch.float64)
  unscorable = torch.isnan(rpf).all(dim=1)
  rewards = (rpf * torch.tensor(weights, dtype=torch.float64).unsqueeze(0)).nansum(dim=1)
  rewards[unscorable] = torch.nan
  mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, 0)
  if scale_rewards == "group":
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, 0)
  else:
    std = nanstd(rewards).expand_as(rewards)
  adv = (rewards - mean) / (std + 1e-4)
  return torch.nan_to_num(adv, nan=0.0).numpy()


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_the_numpy_transcription_of_trls_advantages_is_trls(scale_rewards):
  """tests/test_rewards.py checks "a reward that does not apply" against a float64 NumPy
  transcription of TRL's advantages (run where TRL is not installed, as in CI); here that
  transcription against TRL's own code, on the same kinds of holes."""
  from test_rewards import trl_advantages_numpy
  rng = np.random.default_rng(4)
  parts = rng.normal(size=(3, 4 * 5))
  parts[rng.uniform(size=parts.shape) < 0.3] = np.nan
  parts[:, 7] = np.nan
  parts[:, 10:15] = np.nan
  parts[0, 10] = 0.5
  want = trl_advantages(parts.T, (1.0, 0.5, 2.0), 5, scale_rewards)
  # TRL's Bessel factor count / (count − 1) divides int64 counts: a float32 tensor, so 1e-7, not 1e-12
  np.testing.assert_allclose(trl_advantages_numpy(parts.T, (1.0, 0.5, 2.0), 5, scale_rewards), want, rtol=1e-6)
