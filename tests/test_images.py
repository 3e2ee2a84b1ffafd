"""Image preprocessing equals transformers' Qwen2VLImageProcessorPil, on real and odd inputs; bad
images give errors naming their source."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import shared_dir
from lgrpo_jax.data import ImageConfig, ImageError, process_image, process_images
from lgrpo_jax.data.images import CLIP_MEAN, CLIP_STD, nearest_bucket

REAL = os.path.join(shared_dir(), "data", "imagereward", "images")
CFG = ImageConfig(min_pixels=56 * 56, max_pixels=448 * 448)


def reference(images, cfg=CFG):
  proc = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
  out = proc(images=images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def odd_images():
  rng = np.random.default_rng(0)
  rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  rgba = Image.fromarray(rng.integers(0, 256, (61, 97, 4), dtype=np.uint8), "RGBA")
  grey = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L")
  la = Image.fromarray(rng.integers(0, 256, (45, 80, 2), dtype=np.uint8), "LA")
  pal = rgb(64, 48).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  pal_t = pal.copy()
  pal_t.info["transparency"] = 3
  cmyk = rgb(40, 90).convert("CMYK")
  return {"tiny 1x1": rgb(1, 1), "thin 33x517": rgb(33, 517), "wide 30x1000": rgb(30, 1000),
          "big 1500x900 (over max_pixels)": rgb(1500, 900), "odd 223x311": rgb(223, 311), "RGBA": rgba,
          "greyscale": grey, "grey+alpha": la, "palette": pal, "palette+transparency": pal_t, "CMYK": cmyk}


@pytest.mark.parametrize("name", sorted(os.listdir(REAL)))
def test_real_imagereward_images_match_transformers(name):
  path = os.path.join(REAL, name)
  got, grid = process_image(path, CFG)
  ref, ref_grid = reference([Image.open(path)])
  assert grid == tuple(ref_grid[0]) == (1, 32, 32)  # 512x512 -> 448x448 under max_pixels
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_odd_sizes_and_modes_match_transformers(name):
  img = odd_images()[name]
  got, grid = process_image(img, CFG, source=name)
  ref, ref_grid = reference([img])
  assert grid == tuple(ref_grid[0])
  np.testing.assert_array_equal(got, ref)


def png_chunk(kind: bytes, data: bytes) -> bytes:
  import struct
  import zlib
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def orientation_chunk(exif: bytes, how: str) -> bytes:
  """A PNG chunk with an orientation Pillow reads: eXIf, ImageMagick's "Raw profile type exif" text
  chunk, or XMP's tiff:Orientation in an iTXt chunk."""
  if how == "exif":
    return png_chunk(b"eXIf", exif)
  if how == "text":
    hexed = (b"Exif\0\0" + exif).hex().encode()
    return png_chunk(b"tEXt", b"Raw profile type exif\0\nexif\n" + str(len(hexed) // 2).encode() + b"\n" + hexed)
  orientation = Image.Exif()
  orientation.load(exif)
  xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
         f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation[0x0112]}"/>'
         f'</rdf:RDF></x:xmpmeta>').encode()
  return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)


def png_with_late_orientation(png: bytes, exif: bytes, how: str) -> bytes:
  """`png` (its early eXIf chunk removed) with the orientation after the image data, where Pillow
  reads it only after decoding (`orientation_chunk`)."""
  import struct
  if b"eXIf" in png:
    at = png.index(b"eXIf") - 4
    png = png[:at] + png[at + 12 + struct.unpack(">I", png[at:at + 4])[0]:]
  end = png.rindex(b"IEND") - 4
  return png[:end] + orientation_chunk(exif, how) + png[end:]


@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff", "png_late_exif", "png_late_text", "png_late_xmp"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_file_is_turned_upright_by_its_exif_orientation_as_transformers_load_image_does(tmp_path, orientation, fmt):
  """A camera JPEG stored sideways with an EXIF orientation: read from its path or bytes it is
  turned as a browser shows it and as transformers' `load_image` gives it to the processor — the
  grid from the header alone (`image_grid`) included. PNGs with the orientation after the image
  data (read by Pillow only after decoding) were not turned."""
  from transformers.image_utils import load_image

  from lgrpo_jax.data.images import image_grid
  rng = np.random.default_rng(orientation)
  img = Image.fromarray(rng.integers(0, 256, (80, 200, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / f"sideways.{fmt.split('_')[0]}"
  img.save(path, exif=exif.tobytes())
  if fmt.startswith("png_late_"):
    path.write_bytes(png_with_late_orientation(path.read_bytes(), exif.tobytes(), fmt.split("_")[-1]))
  ref, ref_grid = reference([load_image(str(path))])
  for src in (str(path), path.read_bytes()):
    got, grid = process_image(src, CFG, source=path.name)
    assert grid == tuple(ref_grid[0]) == image_grid(src, CFG, source=path.name)
    np.testing.assert_array_equal(got, ref)
  assert (ref_grid[0][1] > ref_grid[0][2]) == (orientation in (6, 8))  # 6 and 8 stand it upright


def test_a_corrupt_png_read_for_its_late_orientation_is_a_bad_image(tmp_path):
  # Reading the orientation decoded the image inside a guard for garbled EXIF: the decode error was
  # swallowed, and the image came out black instead of a bad image.
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(buf, "PNG")
  exif = Image.Exif()
  exif[0x0112] = 6
  png = bytearray(png_with_late_orientation(buf.getvalue(), exif.tobytes(), "exif"))
  at = png.index(b"IDAT") + 20
  png[at:at + 40] = bytes(40)  # the compressed data damaged
  (tmp_path / "bad.png").write_bytes(bytes(png))
  with pytest.raises(ImageError, match=r"bad\.png: cannot decode image"):
    process_image(str(tmp_path / "bad.png"), CFG)


def test_batch_of_images_and_default_config():
  imgs = [odd_images()["odd 223x311"], Image.open(os.path.join(REAL, "1.webp"))]
  pv, grid = process_images(imgs)
  ref_pv, ref_grid = reference(imgs, ImageConfig())
  np.testing.assert_array_equal(grid, ref_grid)
  np.testing.assert_array_equal(pv, ref_pv)


def test_bad_images_name_their_source(tmp_path):
  with pytest.raises(ImageError, match=r"nope\.png: image file not found"):
    process_image(str(tmp_path / "nope.png"))
  (tmp_path / "adir.png").mkdir()
  with pytest.raises(ImageError, match=r"adir\.png: a directory, not an image file") as e:
    process_image(str(tmp_path / "adir.png"))
  assert e.value.kind == "bad_image"
  good = io.BytesIO()
  odd_images()["odd 223x311"].save(good, "PNG")
  (tmp_path / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
  with pytest.raises(ImageError, match=r"cut\.png: cannot decode image"):
    process_image(str(tmp_path / "cut.png"))
  (tmp_path / "junk.webp").write_bytes(b"not an image at all")
  with pytest.raises(ImageError, match=r"junk\.webp: cannot decode image"):
    process_image(str(tmp_path / "junk.webp"))
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(ImageError, match=r"empty\.jpg: cannot decode image"):
    process_image(str(tmp_path / "empty.jpg"))
  with pytest.raises(ImageError, match=r"record 17: empty image \(0x5\)"):
    process_image(Image.new("RGB", (0, 5)), source="record 17")
  with pytest.raises(ImageError, match=r"record 9: aspect ratio 250 exceeds 200"):
    process_image(Image.new("RGB", (2500, 10)), source="record 9")
  with pytest.raises(ImageError, match=r"pair 4/img 2: cannot decode image"):
    process_image(b"\x89PNG\r\n\x1a\n garbage", source="pair 4/img 2")


BUCKETS = ((448, 448), (336, 560), (560, 336))


@pytest.mark.parametrize("name", ["odd 223x311", "wide 30x1000", "big 1500x900 (over max_pixels)", "tiny 1x1"])
def test_grid_buckets_stretch_is_transformers_on_the_bucket_sized_image(name):
  img = odd_images()[name].convert("RGB")
  cfg = ImageConfig(min_pixels=56 * 56, max_pixels=600 * 600, grid_buckets=BUCKETS)
  got, grid = process_image(img, cfg, source=name)
  h, w = nearest_bucket(img.height, img.width, BUCKETS)
  assert grid == (1, h // 14, w // 14)
  # The bucket whose aspect ratio is nearest: no other bucket is closer in log ratio.
  r = np.log(img.height / img.width)
  assert all(abs(np.log(h / w) - r) <= abs(np.log(b[0] / b[1]) - r) for b in BUCKETS)
  # transformers on the image already resized to the bucket leaves the size alone: equal bits.
  ref, ref_grid = reference([img.resize((w, h), Image.Resampling.BICUBIC)], cfg)
  assert tuple(ref_grid[0]) == grid
  np.testing.assert_array_equal(got, ref)


def test_grid_buckets_pad_keeps_aspect_and_pads_white():
  img = Image.new("RGB", (200, 100), (0, 0, 0))  # wide black image into one square bucket
  cfg = ImageConfig(grid_buckets=((112, 112),), fit="pad")
  pv, grid = process_image(img, cfg)
  assert grid == (1, 8, 8)
  # Undo the patchify on channel 0 to look at the picture: rows 0..27 and 84..111 are white padding.
  x = pv.reshape(4, 4, 2, 2, 3, 2, 14, 14)[:, :, :, :, 0, 0]  # gh', gw', m, m, p, p
  picture = x.transpose(0, 2, 4, 1, 3, 5).reshape(112, 112)
  white, black = (1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[0]) / CLIP_STD[0]
  np.testing.assert_allclose(picture[:28], white, atol=1e-5)
  np.testing.assert_allclose(picture[84:], white, atol=1e-5)
  np.testing.assert_allclose(picture[28:84], black, atol=1e-5)


def test_grid_buckets_bad_config_names_the_field():
  with pytest.raises(ValueError, match="grid_buckets"):
    ImageConfig(grid_buckets=((100, 112),))
  with pytest.raises(ValueError, match="fit"):
    ImageConfig(fit="crop")


def test_a_multi_frame_file_is_closed_after_decoding(tmp_path, monkeypatch):
  """Pillow keeps an animated GIF's file open after `load`: each image read left one open until
  the garbage collector found it (a ResourceWarning per image)."""
  import gc
  import sys

  from lgrpo_jax.data.images import open_image
  frames = [Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)) for k in range(3)]
  frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
  import warnings
  unclosed = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unclosed.append(str(u.exc_value)))
  with warnings.catch_warnings():
    warnings.simplefilter("error", ResourceWarning)  # raised in __del__: reaches the hook
    for _ in range(3):
      open_image(str(tmp_path / "anim.gif"))
      open_image((tmp_path / "anim.gif").read_bytes())
    gc.collect()
  assert not unclosed, unclosed


def test_an_image_declaring_more_pixels_than_the_limit_is_refused_before_decoding(tmp_path, monkeypatch):
  # A PNG of a few KB declaring 13000x13000 (under Pillow's own refusal at 179 M pixels) was decoded
  # in full: 3.4 GB for one image, several at once in the pipeline. Here the limit is lowered.
  from lgrpo_jax.data.images import ImageConfig, ImageError, image_grid, process_image
  path = tmp_path / "big.png"
  Image.new("L", (300, 200)).save(path)
  cfg = ImageConfig(max_decoded_pixels=300 * 200 - 1)
  decoded = []
  monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(1) or None)
  for read in (image_grid, process_image):
    with pytest.raises(ImageError, match=r"big\.png.*300x200 = 60,000 pixels, over pipeline\.image\.max_decoded_pixels=59,999"):
      read(str(path), cfg)
  assert not decoded  # refused from the header
  monkeypatch.undo()
  assert image_grid(str(path), ImageConfig(max_decoded_pixels=300 * 200))[0] == 1
  with pytest.raises(ValueError, match="max_decoded_pixels=0 must be"):
    ImageConfig(max_decoded_pixels=0)


@pytest.mark.parametrize("case", ["idat_in_text", "big_late_chunk", "early_xmp"])
def test_png_orientation_found_without_walking_or_decoding_where_it_can_be(tmp_path, monkeypatch, case):
  """The late-orientation scan reads the file's end: the bytes "IDAT" in a text chunk after the data
  took it for the image data's end (the orientation was missed); a chunk after the data longer than
  the end read goes through a walk of the chunk headers; XMP before the data is read from the header
  (a full decode per image in the plan pass before)."""
  from transformers.image_utils import load_image

  from lgrpo_jax.data.images import image_grid
  img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 200, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  img.save(buf, "PNG")
  png = buf.getvalue()
  if case == "early_xmp":
    png = png[:33] + orientation_chunk(exif.tobytes(), "xmp") + png[33:]  # right after IHDR
  else:
    png = png_with_late_orientation(png, exif.tobytes(), "exif")
    end = png.rindex(b"IEND") - 4
    text = b"Comment\0" + (b"mentions IDAT " if case == "idat_in_text" else b"x" * 300_000)
    png = png[:end] + png_chunk(b"tEXt", text) + png[end:]
  path = tmp_path / "p.png"
  path.write_bytes(png)
  want = load_image(str(path)).size
  assert want == (80, 200)  # transformers turns it
  if case == "early_xmp":
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: pytest.fail("decoded to plan"))
  _, h, w = image_grid(str(path), CFG)
  assert h > w  # turned upright, as transformers'
