"""Prefix sharing is exact: the policy log-probs, the gradients of the GRPO loss with respect to every
parameter, and the listener's probabilities equal the plain computation in which every completion
has its own copy of the prompt and images (fp32), with left-padded prompts of different lengths, two
images of different sizes, window attention and completions of different lengths — also with the
parameters sharded over 8 devices."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.sources import PreferencePair
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.grpo import LossConfig, token_weights
from lgrpo_jax.grpo.update import PolicyBatch, loss_fn, policy_logprobs
from lgrpo_jax.listener import ListenerSpec, listener_probs
from lgrpo_jax.train.loop import pair_grid_of, to_device

TEXTS = ["<think>The first is sharp and red.</think><answer>Image 1</answer>",
         "<think>No.</think>\n<answer>Image 2</answer>",
         "<think>Both are circles, but the second one has the colours the prompt asks for and less noise."
         "</think><answer>Image 2</answer>"]


def png(h, w, seed):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
  tok = AutoTokenizer.from_pretrained(tok_dir)
  cfg = tiny_model_config(tok_dir)
  cfg["vision_config"].update(window_size=56)  # several (partial) windows per image
  model = lgrpo_jax.from_config(cfg, seed=7)
  # two pairs, the same grid signature (a 56×84 and an 84×56 image), prompts of different lengths
  pairs = [PreferencePair("a", "a red circle", (png(56, 84, 1), png(84, 56, 2)), 0),
           PreferencePair("b", "a very small blue square on a white background, watercolour",
                          (png(56, 84, 3), png(84, 56, 4)), 1)]
  host = next(iter(make_batches(pairs, tok, PipelineConfig(global_batch=2, num_epochs=1, shuffle=False,
                                                           swap_prob=0.0, length_buckets=(128, 256)))))
  assert host["attention_mask"].sum(1).tolist()[0] != host["attention_mask"].sum(1).tolist()[1]
  end = tok.convert_tokens_to_ids("<|im_end|>")
  rows = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in TEXTS]
  n = max(map(len, rows)) + 2
  tokens = np.zeros((2, 3, n), np.int32)
  mask = np.zeros((2, 3, n), np.int32)
  for b in range(2):
    for g in range(3):
      ids = rows[(b + g) % 3]
      tokens[b, g, :len(ids)], mask[b, g, :len(ids)] = ids, 1
  return tok, model, host, jnp.asarray(tokens), jnp.asarray(mask)


def both(fn):
  """fn(prefix_sharing) jitted for both settings."""
  return (jax.jit(lambda *a: fn(*a, prefix_sharing=True)), jax.jit(lambda *a: fn(*a, prefix_sharing=False)))


def logprobs(model, batch, grid, tokens, mask):
  return tuple(np.asarray(f(nnx.state(model, nnx.Param), batch, tokens, mask)) for f in both(
      lambda params, bt, t, m, prefix_sharing: policy_logprobs(
          nnx.merge(nnx.graphdef(model), params), bt.input_ids, bt.attention_mask, bt.pixel_values, grid, t, m,
          chunk=128, prefix_sharing=prefix_sharing)))


def listener(model, batch, host, spec, tokens, mask):
  grid = tuple(map(tuple, host["image_grid_thw"].tolist()))
  lengths = mask.sum(-1)
  pixels = batch.pixel_values.reshape(-1, batch.pixel_values.shape[-1])
  return tuple(np.asarray(f(nnx.state(model, nnx.Param))) for f in both(
      lambda params, prefix_sharing: listener_probs(
          nnx.merge(nnx.graphdef(model), params), batch.listener_input_ids, batch.listener_attention_mask, pixels,
          grid, tokens, lengths, spec, prefix_sharing)))


def test_logprobs_and_listener_equal_g_copies(setup):
  tok, model, host, tokens, mask = setup
  batch, grid = to_device(host), pair_grid_of(host)
  shared, copies = logprobs(model, batch, grid, tokens, mask)
  m = np.asarray(mask) > 0
  assert np.abs(shared - copies)[m].max() <= 1e-5 * np.abs(copies)[m].max()
  assert np.abs(copies[m]).min() > 0  # real log-probs, not zeros
  p_shared, p_copies = listener(model, batch, host, ListenerSpec.from_tokenizer(tok), tokens, mask)
  np.testing.assert_allclose(p_shared, p_copies, atol=1e-6)
  assert np.abs(p_copies[:, :, 0] - p_copies[0, 0, 0]).max() > 1e-6  # the probabilities differ across rows


def test_grpo_loss_gradients_equal_g_copies(setup):
  _, model, host, tokens, mask = setup
  batch, grid = to_device(host), pair_grid_of(host)
  rng = np.random.default_rng(0)
  logp, _ = logprobs(model, batch, grid, tokens, mask)
  shape = tokens.shape
  pb = PolicyBatch(batch.input_ids, batch.attention_mask, batch.pixel_values, tokens, mask,
                   jnp.asarray(logp + 0.05 * rng.standard_normal(shape), jnp.float32),  # old: ratios ≠ 1, some clipped
                   jnp.asarray(rng.standard_normal(shape[:2]), jnp.float32),
                   token_weights(mask, LossConfig()), jnp.asarray(logp - 0.1 * rng.random(shape), jnp.float32))
  cfg = LossConfig(beta=0.04, eps_low=0.02, eps_high=0.02)
  graphdef, params = nnx.split(model, nnx.Param)
  grads = [jax.jit(jax.grad(lambda p, s=s: loss_fn(p, graphdef, pb, grid, cfg, 128, s)[0]))(params)
           for s in (True, False)]
  leaves = [jax.tree_util.tree_leaves_with_path(g) for g in grads]
  assert len(leaves[0]) == len(leaves[1]) > 20
  worst = 0.0
  for (path, a), (_, b) in zip(*leaves):
    a, b = np.asarray(a), np.asarray(b)
    scale = np.abs(b).max()
    assert scale > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient, vision tower included
    worst = max(worst, np.abs(a - b).max() / scale)
  assert worst <= 1e-5, worst


def test_sharded_over_8_devices(setup):
  tok, model, host, tokens, mask = setup
  from lgrpo_jax.sharding import MeshConfig, make_mesh, state_shardings
  mesh = make_mesh(MeshConfig(fsdp=8))
  graphdef, params = nnx.split(model, nnx.Param)
  shardings = state_shardings(params, mesh)
  placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), params, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharded = nnx.merge(graphdef, placed)
  batch, grid = to_device(host), pair_grid_of(host)
  ref, _ = logprobs(model, batch, grid, tokens, mask)
  with jax.set_mesh(mesh):
    shared, copies = logprobs(sharded, batch, grid, tokens, mask)
    p_shared, p_copies = listener(sharded, batch, host, ListenerSpec.from_tokenizer(tok), tokens, mask)
  m = np.asarray(mask) > 0
  for got in (shared, copies):
    assert np.abs(got - ref)[m].max() <= 1e-5 * np.abs(ref)[m].max()
  np.testing.assert_allclose(p_shared, p_copies, atol=1e-6)


def test_training_step_with_and_without_prefix_sharing(setup):
  """The switch reaches the listener, the reference, the recomputed old log-probs and the update:
  one GRPO step gives the same rewards, loss and gradient norm either way."""
  import dataclasses

  from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
  from lgrpo_jax.rewards.text import ByteTable
  from lgrpo_jax.sampling import SamplingConfig
  from lgrpo_jax.train import StepConfig, Tables, init_state, make_train_step
  tok, model, host, _, _ = setup
  batch, grid = to_device(host), pair_grid_of(host)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=8, num_samples=3, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.04), optim=OptimConfig(learning_rate=1e-3), old_logprobs="recompute")
  graphdef, params = nnx.split(model, nnx.Param)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  spec = ListenerSpec.from_tokenizer(tok)
  out = {}
  for sharing in (True, False):
    c = dataclasses.replace(cfg, prefix_sharing=sharing)
    tx = make_optimizer(c.optim, params)
    step = make_train_step(graphdef, graphdef, tx, c, spec, grid)
    state, metrics = step(init_state(jax.tree.map(jnp.copy, params), tx, seed=0), params, params, batch, tables)
    out[sharing] = (jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()})
  (p1, m1), (p2, m2) = out[True], out[False]
  assert m1["generated_tokens"] == m2["generated_tokens"] and m1["accuracy"] == m2["accuracy"]
  for k in ("reward/total", "reward/listener", "grad_norm", "kl", "ratio_mean"):
    assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k
  # On-policy the loss is −mean(A·ratio) with ratio = 1 and each group's advantages summing to 0: its
  # value is fp32 cancellation noise (~1e-6, CPU-dependent: 1.5e-6 against 1.5e-7 on one Xeon), so
  # it is checked at the scale of its terms; the gradient norm above carries the signal.
  assert abs(m1["loss"] - m2["loss"]) < 1e-5, (m1["loss"], m2["loss"])
  diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2))])
  assert diffs.max() <= 2e-3 and np.mean(diffs < 1e-6) > 0.99  # Adam: last-bit gradient noise can flip ~lr


def test_remat_keeps_gradients_and_saves_memory(setup):
  """`model.remat`: the GRPO-loss gradients of every parameter (vision tower, both attention kinds,
  prefix + extend) are the same with each policy, and recomputing cuts the backward's memory."""
  grads, temp = {}, {}
  for policy in ("none", "full", "dots"):
    model = lgrpo_jax.from_config(setup[1].config.replace(remat=policy), seed=7)
    make_loss, params, pb = grpo_loss_of_params(setup, seed=1, model=model)
    compiled = loss_grad(make_loss()).lower(params, pb).compile()
    temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    grads[policy] = jax.tree.leaves(compiled(params, pb))
  for policy in ("full", "dots"):
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))
                for a, b in zip(grads[policy], grads["none"]))
    assert worst <= 1e-6, (policy, worst)
  assert temp["full"] < temp["none"], temp


def test_remat_is_validated():
  from lgrpo_jax.config import ModelConfig
  from lgrpo_jax.models.qwen2_5_vl import ConfigError
  with pytest.raises(ConfigError, match="model.remat='some'"):
    ModelConfig(remat="some")
  with pytest.raises(ConfigError, match="remat='x'"):
    lgrpo_jax.from_config(lgrpo_jax.models.qwen2_5_vl.presets.TINY).config.replace(remat="x")


def grpo_loss_of_params(setup, seed: int, model=None):
  """(a maker of the GRPO loss (β = 0.04) as a function `loss(params, batch)`, the parameters of
  `model` (default: the setup's), a batch with random old/reference log-probs and advantages).
  Each call of the maker gives a new function, which JAX traces anew, so a switch monkeypatched in
  `layers` takes effect. The batch is an argument, not a constant baked into the program: the
  tests' programs of the same model and switches are then one, compiled once (the tests' cache)."""
  _, default, host, tokens, mask = setup
  batch, grid = to_device(host), pair_grid_of(host)
  rng = np.random.default_rng(seed)
  logp = jnp.asarray(-rng.random(tokens.shape), jnp.float32)
  pb = PolicyBatch(batch.input_ids, batch.attention_mask, batch.pixel_values, tokens, mask, logp,
                   jnp.asarray(rng.standard_normal(tokens.shape[:2]), jnp.float32),
                   token_weights(mask, LossConfig()), logp)
  graphdef, params = nnx.split(model if model is not None else default, nnx.Param)
  return (lambda: lambda p, b: loss_fn(p, graphdef, b, grid, LossConfig(beta=0.04), 128)[0]), params, pb


def loss_grad(fn):
  """The jitted gradient of `fn(params, batch)` with respect to the parameters."""
  return jax.jit(jax.grad(fn))


def test_unrolled_layers_equal_the_scan(setup, monkeypatch):
  """On CPU (`layers.UNROLL_BACKENDS`) the layer stacks run as a Python loop; elsewhere as one
  lax.scan. Both give the same GRPO-loss gradients for every parameter, and only the scan traces a
  loop over layers."""
  from lgrpo_jax.models.qwen2_5_vl import layers
  make_loss, params, pb = grpo_loss_of_params(setup, seed=2)
  grads, loops = {}, {}
  for backends in (("cpu",), ()):
    monkeypatch.setattr(layers, "UNROLL_BACKENDS", backends)
    fn = make_loss()
    loops[backends] = str(jax.make_jaxpr(fn)(params, pb)).count("scan[")
    grads[backends] = jax.tree.leaves(loss_grad(fn)(params, pb))
  assert loops[()] >= 3 and loops[("cpu",)] < loops[()], loops  # vision, prefill, extend scans
  worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))
              for a, b in zip(grads[("cpu",)], grads[()]))
  assert worst <= 1e-5, worst


@pytest.mark.parametrize("tied", [True, False])
def test_dense_weight_gradients_equal_autodiff(setup, monkeypatch, tied):
  """On one CPU device (`layers.WEIGHT_GRAD_BACKENDS`, `WEIGHT_GRAD_MAX_DEVICES`) every Dense takes
  its weight gradient as xᵀ·g with a custom backward; the GRPO loss's gradients for every parameter
  (vision tower, decoder, tied or untied head) equal JAX's own transpose of the matmuls."""
  from lgrpo_jax.models.qwen2_5_vl import layers
  if not tied:
    cfg = setup[1].config.replace(tie_word_embeddings=False)
    setup = (setup[0], lgrpo_jax.from_config(cfg, seed=7), *setup[2:])
    assert setup[1].lm_head is not None
  make_loss, params, pb = grpo_loss_of_params(setup, seed=4)
  monkeypatch.setattr(layers, "WEIGHT_GRAD_MAX_DEVICES", jax.device_count())  # the tests' 8 CPU devices
  grads, customs = {}, {}
  for backends in (("cpu",), ()):
    monkeypatch.setattr(layers, "WEIGHT_GRAD_BACKENDS", backends)
    fn = make_loss()
    customs[backends] = str(jax.make_jaxpr(fn)(params, pb)).count("custom_vjp_call")
    grads[backends] = jax.tree_util.tree_leaves_with_path(loss_grad(fn)(params, pb))
  assert customs[("cpu",)] > customs[()] + 20, customs  # every Dense of both stacks
  assert len(grads[()]) > 20
  for (path, a), (_, b) in zip(grads[("cpu",)], grads[()]):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), jax.tree_util.keystr(path)
