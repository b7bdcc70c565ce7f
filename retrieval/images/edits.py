"""The edits a copy of a photo typically goes through: the label-free quality measure (evaluate-index --copies)
and the quality benchmarks make edited copies with these, so a copy search is scored on the same edits everywhere."""
from __future__ import annotations

import io
import random
from typing import Callable

from PIL import Image, ImageEnhance, ImageFilter, ImageOps


def _crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A crop keeping 70-85% of each side, at a random place."""
    w, h = img.size
    f = rng.uniform(0.70, 0.85)
    cw, ch = max(1, int(w * f)), max(1, int(h * f))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def _jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    """Saved again as a JPEG of quality 30."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=30)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _downscale(img: Image.Image, rng: random.Random) -> Image.Image:
    """A third of the size (at least 32 pixels a side)."""
    w, h = img.size
    return img.resize((max(32, w // 3), max(32, h // 3)), Image.BILINEAR)


EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop": _crop,
    "flip": lambda img, rng: ImageOps.mirror(img),
    "jpeg30": _jpeg,
    "brightness": lambda img, rng: ImageEnhance.Brightness(img).enhance(rng.choice((0.6, 1.4))),
    "downscale": _downscale,
    "rotate7": lambda img, rng: img.rotate(rng.choice((-7, 7)), resample=Image.BILINEAR, expand=False),
    "greyscale": lambda img, rng: ImageOps.grayscale(img).convert("RGB"),
    "blur": lambda img, rng: img.filter(ImageFilter.GaussianBlur(2)),
}


def edited_copies(img: Image.Image, seed: int, edits: list[str] | None = None) -> dict[str, Image.Image]:
    """{edit name: edited RGB copy} of img, one per edit (all of EDITS unless named); seeded, so the same image and
    seed give the same copies."""
    rgb = img.convert("RGB")
    names = list(EDITS) if edits is None else edits
    unknown = [n for n in names if n not in EDITS]
    if unknown:
        raise ValueError(f"unknown edit {unknown[0]!r}: choose from {', '.join(EDITS)}")
    return {name: EDITS[name](rgb, random.Random(f"{seed}:{name}")).convert("RGB") for name in names}
