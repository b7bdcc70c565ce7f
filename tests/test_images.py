"""Tests for retrieval.images.decode: folder scanning, awkward image formats, bad files, draft decoding, preprocessing."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights

from helpers.images import bad_files, encode
from retrieval.features.backbones import preprocessing_for
from retrieval.images import decode as images
from retrieval.images.decode import MAX_ASPECT_RATIO, ImageDecodeError, decode_for_model, open_rgb, thumbnail_rgb
from retrieval.images.scan import scan_folder


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
    # a Synology share's thumbnails of every photo (they were indexed, each a near-duplicate of its photo), a bin
    (tmp_path / "cats" / "@eaDir" / "a.JPG").mkdir(parents=True)
    (tmp_path / "cats" / "@eaDir" / "a.JPG" / "SYNOFILE_THUMB_M.jpg").write_bytes(encode(img, "JPEG"))
    (tmp_path / "#recycle" / "dogs").mkdir(parents=True)
    (tmp_path / "#recycle" / "dogs" / "deleted.jpg").write_bytes(encode(img, "JPEG"))

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
    assert scan.folders["elsewhere"].startswith(f"a link to a folder outside the data folder ({outside})")


def test_a_link_to_a_class_folder_never_takes_its_images_and_label(tmp_path):
    """Reproduces: data/Favourites -> 'red circles' (a shortcut), sorted before the folder it links to, took its
    images under the label 'Favourites' and the real folder was dropped: removed 10, 'red circles' gone from every
    label list, without a word. The real folders are walked first now; a link to one is named and left out."""
    for name in ("red circles", "blue"):
        (tmp_path / name).mkdir()
        two_colour((20, 20)).save(tmp_path / name / "x.png")
    os.symlink("red circles", tmp_path / "Favourites")                     # sorts before the folder it links to
    os.symlink(tmp_path / "red circles", tmp_path / "blue" / "also")      # a link inside another class
    (tmp_path / "archive" / "2019").mkdir(parents=True)
    two_colour((20, 20)).save(tmp_path / "archive" / "2019" / "y.png")
    os.symlink("archive/2019", tmp_path / "2019")                          # a link to a folder under another one

    scan = scan_folder(tmp_path)

    assert {f.path: f.label for f in scan.images} == {"red circles/x.png": "red circles", "blue/x.png": "blue",
                                                      "archive/2019/y.png": "archive"}
    assert scan.folders == {"2019": "a link to the folder archive/2019, which is indexed under its own name",
                            "Favourites": "a link to the folder red circles, which is indexed under its own name",
                            "blue/also": "a link to the folder red circles, which is indexed under its own name"}
    (tmp_path / "Favourites").unlink()
    (tmp_path / "more").mkdir()
    os.symlink("../blue", tmp_path / "more" / "blues")
    os.symlink(tmp_path / "more", tmp_path / "shortcut")
    (tmp_path / "elsewhere").mkdir()
    two_colour((20, 20)).save(tmp_path / "elsewhere" / "z.png")
    hidden = tmp_path / ".private"
    hidden.mkdir()
    two_colour((20, 20)).save(hidden / "p.png")
    os.symlink(".private", tmp_path / "shown")                              # the one way into a hidden folder: walked
    assert [f.path for f in scan_folder(tmp_path).images] == [
        "archive/2019/y.png", "blue/x.png", "elsewhere/z.png", "red circles/x.png", "shown/p.png"]


def test_scan_skips_symlinks_that_loop_on_themselves_or_lead_nowhere(tmp_path):
    """A symlink to itself (any name) crashed index-images with ELOOP and left a half-made index; one to a missing
    file was dropped without a word. Both are skipped now, with a reason where the name is an image's."""
    (tmp_path / "cats").mkdir()
    two_colour((20, 20)).save(tmp_path / "cats" / "ok.png")
    os.symlink("self.jpg", tmp_path / "cats" / "self.jpg")          # cats/self.jpg -> itself
    os.symlink("x", tmp_path / "cats" / "x")                        # not an image's name: passed over
    os.symlink("gone.jpg", tmp_path / "cats" / "dangling.jpg")

    scan = scan_folder(tmp_path)

    assert [f.path for f in scan.images] == ["cats/ok.png"]
    assert scan.skipped == {"cats/self.jpg": "a symlink loop: it never leads to a file",
                            "cats/dangling.jpg": "symlink to a file that is not there"}


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
    assert decoded.pixels.shape == (3, 224, 224) and decoded.pixels.dtype == np.uint8


# --- bad files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated"),
    ("bomb", "decompression bomb"),
])
def test_bad_files_raise_a_decode_error_with_a_reason(kind, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_for_model(bad_files()[kind], preprocessing_for("alexnet"))


def test_an_image_over_pillows_own_limit_is_refused_with_the_limit_the_docs_give():
    """Over twice Pillow's limit, Pillow refuses it itself; its message quoted 178,956,970 pixels where the docs
    and the smaller bombs say 89,478,485."""
    from retrieval.images.decode import DEFAULT_MAX_PIXELS

    with pytest.raises(ImageDecodeError) as err:
        open_rgb(encode(Image.new("1", (14000, 13000)), "PNG"))
    assert str(err.value) == (f"image too large (182,000,000 pixels, limit {DEFAULT_MAX_PIXELS:,}): refused as a "
                              "possible decompression bomb")


def test_a_100_megapixel_cameras_jpeg_is_decoded_reduced_not_refused(tmp_path):
    """Reproduces: a Fujifilm GFX100's 11648x8736 JPEG (102 Mpx) was skipped by index-images as 'a possible
    decompression bomb' (over Pillow's 89 Mpx), after Pillow's own warning on the terminal. Decoded at 1/8 scale it
    is 1.6 Mpx: the limit bounds the pixels decoded. The same size as PNG (decoded whole) is still refused. (The
    terminal without Pillow's warning: test_cli, a process with its own warning filters.)"""
    photo = tmp_path / "GFX100_0001.jpg"
    Image.new("L", (11648, 8736), 90).save(photo, "JPEG", quality=80)
    pixels = decode_for_model(str(photo), preprocessing_for("alexnet")).pixels
    assert tuple(pixels.shape) == (3, 224, 224)
    with pytest.raises(ImageDecodeError, match=r"image too large \(11648x8736 = 101,756,928 pixels"):
        decode_for_model(encode(Image.new("1", (11648, 8736)), "PNG"), preprocessing_for("alexnet"))


def test_a_path_decodes_like_its_bytes_and_is_read_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    data = encode(two_colour((300, 200)), "PNG")
    path.write_bytes(data)
    reads: list[int] = []
    real_open = images.open_regular

    class Recording:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(images, "open_regular", lambda p: Recording(real_open(p)))
    monkeypatch.setattr(images, "READ_CHUNK", 1024)
    from_path = decode_for_model(path, preprocessing_for("alexnet"))
    from_str = decode_for_model(str(path), preprocessing_for("alexnet"))
    from_bytes = decode_for_model(data, preprocessing_for("alexnet"))

    assert from_path.sha256 == from_str.sha256 == from_bytes.sha256 == hashlib.sha256(data).hexdigest()
    assert np.array_equal(from_path.pixels, from_bytes.pixels)
    assert (from_path.width, from_path.height) == (300, 200)
    assert reads and all(n is not None and 0 < n <= 1 << 16 for n in reads), reads   # never read() the whole file


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: tmp / "missing.jpg", "cannot read file"),
    (lambda tmp: tmp, "cannot read file"),                                  # a folder
    (lambda tmp: (tmp / "empty.jpg").write_bytes(b"") or tmp / "empty.jpg", "empty file"),   # write_bytes: 0
])
def test_unreadable_paths_raise_a_decode_error(tmp_path, make, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_for_model(make(tmp_path), preprocessing_for("alexnet"))


@pytest.mark.parametrize("size", [(2, 40_000_000), (64, 64 * (MAX_ASPECT_RATIO + 1)), (3000, 20)])
def test_long_thin_images_are_refused_before_decoding(size):
    data = encode(Image.new("L", size), "PNG")
    with pytest.raises(ImageDecodeError, match="long and thin"):
        decode_for_model(data, preprocessing_for("alexnet"))


def test_a_panorama_within_the_aspect_limit_decodes():
    decoded = decode_for_model(encode(Image.new("RGB", (2000, 40), (0, 90, 0)), "PNG"), preprocessing_for("alexnet"))
    assert decoded.pixels.shape == (3, 224, 224) and tuple(decoded.pixels[:, 100, 100]) == (0, 90, 0)


def test_decoded_pixels_are_limited_after_draft_reduction():
    photo = encode(Image.new("RGB", (4000, 3000), (90, 140, 200)), "JPEG")   # drafted to 500x375
    png = encode(Image.new("RGB", (1100, 1000), (90, 140, 200)), "PNG")      # no draft for PNG
    assert decode_for_model(photo, preprocessing_for("alexnet"), max_decoded_pixels=1_000_000).width == 4000
    with pytest.raises(ImageDecodeError, match="too large to decode"):
        decode_for_model(png, preprocessing_for("alexnet"), max_decoded_pixels=1_000_000)


@pytest.mark.parametrize("mode, values, expected", [
    ("I", (-5000, 15000), (0, 255)),                      # 32-bit int: the actual range is stretched
    ("F", (0.25, 0.75), (0, 255)),
])
def test_32bit_images_stretch_their_range(mode, values, expected):
    img = Image.new(mode, (40, 40), values[0])
    img.paste(values[1], (20, 0, 40, 40))
    rgb = open_rgb(encode(img, "TIFF"))
    assert rgb.mode == "RGB"
    assert tuple(np.asarray(rgb)[20, 5]) == (expected[0],) * 3 and tuple(np.asarray(rgb)[20, 35]) == (expected[1],) * 3


def test_a_float_image_with_nan_stretches_its_finite_values():
    img = Image.new("F", (60, 40), float("nan"))
    img.paste(0.25, (20, 0, 40, 40))
    img.paste(0.75, (40, 0, 60, 40))
    row = np.asarray(open_rgb(encode(img, "TIFF")))[20, :, 0]
    assert (row[5], row[30], row[55]) == (0, 0, 255)      # NaN counts as the lowest value


@pytest.mark.parametrize("mode, value", [("I;16", 40000), ("I", 70000), ("F", 0.5)])
def test_high_bit_depth_images_are_reduced_before_any_float_copy(mode, value):
    img = Image.new(mode, (2000, 1500), value)
    img.paste(0 if mode != "F" else 0.0, (0, 0, 1000, 1500))
    data = encode(img, "PNG" if mode == "I;16" else "TIFF")
    tracemalloc.start()
    try:
        decoded = decode_for_model(data, preprocessing_for("alexnet"), preview_size=480)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak:,} bytes traced: a full-size float64 copy is 24 MB"   # numpy is traced
    assert decoded.preview.size == (480, 360)


def test_alpha_is_composited_over_white_after_reduction():
    img = Image.new("RGBA", (1200, 900), (10, 200, 30, 0))
    img.paste((10, 200, 30, 255), (600, 0, 1200, 900))
    thumb = thumbnail_rgb(encode(img, "PNG"), 120)
    assert thumb.size == (120, 90) and thumb.mode == "RGB"
    assert tuple(np.asarray(thumb)[45, 10]) == (255, 255, 255)
    assert np.allclose(np.asarray(thumb)[45, 110], (10, 200, 30), atol=2)


def test_exif_orientation_is_applied_to_crops_thumbnails_and_previews():
    img = two_colour((400, 200))
    exif = Image.Exif()
    exif[0x0112] = 8   # stored sideways: rotate 90 degrees counter-clockwise to display
    data = encode(img, "PNG", exif=exif.tobytes())
    decoded = decode_for_model(data, preprocessing_for("alexnet"), preview_size=100)
    thumb = thumbnail_rgb(data, 100)
    assert (decoded.width, decoded.height) == (200, 400) and thumb.size == decoded.preview.size == (50, 100)
    assert np.asarray(thumb)[90, 25][0] > 200             # the red (left) half is now at the bottom
    assert decoded.pixels[0, 220, 112] > 200 and decoded.pixels[2, 5, 112] > 200


@pytest.mark.parametrize("exc, reason", [
    (RuntimeError("plugin exploded"), r"RuntimeError: plugin exploded"),
    (OverflowError("signed integer is greater than maximum"), r"OverflowError"),
    (MemoryError(), "memory"),
    (OSError("broken data stream"), "broken data stream"),
])
def test_any_failure_while_decoding_is_a_decode_error_with_a_reason(monkeypatch, exc, reason):
    def fail(self, *args, **kwargs):
        raise exc
    monkeypatch.setattr(Image.Image, "resize", fail)
    data = encode(two_colour(), "PNG")
    for decode in (lambda: decode_for_model(data, preprocessing_for("alexnet")), lambda: thumbnail_rgb(data, 64)):
        with pytest.raises(ImageDecodeError, match=reason):
            decode()


def test_the_image_module_does_not_import_torch():
    code = "import sys, retrieval.images.decode, retrieval.images.decode_pool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# --- preprocessing ------------------------------------------------------------------------------------

# The preprocessing text indexes have recorded since the first one (indexer/network.py's f-string until the
# record moved into Preprocessing.to_record): AlexNet's and VGG16's ImageNet transforms, and a made-up one.
RECORDS_WRITTEN = [
    "resize=256,crop=224,mean=[0.485, 0.456, 0.406],std=[0.229, 0.224, 0.225],interpolation=bilinear",
    "resize=232,crop=200,mean=[0.5, 0.5, 0.5],std=[0.25, 0.125, 1.0],interpolation=bilinear",
]


@pytest.mark.parametrize("record", RECORDS_WRITTEN)
def test_preprocessing_records_round_trip(record):
    prep = images.Preprocessing.from_record(record)
    assert prep.to_record() == record


def test_preprocessing_record_as_written_before():
    for prep in (preprocessing_for("alexnet"), preprocessing_for("vgg16"), images.Preprocessing(232, 200)):
        p = prep   # the f-string indexer/network.py wrote
        before = (f"resize={p.resize_size},crop={p.crop_size},mean={list(p.mean)},std={list(p.std)},"
                  "interpolation=bilinear")
        assert prep.to_record() == before
        assert images.Preprocessing.from_record(before) == prep
    assert images.Preprocessing.from_record(RECORDS_WRITTEN[0]) == preprocessing_for("alexnet")


@pytest.mark.parametrize("text", ["", "resize=256,crop=224", "resize=256,crop=224,mean=[0.5, 0.5],std=[1.0, 1.0, 1.0],"
                                  "interpolation=bilinear", "resize=x,crop=224,mean=[1.0, 1.0, 1.0],std=[1.0, 1.0, 1.0],"
                                  "interpolation=bilinear", RECORDS_WRITTEN[0] + ",extra=1"])
def test_preprocessing_record_refuses_other_text(text):
    with pytest.raises(ValueError):
        images.Preprocessing.from_record(text)


def test_preprocessing_matches_the_weights_own_transforms():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    prep = preprocessing_for("alexnet")

    ours = prep.normalise(torch.from_numpy(prep.crop(img)).unsqueeze(0))[0]
    theirs = AlexNet_Weights.IMAGENET1K_V1.transforms()(img)

    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_heic_or_jpeg_xl_photo_is_named_with_what_to_do():
    """Reproduces: an iPhone's HEIC photo uploaded (or given to search-images) was "not an image, or in a format this
    program cannot read", which reads as a damaged file; the indexer already named such formats. The format is
    named now, with the way to JPEG; anything else unreadable is said as before."""
    from retrieval.images.decode import Preprocessing

    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
    jxl = b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(200)
    from retrieval.images.decode import photo_format

    assert photo_format(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf") == "AVIF"   # HEIF's generic brand first
    for data, said in ((heic, "a HEIC photo, a format this program cannot read: convert it to JPEG (an iPhone"),
                       (jxl, "a JPEG XL photo, a format this program cannot read: convert it to JPEG"),
                       (b"plain text, not a photo" * 4, "not an image, or in a format this program cannot read")):
        with pytest.raises(ImageDecodeError) as raised:
            decode_for_model(data, Preprocessing())
        assert str(raised.value).startswith(said), str(raised.value)
