"""Image files: finding them in a folder, decoding them safely to RGB, and cropping to the network input."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)


# Pillow's own bomb limit (about 89 megapixels); larger images are refused, not decoded.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# What Pillow raises on malformed files: unidentified/truncated (OSError), bad headers (SyntaxError,
# ValueError, struct.error), short reads (EOFError), odd plugins (IndexError, TypeError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
                 Image.DecompressionBombError)


class ImageDecodeError(ValueError):
    """A file that is not a decodable image; the message is the reason shown to the user."""


def open_rgb(data: bytes, *, min_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image.

    min_side: when set, JPEGs are decoded at the largest reduced scale (draft mode) whose sides are
    all still >= min_side, so a 12-megapixel photo costs a fraction of a full decode.
    Raises ImageDecodeError with a human-readable reason for anything that is not a usable image.
    """
    return _decode(data, min_side, max_pixels)[0]


def _decode(data: bytes, min_side: int | None, max_pixels: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """-> (upright RGB image, upright (width, height) of the full-size original)."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image too large ({width}x{height} = {width * height:,} pixels, limit {max_pixels:,}): "
                "refused as a possible decompression bomb")
        if min_side is not None and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        upright = ImageOps.exif_transpose(img)
        if upright.size != img.size:  # turned by 90 degrees
            width, height = height, width
        return _to_rgb(upright), (width, height)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image Pillow can identify") from exc
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale, palette, alpha, CMYK, 16-bit and float images -> 8-bit RGB (alpha over white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:  # 32-bit int or float: stretch the actual range
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, and normalise: the weights' own transform settings."""
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def crop(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor, shape=(3, crop, crop). Normalisation happens on the device."""
        w, h = img.size
        scale = self.resize_size / min(w, h)
        # Same size rule as torchvision's resize(int): the shorter side becomes resize_size.
        new_w, new_h = (self.resize_size, int(self.resize_size * h / w)) if w <= h else (int(self.resize_size * w / h), self.resize_size)
        if scale != 1.0:
            img = img.resize((new_w, new_h), Image.BILINEAR)
        c = self.crop_size
        left = int(round((new_w - c) / 2.0))
        top = int(round((new_h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
        arr = np.asarray(img, dtype=np.uint8)                     # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)      # (3, H, W)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 normalised (B, 3, H, W), on batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    pixels: torch.Tensor   # uint8, shape=(3, crop, crop)
    width: int             # upright size of the original image
    height: int
    sha256: str


def decode_for_model(data: bytes, prep: Preprocessing, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Image bytes -> network-ready uint8 crop plus the facts the catalog keeps. Raises ImageDecodeError."""
    img, (width, height) = _decode(data, prep.resize_size, max_pixels)
    return DecodedImage(prep.crop(img), width, height, hashlib.sha256(data).hexdigest())
