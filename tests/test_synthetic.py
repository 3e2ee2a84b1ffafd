"""Synthetic pairs: deterministic from the seed, the preferred image really matches the prompt."""

import io

import numpy as np
from PIL import Image

from lgrpo_jax.data import process_image
from lgrpo_jax.data.synthetic import BACKGROUNDS, COLOURS, synthetic, synthetic_pair


def dominant(img_bytes):
  """(most common non-background colour name, background name) read back from the pixels."""
  a = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB")).reshape(-1, 3)
  colours, counts = np.unique(a, axis=0, return_counts=True)
  named = {tuple(v): k for k, v in {**COLOURS, **BACKGROUNDS}.items()}
  order = [named.get(tuple(c)) for c in colours[np.argsort(-counts)]]
  bg = order[0]
  fg = next(c for c in order[1:] if c in COLOURS)
  return fg, bg


def test_deterministic_and_independent_of_n():
  a = list(synthetic(5, seed=3))
  b = list(synthetic(8, seed=3))[:5]
  assert a == b
  assert a != list(synthetic(5, seed=4))
  assert synthetic_pair(2, seed=3) == a[2]


def test_preferred_image_matches_the_prompt_and_labels_are_balanced():
  pairs = list(synthetic(60, seed=0, n_wrong=1))
  labels = [p.label for p in pairs]
  assert 15 < sum(labels) < 45
  off = 0
  for p in pairs:
    words = p.prompt.split()  # "a <colour> <shape> on a <background> background"
    colour, background = words[1], words[5]
    assert dominant(p.images[p.label]) == (colour, background), p.prompt
    off += dominant(p.images[1 - p.label]) != (colour, background)
  # n_wrong=1: the other image has the wrong colour or background in ~2/3 of pairs, else the wrong shape
  assert 0.45 < off / len(pairs) < 0.9


def test_images_go_through_the_image_processor():
  p = synthetic_pair(0, image_size=112)
  pv, grid = process_image(p.images[0], source=p.pair_id)
  assert grid == (1, 8, 8) and pv.shape == (64, 1176)
