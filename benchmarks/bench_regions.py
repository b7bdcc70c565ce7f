"""Experiment: would regional database vectors find cropped copies? (Issue 18's last gap: crops.)

Not a feature yet: an offline computation over the quality benchmark's copy sets (benchmarks/quality_sets.py), with
the recommended descriptor (`--views flip --input-norm image`). Each database image also gets the vectors of five
regions (its four corners and its centre, each keeping SCALE of each side, through the same network, views and
normalisation); a query's score for an image is its best over the image's vectors. Whitening (64 dimensions, as
`--whiten-dim auto` gives for these 361 images) is learned on the whole-image vectors only. Compared in the same run:
the whole-image vectors alone (the product today) and the regions averaged into one vector per image.

    python benchmarks/bench_regions.py --seeds 0 1 2      # seed 0 chose SCALE; 1 and 2 are held out

Prints a table and saves JSON under benchmarks/results/ (or --out FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality_sets import copy_set, descriptor_tag  # noqa: E402 - after the path is set

RESULTS = ROOT / "benchmarks" / "results"
OPTIONS = {"views": "flip", "input_norm": "image"}
SCALES = (0.8, 0.65)     # seed 0: 0.8 took crop recall@1 from 0.67 to 0.89, 0.65 to 0.56-0.61
WHITEN_DIM = 64


def region_boxes(width: int, height: int, scale: float) -> list[tuple[int, int, int, int]]:
    """The four corners and the centre, each scale x width by scale x height."""
    w, h = int(width * scale), int(height * scale)
    corners = [(0, 0), (width - w, 0), (0, height - h), (width - w, height - h), ((width - w) // 2, (height - h) // 2)]
    return [(x, y, x + w, y + h) for x, y in corners]


def region_vectors(work: Path, seed: int, scale: float) -> np.ndarray:
    """(n images, 5, d): the regions' vectors of the copy set's database images, in the catalog's id order; cached."""
    from PIL import Image

    import retrieval

    tag = descriptor_tag(OPTIONS)
    cache = work / f"regions-{seed}{tag}-{scale}.npy"
    if cache.exists():
        return np.load(cache)
    data_dir = work / f"copies-{seed}-data"
    with retrieval.open_index(work / f"copies-{seed}{tag}-index") as index:
        catalog = index._index.snapshot().catalog
        ids = np.concatenate([i for i, _ in catalog.vectors()])
        records = catalog.get_many(ids.tolist())
        out = []
        for i in ids:
            img = Image.open(data_dir / Path(records[int(i)].path).name).convert("RGB")
            out.append(np.stack([index.features(img.crop(box)) for box in region_boxes(*img.size, scale)]))
    vectors = np.stack(out).astype(np.float32)
    np.save(cache, vectors)
    return vectors


def recall(sets: dict, vectors: np.ndarray, owner: np.ndarray, train: np.ndarray) -> dict:
    """Copy search where image owner[j] is scored by its best vector j -> recall@1/@5 and recall@1 by edit."""
    from retrieval.vectors.whitening import learn_whitening, whiten

    pca = learn_whitening(train, WHITEN_DIM)
    sims = whiten(pca, sets["queries"]) @ whiten(pca, vectors).T                        # (queries, vectors)
    best = np.full((len(sims), int(owner.max()) + 1), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owner, sims.T)                                                 # (queries, images)
    top = np.argsort(-best, axis=1)[:, :5]
    right = sets["db_original"][top] == sets["query_original"][:, None]
    edits = np.array(sets["query_edit"])
    return {"recall@1": float(right[:, 0].mean()), "recall@5": float(right.any(axis=1).mean()),
            "recall@1_by_edit": {e: float(right[edits == e, 0].mean()) for e in sorted(set(edits.tolist()))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=RESULTS / "quality-bench",
                        help="bench_quality's folder of photo sets and indexes (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for seed in args.seeds:
        sets = copy_set(args.work_dir, seed, **OPTIONS)
        db = sets["db"]
        own = np.arange(len(db))
        rows.append({"seed": seed, "setting": "whole image (today)", **recall(sets, db, own, db)})
        for scale in SCALES:
            regions = region_vectors(args.work_dir, seed, scale)                        # (n, 5, d)
            stacked = np.concatenate([db, regions.reshape(-1, regions.shape[-1])])
            owners = np.concatenate([own, np.repeat(own, regions.shape[1])])
            rows.append({"seed": seed, "setting": f"+ 5 regions at {scale}, best of 6",
                         **recall(sets, stacked, owners, db)})
            averaged = db + regions.sum(axis=1)
            averaged /= np.linalg.norm(averaged, axis=1, keepdims=True)
            rows.append({"seed": seed, "setting": f"+ 5 regions at {scale}, averaged",
                         **recall(sets, averaged, own, averaged)})
        for row in rows[-5:]:
            print(f"seed {seed} {row['setting']:<34} recall@1 {row['recall@1']:.3f} recall@5 {row['recall@5']:.3f} "
                  f"crop {row['recall@1_by_edit']['crop']:.2f}", flush=True)
    print(f"\n{'setting':<36} " + " ".join(f"seed {s:<3}" for s in args.seeds) + "  (copy recall@1)")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        print(f"{setting:<36} " + " ".join(f"{r['recall@1']:8.3f}" for r in rows if r["setting"] == setting))
    out = (args.out or RESULTS / f"bench_regions-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_regions", "seconds": round(time.time() - started, 1), "options": OPTIONS,
        "whiten_dim": WHITEN_DIM, "machine": {"cpus": len(os.sched_getaffinity(0)),
                                              "processor": platform.processor() or platform.machine()},
        "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
