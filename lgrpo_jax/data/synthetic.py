"""Synthetic preference pairs (the demo's embedded data): needs no files, learnable by a tiny model.

Each pair has a prompt "a <colour> <shape> on a <background> background" and two procedurally drawn
images, one that satisfies the prompt and one that does not; which one comes first is random. The
wrong image differs in `n_wrong` attributes (1 = hard: only the colour, or only the shape, or only
the background is off; 3 = easy). `n_wrong=0` is an image-quality judgement instead: both images
show what the prompt asks for, but the other one has a strong magenta colour cast. Position and
size jitter add nuisance variation. Everything is a
pure function of (seed, index), so the same seed always gives the same pairs, on any machine.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from lgrpo_jax.data.sources import PreferencePair

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "purple": (140, 60, 170), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
  img = Image.new("RGB", (size, size), BACKGROUNDS[background])
  d = ImageDraw.Draw(img)
  r = size * rng.uniform(0.2, 0.35)
  cx, cy = rng.uniform(r, size - r, 2)
  box = (cx - r, cy - r, cx + r, cy + r)
  fill = COLOURS[colour]
  if shape == "circle":
    d.ellipse(box, fill=fill)
  elif shape == "square":
    d.rectangle(box, fill=fill)
  else:
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  return img


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def _attributes(rng: np.random.Generator, n_wrong: int) -> tuple[dict, dict]:
  colour = str(rng.choice(list(COLOURS)))
  shape = str(rng.choice(SHAPES))
  background = str(rng.choice(list(BACKGROUNDS)))
  right = {"colour": colour, "shape": shape, "background": background}
  wrong = dict(right)
  if n_wrong == 0:  # same content; the other image has a colour cast
    return {**right, "quality": "clean"}, {**wrong, "quality": "tinted"}
  for attr in rng.permutation(["colour", "shape", "background"])[:max(1, min(3, n_wrong))]:
    options = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}[attr]
    wrong[attr] = str(rng.choice([o for o in options if o != wrong[attr]]))
  return right, wrong


def pair_attributes(index: int, seed: int = 0, n_wrong: int = 1) -> tuple[dict, dict]:
  """(attributes of the preferred image, of the other) of `synthetic_pair(index, seed, n_wrong)`:
  what a teacher can describe (used by the demo's warm start)."""
  return _attributes(np.random.default_rng([seed, index]), n_wrong)


def synthetic_pair(index: int, seed: int = 0, n_wrong: int = 1, image_size: int = 112) -> PreferencePair:
  rng = np.random.default_rng([seed, index])
  right, wrong = _attributes(rng, n_wrong)
  colour, shape, background = right["colour"], right["shape"], right["background"]
  good = _png(draw(colour, shape, background, image_size, rng))
  bad_img = draw(wrong["colour"], wrong["shape"], wrong["background"], image_size, rng)
  if n_wrong == 0:  # half-way to magenta: a cast no clean image has on its background
    tinted = 0.5 * np.asarray(bad_img, np.float32) + 0.5 * np.array([255, 0, 255], np.float32)
    bad_img = Image.fromarray(tinted.astype(np.uint8))
  bad = _png(bad_img)
  label = int(rng.integers(2))  # index of the preferred image
  images = (bad, good) if label else (good, bad)
  return PreferencePair(f"synthetic-{seed}-{index}", f"a {colour} {shape} on a {background} background",
                        images, label)


def synthetic(n: int, seed: int = 0, n_wrong: int = 1, image_size: int = 112):
  """n deterministic pairs (a generator; pair k is the same whatever n is)."""
  for k in range(n):
    yield synthetic_pair(k, seed, n_wrong, image_size)
