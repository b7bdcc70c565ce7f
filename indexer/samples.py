"""Synthetic labelled picture collections (for the demo, the tests and the benchmarks), drawn with Pillow."""
from __future__ import annotations

import random
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


def draw_sample(kind: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One picture of a class: its shape, colours and texture, with jittered position, scale and shade."""
    shape, fg, bg, _texture = SAMPLE_CLASSES[kind]
    w, h = size
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in c)  # noqa: E731
    img = Image.new("RGB", size, jitter(bg))
    d = ImageDraw.Draw(img)
    fg = jitter(fg)
    s = min(w, h)
    r = int(s * rng.uniform(0.2, 0.35))
    cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "stripes":
        step = max(4, int(s * rng.uniform(0.05, 0.09)))
        for x in range(-h, w, 2 * step):
            d.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=fg)
    elif shape == "checks":
        step = max(4, int(s * rng.uniform(0.08, 0.14)))
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
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
