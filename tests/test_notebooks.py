"""The notebooks run from top to bottom (executed with nbclient in a fresh kernel, shortened by
their environment knobs) and are stored without outputs."""

import os

import pytest
from conftest import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.join(HERE, "..", "notebooks")


def execute(name: str, env: dict, monkeypatch):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device in the kernel, as on a laptop
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for cell in nb.cells:  # stored stripped: no outputs in git
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return nb


def text_of(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


def test_inspect_listener(monkeypatch):
  from conftest import shared_dir
  nb = execute("inspect_listener.ipynb", {"LGRPO_SHARED": os.path.abspath(shared_dir())}, monkeypatch)
  text = text_of(nb)
  assert "listener P(Image 1) =" in text and "listener sees:" in text
  assert "<answer>" not in text.split("listener sees:")[2].split("\n")[0]  # the answer is removed


def test_custom_loss(tmp_path, monkeypatch):
  nb = execute("custom_loss.ipynb", {"LGRPO_NB_SFT_STEPS": "0", "LGRPO_NB_GRPO_STEPS": "1",
                                     "LGRPO_NB_EVAL_PAIRS": "2", "LGRPO_NB_OUT": str(tmp_path)}, monkeypatch)
  text = text_of(nb)
  assert "default" in text and "ours" in text and "held-out accuracy" in text
  import json
  ours = json.load(open(tmp_path / "ours" / "config.json"))
  assert ours["step"]["loss"]["kl"] == "k2_clipped"
  assert ["brevity", 0.2] in ours["step"]["rewards"]["weights"]
  rows = [json.loads(x) for x in open(tmp_path / "ours" / "metrics.jsonl")]
  assert any("reward/brevity" in r for r in rows)  # the notebook's reward ran inside the step
  assert (tmp_path / "default" / "curves.png").is_file() and (tmp_path / "ours" / "curves.png").is_file()
