"""Load a local HF Qwen2.5-VL directory into our model, and write our model back as one.

Both directions walk the one table in `params.py`. Import validates every key and shape from the
safetensors headers before reading any data, then reads one tensor at a time.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lgrpo_jax import sharding
from lgrpo_jax.models.qwen2_5_vl import params as P
from lgrpo_jax.models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig
from lgrpo_jax.models.qwen2_5_vl.model import Qwen25VL
from lgrpo_jax.safetensors_io import CheckpointError, SafetensorsDir, write_sharded

# transformers-5 in-memory prefixes -> Hub prefixes (what save_pretrained writes).
_LAYOUT_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))

# Tokenizer / processor / chat-template files copied from a source checkpoint on export.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
               "video_preprocessor_config.json", "generation_config.json",
               "LICENSE")  # a fine-tune ships its base's licence (Qwen2.5-VL-3B's asks for it)

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def normalize_key(key: str) -> str:
  for old, new in _LAYOUT_PREFIXES:
    if key.startswith(old):
      return new + key[len(old):]
  return key


def resolve_config(config, *, dtype=None, param_dtype=None) -> Qwen25VLConfig:
  """Our config from a Qwen25VLConfig, an HF config dict, or a path to config.json / its directory."""
  if isinstance(config, Qwen25VLConfig):
    cfg = config
  elif isinstance(config, dict):
    cfg = Qwen25VLConfig.from_hf_dict(config)
  elif isinstance(config, (str, os.PathLike)):
    cfg = Qwen25VLConfig.from_json(config)
  else:
    raise ConfigError(f"cannot build a config from {type(config).__name__}")
  kw = {}
  if dtype is not None:
    kw["dtype"] = dtype_name(dtype)
    kw["param_dtype"] = dtype_name(param_dtype or dtype)
  elif param_dtype is not None:
    kw["param_dtype"] = dtype_name(param_dtype)
  return cfg.replace(**kw) if kw else cfg


def from_config(config, *, dtype=None, param_dtype=None, seed: int = 0, mesh=None,
                rules=None) -> Qwen25VL:
  """A randomly initialised model (normal(0, 0.02) weights, unit norms, zero biases).

  With a `mesh`, every parameter is created directly in its shard (the values do not depend on
  the mesh: JAX's partitionable threefry RNG)."""
  cfg = resolve_config(config, dtype=dtype, param_dtype=param_dtype)
  rules_key = None if rules is None else repr(sorted(rules.items()))
  init = _INITIALIZERS.pop((cfg, mesh, rules_key), None)
  if init is not None:
    _INITIALIZERS[cfg, mesh, rules_key] = init  # the most recently used last
  else:  # one compiled init per config and layout in a process (seeds are its input)
    if len(_INITIALIZERS) >= _KEEP_INITIALIZERS:  # a sweep over shapes: the oldest goes
      _INITIALIZERS.pop(next(iter(_INITIALIZERS)))
    init = _INITIALIZERS[cfg, mesh, rules_key] = sharding.creator(
        lambda key: Qwen25VL(cfg, rngs=nnx.Rngs(key)), mesh, rules)
  return init(jax.random.key(seed))


_INITIALIZERS: dict = {}
_KEEP_INITIALIZERS = 8  # compiled initialisers kept (each holds its program: ~20 MB on the tiny model)


def abstract_model(cfg: Qwen25VLConfig):
  """(graphdef, state of ShapeDtypeStructs) for this config, without allocating any parameter."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))))
  return graphdef, state


def _get(tree: dict, path: str):
  for k in path.split("."):
    tree = tree[k]
  return tree


def _set(tree: dict, path: str, value) -> None:
  *head, last = path.split(".")
  for k in head:
    tree = tree[k]
  tree[last] = value


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors names


def plan_import(ckpt: SafetensorsDir, cfg: Qwen25VLConfig, shapes: dict) -> dict[str, str]:
  """Checks every expected key and shape against the headers; returns Hub key -> key in file."""
  where = ckpt.path
  in_file: dict[str, str] = {}
  for raw in ckpt.keys():
    key = normalize_key(raw)
    if key in in_file:
      raise CheckpointError(f"{where}: tensor '{key}' appears twice (as '{in_file[key]}' and '{raw}')")
    in_file[key] = raw
  expected: set[str] = set()
  for rule in P.rules_for(cfg):
    full = tuple(_get(shapes, rule.ours).shape)
    layer_shape = full if P.num_layers(rule, cfg) is None else full[1:]
    want = P.hf_shape(rule, layer_shape, cfg)
    for key in P.hf_keys(rule, cfg):
      expected.add(key)
      if key not in in_file:
        raise CheckpointError(f"{where}: missing tensor '{key}' (expected shape {want})")
      got = ckpt.shape(in_file[key])
      file = ckpt.file_of[in_file[key]]  # the shard that holds it
      if tuple(got) != tuple(want):
        raise CheckpointError(f"{file}: tensor '{in_file[key]}' has shape {tuple(got)}, "
                              f"expected {tuple(want)} for {os.path.join(where, 'config.json')}")
      if ckpt.dtype(in_file[key]) not in FLOAT_DTYPES:  # an integer or bool weight would be cast silently
        raise CheckpointError(f"{file}: tensor '{in_file[key]}' is {ckpt.dtype(in_file[key])}, expected a "
                              f"floating-point weight ({', '.join(FLOAT_DTYPES)})")
  ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # tied: head = embeddings
  unexpected = sorted(set(in_file) - expected - ignorable)
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise CheckpointError(f"{where}: unexpected tensors {[in_file[k] for k in unexpected[:5]]}{more}"
                          " not used by a Qwen2.5-VL model with this config.json")
  return in_file


def load_hf(path, *, dtype="float32", param_dtype=None, mesh=None, rules=None) -> Qwen25VL:
  """Loads a local HF Qwen2.5-VL directory (Hub or transformers-5 key layout, bf16 or fp32).

  With a `mesh`, parameters land directly in their shards: for each parameter this process builds
  only the shards its own devices hold, reading the checkpoint one (per-layer) tensor at a time.
  Host memory at any moment: one parameter's local shards plus one checkpoint tensor.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a local HF checkpoint)")
  cfg = resolve_config(path, dtype=dtype, param_dtype=param_dtype)
  ckpt = SafetensorsDir(path)
  graphdef, state = abstract_model(cfg)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, nnx.to_pure_dict(state))
  else:
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
  pure = nnx.to_pure_dict(state)
  in_file = plan_import(ckpt, cfg, pure)
  np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  for rule in P.rules_for(cfg):
    full = tuple(_get(pure, rule.ours).shape)
    n = P.num_layers(rule, cfg)
    if n is None:
      layers = [lambda: P.to_ours(rule, ckpt.get(in_file[rule.hf], finite=True), full)]
    else:
      layers = [lambda k=key: P.to_ours(rule, ckpt.get(in_file[k], finite=True), full[1:])
                for key in P.hf_keys(rule, cfg)]
    _set(pure, rule.ours, _place(full, np_dtype, _get(shardings, rule.ours), layers, stacked=n is not None))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _place(shape, np_dtype, sharding, read_layers, stacked: bool):
  """A global array with `sharding`, holding on the host only one checkpoint tensor at a time.

  `read_layers` are thunks giving the parameter in our layout (one thunk) or each layer's slice of
  it (stacked). A single tensor is cut into the local devices' shards and sent; a stacked one is
  built on the devices, one layer at a time, so no host buffer ever holds a whole stacked parameter.
  """
  index_of = sharding.addressable_devices_indices_map(shape)
  ranges = {dev: tuple(sl.indices(d)[:2] for sl, d in zip(idx, shape)) for dev, idx in index_of.items()}
  send = lambda whole, dev, r: jax.device_put(np.ascontiguousarray(whole[_slices(r)], dtype=np_dtype), dev)
  if not stacked:
    whole = read_layers[0]()
    return jax.make_array_from_single_device_arrays(shape, sharding, [send(whole, dev, r) for dev, r in ranges.items()])
  zeros = {dev: jax.device_put(np.zeros([b - a for a, b in r], np_dtype), dev) for dev, r in ranges.items()}
  if all(r[0] == (0, shape[0]) for r in ranges.values()):
    # The layer axis is whole on every device (as the rules shard it): layer i goes into the global
    # stack with one program for all devices. Per device, jit compiled one program per device and
    # shape (116 programs for the tiny model on 8 devices, against 15).
    stack = jax.make_array_from_single_device_arrays(shape, sharding, list(zeros.values()))
    layer_sharding = _without_leading_axis(sharding)
    for i, read in enumerate(read_layers):
      whole = read()
      layer = jax.make_array_from_single_device_arrays(
          shape[1:], layer_sharding, [send(whole, dev, r[1:]) for dev, r in ranges.items()])
      stack = _set_layer(stack, layer, i)
    return stack
  arrays = zeros  # layers split over devices: each device's stack is filled with its own layers
  for i, read in enumerate(read_layers):
    whole = None
    for dev, r in ranges.items():
      (l0, l1), rest = r[0], r[1:]
      if l0 <= i < l1:
        whole = read() if whole is None else whole
        arrays[dev] = _set_layer(arrays[dev], send(whole, dev, rest), i - l0)
  return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[dev] for dev in ranges])


def _without_leading_axis(sharding):
  """The sharding of one layer of a stack laid out as `sharding` (layer axis not partitioned)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding  # one device


def _slices(ranges):
  return tuple(slice(a, b) for a, b in ranges)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, layer, i):
  return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def iter_hf_tensors(model: Qwen25VL, dtype=None):
  """Yields (Hub key, numpy array) one tensor at a time, in `dtype` (default: the params' dtype)."""
  cfg = model.config
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  for rule in P.rules_for(cfg):
    full = np.asarray(jax.device_get(_get(pure, rule.ours)))
    n = P.num_layers(rule, cfg)
    items = [(rule.hf, full)] if n is None else list(zip(P.hf_keys(rule, cfg), full))
    for key, arr in items:
      yield key, P.to_hf(rule, arr, P.hf_shape(rule, arr.shape, cfg)).astype(out_dtype)


def save_hf(model: Qwen25VL, out_dir, *, dtype=None, hf_source=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
  """Writes a directory `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads.

  Hub key layout, config.json, generation_config.json, safetensors (sharded with an index above
  `max_shard_bytes`); tokenizer, processor and chat-template files are copied from `hf_source`.
  """
  out_dir = os.fspath(out_dir)
  if hf_source is not None and not os.path.isdir(hf_source):
    raise CheckpointError(f"{hf_source}: --hf-source is not a directory")
  if hf_source is not None and os.path.isdir(out_dir) and os.path.samefile(out_dir, hf_source):
    raise CheckpointError(f"{out_dir}: the export would overwrite its own --hf-source; choose another folder")
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.config
  out_dtype = dtype_name(dtype or cfg.param_dtype)
  write_sharded(out_dir, iter_hf_tensors(model, out_dtype), max_shard_bytes=max_shard_bytes)
  hf_cfg = cfg.to_hf_dict()
  hf_cfg["dtype"] = out_dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  copied = []
  if hf_source is not None:
    for name in _SIDE_FILES:
      src = os.path.join(hf_source, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
        copied.append(name)
  if "generation_config.json" not in copied:
    t = cfg.text
    eos, gen_eos = t.eos_token_id, cfg.generation_eos_token_id
    if gen_eos is not None:  # as read: one id as a number, several as a list
      eos = gen_eos[0] if len(gen_eos) == 1 else list(gen_eos)
    gen = {k: v for k, v in (("bos_token_id", t.bos_token_id), ("eos_token_id", eos),
                             ("pad_token_id", t.pad_token_id)) if v is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
  return out_dir
