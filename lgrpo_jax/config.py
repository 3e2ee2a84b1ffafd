"""Experiment configs: plain Python files returning typed (frozen dataclass) configs, with validated
`key.path=value` overrides from the command line.

A config file defines `config() -> ExperimentConfig` (see configs/). `apply_overrides(cfg,
["step.loss.beta=0", "loop.steps=20"])` walks the dataclass fields; an unknown key or a value that
does not parse as the field's type is one `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import re
import os
import sys
import traceback
import types
import typing
from typing import Any

from lgrpo_jax.data.images import ImageConfig
from lgrpo_jax.data.pipeline import PipelineConfig
from lgrpo_jax.data.prompts import PromptConfig
from lgrpo_jax.grpo.core import LossConfig
from lgrpo_jax.grpo.update import OptimConfig
from lgrpo_jax.models.qwen2_5_vl.config import ATTENTION, DECODE_ATTENTION, DECODE_MATMUL, DTYPES, REMAT, ConfigError
from lgrpo_jax.rewards import RewardConfig
from lgrpo_jax.sampling import SamplingConfig
from lgrpo_jax.sharding import MeshConfig
from lgrpo_jax.train.loop import LoopConfig
from lgrpo_jax.train.sft import SFTConfig
from lgrpo_jax.train.step import StepConfig

SOURCES = ("synthetic", "hpdv2", "hpdv2_test", "imagereward", "rapidata")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  checkpoint: str | None = None  # local HF directory or lgrpo_jax Orbax checkpoint; None: `preset`
  preset: str = "tiny"  # a random model from presets (with the tiny local tokenizer) when no checkpoint
  tokenizer: str | None = None  # default: the checkpoint directory
  # default: the policy's initial weights (the paper: the base checkpoint); loaded only when a reward
  # with a non-zero weight reads the listener
  listener: str | None = None
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (also the frozen listener's weights)
  # The trained policy's parameters and optimizer state (the master weights): float32 | bfloat16.
  # With dtype=bfloat16 the layers cast them to bf16 at use; kept in bf16 instead, an AdamW step at
  # the paper's lr 1e-6 is ~1% of a bf16 weight's spacing and rounds away, and AdamW's bf16 second
  # moment stops decaying (0.999·v rounds to v) — the launcher warns.
  param_dtype: str = "float32"
  # Policy activations recomputed in the backward pass, per layer: none | full | dots (weight-matmul
  # outputs kept). Trades step time for memory; values and gradients are unchanged.
  remat: str = "none"
  # Attention kernel of the policy, reference and listener: auto (cuDNN flash attention on GPUs in
  # bfloat16, XLA elsewhere) | xla | cudnn (an error where cuDNN cannot run).
  attention: str = "auto"
  # The rollout's decode-loop attention: xla | pallas (one Pallas kernel per layer that also writes
  # the cache; GPUs; elsewhere it runs interpreted, for checking only). Not yet timed on a GPU.
  decode_attention: str = "xla"
  # The rollout's decode-loop weight matmuls: xla | pallas (one Pallas kernel per matmul with the
  # norms, bias, SwiGLU and residual adds folded in; GPUs, data/fsdp meshes). Not yet timed on a GPU.
  decode_matmul: str = "xla"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name}={getattr(self, name)!r}: choose one of {DTYPES}")
    if self.remat not in REMAT:
      raise ConfigError(f"model.remat={self.remat!r}: choose one of {REMAT}")
    if self.attention not in ATTENTION:
      raise ConfigError(f"model.attention={self.attention!r}: choose one of {ATTENTION}")
    if self.decode_attention not in DECODE_ATTENTION:
      raise ConfigError(f"model.decode_attention={self.decode_attention!r}: choose one of {DECODE_ATTENTION}")
    if self.decode_matmul not in DECODE_MATMUL:
      raise ConfigError(f"model.decode_matmul={self.decode_matmul!r}: choose one of {DECODE_MATMUL}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"  # synthetic | hpdv2 | hpdv2_test | imagereward | rapidata
  path: str | None = None  # the source's file (train.json, test.json, .parquet)
  image_root: str | None = None  # relative image paths are under this folder
  fraction: float = 1.0  # deterministic subsample by pair id and loop.seed, every source alike (the paper trains on ~16% of HPDv2)
  synthetic_pairs: int = 256  # data.source=synthetic: number of generated pairs
  synthetic_image_size: int = 112  # synthetic images are this many pixels square
  synthetic_n_wrong: int = 1  # attributes the worse image gets wrong (0: a colour cast instead)
  # Held-out pairs for `loop.eval_every`: synthetic (a different seed) or any source by file.
  eval_source: str | None = None  # None: synthetic held-out pairs when source is synthetic, else none
  eval_path: str | None = None  # the held-out source's file
  eval_image_root: str | None = None  # its image root
  eval_pairs: int = 64  # at most this many held-out pairs (each judged in both orders)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ConfigError(f"data.source={self.source!r}: choose one of {SOURCES}")
    if self.source != "synthetic" and not self.path:
      raise ConfigError(f"data.path is required for data.source={self.source!r}")
    if not 0 < self.fraction <= 1:
      raise ConfigError(f"data.fraction={self.fraction} must be in (0, 1]")
    for name in ("synthetic_pairs", "synthetic_image_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"data.{name}={getattr(self, name)} must be ≥ 1")
    if self.eval_pairs < 0:
      raise ConfigError(f"data.eval_pairs={self.eval_pairs} must be ≥ 0")
    if not 0 <= self.synthetic_n_wrong <= 3:
      raise ConfigError(f"data.synthetic_n_wrong={self.synthetic_n_wrong} must be in [0, 3] (attributes: colour, "
                        "shape, background; 0: a colour cast)")
    if self.eval_source is not None:
      if self.eval_source not in SOURCES:
        raise ConfigError(f"data.eval_source={self.eval_source!r}: choose one of {SOURCES}")
      if self.eval_source != "synthetic" and not self.eval_path:
        raise ConfigError(f"data.eval_path is required for data.eval_source={self.eval_source!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  run_dir: str = "runs/experiment"  # checkpoints, metrics, plots; an existing run resumes
  # Persistent XLA compilation cache (train/compile_cache.py): "auto" ($JAX_COMPILATION_CACHE_DIR,
  # else RUN_DIR/xla_cache), "off", or a directory. A restarted run loads its programs from it.
  compile_cache: str = "auto"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  pipeline: PipelineConfig = PipelineConfig()
  sft: SFTConfig = SFTConfig()  # optional warm start before GRPO (off: steps=0)
  step: StepConfig = StepConfig()
  loop: LoopConfig = LoopConfig()
  mesh: MeshConfig = MeshConfig()


def load_config_file(path: str) -> ExperimentConfig:
  """The config of a Python file defining `config()`, or of a run's config.json (`to_record`).
  Any mistake in the file — a syntax error, an unknown field, a value its section refuses, a value
  of the wrong type — is one `ConfigError` naming the file (and the line, or the field)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found")
  if path.endswith(".json"):  # a run's resolved config: the same run again
    from lgrpo_jax.safetensors_io import read_json
    record = read_json(path, ConfigError)
    try:
      cfg = from_record(record)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None
    return check_types(cfg, path)
  spec = importlib.util.spec_from_file_location("lgrpo_config", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: a config file is a Python file (.py) defining config(), or a run's config.json")
  module = importlib.util.module_from_spec(spec)
  # As `python file.py` does: the file's directory is importable while it runs, so a config can
  # import the module beside it that registers its rewards or loss (from any working directory).
  here = os.path.dirname(os.path.abspath(path))
  added = here not in sys.path
  if added:
    sys.path.insert(0, here)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
      raise ConfigError(f"{path}: defines no config() function")
    cfg = module.config()
  except ConfigError:
    raise
  except Exception as e:  # the user's code: where in it, and what
    line = e.lineno if isinstance(e, SyntaxError) else next(
        (fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__))
         if os.path.abspath(fr.filename) == os.path.abspath(path)), None)
    raise ConfigError(f"{path}{'' if line is None else f':{line}'}: {type(e).__name__}: {e}") from None
  finally:
    if added and here in sys.path:
      sys.path.remove(here)
  if not isinstance(cfg, ExperimentConfig):
    raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, not ExperimentConfig")
  return check_types(cfg, path)


def check_types(cfg, source: str, prefix: str = ""):
  """`cfg` (a config dataclass, recursively) with lists where tuples are asked made tuples (configs
  are hashed: they key compiled programs), after checking that every field holds a value of its
  annotated type (an int where a float is asked is fine; a bool is not an int); else a
  `ConfigError` naming `source` and the field."""
  hints = typing.get_type_hints(type(cfg))
  changes = {}
  for f in dataclasses.fields(cfg):
    value, kind, key = getattr(cfg, f.name), hints[f.name], prefix + f.name
    if dataclasses.is_dataclass(kind) or dataclasses.is_dataclass(value):
      if not (dataclasses.is_dataclass(kind) and isinstance(value, kind)):
        raise ConfigError(f"{source}: {key} is a {type(value).__name__}, expected a {_plain(kind)}")
      new = check_types(value, source, key + ".")
    else:
      new = _as_tuples(value)
      if not _is_a(new, kind):
        raise ConfigError(f"{source}: {key}={value!r}: expected {_plain(kind)}")
    if new is not value:
      changes[f.name] = new
  if not changes:
    return cfg
  try:
    return dataclasses.replace(cfg, **changes)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: {prefix or type(cfg).__name__}: {e}") from None


def _plain(kind) -> str:
  return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _is_a(value, kind) -> bool:
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if kind is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_is_a(value, a) for a in args)
  if kind is type(None):
    return value is None
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if origin is tuple:
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_is_a(v, args[0]) for v in value)
    return not args or (len(args) == len(value) and all(_is_a(v, a) for v, a in zip(value, args)))
  if isinstance(kind, type):
    return isinstance(value, kind)
  return True  # anything else (callables, literals): not checked here


def _loose_list(text: str):
  """A list as a shell leaves it when its quotes go (`["vision"]` → `[vision]`, `[[format,1]]`),
  or typed with parentheses (`(128,256)`) or bare (`vision,embeddings`): nested lists of words.
  None when the brackets do not balance."""
  if not text.lstrip().startswith(("[", "(")):  # a bare comma list: brackets inside a value are text
    return [v.strip() for v in text.split(",") if v.strip()]
  tokens = [t.strip() for t in re.findall(r"[\[\](),]|[^\[\](),]+", text) if t.strip()]
  pos = 0

  def items(close):
    nonlocal pos
    out, expect_item = [], True
    while pos < len(tokens):
      t = tokens[pos]
      pos += 1
      if t in "[(":
        if not expect_item:  # `[1][2]`: a missing comma
          raise ValueError(t)
        out.append(items("]" if t == "[" else ")"))
        expect_item = False
      elif t in "])":
        if t != close:
          raise ValueError(t)
        return out
      elif t == ",":
        expect_item = True
      else:
        if not expect_item:
          raise ValueError(t)
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":  # ['a','b'] is not JSON: its quotes go
          t = t[1:-1]
        out.append(t)
        expect_item = False
    if close is not None:
      raise ValueError("unclosed")
    return out

  try:
    value = items(None)
  except ValueError:
    return None
  return value[0] if len(value) == 1 and isinstance(value[0], list) else value


def _parse(text: str, kind, key: str):
  """`text` as a value of type `kind` (int, float, bool, str, None, tuples, unions of those)."""
  origin = typing.get_origin(kind)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(kind)
    if text.lower() in ("none", "null") and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _parse(text, option, key)
      except ConfigError as e:
        errors.append(str(e))
    if len(errors) == 1:  # X | None: X's own message (it says what X expects)
      raise ConfigError(errors[0] + " (or None)")
    raise ConfigError(f"{key}={text!r}: expected {kind}")
  if kind is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key}={text!r}: expected true or false")
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      if kind is int:  # 1e3, 2.0: a whole number written as a float
        try:
          as_float = float(text)
        except ValueError:
          as_float = None
        if as_float is not None and as_float.is_integer():
          return int(as_float)
      raise ConfigError(f"{key}={text!r}: expected {kind.__name__}") from None
  if kind is str:
    return text
  if origin is tuple:
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = _loose_list(text)
      if value is None:
        raise ConfigError(f"{key}={text!r}: expected a list, e.g. {key}='[\"a\", \"b\"]' or {key}=a,b") from None
    if not isinstance(value, list):
      value = [value]
    args = typing.get_args(kind)
    as_text = lambda v: v if isinstance(v, str) else json.dumps(v)
    if args and Ellipsis not in args:  # fixed length: one type per position
      if len(args) != len(value):
        raise ConfigError(f"{key}={text!r}: expected {len(args)} values")
      return tuple(_parse(as_text(v), a, key) for v, a in zip(value, args))
    inner = args[0] if args else str
    return tuple(_parse(as_text(v), inner, key) for v in value)
  if isinstance(kind, type) and kind.__module__ == "builtins":
    raise ConfigError(f"{key}: cannot override a field of type {kind.__name__}")
  # Anything else (nested tuples of tuples, …): JSON.
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    raise ConfigError(f"{key}={text!r}: expected JSON for {kind} (quote it for the shell: {key}='[…]')") from None


def _parse_override(cfg, path: list[str], text: str, full: str):
  """The value of override `full` (key path `path` in `cfg`), parsed to its field's type."""
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  name = path[0]
  if name not in fields:
    close = difflib.get_close_matches(name.lstrip("-"), list(fields), n=1, cutoff=0.6)
    parts = full.lstrip("-").split(".")
    hint = (f"; did you mean {'.'.join(parts[:len(parts) - len(path)] + close + parts[len(parts) - len(path) + 1:])!r}?"
            if close else "")
    if full.startswith("-"):
      hint += " (overrides are key.path=value, without dashes)"
    raise ConfigError(f"unknown config key {full!r}{hint}: {type(cfg).__name__} has {sorted(fields)}")
  current = getattr(cfg, name)
  if len(path) > 1:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"unknown config key {full!r}: {name} is a value, not a section")
    return _parse_override(current, path[1:], text, full)
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"{full} is a section; set one of its keys: "
                      f"{sorted(f.name for f in dataclasses.fields(current))}")
  return _parse(text, typing.get_type_hints(type(cfg))[name], full)


def _replace(cfg, changes: dict, given: dict, prefix: str = ""):
  """`cfg` with `changes` ({field: value, or {…} for a section}) made, each section rebuilt once
  with all of its changes, so that a check across two fields (a source and its path) sees both.
  `given`: the overrides as typed, named in the error of a section that rejects them."""
  kwargs = {name: _replace(getattr(cfg, name), value, given, f"{prefix}{name}.") if isinstance(value, dict)
            else value for name, value in changes.items()}
  try:
    return dataclasses.replace(cfg, **kwargs)
  except (ValueError, TypeError) as e:
    mine = " ".join(f"{k}={v!r}" for k, v in given.items() if k.startswith(prefix))
    raise ConfigError(f"{mine}: {e}") from None


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
  """`cfg` with `key.path=value` overrides; a key given twice takes its last value. Their order
  does not matter: `data.source=hpdv2 data.path=F` and `data.path=F data.source=hpdv2` both work."""
  changes, given = {}, {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected key.path=value")
    key, text = (part.strip() for part in item.split("=", 1))
    path = key.split(".")
    value = _parse_override(cfg, path, text, key)
    node = changes
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
    given.pop(key, None)
    given[key] = text
  return _replace(cfg, changes, given) if changes else cfg


def to_record(cfg) -> Any:
  """The resolved config as JSON-able nested dicts (written to the run directory)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_record(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (tuple, list)):
    return [to_record(v) for v in cfg]
  return cfg


def from_record(record: dict, cls=ExperimentConfig):
  """The config a run wrote to RUN_DIR/config.json (`to_record`), rebuilt with its types; keys this
  version does not know are an error naming them."""
  if not isinstance(record, dict):
    raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(record).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(record) - set(fields))
  if unknown:
    raise ConfigError(f"{cls.__name__}: unknown keys {unknown} (written by another version?)")
  hints = typing.get_type_hints(cls)
  kwargs = {name: _from_json(value, hints[name], f"{cls.__name__}.{name}") for name, value in record.items()}
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{cls.__name__}: {e}") from None


def _from_json(value, kind, key: str):
  if dataclasses.is_dataclass(kind):
    return from_record(value, kind)
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin in (typing.Union, types.UnionType):
    if value is None:
      return None
    options = [a for a in args if a is not type(None)]
    return _from_json(value, options[0], key) if len(options) == 1 else value
  if origin is tuple and isinstance(value, list):
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_from_json(v, args[0], key) for v in value)
    if args and len(args) == len(value):
      return tuple(_from_json(v, a, key) for v, a in zip(value, args))
    return tuple(value)
  return value


def _field_docs(cls) -> dict[str, str]:
  """Each field's comment in the class source: the comment on its line, else the comment lines
  right above it."""
  import inspect
  import io
  import re
  import tokenize
  src = inspect.getsource(cls)
  comments: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  lines = src.splitlines()
  out = {}
  for n, line in enumerate(lines, 1):
    m = re.match(r"^(\s+)(\w+)\s*:", line)
    if not m or m.group(2) not in {f.name for f in dataclasses.fields(cls)} or m.group(2) in out:
      continue
    if n in comments:
      out[m.group(2)] = comments[n]
      continue
    above, k = [], n - 1
    while k >= 1 and lines[k - 1].strip().startswith("#"):
      above.insert(0, comments.get(k, ""))
      k -= 1
    out[m.group(2)] = " ".join(above)
  return out


def _show(value) -> str:
  text = json.dumps(to_record(value), ensure_ascii=False) if not isinstance(value, str) else repr(value)
  if len(text) > 70:
    text = text[:67] + "…"
  return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _type_name(kind) -> str:
  text = kind if isinstance(kind, str) else getattr(kind, "__name__", None) or str(kind)
  return str(text).replace("typing.", "").replace("|", "\\|")


def reference() -> str:
  """docs/configuration.md: every field of ExperimentConfig with its type, default and the comment
  from the source (regenerate with `python -m lgrpo_jax.config --write docs/configuration.md`)."""
  out = ["# Configuration reference", "",
         "Generated from the config classes (a test fails when this file and the code differ):", "",
         "```bash", "python -m lgrpo_jax.config --write docs/configuration.md", "```", "",
         "Set any key in a config file (plain Python returning an `ExperimentConfig`, see `configs/`) or",
         "on the command line; an unknown key or a value of the wrong type is one error naming the key:", "",
         "```bash", "python -m lgrpo_jax.launch --config configs/demo.py loop.steps=20 step.loss.beta=0 \\",
         "    \'pipeline.image.grid_buckets=[[56,56]]\' \'step.rewards.weights=[[\"format\",1],[\"accuracy\",1]]\'", "```", ""]

  def section(cls, prefix: str, default) -> None:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    rows, subs = [], []
    for f in dataclasses.fields(cls):
      value = getattr(default, f.name)
      key = f"{prefix}{f.name}"
      if dataclasses.is_dataclass(value):
        subs.append((type(value), f"{key}.", value))
        continue
      rows.append(f"| `{key}` | {_type_name(hints[f.name])} | {_show(value)} | "
                  f"{docs.get(f.name, '').replace('|', chr(92) + '|')} |")
    if rows:
      title = prefix.rstrip(".") or "(top level)"
      doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
      doc = "" if doc.startswith(cls.__name__ + "(") else doc  # the dataclass's generated signature
      out.extend([f"## `{title}` — {cls.__name__}", "", *([doc, ""] if doc else []),
                  "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
    for sub_cls, sub_prefix, sub_default in subs:
      section(sub_cls, sub_prefix, sub_default)

  section(ExperimentConfig, "", ExperimentConfig())
  return "\n".join(out)


def build_parser():
  import argparse
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.config",
                               description="Print (or --write) the configuration reference.")
  ap.add_argument("--write", default=None, help="write it to this file (docs/configuration.md)")
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  text = reference()
  if args.write:
    with open(args.write, "w") as f:
      f.write(text)
  else:
    print(text)
  return 0


__all__ = ["DataConfig", "ExperimentConfig", "ImageConfig", "LoopConfig", "LossConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "PipelineConfig", "PromptConfig", "RewardConfig", "SamplingConfig",
           "SFTConfig", "StepConfig", "apply_overrides", "from_record", "load_config_file", "reference", "to_record"]


if __name__ == "__main__":
  import sys
  sys.exit(main())
