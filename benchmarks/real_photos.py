"""Real photographs for the quality benchmarks, offline: the photos bundled with scikit-image and scikit-learn.

Synthetic drawings (retrieval.samples) are too easy and too unlike photos to measure retrieval quality on; these
are the few real photos a machine without network has. Scenes become classes by taking random crops of them.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

# scikit-image's data folder: the colour or grey photographs (not the drawings, charts or test patterns)
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
                  "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png"]


def real_photos() -> dict[str, Image.Image]:
    """{name: RGB photo}: scikit-image's bundled photos and scikit-learn's two sample photos (china, flower)."""
    import skimage
    from sklearn.datasets import load_sample_images

    root = Path(skimage.__file__).parent / "data"
    photos = {Path(name).stem: Image.open(root / name).convert("RGB") for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for name, array in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = Image.fromarray(array).convert("RGB")
    return photos


def random_crops(photo: Image.Image, n: int, rng: random.Random, *, min_frac: float = 0.3, max_frac: float = 0.6,
                 size: tuple[int, int] = (320, 240)) -> list[Image.Image]:
    """n random crops of photo, each side a fraction in [min_frac, max_frac] of the photo's, resized to size."""
    w, h = photo.size
    crops = []
    for _ in range(n):
        f = rng.uniform(min_frac, max_frac)
        cw, ch = max(16, int(w * f)), max(16, int(h * f))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crops.append(photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR))
    return crops


def crop_collection(folder: Path, per_class: int, seed: int, **crop_options) -> dict[str, int]:
    """Write folder/<photo>/<photo>_NNN.jpg, per_class random crops of each real photo (a scene is a class);
    -> {class: count}. Train and test sets are drawn with different seeds."""
    rng = random.Random(seed)
    counts = {}
    for name, photo in sorted(real_photos().items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(random_crops(photo, per_class, rng, **crop_options)):
            crop.save(folder / name / f"{name}_{i:03d}.jpg", "JPEG", quality=90)
        counts[name] = per_class
    return counts
