"""Synthetic pictures, drawn with Pillow: labelled collections (for the demo, the tests and the benchmarks), and
files made to test the decoder's limits (for the tests and benchmarks of hostile uploads)."""
from __future__ import annotations

import io
import random
import struct
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# class name -> (shape, foreground colour, background colour, texture)
SAMPLE_CLASSES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int], str]] = {
    "red_circles": ("circle", (215, 40, 40), (245, 235, 220), "plain"),
    "blue_squares": ("square", (40, 70, 200), (230, 235, 245), "plain"),
    "green_stripes": ("stripes", (30, 150, 60), (235, 245, 230), "stripes"),
    "orange_triangles": ("triangle", (240, 140, 20), (40, 40, 60), "plain"),
    "purple_checks": ("checks", (120, 40, 160), (240, 230, 245), "checks"),
}


def draw_shape(d: ImageDraw.ImageDraw, shape: str, size: tuple[int, int], fg: tuple[int, int, int], rng: random.Random,
               *, radius: tuple[float, float], stripe: tuple[float, float], check: tuple[float, float],
               min_step: int) -> None:
    """Draw one shape in fg: a circle, square or triangle of a radius (a fraction of the shorter side, drawn from
    `radius`) near the middle, or diagonal stripes or checks over the whole picture (their step drawn likewise)."""
    w, h = size
    s = min(w, h)
    r = int(s * rng.uniform(*radius))
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "stripes":
        step = max(min_step, int(s * rng.uniform(*stripe)))
        for x in range(-h, w, 2 * step):
            d.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=fg)
    elif shape == "checks":
        step = max(min_step, int(s * rng.uniform(*check)))
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)


def draw_sample(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One picture of a class: its shape, colours and texture, with jittered position, scale and shade."""
    shape, fg, bg, _texture = SAMPLE_CLASSES[kind]
    w, h = size
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in c)  # noqa: E731
    img = Image.new("RGB", size, jitter(bg))
    d = ImageDraw.Draw(img)
    fg = jitter(fg)
    draw_shape(d, shape, size, fg, rng, radius=(0.2, 0.35), stripe=(0.05, 0.09), check=(0.08, 0.14), min_step=4)
    # a little noise so no two pictures are identical
    for _ in range(20):
        x, y = rng.randrange(w), rng.randrange(h)
        d.point((x, y), fill=jitter(fg))
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 1.0)))


def make_sample_collection(folder: Path, per_class: int = 12, size: tuple[int, int] = (320, 240), seed: int = 0,
                           classes: list[str] | None = None, fmt: str = "JPEG") -> list[Path]:
    """Write folder/<class>/<class>_NNN.jpg for each class; -> the written paths."""
    rng = random.Random(seed)
    written = []
    for kind in classes or list(SAMPLE_CLASSES):
        (Path(folder) / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = Path(folder) / kind / f"{kind}_{i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
            draw_sample(kind, size, rng).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            written.append(path)
    return written


# Colour classes whose pictures vary in everything else (background colour, shape, texture, place, size): features of
# a random network group them by background as much as by class, and a network trained on them learns the colour.
COLOUR_CLASSES: dict[str, tuple[int, int, int]] = {"reds": (200, 50, 50), "greens": (50, 170, 60), "blues": (50, 70, 200)}


def draw_colour_sample(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One picture of a colour class: a shape, stripes or checks in the class's colour (jittered) on a random background."""
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    fg = tuple(max(0, min(255, v + rng.randint(-40, 40))) for v in COLOUR_CLASSES[kind])
    d = ImageDraw.Draw(img)
    shape = rng.choice(["circle", "square", "stripes", "checks"])
    draw_shape(d, shape, size, fg, rng, radius=(0.15, 0.3), stripe=(0.05, 0.1), check=(0.08, 0.15), min_step=3)
    return img


def make_colour_collection(folder: Path, per_class: int = 30, size: tuple[int, int] = (96, 96), seed: int = 0) -> list[Path]:
    """Write folder/<colour>/<colour>_NNN.png for each of COLOUR_CLASSES (for fine-tuning); -> the written paths."""
    rng = random.Random(seed)
    written = []
    for kind in COLOUR_CLASSES:
        (Path(folder) / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = Path(folder) / kind / f"{kind}_{i:03d}.png"
            draw_colour_sample(kind, size, rng).save(path)
            written.append(path)
    return written


# --- files made to test the decoder's limits ------------------------------------------------------

def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    """img saved as fmt (Pillow save options in kw), as bytes."""
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def many_scans_jpeg(width: int, height: int, scans: int) -> bytes:
    """A greyscale progressive JPEG whose picture is all grey and whose AC scan (an end-of-band run over every
    block) is repeated `scans` times: a few bytes a scan, yet every scan walks every block."""
    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    bits, n = 0, 0
    left = ((width + 7) // 8) * ((height + 7) // 8)
    while left:                                   # EOBr symbols (4-bit codes) + r extra bits: runs of <= 32767
        run = min(left, 32767)
        r = run.bit_length() - 1
        bits, n = (bits << (4 + r)) | (r << r) | (run - (1 << r)), n + 4 + r
        left -= run
    pad = -n % 8
    data = ((bits << pad) | ((1 << pad) - 1)).to_bytes((n + pad) // 8, "big").replace(b"\xff", b"\xff\x00")
    scan = segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + data   # component 1, AC table 0, Ss=1 Se=63 Ah=Al=0
    return b"".join([b"\xff\xd8", segment(0xDB, b"\x00" + bytes([1]) * 64),
                     segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),
                     segment(0xC4, b"\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(r << 4 for r in range(15))),
                     scan * scans, b"\xff\xd9"])
