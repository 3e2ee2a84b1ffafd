"""Orbax checkpoints of a model's parameters, with the model config beside them.

Layout of a checkpoint directory:
    config.json   the HF-layout config plus {"lgrpo_jax": {"param_dtype", "dtype"}}
    params/       Orbax (OCDBT/Zarr) tree of the parameters, same nesting as `nnx.state(model)`
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lgrpo_jax import sharding
from lgrpo_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from lgrpo_jax.models.qwen2_5_vl.hf import abstract_model, dtype_name
from lgrpo_jax.safetensors_io import CheckpointError, read_json

CONFIG = "config.json"
PARAMS = "params"


def save_model(model: Qwen25VL, path) -> str:
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  if os.path.exists(os.path.join(path, PARAMS)):
    raise CheckpointError(f"{path}: already holds a checkpoint ({PARAMS}/ exists)")
  cfg = model.config
  raw = cfg.to_hf_dict()
  raw["lgrpo_jax"] = {"param_dtype": cfg.param_dtype, "dtype": cfg.dtype}
  if cfg.generation_eos_token_id is not None:  # generation_config.json's end ids (not in config.json)
    raw["lgrpo_jax"]["generation_eos_token_id"] = list(cfg.generation_eos_token_id)
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(raw, f, indent=2)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, PARAMS), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ckptr.wait_until_finished()
  return path


def is_checkpoint(path) -> bool:
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isdir(os.path.join(path, PARAMS))


def model_config(path, dtype=None, param_dtype=None) -> Qwen25VLConfig:
  """The model config of a checkpoint saved by `save_model` (`dtype` overrides the compute dtype,
  `param_dtype` the parameters' as restored)."""
  path = os.path.abspath(os.fspath(path))
  if not is_checkpoint(path):
    if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.isfile(os.path.join(path, CONFIG)):
      raise CheckpointError(f"{path}: a training run directory without its {CONFIG} (the run's resolved config, "
                            "which says how to build its model): restore it from a copy of the run")
    raise CheckpointError(f"{path}: not an lgrpo_jax checkpoint (needs {CONFIG} and {PARAMS}/)")
  raw = read_json(os.path.join(path, CONFIG))
  if not isinstance(raw, dict):
    raise CheckpointError(f"{os.path.join(path, CONFIG)}: expected a JSON object")
  ours = raw.pop("lgrpo_jax", {})
  if not isinstance(ours, dict):
    raise CheckpointError(f"{os.path.join(path, CONFIG)}: field 'lgrpo_jax' must be a JSON object")
  gen_eos = ours.get("generation_eos_token_id")
  if gen_eos is not None and not (isinstance(gen_eos, list) and all(
      isinstance(e, int) and not isinstance(e, bool) for e in gen_eos)):
    raise CheckpointError(f"{os.path.join(path, CONFIG)}: lgrpo_jax.generation_eos_token_id must be a list "
                          f"of token ids, got {gen_eos!r}")
  return Qwen25VLConfig.from_hf_dict(raw, source=os.path.join(path, CONFIG)).replace(
      param_dtype=dtype_name(param_dtype) if param_dtype is not None else ours.get("param_dtype", "float32"),
      dtype=dtype_name(dtype) if dtype is not None else ours.get("dtype", "float32"),
      generation_eos_token_id=None if gen_eos is None else tuple(gen_eos))


def load_model(path, *, dtype=None, param_dtype=None, mesh=None, rules=None) -> Qwen25VL:
  """Restores a model saved by `save_model`; `dtype` overrides the compute dtype, `param_dtype` the
  dtype the parameters are restored in (default: as saved).

  With a `mesh`, each parameter is restored directly into its shards on that mesh, whatever mesh
  the checkpoint was saved from (Orbax reshards on restore)."""
  path = os.path.abspath(os.fspath(path))
  cfg = model_config(path, dtype, param_dtype)
  graphdef, state = abstract_model(cfg)
  if mesh is None:
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
  else:
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nnx.to_pure_dict(state), shardings)
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS), target)
  except Exception as e:  # shape/dtype/tree mismatch from Orbax
    raise CheckpointError(f"{path}: cannot restore parameters for this config ({e})") from None
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
