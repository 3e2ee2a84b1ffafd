"""Device mesh, the logical-axis rules table, sharded model creation, per-host batch helpers.

One mesh with three named axes for every run, from one CPU to a pod:

    data    pure data parallelism (parameters replicated along it)
    fsdp    data parallelism with parameters and optimizer state sharded along it (ZeRO-3 style)
    tensor  tensor parallelism: attention heads, MLP width and vocabulary split across it

The model names every parameter axis logically ("embed", "heads", "mlp", ...); RULES maps those
names onto mesh axes, once, for every mesh. Axes of size 1 make a rule a no-op, so the presets are
just mesh shapes:

    dp       MeshConfig(data=-1, fsdp=1)         replicate parameters, split the batch
    fsdp     MeshConfig(fsdp=-1)                 shard parameters over all devices (default)
    fsdp_tp  MeshConfig(fsdp=-1, tensor=T)       FSDP across, tensor parallel within T devices

A dimension that its mesh axes do not divide evenly is left unsharded (replicated) rather than
failing: tiny test models on 8 devices, or a vision tower whose width does not split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: never sharded). Batch-like activation axes go over both
# data-parallel axes; weights' "embed" axis is the FSDP axis; widths go over "tensor".
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "length": None,
}

PRESETS = {"dp": dict(data=-1, fsdp=1, tensor=1), "fsdp": dict(data=1, fsdp=-1, tensor=1)}


class MeshError(ValueError):
  """A mesh shape that cannot be built on the available devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) axes; one of them may be -1 = "all remaining devices"."""
  data: int = 1  # data-parallel replicas
  fsdp: int = -1  # parameters sharded over this axis; -1: all remaining devices
  tensor: int = 1  # tensor (model) parallel

  @classmethod
  def preset(cls, name: str, tensor: int = 1) -> "MeshConfig":
    if name == "fsdp_tp":
      return cls(data=1, fsdp=-1, tensor=tensor)
    if name not in PRESETS:
      raise MeshError(f"unknown mesh preset {name!r} (choose from dp, fsdp, fsdp_tp)")
    return cls(**dict(PRESETS[name], tensor=tensor))  # `tensor` applies to every preset

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    desc = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      hint = " (fsdp defaults to -1: with data=-1 give fsdp=1, the 'dp' preset)" if sizes[:2] == [-1, -1] else ""
      raise MeshError(f"mesh ({desc}): sizes must be positive, with at most one -1{hint}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise MeshError(f"mesh ({desc}): {num_devices} devices are not divisible by {known}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise MeshError(f"mesh ({desc}): {'×'.join(map(str, sizes))} = {math.prod(sizes)} devices, "
                      f"but {num_devices} are available")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices of all processes (or `devices`)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = (config or MeshConfig()).resolve(len(devices))
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ---- logical names -> specs --------------------------------------------------------------------
def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict | None = None) -> P:
  """PartitionSpec for an array with these logical axis names. Mesh axes that do not divide the
  dimension, or that an earlier dimension already uses, are dropped."""
  rules = RULES if rules is None else rules
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = [a for a in (rules.get(name) or ()) if a in mesh.shape and mesh.shape[a] > 1
            and a not in used] if name is not None else []
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def per_device_bytes(state: nnx.State, sizes: Sequence[int], rules: dict | None = None):
  """(bytes on each device, total bytes, bytes of the arrays the fsdp axis leaves whole, {logical
  axis: bytes of the arrays whose axis of that name the tensor axis was meant to split and does
  not}) of an (abstract) model state laid out by the rules on a (data, fsdp, tensor) mesh of these
  sizes — without building the mesh."""
  rules = RULES if rules is None else rules
  mesh = types.SimpleNamespace(shape=dict(zip(AXES, sizes)))
  per_device = total = not_fsdp = 0
  not_tensor: dict[str, int] = {}
  for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    spec = logical_to_spec(names, var.shape, mesh, rules)
    n = math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
    axes = [a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part)]
    per_device += n // math.prod(mesh.shape[a] for a in axes)
    total += n
    not_fsdp += 0 if "fsdp" in axes else n
    if mesh.shape.get("tensor", 1) > 1 and "tensor" not in axes:
      meant = [nm for nm in names if nm is not None and "tensor" in (rules.get(nm) or ())]
      if meant:
        not_tensor[meant[0]] = not_tensor.get(meant[0], 0) + n
  return per_device, total, not_fsdp, not_tensor


MAX_EXTRA_BYTES = 1 << 30  # replicated parameters beyond an even split that a mesh may cost


def check_parameters_split(model_cfg, sizes: Sequence[int], rules: dict | None = None) -> str | None:
  """A `MeshError` naming mesh.fsdp when the model's widths do not divide by it, so that most of
  its parameters (and so of its optimizer state) would be whole on every device instead of split —
  `logical_to_spec` leaves such a dimension whole, which is right for a small bias and ruinous for
  the whole model: 7B's 3,584-wide layers on fsdp = 24 put the whole model on every device. Over
  1 GiB more per device than an even split only. A smaller part left whole (e.g. the vision tower
  at fsdp = 28 for 7B): the warning returned (None: nothing to say)."""
  data, fsdp, tensor = sizes
  if fsdp == 1 and tensor == 1:  # data parallelism replicates the model by design
    return None
  from lgrpo_jax.models.qwen2_5_vl.hf import abstract_model
  _, state = abstract_model(model_cfg)
  per_device, total, not_fsdp, not_tensor = per_device_bytes(state, sizes, rules)
  ideal = total / (fsdp * tensor)
  # Refused: fsdp leaves most of the parameters whole, and that costs real memory (a small model,
  # e.g. the tiny preset, may be replicated: it fits anyway). A part left whole: a warning.
  if per_device - ideal <= MAX_EXTRA_BYTES:
    return None
  if fsdp == 1 or not_fsdp <= total / 2:
    t, v = model_cfg.text, model_cfg.vision
    counts = {"heads": (("text attention heads", t.num_attention_heads), ("vision attention heads", v.num_heads)),
              "kv_heads": (("key/value heads", t.num_key_value_heads),),
              "mlp": (("text MLP width", t.intermediate_size), ("vision MLP width", v.intermediate_size)),
              "vocab": (("vocabulary", t.vocab_size),)}
    causes = []
    for k, b in sorted(not_tensor.items(), key=lambda kv: -kv[1]):
      named = [f"{what} {n}" for what, n in counts.get(k, ((k, 0),)) if n % tensor] or [k]
      causes.append(f"{' and '.join(named)} not divisible by mesh.tensor={tensor} ({b / 2**30:.2f} GiB not split)")
    widths = [f"{k} {w}" for k, w in (("vision hidden_size", v.hidden_size), ("text hidden_size", t.hidden_size))
              if fsdp > 1 and w % fsdp]
    if widths:
      causes.insert(0, f"{' and '.join(widths)} not divisible by mesh.fsdp={fsdp}")
    return (f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) puts {per_device / 2**30:.2f} GiB of parameters on "
            f"every device, {ideal / 2**30:.2f} GiB split evenly: " + ("; ".join(causes) or "some widths do not "
                                                                            "divide the mesh"))
  widths = {"text hidden_size": model_cfg.text.hidden_size, "vision hidden_size": model_cfg.vision.hidden_size}
  bad = [f"{k} {w}" for k, w in widths.items() if w % fsdp]
  n = data * fsdp * tensor
  fits = [f for f in range(fsdp, 0, -1) if (n // tensor) % f == 0 and all(w % f == 0 for w in widths.values())]
  hint = (f"; e.g. mesh.fsdp={fits[0]} mesh.data={n // (tensor * fits[0])}" if fits and fits[0] > 1 else "")
  raise MeshError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): mesh.fsdp would leave "
                  f"{not_fsdp / total:.0%} of the model's parameters whole on every device: {per_device / 2**30:.2f} GiB "
                  f"per device instead of {ideal / 2**30:.2f} GiB (of {total / 2**30:.2f} GiB), because "
                  + (" and ".join(bad) + f" {'is' if len(bad) == 1 else 'are'} not divisible by mesh.fsdp={fsdp}"
                     if bad else f"the widths fsdp splits are not divisible by mesh.fsdp={fsdp}")
                  + f"; choose sizes that divide them{hint}")


def state_shardings(state: nnx.State, mesh: Mesh, rules: dict | None = None):
  """NamedSharding for every variable of an (abstract or concrete) model state, from the logical
  names in its `out_sharding` metadata; variables without names are replicated."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_like(state: nnx.State, shardings) -> nnx.State:
  return jax.tree.map(lambda v, s: v.replace(jax.lax.with_sharding_constraint(v.get_value(), s)),
                      state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create(make, mesh: Mesh | None = None, rules: dict | None = None):
  """Builds the module returned by `make()` in one jitted program; with a mesh, every parameter is
  created directly in its shard (no device ever holds a full replicated copy). Compiled either
  way, so the values are the same with and without a mesh."""
  return creator(lambda key: make(), mesh, rules)(jax.random.key(0))


def creator(make, mesh: Mesh | None = None, rules: dict | None = None):
  """`create` as a reusable function of an RNG key, `make(key)`: compiled once, then each call only
  runs the program (the random init of even the tiny test model takes seconds to compile)."""
  if mesh is None:
    return nnx.jit(make)
  shardings = state_shardings(nnx.state(nnx.eval_shape(lambda: make(jax.random.key(0)))), mesh, rules)

  @nnx.jit
  def create_sharded(key):
    module = make(key)
    nnx.update(module, shard_like(nnx.state(module), shardings))
    return module

  def run(key):
    with jax.set_mesh(mesh):
      return create_sharded(key)

  return run


# ---- activations -------------------------------------------------------------------------------
_ACTIVE_RULES: list[dict] = [RULES]


@contextlib.contextmanager
def use_rules(rules: dict):
  _ACTIVE_RULES.append(rules)
  try:
    yield
  finally:
    _ACTIVE_RULES.pop()


def constrain(x, names: Sequence[str | None]):
  """Sharding constraint on an activation by logical names, when a mesh is set (`jax.set_mesh`);
  the identity otherwise. Used at block boundaries so XLA keeps the batch split and does not
  replicate activations."""
  spec = active_spec(names, x.shape)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> P | None:
  """The PartitionSpec these logical names get on the mesh that is set (`jax.set_mesh`), by the
  active rules; None when no mesh of more than one device is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  return logical_to_spec(names, shape, mesh, _ACTIVE_RULES[-1])


# ---- per-process batches -----------------------------------------------------------------------
def process_batch_slice(global_batch: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
  """Which rows of the global batch this process feeds (contiguous, equal shares)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise MeshError(f"global batch {global_batch} is not divisible by {count} processes")
  per = global_batch // count
  return slice(index * per, (index + 1) * per)


def global_batch_array(local: np.ndarray, mesh: Mesh, names: Sequence[str | None] = ("batch",)):
  """One global array from each process's slice of the batch (first axis)."""
  shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
  names = tuple(names) + (None,) * (local.ndim - len(names))
  sharding = NamedSharding(mesh, logical_to_spec(names, shape, mesh))
  return jax.make_array_from_process_local_data(sharding, local, shape)


def put(x, sharding: NamedSharding):
  """`x` (the same value on every process) laid out as `sharding`, also where the sharding spans
  devices of other processes (multi-host), where `jax.device_put` refuses. PRNG key arrays too."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard on device
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  local = np.asarray(x)
  return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])


def on_mesh(tree, mesh: Mesh):
  """Every array of `tree` that is not laid out on `mesh` yet (optimizer counts, RNG keys, tables)
  replicated over it, so that one jitted program sees only global arrays (multi-host needs that)."""
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding) and
                      x.sharding.mesh == mesh else put(x, replicated), tree)


@functools.partial(jax.jit, static_argnames="dtype")
def copy_tree(tree, dtype=None):
  """A copy of every array of `tree` (laid out as its original) in one program: `jnp.copy` leaf by
  leaf compiled a program per shape (21 of the tiny model's). `dtype`: floating arrays cast to it
  (a copy still where they already are: never the original's buffer, which a step may donate)."""
  cast = lambda x: x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) \
      and x.dtype != jnp.dtype(dtype) else jnp.copy(x)
  return jax.tree.map(cast, tree)


_INIT_PROGRAMS: dict = {}


def init_like(fn, tree, mesh: Mesh | None = None, *, key=None):
  """`fn(tree)` — e.g. an optimizer's `init(params)` — as one compiled program. Run eagerly, every
  `zeros_like` compiled a program of its own per shape (22 of the tiny model's). With `mesh`, each
  array of the result whose key path ends with an array of `tree` of the same shape (Adam's moments
  of a parameter) is laid out as that array, as eager `zeros_like` would; the rest (counts, keys)
  is replicated, as `on_mesh` would. `key` (hashable) names what `fn` computes: the program is
  then kept for the next call with the same key, mesh and input layout (else each call compiles)."""
  if key is None:
    return _init_program(fn, tree, mesh)(tree)
  signature = (key, mesh, jax.tree.structure(tree),
               tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(tree)))
  if signature not in _INIT_PROGRAMS:
    if len(_INIT_PROGRAMS) >= 16:  # a notebook making many runs: keep the newest
      _INIT_PROGRAMS.pop(next(iter(_INIT_PROGRAMS)))
    _INIT_PROGRAMS[signature] = _init_program(fn, tree, mesh)
  return _INIT_PROGRAMS[signature](tree)


def _init_program(fn, tree, mesh):
  if mesh is None:
    return jax.jit(fn)
  replicated = NamedSharding(mesh, P())
  given = {tuple(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  lengths = sorted({len(path) for path in given}, reverse=True)

  def layout(path, x):
    for n in lengths:  # the longest matching tail of the key path
      if n <= len(path) and (src := given.get(tuple(path[len(path) - n:]))) is not None:
        if src.shape == x.shape and isinstance(src.sharding, NamedSharding) and src.sharding.mesh == mesh:
          return src.sharding
    return replicated

  out = jax.tree_util.tree_map_with_path(layout, jax.eval_shape(fn, tree))
  return jax.jit(fn, out_shardings=out)
