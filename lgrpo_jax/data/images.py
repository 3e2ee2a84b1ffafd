"""Qwen2-VL image preprocessing: decode, RGB, smart_resize, normalise, patchify.

Produces exactly what transformers' `Qwen2VLImageProcessorPil` produces (tested bit for bit on the
real ImageReward images and odd sizes / modes), without transformers or torch on the hot path:

  1. decode any PIL-readable file or bytes; transparency composited onto white, then RGB;
  2. `smart_resize`: both sides multiples of patch·merge (28), pixels within [min, max], aspect kept;
  3. PIL bicubic resize on the uint8 image;
  4. x/255 (float64, then float32), then (x − mean) / std in float32 — done as a per-channel
     256-entry lookup table computed with exactly that arithmetic, so it is a gather, not math;
  5. patchify into (grid_h·grid_w, C·T·P·P) rows in merge-block order, the still image repeated
     over the temporal patch.

Optionally (`ImageConfig.grid_buckets`) step 2 snaps every image to one of a few fixed shapes, so
the compiled programs see a bounded set of grids (a deliberate departure from transformers).

Every failure names its source (file path or record id): missing, unreadable or truncated file,
empty image, absurd aspect ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


MISSING = "image file not found"


class ImageError(ValueError):
  """An image that cannot be used, with the file or record it came from."""

  def __init__(self, source: str, reason: str):
    super().__init__(f"{source}: {reason}")
    self.source, self.reason = source, reason

  @property
  def kind(self) -> str:
    """The skip reason it is counted under: 'missing_image' or 'bad_image'."""
    return "missing_image" if self.reason == MISSING else "bad_image"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """transformers' defaults for Qwen2.5-VL; `min_pixels`/`max_pixels` bound the resized area."""
  min_pixels: int = 56 * 56  # smallest resized area (transformers default)
  max_pixels: int = 28 * 28 * 1280  # largest resized area: bounds image tokens (area / 28²)
  patch_size: int = 14  # vision patch side in pixels
  merge_size: int = 2  # patches merged per side into one image token
  temporal_patch_size: int = 2  # frames per patch (a still image is repeated)
  mean: tuple[float, float, float] = CLIP_MEAN  # normalisation (CLIP)
  std: tuple[float, float, float] = CLIP_STD  # normalisation (CLIP)
  # Optional shape buckets, (height, width) in pixels, multiples of patch·merge. None: transformers'
  # exact smart_resize (one grid per aspect ratio → one compilation per distinct grid tuple). With
  # buckets every image gets the bucket nearest its aspect ratio, so the device programs compile a
  # bounded number of times; a single bucket gives every image one shape. This departs from
  # transformers' preprocessing (by design): 'stretch' resizes to the bucket, 'pad' keeps the
  # aspect ratio and pads with white (centred).
  grid_buckets: tuple[tuple[int, int], ...] | None = None
  fit: str = "stretch"  # with grid_buckets: stretch | pad
  # Largest image decoded, in pixels (Pillow warns above this, and refuses only at twice it): a file
  # declaring more is a bad image (~4 bytes a pixel while decoding: 89.5 M pixels ≈ 0.36 GB each,
  # and the pipeline decodes several at once); it is resized to at most max_pixels anyway.
  max_decoded_pixels: int = 89_478_485

  def __post_init__(self):
    if self.fit not in ("stretch", "pad"):
      raise ValueError(f"ImageConfig.fit={self.fit!r}: choose 'stretch' or 'pad'")
    if min(self.patch_size, self.merge_size, self.temporal_patch_size) < 1:
      raise ValueError("ImageConfig.patch_size, merge_size and temporal_patch_size must be ≥ 1")
    if len(self.mean) != 3 or len(self.std) != 3 or not all(0 < s < float("inf") for s in self.std) \
        or not all(abs(m) < float("inf") for m in self.mean):
      raise ValueError(f"ImageConfig: mean and std need three finite values each, std > 0; got mean={self.mean}, "
                       f"std={self.std}")
    if self.max_decoded_pixels < 1:
      raise ValueError(f"ImageConfig.max_decoded_pixels={self.max_decoded_pixels} must be ≥ 1")
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"ImageConfig: need 0 < min_pixels ≤ max_pixels, got min_pixels={self.min_pixels}, "
                       f"max_pixels={self.max_pixels}")
    if self.grid_buckets is not None:
      buckets = tuple(tuple(int(v) for v in b) for b in self.grid_buckets)
      if not buckets or any(len(b) != 2 or min(b) <= 0 or b[0] % self.factor or b[1] % self.factor
                            for b in buckets):
        raise ValueError(f"ImageConfig.grid_buckets={self.grid_buckets!r}: need (height, width) pairs "
                         f"in pixels, positive multiples of patch_size·merge_size = {self.factor}")
      object.__setattr__(self, "grid_buckets", buckets)

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 source: str = "image") -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels]."""
  if min(height, width) <= 0:
    raise ImageError(source, f"empty image ({width}x{height})")
  if max(height, width) / min(height, width) > 200:
    raise ImageError(source, f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200 "
                             f"({width}x{height})")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def nearest_bucket(height: int, width: int, buckets) -> tuple[int, int]:
  """The (height, width) bucket whose aspect ratio is nearest (in log ratio) to the image's."""
  r = math.log(height / width)
  return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def _fit(img: Image.Image, cfg: ImageConfig, name: str) -> np.ndarray:
  """The resized (H, W, 3) uint8 image: smart_resize (exact transformers) or a configured bucket."""
  if cfg.grid_buckets is None:
    h, w = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels, name)
    return np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC))
  smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, cfg.max_pixels, name)  # same checks
  h, w = nearest_bucket(img.height, img.width, cfg.grid_buckets)
  if cfg.fit == "stretch":
    return np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC))
  scale = min(h / img.height, w / img.width)
  ih, iw = max(1, min(h, round(img.height * scale))), max(1, min(w, round(img.width * scale)))
  canvas = Image.new("RGB", (w, h), (255, 255, 255))
  canvas.paste(img.resize((iw, ih), resample=Image.Resampling.BICUBIC), ((w - iw) // 2, (h - ih) // 2))
  return np.asarray(canvas)


def _require_file(path, name: str) -> None:
  if not os.path.isfile(path):
    raise ImageError(name, "a directory, not an image file" if os.path.isdir(path) else MISSING)


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that exchange width and height
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # as ImageOps.exif_transpose


# What Pillow's `getexif` reads a PNG's orientation from besides an eXIf chunk: ImageMagick's text
# profile, and XMP's tiff:Orientation (keywords of text chunks)
_PNG_ORIENTATION_KEYS = ("Raw profile type exif", "XML:com.adobe.xmp")
_TAIL = 1 << 17  # bytes read from a PNG's end to find the chunks after its image data


def _orientation_chunk(kind: bytes, data_head: bytes) -> bool:
  """Whether a chunk (its type, the first bytes of its data) is one Pillow reads an orientation from."""
  return kind == b"eXIf" or (kind in (b"tEXt", b"zTXt", b"iTXt")
                             and data_head.split(b"\0")[0].decode("latin-1") in _PNG_ORIENTATION_KEYS)


def _chunks_from(buf: bytes, at: int):
  """The chunks (type, the first 80 bytes of data) of `buf` from offset `at` when they run, each whole (the metadata ones
  with a right CRC; the image data's are not summed, for speed: a false start must still land exactly
  on each next header), to an IEND that ends `buf`; else None (`at` is no chunk boundary)."""
  out = []
  while at + 12 <= len(buf):
    length, kind = struct.unpack(">I4s", buf[at:at + 8])
    end = at + 12 + length
    if end > len(buf) or not kind.isalpha() or (
        kind != b"IDAT" and zlib.crc32(buf[at + 4:end - 4]) != struct.unpack(">I", buf[end - 4:end])[0]):
      return None
    out.append((kind, buf[at + 8:min(end - 4, at + 88)]))  # a data's head is all that is read
    if kind == b"IEND":
      return out if end == len(buf) else None
    at = end
  return None


def _png_metadata_after_data(img) -> bool:
  """Whether a PNG holds, after its image data, a chunk Pillow reads the orientation from (eXIf,
  or a text chunk of `_PNG_ORIENTATION_KEYS`): Pillow — so transformers' `load_image` — sees it
  only once the image is decoded. Without decoding, and for the plan pass without reading more than
  the file's end: the last 128 KB are parsed from the first image-data chunk header in them whose
  chunks run to the file's IEND (a byte pattern that only looks like a chunk header fails there, or
  its CRC); when no image-data chunk starts there (one chunk of image data longer than that: few chunks
  in all), the chunk headers are walked from the start."""
  fp = getattr(img, "fp", None)
  if fp is None:
    return False
  pos = fp.tell()
  try:
    size = fp.seek(0, 2)
    start = max(8, size - _TAIL)
    fp.seek(start)
    tail = fp.read(size - start)
    at = tail.find(b"IDAT")
    while at >= 4:
      chunks = _chunks_from(tail, at - 4)
      if chunks is not None:
        last = max(k for k, (kind, _) in enumerate(chunks) if kind == b"IDAT")
        return any(_orientation_chunk(kind, head) for kind, head in chunks[last + 1:])
      at = tail.find(b"IDAT", at + 1)
    fp.seek(8)  # no chunk boundary found before the image data's end in the tail: walk the headers
    seen_data = False
    while True:
      head = fp.read(8)
      if len(head) < 8:
        return False
      length, kind = struct.unpack(">I4s", head)
      if kind == b"IEND":
        return False
      if kind == b"IDAT":
        seen_data = True
      elif seen_data and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
        data_head = fp.read(min(length, 80))
        if _orientation_chunk(kind, data_head):
          return True
        fp.seek(-len(data_head), 1)
      fp.seek(length + 4, 1)  # the data and its CRC
  except (OSError, struct.error):
    return False
  finally:
    fp.seek(pos)


def _orientation(img) -> int:
  """The EXIF orientation (1: upright) as Pillow's `getexif` gives it (transformers' `load_image`
  applies it), from what opening the file read where that is all of it — a JPEG's/WebP's EXIF
  block, TIFF tags, a PNG's chunks before the image data (eXIf, text profile, XMP) — so the
  header-only grid agrees with the decode. A PNG with such a chunk after the image data is decoded
  first, as Pillow's `getexif` does (rare); a decode error there is the caller's (a bad image)."""
  if img.format == "TIFF":  # Pillow turns a TIFF upright itself: its size at open, and its load
    return 1
  if img.format == "PNG":
    raw = img.info.get("exif")
    if raw:
      try:
        exif = Image.Exif()
        exif.load(raw)
        if 0x0112 in exif:
          return int(exif[0x0112])
      except Exception:  # noqa: BLE001 — garbled: Pillow's getexif below decides
        pass
    if _png_metadata_after_data(img):
      img.load()  # what Pillow's getexif does for a PNG; outside the guard below: corrupt data raises
    elif not (raw or any(k in img.info for k in _PNG_ORIENTATION_KEYS)):
      return 1
    try:  # Image's own getexif: the PNG's override would decode, and nothing comes after the data
      return int(Image.Image.getexif(img).get(0x0112, 1))
    except Exception:  # noqa: BLE001 — a garbled EXIF block: no orientation, as browsers do
      return 1
  try:
    return int(img.getexif().get(0x0112, 1))
  except Exception:  # noqa: BLE001 — a garbled EXIF block: no orientation, as browsers do
    return 1


def open_image(src, source: str | None = None, max_decoded_pixels: int = ImageConfig.max_decoded_pixels) -> Image.Image:
  """A decoded RGB image from a path, bytes or a PIL image; see `_open_image`. A file we open is
  closed here (Pillow keeps a multi-frame file open after `load`). A file declaring more than
  `max_decoded_pixels` pixels is an `ImageError` before it is decoded."""
  opened: list = []
  try:
    return _open_image(src, source, opened, max_decoded_pixels)
  finally:
    for f in opened:
      f.close()


def _too_large(size, limit: int) -> str | None:
  w, h = size
  if w * h > limit:
    return (f"{w}x{h} = {w * h:,} pixels, over pipeline.image.max_decoded_pixels={limit:,} (decoding would take "
            f"~{4 * w * h / 2**30:.1f} GB)")
  return None


def _open_image(src, source: str | None, opened: list, max_decoded_pixels: int = ImageConfig.max_decoded_pixels) -> Image.Image:
  """A decoded RGB image from a path, bytes or a PIL image; transparency composited onto white.
  A file (path or bytes) is turned upright by its EXIF orientation, as a browser shows it and as
  transformers' `load_image` reads a path; a PIL image is taken as given (as the processor does)."""
  name = source or (src if isinstance(src, (str, os.PathLike)) else "<image bytes>")
  name = os.fspath(name)
  try:
    if isinstance(src, Image.Image):
      img = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
      img = Image.open(io.BytesIO(bytes(src)))
      opened.append(img)
    else:
      _require_file(src, name)
      img = Image.open(src)
      opened.append(img)
    if not isinstance(src, Image.Image) and (why := _too_large(img.size, max_decoded_pixels)):
      raise ImageError(name, why)
    orientation = 1 if isinstance(src, Image.Image) else _orientation(img)
    img.load()  # decode now: truncated or corrupt data fails here, with the source named
    if orientation in _UPRIGHT:
      img = img.transpose(_UPRIGHT[orientation])
  except ImageError:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(name, f"cannot decode image ({type(e).__name__}: {e})") from None
  if img.width <= 0 or img.height <= 0:
    raise ImageError(name, f"empty image ({img.width}x{img.height})")
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def _upright_size(img, max_decoded_pixels: int, name: str) -> tuple[int, int]:
  """(width, height) after `open_image` applies the EXIF orientation (read from the header); an
  `ImageError` past `max_decoded_pixels` first (reading a PNG's late EXIF decodes it)."""
  if why := _too_large(img.size, max_decoded_pixels):
    raise ImageError(name, why)
  return (img.height, img.width) if _orientation(img) in _TRANSPOSED else img.size


def image_grid(src, cfg: ImageConfig = ImageConfig(), source: str | None = None) -> tuple[int, int, int]:
  """The (1, grid_h, grid_w) that `process_image` will give, from the file header only (cheap: no
  decode), with the same checks; data that is truncated after a valid header fails only later."""
  name = os.fspath(source or (src if isinstance(src, (str, os.PathLike)) else "<image bytes>"))
  try:
    if isinstance(src, Image.Image):
      size = src.size
    elif isinstance(src, (bytes, bytearray, memoryview)):
      with Image.open(io.BytesIO(bytes(src))) as img:
        size = _upright_size(img, cfg.max_decoded_pixels, name)
    else:
      _require_file(src, name)
      with Image.open(src) as img:
        size = _upright_size(img, cfg.max_decoded_pixels, name)
  except ImageError:
    raise
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(name, f"cannot decode image ({type(e).__name__}: {e})") from None
  w, h = size
  if min(h, w) <= 0:
    raise ImageError(name, f"empty image ({w}x{h})")
  rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels, name)
  if cfg.grid_buckets is not None:
    rh, rw = nearest_bucket(h, w, cfg.grid_buckets)
  return 1, rh // cfg.patch_size, rw // cfg.patch_size


@functools.lru_cache(maxsize=8)
def _lut(mean: tuple, std: tuple) -> np.ndarray:
  """(3, 256) float32: normalised value of each uint8 level per channel, computed as transformers
  does (rescale in float64 then cast to float32; subtract and divide in float32)."""
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return ((levels[None, :] - m[:, None]) / s[:, None]).astype(np.float32)


def process_image(src, cfg: ImageConfig = ImageConfig(), source: str | None = None):
  """One image → (patches (grid_h·grid_w, 3·T·P·P) float32, (1, grid_h, grid_w))."""
  img = open_image(src, source, cfg.max_decoded_pixels)
  name = os.fspath(source or (src if isinstance(src, (str, os.PathLike)) else "<image>"))
  u8 = _fit(img, cfg, name)  # (H, W, 3) uint8
  h, w = u8.shape[:2]
  lut = _lut(tuple(cfg.mean), tuple(cfg.std))
  chw = np.stack([lut[c][u8[..., c]] for c in range(3)])  # (3, H, W) float32
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gh, gw = h // p, w // p
  x = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh', gw', m, m, C, p, p
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
  return np.ascontiguousarray(x).reshape(gh * gw, 3 * t * p * p), (1, gh, gw)


def process_images(sources, cfg: ImageConfig = ImageConfig(), names=None):
  """Several images → (pixel_values (Σ patches, 3·T·P·P), image_grid_thw (n, 3) int64)."""
  names = names or [None] * len(sources)
  out = [process_image(s, cfg, n) for s, n in zip(sources, names)]
  return (np.concatenate([p for p, _ in out]), np.asarray([g for _, g in out], np.int64))
