"""Tests for retrieval.images: folder scanning, awkward image formats, bad files, draft decoding, preprocessing."""
from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights

from retrieval.backbones import preprocessing_for
from retrieval.images import ImageDecodeError, decode_for_model, open_rgb
from retrieval.scan import scan_folder


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def two_colour(size=(200, 100)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return img


# --- scanning -------------------------------------------------------------------------------------

def test_scan_finds_every_format_in_any_case_and_labels_by_first_folder(tmp_path):
    img = two_colour((40, 30))
    (tmp_path / "cats" / "indoor").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    names = {"cats/a.JPG": "JPEG", "cats/indoor/b.png": "PNG", "dogs/c.WebP": "WEBP", "dogs/d.bmp": "BMP",
             "dogs/e.gif": "GIF", "dogs/f.TIFF": "TIFF", "dogs/g.jpeg": "JPEG", "top.tif": "TIFF"}
    for name, fmt in names.items():
        img.save(tmp_path / name, fmt)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / ".hidden.jpg").write_bytes(encode(img, "JPEG"))
    (tmp_path / ".thumbs").mkdir()
    (tmp_path / ".thumbs" / "x.jpg").write_bytes(encode(img, "JPEG"))

    scan = scan_folder(tmp_path)

    assert [f.path for f in scan.images] == sorted(names)
    labels = {f.path: f.label for f in scan.images}
    assert labels["cats/indoor/b.png"] == "cats"
    assert labels["dogs/e.gif"] == "dogs"
    assert labels["top.tif"] is None
    f = next(f for f in scan.images if f.path == "cats/a.JPG")
    st = os.stat(tmp_path / "cats/a.JPG")
    assert (f.size, f.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_scan_does_not_loop_on_directory_symlinks(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    two_colour((20, 20)).save(tmp_path / "a" / "b" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")      # a/b/loop -> a
    os.symlink(tmp_path, tmp_path / "a" / "root")                   # a/root -> data folder itself

    started = time.monotonic()
    scan = scan_folder(tmp_path)

    assert time.monotonic() - started < 5
    assert [f.path for f in scan.images] == ["a/b/x.png"]


def test_scan_refuses_symlinks_that_leave_the_data_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    two_colour((20, 20)).save(outside / "secret.png")
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    two_colour((20, 20)).save(data / "cats" / "ok.png")
    os.symlink(outside / "secret.png", data / "cats" / "link.png")
    os.symlink(outside, data / "elsewhere")

    scan = scan_folder(data)

    assert [f.path for f in scan.images] == ["cats/ok.png"]
    assert "outside the data folder" in scan.skipped["cats/link.png"]


# --- awkward formats ------------------------------------------------------------------------------

def test_exif_orientation_is_applied():
    img = two_colour((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)

    rgb = open_rgb(data)
    decoded = decode_for_model(data, preprocessing_for("alexnet"))

    assert rgb.size == (100, 200)
    assert (decoded.width, decoded.height) == (100, 200)
    top, bottom = np.asarray(rgb)[10, 50], np.asarray(rgb)[190, 50]
    assert top[0] > 200 and top[2] < 60, top        # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("mode, colour, fmt, expected", [
    ("L", 128, "PNG", (128, 128, 128)),
    ("LA", (200, 255), "PNG", (200, 200, 200)),
    ("RGBA", (10, 200, 30, 255), "PNG", (10, 200, 30)),
    ("RGBA", (10, 200, 30, 0), "PNG", (255, 255, 255)),        # fully transparent -> white background
    ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),            # CMYK red
    ("I;16", 65535, "PNG", (255, 255, 255)),                    # 16-bit white is white, not clipped noise
    ("I;16", 32896, "PNG", (128, 128, 128)),
    ("1", 1, "BMP", (255, 255, 255)),
])
def test_modes_become_8bit_rgb(mode, colour, fmt, expected):
    data = encode(Image.new(mode, (32, 24), colour), fmt)

    rgb = open_rgb(data)

    assert rgb.mode == "RGB" and rgb.size == (32, 24)
    assert np.allclose(np.asarray(rgb)[12, 16], expected, atol=3), np.asarray(rgb)[12, 16]


def test_palette_images_with_transparency_become_rgb():
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    plain = open_rgb(encode(pal, "GIF"))
    transparent = open_rgb(encode(pal, "PNG", transparency=1))
    assert tuple(np.asarray(plain)[8, 8]) == (255, 0, 0)
    assert tuple(np.asarray(transparent)[8, 8]) == (255, 255, 255)


def test_large_jpeg_decodes_at_reduced_scale():
    photo = Image.new("RGB", (4000, 3000), (90, 140, 200))
    data = encode(photo, "JPEG", quality=85)

    rgb = open_rgb(data, min_side=256)
    decoded = decode_for_model(data, preprocessing_for("alexnet"))

    assert rgb.size == (500, 375)                       # 1/8 scale, both sides still >= 256
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.pixels.shape == (3, 224, 224) and decoded.pixels.dtype == torch.uint8


# --- bad files --------------------------------------------------------------------------------------

def bad_files() -> dict[str, bytes]:
    good = encode(Image.new("RGB", (300, 200), (200, 30, 30)), "JPEG")
    return {
        "empty": b"",
        "text": b"hello, I am not a picture\n" * 10,
        "truncated": good[: len(good) // 2],
        "bomb": encode(Image.new("1", (10000, 9000)), "PNG"),   # 90 Mpx, over Pillow's default limit
    }


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated"),
    ("bomb", "decompression bomb"),
])
def test_bad_files_raise_a_decode_error_with_a_reason(kind, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_for_model(bad_files()[kind], preprocessing_for("alexnet"))


# --- preprocessing ------------------------------------------------------------------------------------

def test_preprocessing_matches_the_weights_own_transforms():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    prep = preprocessing_for("alexnet")

    ours = prep.normalise(prep.crop(img).unsqueeze(0))[0]
    theirs = AlexNet_Weights.IMAGENET1K_V1.transforms()(img)

    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-5)
