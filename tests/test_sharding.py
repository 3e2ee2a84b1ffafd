"""Sharding on 8 simulated CPU devices: same logits as one device, parameters really sharded as the
rules say, sharded creation/loading equal to unsharded, bounded host memory, Orbax resharding."""

import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lgrpo_jax
from lgrpo_jax import checkpoint, sharding
from hf_tiny import build_hf, config_dict, make_batch, ours_inputs, rel_err, traced_forward

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
# 8 rows (so every data-parallel layout splits the batch), left padding, images of several sizes.
ROWS = [{"text": [2 + i % 3, 3 + i % 2], "images": [[(112, 56), (84, 84), (56, 112), (84, 140)][i % 4]]}
        for i in range(8)]


def mesh_of(shape):
  return sharding.make_mesh(sharding.MeshConfig(*shape))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  build_hf(config_dict("a"), seed=21).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def single(hf_dir):
  return lgrpo_jax.load_hf(hf_dir)


def params(model):
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def spec_of(arr) -> tuple:
  """The array's PartitionSpec padded with None to its rank (jit drops trailing Nones)."""
  spec = tuple(arr.sharding.spec)
  return spec + (None,) * (arr.ndim - len(spec))


def test_eight_devices_available():
  assert jax.device_count() == 8  # tests/conftest.py sets the simulated device count


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_logits_equal_single_device(hf_dir, single, shape):
  mesh = mesh_of(shape)
  model = lgrpo_jax.load_hf(hf_dir, mesh=mesh)
  batch = ours_inputs(make_batch(ROWS, seed=5))
  ref = np.asarray(lgrpo_jax.forward(single, **batch))
  with jax.set_mesh(mesh):
    out = lgrpo_jax.forward(model, **batch)
  assert len(out.sharding.device_set) == 8
  assert rel_err(np.asarray(out), ref, batch["attention_mask"]) <= 1e-5


EXPECTED = {  # parameter -> spec per mesh (data, fsdp, tensor)
    "layers.q_proj.kernel": {(8, 1, 1): P(None, None, None, None), (1, 8, 1): P(None, "fsdp", None, None),
                             (2, 2, 2): P(None, "fsdp", "tensor", None), (1, 4, 2): P(None, "fsdp", "tensor", None)},
    "layers.mlp.down_proj.kernel": {(1, 8, 1): P(None, None, "fsdp"), (1, 4, 2): P(None, "tensor", "fsdp")},
    "embed_tokens": {(1, 8, 1): P(None, "fsdp"), (2, 2, 2): P("tensor", "fsdp")},
    "lm_head.kernel": {(1, 4, 2): P("fsdp", "tensor")},
    "visual.blocks.qkv.kernel": {(2, 2, 2): P(None, "fsdp", None, "tensor", None)},
    "visual.blocks.mlp.gate_proj.kernel": {(1, 8, 1): P(None, "fsdp", None), (2, 2, 2): P(None, "fsdp", "tensor")},
    "visual.merger.mlp0.kernel": {(1, 4, 2): P("fsdp", "tensor")},
}


@pytest.mark.parametrize("shape", MESHES)
def test_parameters_sharded_as_the_rules_say(hf_dir, shape):
  mesh = mesh_of(shape)
  got = params(lgrpo_jax.load_hf(hf_dir, mesh=mesh))
  for name, per_mesh in EXPECTED.items():
    if shape in per_mesh:
      assert spec_of(got[name]) == tuple(per_mesh[shape]), name
  # ZeRO-3: every large parameter is split over fsdp when fsdp > 1, and each device really holds
  # only its part (the shard size matches the spec's mesh axes).
  for name, arr in got.items():
    if arr.ndim < 2 or arr.size < 4096:
      continue
    axes = [a for entry in arr.sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    if shape[1] > 1:
      assert "fsdp" in axes, (name, arr.sharding.spec)
    split = int(np.prod([mesh.shape[a] for a in axes]))
    assert arr.addressable_shards[0].data.size * split == arr.size, (name, arr.sharding.spec)


def test_mesh_errors_name_the_sizes():
  with pytest.raises(sharding.MeshError, match=r"data=2, fsdp=3, tensor=1\): 2×3×1 = 6 devices, but 8"):
    sharding.make_mesh(sharding.MeshConfig(2, 3, 1))
  with pytest.raises(sharding.MeshError, match="not divisible by 3"):
    sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=-1))
  with pytest.raises(sharding.MeshError, match="at most one -1 .fsdp defaults to -1: with data=-1 give fsdp=1"):
    sharding.MeshConfig(data=-1).resolve(8)
  with pytest.raises(sharding.MeshError, match=r"at most one -1$"):
    sharding.MeshConfig(1, -1, -1).resolve(8)
  assert sharding.MeshConfig.preset("fsdp_tp", tensor=2).resolve(8) == (1, 4, 2)
  assert sharding.MeshConfig.preset("dp").resolve(8) == (8, 1, 1)
  assert sharding.MeshConfig.preset("dp", tensor=2).resolve(8) == (4, 1, 2)  # tensor was dropped
  assert sharding.MeshConfig.preset("fsdp", tensor=4).resolve(8) == (1, 2, 4)


def test_sharded_random_init_equals_unsharded():
  cfg = config_dict("b")
  ref = params(lgrpo_jax.from_config(cfg, seed=3))
  got = params(lgrpo_jax.from_config(cfg, seed=3, mesh=mesh_of((1, 4, 2))))
  assert spec_of(got["layers.q_proj.kernel"]) == (None, "fsdp", "tensor", None)
  for name in ref:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)


def test_sharded_load_equals_unsharded(hf_dir, single):
  ref = params(single)
  got = params(lgrpo_jax.load_hf(hf_dir, mesh=mesh_of((2, 2, 2))))
  assert ref.keys() == got.keys()
  for name in ref:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)


def test_sharded_load_host_memory_well_under_a_full_copy(tmp_path):
  """A synthetic 32 MB checkpoint in 60+ safetensors files, loaded onto fsdp=8. The bound: Python-side
  (numpy) allocations peak at about two copies of the largest checkpoint tensor (as read, and in our
  layout) plus a few MB of bookkeeping that does not grow with the model — stacked parameters are
  built on the devices one layer at a time. Measured: 5.1 MB (16%)."""
  cfg = config_dict("a", text_config={
      "num_hidden_layers": 16, "hidden_size": 256, "intermediate_size": 256, "vocab_size": 1024,
      "num_attention_heads": 8, "num_key_value_heads": 8,
      "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}},
      vision_config={"out_hidden_size": 256})
  model = lgrpo_jax.from_config(cfg, seed=0)
  lgrpo_jax.save_hf(model, tmp_path, max_shard_bytes=500_000)
  total = sum(np.asarray(v).nbytes for v in params(model).values())
  largest = max(np.asarray(v).nbytes for k, v in params(model).items() if not k.startswith(("layers.", "visual.blocks.")))
  assert len(list(tmp_path.glob("*.safetensors"))) >= 60
  del model
  mesh = mesh_of((1, 8, 1))
  tracemalloc.start()
  loaded = lgrpo_jax.load_hf(tmp_path, mesh=mesh)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 2 * largest + 5e6, f"peak {peak} B, largest tensor {largest} B"
  assert peak < 0.25 * total, f"peak {peak} B vs {total} B of parameters"
  assert spec_of(params(loaded)["layers.q_proj.kernel"]) == (None, "fsdp", None, None)


def test_a_layer_axis_split_over_devices_loads_the_same_values(hf_dir, single):
  """Loading builds stacked parameters one layer at a time, in one program for all devices when the
  layer axis is whole on each (the default rules), else per device with its own layers: a rules
  table that shards the layers takes the second way and loads the same values."""
  mesh = mesh_of((4, 2, 1))
  got = params(lgrpo_jax.load_hf(hf_dir, mesh=mesh, rules={**sharding.RULES, "layers": ("fsdp",)}))
  assert spec_of(got["layers.q_proj.kernel"])[0] == "fsdp"  # 2 text layers: one per fsdp device
  assert spec_of(got["visual.blocks.qkv.kernel"])[0] == "fsdp"  # 4 vision blocks: two per device
  want = params(single)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_orbax_restore_onto_another_mesh(hf_dir, single, tmp_path):
  a = lgrpo_jax.load_hf(hf_dir, mesh=mesh_of((1, 8, 1)))
  checkpoint.save_model(a, tmp_path / "ckpt")
  mesh_b = mesh_of((2, 2, 2))
  b = checkpoint.load_model(tmp_path / "ckpt", mesh=mesh_b)
  pa, pb = params(single), params(b)
  assert spec_of(pb["layers.q_proj.kernel"]) == (None, "fsdp", "tensor", None)
  assert pb["layers.q_proj.kernel"].sharding.mesh.shape == mesh_b.shape
  for name in pa:
    np.testing.assert_array_equal(np.asarray(pb[name]), np.asarray(pa[name]), err_msg=name)


def test_process_batch_slices_cover_the_batch():
  parts = [sharding.process_batch_slice(12, i, 3) for i in range(3)]
  assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 12)]
  with pytest.raises(sharding.MeshError, match="global batch 10 is not divisible by 3 processes"):
    sharding.process_batch_slice(10, 0, 3)


def test_use_rules_changes_activation_shardings(hf_dir):
  """The activation constraints follow the active rules table (MaxText-style override)."""
  mesh = mesh_of((8, 1, 1))
  model = lgrpo_jax.load_hf(hf_dir, mesh=mesh)
  batch = ours_inputs(make_batch(ROWS, seed=5))
  with jax.set_mesh(mesh):  # traced afresh each time: the rules are read at trace time
    split = traced_forward(model, batch)
    with sharding.use_rules({**sharding.RULES, "batch": None}):
      whole = traced_forward(model, batch)
  assert spec_of(split)[0] == ("data", "fsdp") or spec_of(split)[0] == "data"
  assert spec_of(whole)[0] is None
  assert rel_err(np.asarray(whole), np.asarray(split), batch["attention_mask"]) <= 1e-5


@pytest.mark.parametrize("freeze", [(), ("vision",)])
def test_the_trainers_initial_state_is_one_program_laid_out_as_eagerly(hf_dir, freeze):
  import jax.numpy as jnp
  # The Trainer builds its optimizer state and frozen copies in one program each (eagerly, every
  # zeros_like and copy compiled its own: 43 of the tiny model's 51 programs). The layout must be
  # the eager one: each Adam moment as its parameter, the scalars replicated; the copies as the
  # parameters, in buffers of their own (the step donates the policy's).
  from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
  from lgrpo_jax.train.loop import place
  from lgrpo_jax.train.step import TrainState, init_state
  mesh = mesh_of((2, 2, 2))
  p = place(nnx.split(lgrpo_jax.load_hf(hf_dir), nnx.Param)[1], mesh)
  tx = make_optimizer(OptimConfig(freeze=freeze), p)
  eager = sharding.on_mesh(TrainState(p, tx.init(p), jnp.int32(0), jax.random.key(3)), mesh)
  ours = init_state(p, tx, 3, mesh)
  assert all(a is b for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ours.params)))  # not copied
  eager_leaves, ours_leaves = (jax.tree_util.tree_leaves_with_path(t) for t in (eager, ours))
  assert [path for path, _ in eager_leaves] == [path for path, _ in ours_leaves]
  split = 0
  for (path, a), (_, b) in zip(eager_leaves, ours_leaves):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (jax.tree_util.keystr(path), a.sharding, b.sharding)
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    split += a.ndim > 0 and a.addressable_shards[0].data.size < a.size
  assert split > 20  # moments really sharded (not everything replicated)
  copies = sharding.copy_tree(p)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(copies)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.addressable_shards[0].data.unsafe_buffer_pointer() != b.addressable_shards[0].data.unsafe_buffer_pointer()
  # The Trainer's frozen copies in the compute dtype: floating arrays cast (laid out as before),
  # a bf16 array still a copy of its own (a step donates the policy's buffers).
  import jax.numpy as jnp
  p_leaf = jax.tree.leaves(p)[0]
  mixed = {"w": p_leaf, "b": p_leaf.astype(jnp.bfloat16), "i": jnp.arange(4)}
  cast = sharding.copy_tree(mixed, jnp.dtype("bfloat16"))
  assert {k: v.dtype for k, v in cast.items()} == {"w": jnp.bfloat16, "b": jnp.bfloat16, "i": mixed["i"].dtype}
  assert cast["w"].sharding.is_equivalent_to(p_leaf.sharding, p_leaf.ndim)
  np.testing.assert_array_equal(np.asarray(cast["w"]), np.asarray(p_leaf.astype(jnp.bfloat16)))
  assert cast["b"].addressable_shards[0].data.unsafe_buffer_pointer() != \
      mixed["b"].addressable_shards[0].data.unsafe_buffer_pointer()


def test_a_second_trainer_state_reuses_the_compiled_init():
  # The same optimizer config gives the same transformation, so a second run in the process (a
  # notebook, the test suite) reuses the initial state's program instead of compiling it again.
  import jax.numpy as jnp
  from lgrpo_jax.grpo.update import OptimConfig, make_optimizer
  from lgrpo_jax.train.metrics import CompileCounter
  from lgrpo_jax.train.step import init_state
  p = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  assert make_optimizer(OptimConfig(freeze=[]), p) is make_optimizer(OptimConfig(), p)
  assert make_optimizer(OptimConfig(learning_rate=1e-3), p) is not make_optimizer(OptimConfig(), p)
  init_state(p, make_optimizer(OptimConfig(), p), 7)
  q = {k: v + 1 for k, v in p.items()}
  counter = CompileCounter()
  second = init_state(q, make_optimizer(OptimConfig(), p), 7)
  assert counter.stats()[0] == 0
  other = init_state(p, make_optimizer(OptimConfig(), p), 8)  # another seed: its own key, compiled
  assert counter.stats()[0] > 0
  assert not np.array_equal(jax.random.key_data(second.key), jax.random.key_data(other.key))
  np.testing.assert_array_equal(np.asarray(second.params["w"]), 2.0)
