"""The quality benchmark's data: a copy-search set and a labelled scene-crop set of real photos, their fc7 vectors.

Copy search: originals are random crops of the real photos (distinct crops of one photo are distinct "photos"), each
with its 8 edited copies (retrieval.images.edits); the database holds the originals among distractor crops of the same
photos; each edited copy is a query whose one right answer is its original. kNN: crop_collection's scene classes.
The vectors are made by the product: index_folder (--weights random, the default model) for the database, and the
opened index's features() for the queries. Cached per seed under the work folder (the network is seeded).
"""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORIGINALS_PER_PHOTO = 3     # 19 photos -> 57 originals, 456 edited-copy queries
DISTRACTORS_PER_PHOTO = 16  # 304 distractors
KNN_PER_CLASS = 20          # 19 classes x 20 scene crops
CROP_FRACTION = (0.3, 0.6)  # each side of a crop, as a fraction of the photo's (as real_photos.random_crops)
CROP_SIZE = (320, 240)
MAX_OVERLAP = 0.5           # of the smaller crop's area shared with an original of the same photo: distinct photos do
                            # not share most of their content (a distractor holding 80% of an original is a copy of it)


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """The share of the smaller box's area that the two boxes (x0, y0, x1, y1) have in common."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def crop_boxes(size: tuple[int, int], originals: int, distractors: int, rng: random.Random,
               tries: int = 200) -> list[tuple[int, int, int, int]]:
    """originals + distractors random crop boxes of a photo of this size, the originals first; every box shares at
    most MAX_OVERLAP with each original (the best of `tries` draws where none does)."""
    w, h = size
    boxes: list[tuple[int, int, int, int]] = []
    for n in range(originals + distractors):
        best = None
        for _ in range(tries):
            f = rng.uniform(*CROP_FRACTION)
            cw, ch = max(16, int(w * f)), max(16, int(h * f))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
            worst = max((overlap(box, o) for o in boxes[:min(n, originals)]), default=0.0)
            if best is None or worst < best[0]:
                best = (worst, box)
            if worst <= MAX_OVERLAP:
                break
        boxes.append(best[1])
    return boxes


def descriptor_tag(options: dict) -> str:
    """"" for the default descriptor, else e.g. "-views=flip-input_norm=image": the cache and index folders' suffix."""
    return "".join(f"-{k}={v}" for k, v in sorted(options.items()))


def copy_set(work: Path, seed: int, **index_options) -> dict:
    """-> {"db": (n, d) float32, "db_original": (n,) int (original number or -1 for a distractor),
    "queries": (q, d) float32, "query_original": (q,) int, "query_edit": [edit name per query], "extract_s": float}.
    index_options: index-images' descriptor options (views, input_norm, layer) for the database, which the queries
    then go through too."""
    tag = descriptor_tag(index_options)
    cache = work / f"copies-{seed}{tag}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {k: (data[k].tolist() if k == "query_edit" else data[k]) for k in data.files}
    import time

    import retrieval
    from indexer import index_folder
    from retrieval.images.edits import edited_copies

    from PIL import Image

    from benchmarks.real_photos import real_photos

    rng = random.Random(seed)
    data_dir, index_dir = work / f"copies-{seed}-data", work / f"copies-{seed}{tag}-index"
    data_dir.mkdir(parents=True, exist_ok=True)
    originals, paths = [], {}
    for name, photo in sorted(real_photos().items()):
        boxes = crop_boxes(photo.size, ORIGINALS_PER_PHOTO, DISTRACTORS_PER_PHOTO, rng)
        crops = [photo.crop(box).resize(CROP_SIZE, Image.BILINEAR) for box in boxes]
        for i, crop in enumerate(crops):
            path = data_dir / f"{name}_{i:03d}.jpg"
            if not path.exists():   # written once per seed, shared by the descriptors' indexes
                crop.save(path, "JPEG", quality=90)
            if i < ORIGINALS_PER_PHOTO:
                paths[path.name] = len(originals)
                originals.append(crop)
    started = time.perf_counter()
    index_folder(data_dir, index_dir, weights="random", **index_options)
    with retrieval.open_index(index_dir) as index:
        snapshot = index._index.snapshot()
        ids, db = [], []
        for chunk_ids, vecs in snapshot.catalog.vectors():
            ids.append(chunk_ids)
            db.append(vecs)
        ids, db = np.concatenate(ids), np.concatenate(db)
        records = snapshot.catalog.get_many(ids.tolist())
        db_original = np.array([paths.get(Path(records[int(i)].path).name, -1) for i in ids])
        queries, query_original, query_edit = [], [], []
        for number, crop in enumerate(originals):
            for edit, copy in edited_copies(crop, seed * 1000 + number).items():
                queries.append(index.features(copy))
                query_original.append(number)
                query_edit.append(edit)
    out = {"db": db, "db_original": db_original, "queries": np.stack(queries).astype(np.float32),
           "query_original": np.array(query_original), "query_edit": np.array(query_edit),
           "extract_s": np.array(time.perf_counter() - started)}
    np.savez(cache, **out)
    out["query_edit"] = list(query_edit)
    return out


def knn_set(work: Path, seed: int, **index_options) -> dict:
    """-> {"vectors": (n, d) float32, "labels": (n,) str}: crop_collection's scene crops of one seed, indexed with
    index_options (as copy_set)."""
    tag = descriptor_tag(index_options)
    cache = work / f"knn-{seed}{tag}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {k: data[k] for k in data.files}
    import retrieval
    from indexer import index_folder

    from benchmarks.real_photos import crop_collection

    data_dir, index_dir = work / f"knn-{seed}-data", work / f"knn-{seed}{tag}-index"
    if not data_dir.exists():
        crop_collection(data_dir, KNN_PER_CLASS, seed)
    index_folder(data_dir, index_dir, weights="random", **index_options)
    with retrieval.open_index(index_dir) as index:
        catalog = index._index.snapshot().catalog
        ids, vecs = zip(*catalog.vectors())
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
        records = catalog.get_many(ids.tolist())
        labels = np.array([records[int(i)].label for i in ids])
    out = {"vectors": vecs, "labels": labels}
    np.savez(cache, **out)
    return out


if __name__ == "__main__":
    work = Path(sys.argv[1])
    for s in [int(a) for a in sys.argv[2:]]:
        c = copy_set(work, s)
        print(s, c["db"].shape, c["queries"].shape, float(c["extract_s"]))
        k = knn_set(work, s)
        print(s, k["vectors"].shape)


def save_results(benchmark: str, started: float, out: Path | None, **fields) -> Path:
    """Write a quality benchmark's JSON (to out, or benchmarks/results/BENCHMARK-TIME.json): its name, start, duration,
    the machine, the network measured, then fields -> the file written."""
    out = (out or ROOT / "benchmarks" / "results" / f"{benchmark}-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": benchmark, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average": os.getloadavg()},
        "network": "alexnet fc7, --weights random (seed 0)", **fields}, indent=2))
    print(f"\nsaved {out}")
    return out
