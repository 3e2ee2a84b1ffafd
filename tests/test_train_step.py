"""The GRPO step: one compiled program that samples, scores with the listener, rewards and updates;
a second batch of the same shapes does not recompile; the reference and listener never change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

import lgrpo_jax
from lgrpo_jax.data import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig, make_batches
from lgrpo_jax.data.synthetic import synthetic
from lgrpo_jax.data.tokenizer import build_tiny_tokenizer, tiny_model_config
from lgrpo_jax.grpo import LossConfig
from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
from lgrpo_jax.listener import ListenerSpec
from lgrpo_jax.rewards import ByteTable
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.train import Batch, StepConfig, Tables, init_state, make_train_step


def device_batch(b):
  n = b["input_ids"].shape[0]
  return Batch(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
               jnp.asarray(b["pixel_values"]).reshape(n, -1, b["pixel_values"].shape[-1]),
               jnp.asarray(b["labels"]), jnp.asarray(b["valid"]), jnp.asarray(b["listener_input_ids"]),
               jnp.asarray(b["listener_attention_mask"]))


def test_one_program_per_shape_and_frozen_reference_and_listener(tmp_path):
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  tok = AutoTokenizer.from_pretrained(tok_dir)
  model = lgrpo_jax.from_config(tiny_model_config(tok_dir))
  graphdef, params = nnx.split(model, nnx.Param)
  ref = jax.tree.map(jnp.copy, params)
  listener = jax.tree.map(jnp.copy, params)
  frozen = jax.tree.map(np.asarray, params)

  pipe = PipelineConfig(global_batch=2, seed=0, image=ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56),
                        length_buckets=(256, 512))
  batches = make_batches(list(synthetic(8, seed=0, image_size=64)), tok, pipe)
  first = next(batches)
  pair_grid = tuple(map(tuple, first["image_grid_thw"][:2].tolist()))
  end = tok.convert_tokens_to_ids("<|im_end|>")
  cfg = StepConfig(sampling=SamplingConfig(max_new_tokens=10, num_samples=4, temperature=1.0, eos_ids=(end,)),
                   loss=LossConfig(beta=0.04), optim=OptimConfig(learning_rate=1e-3, micro_batches=2))
  tx = make_optimizer(cfg.optim, params)
  spec = ListenerSpec.from_tokenizer(tok)
  bt = ByteTable.from_tokenizer(tok)
  tables = Tables(jnp.asarray(bt.table), jnp.asarray(bt.lengths))
  step = make_train_step(graphdef, graphdef, tx, cfg, spec, pair_grid)
  state = init_state(params, tx, seed=0)

  state, m1 = step(state, ref, listener, device_batch(first), tables)
  state, m2 = step(state, ref, listener, device_batch(next(batches)), tables)
  assert step._cache_size() == 1  # the second batch (same shapes) reused the compiled program
  assert int(state.step) == 2
  for m in (m1, m2):
    assert all(np.isfinite(np.asarray(v)).all() for v in m.values()), m
    assert 0 <= float(m["listener_confidence"]) <= 1 and float(m["kl"]) >= 0
  # The policy moved; the reference and the listener did not.
  moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state.params),
                                                                 jax.tree.leaves(frozen))]
  assert any(moved)
  for tree in (ref, listener):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(frozen)):
      np.testing.assert_array_equal(np.asarray(a), b)


def test_step_config_rejects_single_sample():
  with pytest.raises(ValueError, match="G ≥ 2"):
    StepConfig(sampling=SamplingConfig(num_samples=1))
