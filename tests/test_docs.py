"""The documentation cannot rot: every `python -m lgrpo_jax.…` command in README.md and docs/*.md
(also through the launch scripts) parses with that entry point's real argument parser — and for the
launcher, its config file loads and its overrides are valid keys and types — and the Python snippets
of the guides that run offline are executed. The tiny paths themselves run in the other tests
(demo, launcher, evaluate, convert)."""

import glob
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
ENTRY_POINTS = ("launch", "evaluate", "convert", "check", "plot", "config", "demo", "roundtrip")


def code_blocks(path: str, langs: tuple[str, ...]) -> list[str]:
  text = open(path).read()
  return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S) if m.group(1) in langs]


def commands(path: str) -> list[list[str]]:
  """The lgrpo_jax entry-point invocations in a file's shell blocks, as (module, argv)."""
  out = []
  for block in code_blocks(path, ("bash", "sh", "shell")):
    for line in block.replace("\\\n", " ").splitlines():
      try:
        words = shlex.split(line, comments=True)
      except ValueError:
        continue
      if "--command=" in " ".join(words):  # gcloud ... --command="launch/tpu_pod.sh ENTRY ARGS"
        inner = next(w for w in words if w.startswith("--command="))[len("--command="):]
        words = shlex.split(inner.split("&&")[-1])
      for k, w in enumerate(words):
        if w == "-m" and k + 1 < len(words) and words[k + 1].startswith("lgrpo_jax."):
          out.append((words[k + 1], words[k + 2:]))
          break
        if w.endswith((".sh", ".sbatch")) and w.startswith("launch/") and k + 1 < len(words) \
            and words[k + 1].startswith("lgrpo_jax."):
          out.append((words[k + 1], words[k + 2:]))
          break
  return out


ALL = [(os.path.relpath(p, ROOT), mod, argv) for p in DOCS for mod, argv in commands(p)]


def test_the_docs_have_commands_for_every_entry_point():
  seen = {mod.split(".")[1] for _, mod, _ in ALL}
  assert {"launch", "evaluate", "convert", "check", "plot", "config"} <= seen, seen


@pytest.mark.parametrize("where,module,argv", ALL, ids=[f"{w}: {m} {' '.join(a)[:60]}" for w, m, a in ALL])
def test_documented_command_parses(where, module, argv):
  name = module.split(".")[1]
  assert name in ENTRY_POINTS, f"{where}: unknown entry point {module}"
  mod = importlib.import_module(module)
  if name in ("demo", "roundtrip"):
    return  # no arguments documented; `make demo` and tests/test_roundtrip.py run them
  args = mod.build_parser().parse_args(argv)  # SystemExit (a failure here) on an unknown flag
  if name == "launch":
    from lgrpo_jax.config import apply_overrides, load_config_file
    apply_overrides(load_config_file(os.path.join(ROOT, args.config)), args.overrides)
  if name == "evaluate":
    from lgrpo_jax.evaluate import DATA_SOURCES, _ranking
    _ranking(args.ranking)
    assert args.data.split(":")[0] in DATA_SOURCES


@pytest.mark.parametrize("module", [f"lgrpo_jax.{m}" for m in ENTRY_POINTS if m not in ("demo", "roundtrip")])
def test_every_entry_point_has_help(module, capsys):
  with pytest.raises(SystemExit) as e:
    importlib.import_module(module).main(["--help"])
  assert e.value.code == 0 and "usage: python -m " + module in capsys.readouterr().out


def test_the_extension_guide_runs(tmp_path):
  """docs/extending.md: the reward, text reward, surrogate, KL, loss and advantage registered there
  work in configs and give the documented values."""
  import jax.numpy as jnp
  import numpy as np
  from transformers import AutoTokenizer

  from lgrpo_jax.data.tokenizer import build_tiny_tokenizer
  from lgrpo_jax.grpo import ADVANTAGES, KL_ESTIMATORS, LOSSES, OBJECTIVES, advantages
  from lgrpo_jax.grpo.core import LossConfig
  from lgrpo_jax.rewards import REWARDS, RewardConfig
  tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / "tok"))
  namespace = {"tokenizer": tokenizer}
  for block in code_blocks(os.path.join(ROOT, "docs", "extending.md"), ("python",)):
    exec(block, namespace)
  assert {"brevity", "mentions_detail"} <= set(REWARDS) and "k2_clipped" in KL_ESTIMATORS and "seq_sum" in LOSSES
  RewardConfig(weights=(("format", 1.0), ("brevity", 0.1)))
  LossConfig(kl="k2_clipped", loss="seq_sum")
  np.testing.assert_allclose(KL_ESTIMATORS["k2_clipped"](jnp.zeros(3), jnp.asarray([0.5, 3.0, -5.0])),
                             [0.125, 2.0, 2.0])
  mask = jnp.asarray([[[1, 1, 0], [1, 0, 0]]], jnp.float32)
  np.testing.assert_allclose(LOSSES["seq_sum"](mask), mask / 2)
  cfg = LossConfig(objective="clip_low_only", advantage="rank")
  assert "clip_low_only" in OBJECTIVES and "rank" in ADVANTAGES
  ratio = jnp.asarray([0.5, 1.0, 1.5])
  np.testing.assert_allclose(OBJECTIVES["clip_low_only"](None, ratio, 1.0, None, cfg), [-0.5, -1.0, -1.5])  # no cap
  np.testing.assert_allclose(OBJECTIVES["clip_low_only"](None, ratio, -1.0, None, cfg), [0.8, 1.0, 1.5])
  np.testing.assert_allclose(advantages(jnp.asarray([[0.1, 0.5, 0.3]]), cfg), [[-0.5, 0.5, 0.0]])
  np.testing.assert_allclose(advantages(jnp.asarray([[0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 1.0, 0.0]]), cfg),
                             [[0.0] * 4, [1 / 3, -1 / 3, 1 / 3, -1 / 3]], atol=1e-7)  # ties share a rank
  nan = float("nan")  # not scored: out of the ranking (the better of two scored was ranked below 0)
  np.testing.assert_allclose(advantages(jnp.asarray([[1.0, 0.0, nan, nan], [0.3, 0.3, 0.3, nan]]), cfg),
                             [[0.5, -0.5, 0.0, 0.0], [0.0] * 4], atol=1e-7)


def test_the_evaluation_guide_example():
  ns = {}
  block = code_blocks(os.path.join(ROOT, "docs", "evaluation.md"), ("python",))[0]
  exec(block.replace("imagereward_accuracy([[1", "result = imagereward_accuracy([[1"), ns)
  assert ns["result"] == 1.0
