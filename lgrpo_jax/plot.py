"""`python -m lgrpo_jax.plot RUN_DIR [--out FILE.png]` — reward, accuracy and contradiction rate
against steps, from RUN_DIR/metrics.jsonl, as one PNG (drawn with PIL: no plotting dependency).

Training curves are drawn per step (thin) with a moving average (thick); held-out evaluations
(eval/accuracy, eval/contradiction_rate) as dots.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

PANELS = (("reward/total", None, "reward (total)"), ("accuracy", "eval/accuracy", "accuracy"),
          ("contradiction_rate", "eval/contradiction_rate", "contradiction rate"))
W, H, PAD = 900, 260, 48


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
  from lgrpo_jax.runs import read_jsonl
  return read_jsonl(path)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
  if len(y) < 2 or k <= 1:
    return y
  k = min(k, len(y))
  c = np.cumsum(np.insert(y, 0, 0.0))
  out = (c[k:] - c[:-k]) / k
  return np.concatenate([y[:k - 1].cumsum() / np.arange(1, k), out])


def plot(run_dir: str, out: str | None = None) -> str:
  rows = read_metrics(run_dir)
  out = out or os.path.join(run_dir, "curves.png")
  img = Image.new("RGB", (W, H * len(PANELS)), "white")
  d = ImageDraw.Draw(img)
  steps_all = [r["step"] for r in rows] or [0]
  x0, x1 = min(steps_all), max(max(steps_all), min(steps_all) + 1)
  for p, (train_key, eval_key, title) in enumerate(PANELS):
    top = p * H
    # Non-finite values (a step whose reward was infinite, its update skipped) are left out of the
    # curves: they would make the panel's range, and every point's place, not a number.
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    train = [(r["step"], r[train_key]) for r in rows if train_key in r and finite(r[train_key])]
    evals = [(r["step"], r[eval_key]) for r in rows if eval_key and eval_key in r and finite(r[eval_key])]
    values = [v for _, v in train + evals]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
      lo, hi = lo - 0.5, hi + 0.5
    sx = lambda s: PAD + (s - x0) / (x1 - x0) * (W - 2 * PAD)
    sy = lambda v: top + H - PAD + (v - lo) / (hi - lo) * (2 * PAD - H)
    d.rectangle([PAD, top + PAD, W - PAD, top + H - PAD], outline=(160, 160, 160))
    d.text((PAD, top + 12), f"{title}   [{lo:.3g}, {hi:.3g}]   steps {x0}-{x1}", fill="black")
    if len(train) > 1:
      xs, ys = np.array([s for s, _ in train], float), np.array([v for _, v in train], float)
      d.line([(sx(s), sy(v)) for s, v in zip(xs, ys)], fill=(150, 180, 230), width=1)
      d.line([(sx(s), sy(v)) for s, v in zip(xs, _smooth(ys, max(1, len(ys) // 10)))], fill=(30, 80, 200), width=3)
    for s, v in evals:
      d.ellipse([sx(s) - 4, sy(v) - 4, sx(s) + 4, sy(v) + 4], fill=(220, 60, 30))
  img.save(out)
  return out


def bars(panels, out: str, width: int = 900, height: int = 240) -> str:
  """Horizontal bars in [0, 1], one panel per (title, [(label, value or None), ...]), as a PNG."""
  img = Image.new("RGB", (width, height * len(panels)), "white")
  d = ImageDraw.Draw(img)
  left, right = 220, width - 80
  for p, (title, rows) in enumerate(panels):
    top = p * height
    d.text((PAD, top + 12), title, fill="black")
    step = (height - 2 * PAD) / max(len(rows), 1)
    x = lambda v: left + v * (right - left)
    for k in (0.0, 0.5, 1.0):  # the axis: 0, chance, 1
      d.line([(x(k), top + PAD - 6), (x(k), top + height - PAD + 6)], fill=(200, 200, 200))
      d.text((x(k) - 8, top + height - PAD + 8), f"{k:g}", fill=(120, 120, 120))
    for r, (label, value) in enumerate(rows):
      y = top + PAD + r * step
      d.text((PAD, y + step / 2 - 6), str(label), fill="black")
      if value is None:
        d.text((left + 4, y + step / 2 - 6), "n/a", fill=(120, 120, 120))
        continue
      v = min(max(float(value), 0.0), 1.0)
      d.rectangle([left, y + 4, x(v), y + step - 4], fill=(60, 110, 200))
      d.text((x(v) + 6, y + step / 2 - 6), f"{float(value):.3f}", fill="black")
  img.save(out)
  return out


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m lgrpo_jax.plot", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dir")
  ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    print(plot(args.run_dir, args.out))
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
