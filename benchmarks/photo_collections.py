"""Photo-like JPEG collections for the benchmarks: one size each, drawn in parallel, with a photograph's file size."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"small": (500, 375), "phone": (4000, 3000)}

_GRAIN_TILES: dict[tuple[int, int, int], object] = {}   # per generating process: (w, h, grain) -> noise image


def draw_file(task: tuple[int, str, tuple[int, int], int, str]) -> int:
    """Write one unique JPEG (quality 90); -> its size in bytes. Runs in a generating process.

    task: (index, class name, (width, height), grain, path). The picture is a class sample drawn small (seeded by
    index) and enlarged, plus film grain: uniform noise of `grain` levels, which gives the file the entropy (bytes
    per pixel) of a photograph, and so its decoding cost; a smooth enlarged drawing compresses several times better
    and decodes several times faster than a photo (a 4000x3000 one here: 0.6 MB and 19 ms, against 2.9 MB and 58 ms).
    The grain is the same in every file of a size (drawing it costs more than the rest); the pictures differ.
    """
    import numpy as np
    from PIL import Image, ImageChops

    from retrieval.samples import draw_sample

    index, kind, (w, h), grain, path = task
    rng = random.Random(index)
    factor = max(2, -(-w // 200))                       # draw at most 200 wide: blurring is most of a small file's cost
    img = draw_sample(kind, (max(8, w // factor), max(8, h // factor)), rng)
    if grain:
        img = img.point([v * (255 - grain) // 255 for v in range(256)] * 3)   # room for the grain: no wrap-around
    img = img.resize((w, h), Image.NEAREST)
    if grain:
        key = (w, h, grain)
        if key not in _GRAIN_TILES:
            _GRAIN_TILES[key] = Image.fromarray(np.random.default_rng(12345).integers(0, grain + 1, (h, w, 3), np.uint8))
        img = ImageChops.add_modulo(img, _GRAIN_TILES[key])
    img.save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_size_collection(folder: Path, size: str, n: int, unique: int, grain: int, processes: int) -> dict:
    """n JPEGs of one size in class folders, drawn in `processes` forked processes; -> how it was made.

    unique: how many distinct files to draw (0 or >= n: all); the others are hard links to them (copies where
    links fail), which decode at the same cost. Reused when the folder holds a collection made with the same
    parameters."""
    from retrieval.samples import SAMPLE_CLASSES

    params = {"size": list(SIZES[size]), "images": n, "unique": min(unique, n) if unique else n, "grain": grain}
    marker = folder / ".complete.json"
    if marker.exists():
        stats = json.loads(marker.read_text())
        if stats.get("params") == params:
            return {**stats, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    classes = list(SAMPLE_CLASSES)
    for kind in classes:
        (folder / kind).mkdir(parents=True)
    unique = params["unique"]
    path_of = lambda i: folder / classes[i % len(classes)] / f"{classes[i % len(classes)]}_{i:06d}.jpg"  # noqa: E731
    tasks = [(i, classes[i % len(classes)], SIZES[size], grain, str(path_of(i))) for i in range(unique)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        sizes = list(pool.imap_unordered(draw_file, tasks, chunksize=max(1, min(64, unique // (processes * 8)))))
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    linked = copied = 0
    for i in range(unique, n):
        source = path_of(i % unique)
        target = source.parent / f"{source.stem}_dup{i:06d}.jpg"      # same class folder as its source
        try:
            os.link(source, target)
            linked += 1
        except OSError:
            shutil.copyfile(source, target)
            copied += 1
    stats = {
        "params": params, "files": n, "unique_files": unique, "hard_links": linked, "copies": copied,
        "grain_levels": grain, "jpeg_quality": 90, "mean_file_bytes": round(statistics.fmean(sizes)),
        "processes": processes, "generation_s": round(generation_s, 2), "link_s": round(time.perf_counter() - started, 2),
        # one core's time per drawn file, were the processes all busy all along (an upper bound)
        "core_ms_per_unique_file": round(generation_s * processes * 1000 / unique, 1),
    }
    marker.write_text(json.dumps(stats))
    return {**stats, "reused": False}


def link_subset(source: Path, folder: Path, n: int) -> Path:
    """folder/<class>/... hard links to the first n image files of source (in scan order); -> folder."""
    from retrieval.images.scan import scan_folder

    shutil.rmtree(folder, ignore_errors=True)
    for f in scan_folder(source).images[:n]:
        target = folder / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / f.path, target)
        except OSError:
            shutil.copyfile(source / f.path, target)
    return folder
