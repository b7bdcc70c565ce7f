"""Any Pillow mode to 8-bit RGB, after resizing: what decode.py turns a decoded image into (greyscale, palette, alpha,
16- and 32-bit, CMYK and other colour spaces)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

_ALPHA = ("RGBA", "LA", "RGBa", "La")


def resizable(img: Image.Image):  # noqa: ANN202 - (Image, finish: small Image -> RGB Image)
    """-> (an image Pillow resizes well, the conversion of its resized copy to 8-bit RGB).

    Greyscale, RGB, alpha, 16-bit and 32-bit images are resized as they are (Pillow resizes alpha images
    premultiplied, so compositing over white after resizing is the same as before); bilevel, palette,
    CMYK and other colour spaces become L, RGB or RGBA first (at most 4 bytes a pixel)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img, _rgb
    if mode in _ALPHA:
        return img, _over_white
    if mode.startswith("I;16"):
        return img, _scaled_16bit
    if mode in ("I", "F"):
        lo, hi = img.getextrema()
        if not (math.isfinite(lo) and math.isfinite(hi)):   # NaN or inf in a float image: range of the finite values
            lo, hi = _finite_range(img)
        return img, lambda small: _stretched(small, lo, hi)
    if mode == "1":
        return img.convert("L"), _rgb
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if alpha else "RGB"), _over_white if alpha else _rgb
    return img.convert("RGB"), _rgb   # CMYK, YCbCr, LAB, HSV, ...


def _rgb(small: Image.Image) -> Image.Image:
    return small if small.mode == "RGB" else small.convert("RGB")


def _over_white(small: Image.Image) -> Image.Image:
    rgba = small.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_16bit(small: Image.Image) -> Image.Image:
    arr = np.asarray(small).astype(np.float32) / 257.0                       # 65535 -> 255
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _stretched(small: Image.Image, lo: float, hi: float) -> Image.Image:
    """32-bit int or float: the full image's actual range [lo, hi] -> 0..255."""
    arr = np.nan_to_num(np.asarray(small, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)   # small: crop or preview
    arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _finite_range(img: Image.Image, rows: int = 256) -> tuple[float, float]:
    """(min, max) of the finite values of a float image, a strip of rows at a time; (0, 0) when none."""
    lo, hi = math.inf, -math.inf
    for top in range(0, img.height, rows):
        strip = np.asarray(img.crop((0, top, img.width, min(img.height, top + rows))))
        finite = strip[np.isfinite(strip)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)
