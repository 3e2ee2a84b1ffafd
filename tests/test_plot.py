"""python -m lgrpo_jax.plot draws the three curves from metrics.jsonl."""

import json

import numpy as np
from PIL import Image

from lgrpo_jax import plot


def test_plot_draws_curves_and_eval_points(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for s in range(1, 31):
      m = {"step": s, "reward/total": s / 30, "accuracy": 0.5 + s / 100, "contradiction_rate": 0.3 - s / 200}
      if s % 10 == 0:
        m.update({"eval/accuracy": 0.6, "eval/contradiction_rate": 0.2})
      f.write(json.dumps(m) + "\n")
  assert plot.main([str(tmp_path)]) == 0
  img = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
  assert img.shape == (3 * plot.H, plot.W, 3)
  blue = (np.abs(img - [30, 80, 200]).sum(-1) < 30)
  red = (np.abs(img - [220, 60, 30]).sum(-1) < 30)
  for p in range(3):  # every panel has a smoothed curve; panels 2 and 3 have evaluation dots
    panel = slice(p * plot.H, (p + 1) * plot.H)
    assert blue[panel].sum() > 100
    assert (red[panel].sum() > 20) == (p > 0)
  # The reward rises: its curve ends higher (smaller y) than it starts.
  ys, xs = np.nonzero(blue[:plot.H])
  assert ys[xs > plot.W - 2 * plot.PAD].mean() < ys[xs < 2 * plot.PAD].mean()


def test_a_step_with_an_infinite_reward_is_left_out_of_the_curve(tmp_path):
  """A step whose reward was infinite (its update skipped) is written as Infinity: the panel's
  range and every point's place became NaN (a RuntimeWarning and a blank panel)."""
  import warnings
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for s in range(1, 21):
      f.write(json.dumps({"step": s, "reward/total": float("inf") if s == 7 else s / 20, "accuracy": 0.5,
                          "contradiction_rate": 0.2}) + "\n")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert plot.main([str(tmp_path)]) == 0
  img = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
  assert (np.abs(img[:plot.H] - [30, 80, 200]).sum(-1) < 30).sum() > 100


def test_plot_missing_run_dir_is_a_clear_error(tmp_path, capsys):
  assert plot.main([str(tmp_path / "nope")]) == 2
  assert "no metrics" in capsys.readouterr().err
