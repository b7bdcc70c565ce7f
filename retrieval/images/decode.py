"""Image files: decoding them safely (bounded pixels, shape and scans) to upright 8-bit RGB, and cropping to the network input."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image

from retrieval.files import open_regular
from retrieval.images.modes import resizable
from retrieval.images.preprocessing import REGION_SCALE, Preprocessing, region_boxes
from retrieval.images.scan import unreadable

log = logging.getLogger(__name__)


# Pillow's own bomb limit (about 89 megapixels); larger images are refused, not decoded (a JPEG: when more than this
# would be decoded at the reduced scale the network needs; see _load).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Pillow warns of images over its limit as it opens them: these limits are checked here, and the warning would only
# reach a user's terminal as a traceback-like line (index-images, fine-tune) for a 100-megapixel camera's JPEG
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Longest side / shortest side. A 64 x 1,114,160 strip is within the pixel limit, but resizing its short side to
# the network's 256 px would make a 256 x 4,456,640 image (gigabytes); real panoramas stay well under 1:100.
MAX_ASPECT_RATIO = 100

# Start-of-scan markers a JPEG may hold. Ordinary progressive JPEGs have about 10 scans; a file that repeats
# empty scans hundreds of times costs seconds of CPU per hundred at tens of megapixels, draft mode or not.
MAX_JPEG_SCANS = 100

# What Pillow raises on malformed files: unidentified/truncated (OSError), bad headers (SyntaxError,
# ValueError, struct.error), short reads (EOFError), odd plugins (IndexError, TypeError). Decoding catches
# every Exception (see decode_error); this tuple is for callers that only open or identify a file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
                 Image.DecompressionBombError)

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]   # image bytes, or a file path

# The formats read, and the only Pillow plugins any file or upload is handed to (a phone's multi-picture JPEG opens
# as JPEG, its format then "MPO"). Pillow's other readers are never reached: EPS runs Ghostscript on the file, and
# the dozen others (PCX, SGI, DDS, ...) are parsers an anonymous upload has no business reaching.
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

READ_CHUNK = 1 << 20        # a file is hashed (and its scans counted) this many bytes at a time
_SOS = b"\xff\xda"          # JPEG start-of-scan marker (entropy-coded data never holds 0xFF 0xDA: 0xFF is stuffed)

# EXIF orientation -> the transpose that turns the stored image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SIDEWAYS = (5, 6, 7, 8)    # orientations that swap width and height



class ImageDecodeError(ValueError):
    """A file that is not a decodable image; the message is the reason shown to the user."""


def decode_error(exc: BaseException) -> ImageDecodeError:
    """Any failure to read or decode one file -> an ImageDecodeError with a reason a person can read."""
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):   # Pillow's own check, at twice its limit: said as check_header says it
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size.group(1)):,} pixels, " if size else ""
        return ImageDecodeError(f"image too large ({pixels}limit {DEFAULT_MAX_PIXELS:,}): refused as a possible "
                                "decompression bomb")
    if isinstance(exc, Image.UnidentifiedImageError):
        return ImageDecodeError("not an image, or in a format this program cannot read (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    if isinstance(exc, MemoryError):
        return ImageDecodeError("too large to decode within the memory allowed")
    if isinstance(exc, DECODE_ERRORS):
        return ImageDecodeError(f"cannot decode image: {exc}")
    return ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})")


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray     # uint8, shape=(3, crop, crop); torch.from_numpy(pixels) where a tensor is needed
    width: int             # upright size of the original image
    height: int
    sha256: str            # of the file's bytes
    preview: Image.Image | None = None   # upright RGB, long side <= preview_size, when asked for
    regions: np.ndarray | None = None    # uint8, shape=(prep.regions, 3, crop, crop): the regions' crops (prep.regions)


def decode_for_model(source: ImageSource, prep: Preprocessing, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_decoded_pixels: int | None = None, preview_size: int | None = None) -> DecodedImage:
    """Image bytes or a file path -> network-ready uint8 crop plus the facts the catalog keeps.

    A path is read through an open file (Pillow reads what it needs) and hashed in chunks; it is never
    read whole. max_pixels bounds the image's own size (as stored), max_decoded_pixels the pixels actually
    decoded (after JPEG draft reduction; None: no bound beyond max_pixels). preview_size: also make an
    upright RGB preview no larger than this on its long side, from the same decode. prep.regions: also the crops
    of the image's regions (preprocessing.region_boxes), each resized and centre-cropped as the whole image is.
    Raises ImageDecodeError, whatever went wrong with the file.
    """
    try:   # JPEGs draft-decoded for the whole image, regions or not: a query decoded alike finds it at distance 0
        with _opened(source, prep.resize_size, max_pixels, max_decoded_pixels) as loaded:
            size = prep.resized_size(*loaded.decoded_size)     # at most 256 x 25,600 (MAX_ASPECT_RATIO)
            crop = np.asarray(loaded.resized(size, Image.BILINEAR).crop(prep.crop_box(*size)), dtype=np.uint8)  # (c, c, 3)
            preview = None if preview_size is None else loaded.fitted(preview_size)
            regions = _region_crops(loaded, prep) if prep.regions else None
            return DecodedImage(np.ascontiguousarray(crop.transpose(2, 0, 1)), loaded.width, loaded.height,
                                loaded.sha256, preview, regions)
    except Exception as exc:  # noqa: BLE001 - every failure of one file is that file's decode error
        raise decode_error(exc) from exc


def _region_crops(loaded: "_Loaded", prep: Preprocessing) -> np.ndarray:
    """The regions of a decoded image, each resized and centre-cropped -> uint8 shape=(prep.regions, 3, c, c).

    The image is first brought to resize_size / REGION_SCALE on its shorter side (never enlarged: a region then has
    about resize_size pixels on its shorter side), so a large photo is cropped from a copy of a few hundred pixels a
    side, not from its full-size pixels."""
    min_side = math.ceil(prep.resize_size / REGION_SCALE)
    w, h = loaded.decoded_size
    if min(w, h) > min_side:
        w, h = (min_side, max(1, round(h * min_side / w))) if w <= h else (max(1, round(w * min_side / h)), min_side)
    upright = loaded.resized((w, h), Image.BILINEAR)
    return np.stack([prep.crop(upright.crop(box)) for box in region_boxes(w, h, prep.regions)])   # (R, 3, c, c)


@dataclasses.dataclass(frozen=True)
class JpegFacts:
    """A JPEG checked against the limits and left undecoded, for the GPU's decoder: what the catalog keeps of it,
    and how to turn it upright."""
    width: int             # upright size
    height: int
    sha256: str            # of the file's bytes
    size: int              # bytes, as hashed: the decoder checks it read the same file
    orientation: int       # EXIF orientation, 1..8

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclasses.dataclass(frozen=True)
class DeviceJpeg:
    """One JPEG of a batch left for the device (retrieval.images.device_decode): its row in the batch, its file and what
    its inspection found."""
    row: int
    path: Path          # absolute
    facts: JpegFacts


# The file names inspect_jpeg is tried on (a JPEG under another name is decoded on the CPU, as any image is):
# other files would be read and hashed twice, once to find they are not JPEGs.
DEVICE_JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe")

# What the GPU decoder is given: baseline or progressive JPEG in colour or greyscale. CMYK and YCCK JPEGs,
# and every other format, are decoded on the CPU.
DEVICE_JPEG_MODES = ("RGB", "L")


def inspect_jpeg(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> JpegFacts | None:
    """Hash a file and check its header against the same limits as decode_for_model, without decoding it.

    -> JpegFacts for a JPEG the GPU decoder takes, None for any other image (decode that one on the CPU).
    Raises ImageDecodeError for a file that no decoder should be given (too large, too thin, a scan bomb,
    unreadable, not an image)."""
    try:
        f = open_regular(path)   # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImageDecodeError(unreadable(exc)) from exc
    try:
        with f:
            sha256, size, scans = _file_facts(f)
            if size == 0:
                raise ImageDecodeError("empty file")
            f.seek(0)
            with open_image(f) as img:           # the header only
                if img.format != "JPEG" or img.mode not in DEVICE_JPEG_MODES:
                    return None
                if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
                    return None                  # decoded whole on the device: the CPU decodes it reduced instead
                check_header(img, scans, max_pixels)
                orientation = exif_orientation(img)
                width, height = img.size
    except Exception as exc:  # noqa: BLE001 - see decode_for_model
        raise decode_error(exc) from exc
    if orientation in _SIDEWAYS:
        width, height = height, width
    return JpegFacts(width, height, sha256, size, orientation)


def open_rgb(source: ImageSource, *, min_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             max_decoded_pixels: int | None = None) -> Image.Image:
    """Decode image bytes or a file to an upright 8-bit RGB image, full size (of the decode).

    min_side: when set, JPEGs are decoded at the largest reduced scale (draft mode) whose sides are
    all still >= min_side, so a 12-megapixel photo costs a fraction of a full decode.
    Raises ImageDecodeError with a human-readable reason for anything that is not a usable image.
    """
    try:
        with _opened(source, min_side, max_pixels, max_decoded_pixels) as loaded:
            return loaded.resized(loaded.decoded_size, Image.BILINEAR)
    except Exception as exc:  # noqa: BLE001 - see decode_for_model
        raise decode_error(exc) from exc


def thumbnail_rgb(source: ImageSource, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  max_decoded_pixels: int | None = None) -> Image.Image:
    """Upright 8-bit RGB no larger than size px on its long side (never enlarged), without a full-size RGB copy.
    Raises ImageDecodeError."""
    try:
        with _opened(source, size, max_pixels, max_decoded_pixels) as loaded:
            return loaded.fitted(size)
    except Exception as exc:  # noqa: BLE001 - see decode_for_model
        raise decode_error(exc) from exc


def jpeg_bytes(img: Image.Image, quality: int = 85) -> bytes:
    """RGB image -> progressive JPEG bytes (thumbnails and previews)."""
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


# --- the one decoding path ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Loaded:
    """A decoded image as stored: own mode, own orientation, possibly draft-reduced. Converted only once small."""
    img: Image.Image
    orientation: int       # EXIF orientation, 1..8
    width: int             # upright size of the full-size original
    height: int
    sha256: str

    @property
    def decoded_size(self) -> tuple[int, int]:
        """Upright size of what was decoded (smaller than width x height after JPEG draft reduction)."""
        w, h = self.img.size
        return (h, w) if self.orientation in _SIDEWAYS else (w, h)

    def fitted(self, size: int) -> Image.Image:
        """The whole image, upright RGB, long side <= size (Image.thumbnail's rounding)."""
        w, h = self.decoded_size
        if max(w, h) > size:
            scale = size / max(w, h)
            out = (max(1, round(w * scale)), max(1, round(h * scale)))
        else:
            out = (w, h)
        return self.resized(out, Image.LANCZOS, reducing_gap=2.0)

    def resized(self, size: tuple[int, int], resample: int, reducing_gap: float | None = None) -> Image.Image:
        """The whole image resized to size (upright), as upright 8-bit RGB.

        Resized in the image's own orientation and (where Pillow can) its own mode, then turned upright and
        converted: 16-bit, 32-bit and alpha images never get a full-size float or RGB copy."""
        img, finish = resizable(self.img)
        out = (size[1], size[0]) if self.orientation in _SIDEWAYS else size
        if img.mode.startswith("I;16"):   # Image.reduce has no 16-bit integer modes
            reducing_gap = None
        small = img.resize(out, resample, reducing_gap=reducing_gap) if out != img.size else img
        if self.orientation in _UPRIGHT:
            small = small.transpose(_UPRIGHT[self.orientation])
        return finish(small)


@contextmanager
def _opened(source: ImageSource, min_side: int | None, max_pixels: int | None,
            max_decoded_pixels: int | None) -> Iterator[_Loaded]:
    """Open, check the header against the limits, draft-reduce JPEGs, and load. Raises ImageDecodeError (and
    whatever Pillow raises: the public functions turn it into an ImageDecodeError)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageDecodeError("empty file")
        with _open_image(io.BytesIO(data), data[:64]) as img:
            yield _load(img, hashlib.sha256(data).hexdigest(), data.count(_SOS), min_side, max_pixels,
                        max_decoded_pixels)
        return
    try:
        f = open_regular(source)   # noqa: SIM115 - closed below, after Pillow has read what it needs
    except OSError as exc:
        raise ImageDecodeError(unreadable(exc)) from exc
    with f:
        sha256, size, scans = _file_facts(f)
        if size == 0:
            raise ImageDecodeError("empty file")
        f.seek(0)
        head = f.read(64)
        f.seek(0)
        with _open_image(f, head) as img:
            yield _load(img, sha256, scans, min_side, max_pixels, max_decoded_pixels)


def open_image(fp: BinaryIO) -> Image.Image:
    """Image.open of the formats read (READ_FORMATS) only: any other file is not identified."""
    return Image.open(fp, formats=READ_FORMATS)


def _open_image(fp: BinaryIO, head: bytes) -> Image.Image:
    """Image.open, a photo format Pillow does not read named as such (an iPhone's HEIC upload was "not an image")."""
    try:
        return open_image(fp)
    except Image.UnidentifiedImageError:
        if (name := photo_format(head)) is not None:
            hint = " (an iPhone takes JPEGs with Settings > Camera > Formats > Most Compatible)" if name == "HEIC" else ""
            raise ImageDecodeError(f"a {name} photo, a format this program cannot read: convert it to JPEG{hint}") \
                from None
        raise


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def photo_format(head: bytes) -> str | None:
    """The name of a photo format Pillow does not read, from a file's first bytes: "HEIC", "AVIF", "JPEG XL"; None
    for anything else."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis") or (brand in (b"mif1", b"msf1") and b"avif" in head[16:]):
            return "AVIF"   # (mif1 and msf1 are HEIF's generic brands: an AVIF file may give one first)
        if brand in _HEIF_BRANDS:
            return "HEIC"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    return None


def _file_facts(f: BinaryIO) -> tuple[str, int, int]:
    """-> (sha256 hex, size in bytes, JPEG start-of-scan markers), reading f in READ_CHUNK pieces."""
    digest, size, scans, tail = hashlib.sha256(), 0, 0, b""
    while chunk := f.read(READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        scans += (tail + chunk[:1]).count(_SOS) + chunk.count(_SOS)   # + a marker split between two chunks
        tail = chunk[-1:]
    return digest.hexdigest(), size, scans


def check_header(img: Image.Image, scans: int, max_pixels: int | None) -> None:
    """The limits an opened (not yet loaded) image must pass before anything decodes it. Raises ImageDecodeError."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large ({width}x{height} = {width * height:,} pixels, limit {max_pixels:,}): "
            "refused as a possible decompression bomb")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(f"image too long and thin ({width}x{height}; at most 1:{MAX_ASPECT_RATIO} is accepted)")
    if img.format in ("JPEG", "MPO") and scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(f"JPEG with {scans:,} scans (at most {MAX_JPEG_SCANS} are decoded): "
                               "refused as a possible decoding bomb")


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1..8 (1, upright as stored, when absent or invalid)."""
    orientation = img.getexif().get(0x0112, 1)
    return orientation if isinstance(orientation, int) and orientation in _UPRIGHT else 1


def _load(img: Image.Image, sha256: str, scans: int, min_side: int | None, max_pixels: int | None,
          max_decoded_pixels: int | None) -> _Loaded:
    # a JPEG read at a reduced size (draft mode) decodes a fraction of its pixels: a 100-megapixel camera's photo
    # decodes to 1.6 at 1/8 scale, so max_pixels bounds what is decoded, not the size declared
    draft = min_side is not None and img.format in ("JPEG", "MPO")
    check_header(img, scans, None if draft else max_pixels)
    width, height = img.size
    if draft:
        img.draft("RGB", (min_side, min_side))
    w, h = img.size
    if draft and max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(f"image too large ({width}x{height}, {w}x{h} = {w * h:,} pixels even when decoded at a "
                               f"reduced scale, limit {max_pixels:,}): refused as a possible decompression bomb")
    if max_decoded_pixels is not None and w * h > max_decoded_pixels:
        raise ImageDecodeError(f"image too large to decode here ({w}x{h} = {w * h:,} pixels to decode, "
                               f"limit {max_decoded_pixels:,}): downscale it, or send it as a JPEG (decoded "
                               "straight to a fraction of its size)")
    img.load()
    orientation = exif_orientation(img)
    if orientation in _SIDEWAYS:
        width, height = height, width
    return _Loaded(img, orientation, width, height, sha256)
