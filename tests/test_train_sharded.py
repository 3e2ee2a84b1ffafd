"""The loop on a mesh of 8 simulated devices: parameters and optimizer state really sharded, and the
same training as on one device (same sampled completions and rewards, parameters equal to float
tolerance — only the order of sharded reductions differs)."""

import json

import jax
import numpy as np

from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
from lgrpo_jax.sharding import MeshConfig, make_mesh
from lgrpo_jax.train.step import clear_compiled_steps
from train_worker import make


def test_sharded_loop_matches_one_device(tmp_path):
  clear_compiled_steps()  # its program count is this test's own
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  one = make(tmp_path / "one", tok_dir, steps=2, save_every=2, batch=4, samples=2)
  sharded = make(tmp_path / "sharded", tok_dir, steps=2, save_every=2, batch=4, samples=2, mesh=mesh)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded.state.params)}
  assert any("fsdp" in s for s in specs), specs
  mu = [x for x in jax.tree.leaves(sharded.state.opt_state) if getattr(x, "ndim", 0) >= 2]
  assert any("fsdp" in str(x.sharding.spec) for x in mu)
  one.run()
  sharded.run()
  for t in (one, sharded):
    t.close()
  read = lambda d: [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
  for a, b in zip(read("one"), read("sharded"), strict=True):
    for k in ("reward/total", "accuracy", "format_rate", "generated_tokens"):
      np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    np.testing.assert_allclose(a["loss"], b["loss"], atol=2e-5)  # a near-zero sum of ± terms
    assert b["compiled_programs"] == 1  # the new state has the old layout: no recompilation
  # Adam divides by √v: where a gradient is ~0, its last-bit differences between reduction orders
  # become update differences of up to lr per step (Adam's step is bounded by ~lr). So: nearly every
  # element to 1e-5, and all within lr × steps.
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(one.state.params)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(sharded.state.params)])
  close = np.isclose(a, b, rtol=1e-4, atol=1e-5)
  assert close.mean() > 0.995, close.mean()
  np.testing.assert_allclose(a, b, atol=1e-3 * 2)
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded.state.params))


def test_tensor_parallel_training_equals_one_device(tmp_path):
  """Tensor parallelism (heads, MLP and vocabulary split over `tensor`, with fsdp and data) trains
  as one device does. Adam's eps = 1 keeps its update near-linear in the gradient, so reduction-order
  noise in near-zero gradients stays noise (with eps = 1e-8 it becomes ±lr steps) and parameters
  can be compared tightly."""
  tok_dir = build_tiny_tokenizer(tmp_path / "tok")
  optim = {"eps": 1.0, "learning_rate": 0.1}
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t.state.params)])
  one = make(tmp_path / "one", tok_dir, steps=2, save_every=2, batch=4, samples=2, optim=optim)
  start = flat(one)
  one.run()
  one.close()
  want = flat(one)
  assert np.abs(want - start).max() > 1e-3  # two steps moved the parameters
  for sizes in ((1, 2, 4), (2, 2, 2)):
    mesh = make_mesh(MeshConfig(*sizes))
    t = make(tmp_path / ("mesh" + "x".join(map(str, sizes))), tok_dir, steps=2, save_every=2, batch=4, samples=2,
             optim=optim, mesh=mesh)
    assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(t.state.params))
    t.run()
    t.close()
    np.testing.assert_allclose(flat(t), want, atol=2e-5, err_msg=str(sizes))
