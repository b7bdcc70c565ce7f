"""Benchmark: copy search with regional database vectors (`index-images --regions`) against the same recipe without.

The recommended recipe for copies (`--views flip --input-norm image`, whitened with auto dimensions) indexed twice
per copy set of benchmarks/quality_sets.py, in the same run: without regions, and with `--regions` (each image also
holds the vectors of its four corners and its centre, 80% of each side; a search scores each image by its nearest
vector). Both through the product: `index_folder` (index-images) builds each index, `IndexSnapshot.search_vectors`
(what the server, search-images and the Python API call) answers the copy set's 456 edited copies (their vectors made
by the same network and options, cached by quality_sets). Reported: copy recall@1/@5 (and by edit), the indexing
time (the run's seconds and its extraction loop's; ratio with regions / without), the FAISS files' bytes and the
median time of one query. Seed 0 chose the region size (0.8, in an offline version of this script); seeds 1 and 2
are held out.

    python benchmarks/bench_regions.py --seeds 0 1 2
    python benchmarks/bench_regions.py --duplicates --seeds 0 1 2   # would regions help find-duplicates?
    python benchmarks/bench_regions.py --knn --seeds 1 2             # and what do they do to kNN on classes?

--knn: bench_quality's labelled scene crops (19 classes of 20) indexed with the recipe without and with --regions;
leave-one-out kNN@10 and precision@10 through search_vectors (each image's neighbours, itself and its regions left
out), as bench_quality measures them.

--duplicates asks whether find-duplicates should use the regions: bench_duplicates' near-duplicate sets (19 originals
with their 8 edited copies among 336 distractor crops) indexed with the recipe and --regions; every pair of images
scored by the distance of its whole-image vectors (what find-duplicates compares) and by the nearest of either
image's own vector to any vector of the other (what a search with regions compares), both whitened as
find-duplicates whitens (learned on the whole-image vectors); reported: the best pair F1 any single threshold gives
on each (an upper bound on what a calibrated threshold can reach) and the average precision of the ranking.

Prints a table and saves JSON under benchmarks/results/ (or --out FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality_sets import copy_set  # noqa: E402 - after the path is set

RESULTS = ROOT / "benchmarks" / "results"
OPTIONS = {"views": "flip", "input_norm": "image"}   # the recipe for copies (docs/quality.md)
TIMED_QUERIES = 50


def indexed(work: Path, seed: int, regions: bool) -> tuple[Path, dict]:
    """The copy set's database indexed anew with the recipe, with or without regions -> (index folder, facts)."""
    from indexer import index_folder

    data_dir = work / f"copies-{seed}-data"
    index_dir = work / f"regions-bench-{seed}-{'with' if regions else 'without'}"
    shutil.rmtree(index_dir, ignore_errors=True)
    started = time.perf_counter()
    report = index_folder(data_dir, index_dir, weights="random", regions=regions, **OPTIONS)
    seconds = time.perf_counter() - started
    record = report.vector_index
    return index_dir, {"index_s": seconds, "loop_s": report.extraction["loop_seconds"], "images": report.indexed,
                       "factory": record["factory"], "faiss_bytes": record["file_bytes"],
                       "regions_bytes": (record.get("regions") or {}).get("file_bytes") or 0,
                       "precision": report.extraction["precision"]}


def searched(index_dir: Path, sets: dict) -> dict:
    """The copy set's queries searched through the product -> recall@1/@5, by edit, median ms of one query."""
    from retrieval.search.index import ImageIndex

    index = ImageIndex(index_dir, load_network=False, mmap=False)
    try:
        snapshot = index.snapshot()
        names = {Path(r.path).name: r.id for r in snapshot.catalog.list_images(limit=10**6)}
        hits = snapshot.search_vectors(sets["queries"], 5)
        times = []
        for i in range(TIMED_QUERIES):
            started = time.perf_counter()
            snapshot.search_vectors(sets["queries"][i:i + 1], 5)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        index.close()
    original = original_by_name(sets, names)
    found = np.array([[original.get(Path(h.path).name, -1) for h in row] + [-1] * (5 - len(row)) for row in hits])
    right = found == sets["query_original"][:, None]
    edits = np.array(sets["query_edit"])
    return {"recall@1": float(right[:, 0].mean()), "recall@5": float(right.any(axis=1).mean()),
            "search_ms": statistics.median(times),
            "recall@1_by_edit": {e: float(right[edits == e, 0].mean()) for e in sorted(set(edits.tolist()))}}


def original_by_name(sets: dict, names: dict[str, int]) -> dict[str, int]:
    """Database file name -> its original's number (-1: a distractor). quality_sets lists the database in the
    catalog's id order, which is the order of the file names (the indexer's walk is sorted)."""
    ordered = sorted(names, key=names.get)
    assert len(ordered) == len(sets["db_original"]), "the same database as the copy set's"
    return {name: int(o) for name, o in zip(ordered, sets["db_original"])}


def same_network(index_dir: Path, sets: dict) -> float:
    """The smallest cosine between the new index's whole-image vectors and the copy set's cached ones (the queries
    were made by that network: they must be the same one)."""
    from retrieval.catalog import Catalog

    catalog = Catalog(index_dir)
    try:
        vectors = np.concatenate([v for _, v in catalog.vectors()])
    finally:
        catalog.close()
    return float(np.min(np.sum(vectors * sets["db"], axis=1)))


def duplicate_pairs(seed: int, work: Path) -> dict:
    """bench_duplicates' set of a seed indexed with the recipe and --regions -> pair separability with and without."""
    from indexer import index_folder
    from retrieval.catalog import Catalog
    from retrieval.vectors.duplicates import DEFAULT_WHITEN_DIM
    from retrieval.vectors.whitening import learn_whitening, whiten

    from benchmarks.bench_duplicates import make_set

    data, index_dir = work / f"dupes-{seed}-data", work / f"dupes-{seed}-regions-index"
    groups_file = work / f"dupes-{seed}-groups.json"   # the true groups' file names, kept with the folder
    if not groups_file.exists():
        shutil.rmtree(data, ignore_errors=True)
        groups_file.write_text(json.dumps(make_set(data, seed)))
    truth = [set(g) for g in json.loads(groups_file.read_text())]
    if not index_dir.exists():
        index_folder(data, index_dir, weights="random", regions=True, **OPTIONS)
    catalog = Catalog(index_dir)
    try:
        ids, whole = (np.concatenate(x) for x in zip(*catalog.vectors()))
        owners, regional = (np.concatenate(x) for x in zip(*catalog.region_vectors()))
        names = [Path(catalog.get_many([int(i)])[int(i)].path).name for i in ids]
    finally:
        catalog.close()
    pca = learn_whitening(whole, DEFAULT_WHITEN_DIM)
    w, r = whiten(pca, whole), whiten(pca, regional).reshape(len(ids), -1, pca.d_out)   # (n, d), (n, R, d)
    assert np.array_equal(owners.reshape(len(ids), -1)[:, 0], ids), "regions in the catalog's id order"
    d_whole = np.sqrt(np.maximum(2 - 2 * w @ w.T, 0))                                    # (n, n)
    to_regions = np.sqrt(np.maximum(2 - 2 * np.einsum("id,jrd->ijr", w, r), 0)).min(axis=2)   # (n, n): i to j's regions
    d_regions = np.minimum(d_whole, np.minimum(to_regions, to_regions.T))
    group = {name: g for g, members in enumerate(truth) for name in members}
    same = np.array([[group.get(a, -1 - i) == group.get(b, -2 - j) for j, b in enumerate(names)]
                     for i, a in enumerate(names)])
    upper = np.triu_indices(len(names), 1)
    return {"seed": seed, "images": len(names), "true_pairs": int(same[upper].sum()),
            "whole": separability(d_whole[upper], same[upper]), "regions": separability(d_regions[upper], same[upper])}


def knn_rows(seed: int, work: Path) -> list[dict]:
    """bench_quality's kNN set of a seed indexed with the recipe, without and with --regions -> kNN@10, precision@10."""
    from indexer import index_folder
    from retrieval.catalog import Catalog

    from benchmarks.bench_quality import Setting, knn
    from benchmarks.quality_sets import KNN_PER_CLASS
    from benchmarks.real_photos import crop_collection

    data = work / f"knn-{seed}-data"
    if not data.exists():
        crop_collection(data, KNN_PER_CLASS, seed)
    rows = []
    for regions in (False, True):
        index_dir = work / f"knn-regions-bench-{seed}-{'with' if regions else 'without'}"
        shutil.rmtree(index_dir, ignore_errors=True)
        index_folder(data, index_dir, weights="random", regions=regions, **OPTIONS)
        catalog = Catalog(index_dir)
        try:
            ids, vectors = (np.concatenate(x) for x in zip(*catalog.vectors()))
            records = catalog.get_many(ids.tolist())
        finally:
            catalog.close()
        labelled = {"ids": ids, "vectors": vectors, "labels": np.array([records[int(i)].label for i in ids])}
        rows.append({"seed": seed, "regions": regions, **knn(labelled, index_dir, Setting("recipe", True))})
    return rows


def separability(distances: np.ndarray, positive: np.ndarray) -> dict:
    """Pairs ranked by distance -> the best F1 of any threshold, its threshold, and the ranking's average precision."""
    order = np.argsort(distances, kind="stable")
    hits = positive[order].astype(np.float64)
    tp = np.cumsum(hits)
    precision, recall = tp / np.arange(1, len(hits) + 1), tp / max(1.0, hits.sum())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"best_f1": float(f1[best]), "threshold": float(distances[order][best]),
            "precision": float(precision[best]), "recall": float(recall[best]),
            "average_precision": float((precision * hits).sum() / max(1.0, hits.sum()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=RESULTS / "quality-bench",
                        help="bench_quality's folder of photo sets (reused; made when missing)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--duplicates", action="store_true", help="measure the near-duplicate pairs instead")
    parser.add_argument("--knn", action="store_true", help="measure kNN on the labelled scene crops instead")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.knn:
        rows = [row for seed in args.seeds for row in knn_rows(seed, args.work_dir)]
        for row in rows:
            print(f"seed {row['seed']} {'with' if row['regions'] else 'without'} regions: kNN@10 {row['knn@10']:.3f} "
                  f"precision@10 {row['precision@10']:.3f}", flush=True)
        save(args.out, "knn", {"benchmark": "bench_regions --knn", "options": OPTIONS,
                               "seconds": round(time.time() - started, 1), "rows": rows})
        return
    if args.duplicates:
        rows = []
        for seed in args.seeds:
            rows.append(duplicate_pairs(seed, args.work_dir))
            w, r = rows[-1]["whole"], rows[-1]["regions"]
            print(f"seed {seed}: best pair F1 whole-image {w['best_f1']:.3f} (AP {w['average_precision']:.3f}), "
                  f"with regions {r['best_f1']:.3f} (AP {r['average_precision']:.3f})", flush=True)
        save(args.out, "duplicates", {"benchmark": "bench_regions --duplicates", "options": OPTIONS,
                                      "seconds": round(time.time() - started, 1), "rows": rows})
        return
    rows = []
    for seed in args.seeds:
        sets = copy_set(args.work_dir, seed, **OPTIONS)
        for regions in (False, True):
            index_dir, facts = indexed(args.work_dir, seed, regions)
            row = {"seed": seed, "regions": regions, **facts, **searched(index_dir, sets),
                   "min_cosine_to_cached": same_network(index_dir, sets)}
            rows.append(row)
            print(f"seed {seed} {'with' if regions else 'without'} regions: recall@1 {row['recall@1']:.3f} "
                  f"recall@5 {row['recall@5']:.3f} crop {row['recall@1_by_edit']['crop']:.3f} "
                  f"index {row['index_s']:.1f} s (loop {row['loop_s']:.1f} s) FAISS {row['faiss_bytes'] / 1e6:.2f} + "
                  f"{row['regions_bytes'] / 1e6:.2f} MB, {row['search_ms']:.2f} ms/query, {row['precision']}, "
                  f"cos to cached >= {row['min_cosine_to_cached']:.4f}", flush=True)
    print(f"\n{'copy recall@1':<40} " + " ".join(f"seed {s:<3}" for s in args.seeds))
    for regions in (False, True):
        name = "recipe + --regions" if regions else "recipe (--views flip --input-norm image)"
        print(f"{name:<40} " + " ".join(f"{r['recall@1']:8.3f}" for r in rows if r["regions"] == regions))
    pairs = [(a, b) for a in rows for b in rows if a["seed"] == b["seed"] and not a["regions"] and b["regions"]]
    ratio = {key: statistics.median(b[key] / a[key] for a, b in pairs)
             for key in ("index_s", "loop_s", "search_ms")}
    size = statistics.median((b["faiss_bytes"] + b["regions_bytes"]) / a["faiss_bytes"] for a, b in pairs)
    print(f"with regions / without (medians over seeds): indexing {ratio['index_s']:.2f}x (extraction loop "
          f"{ratio['loop_s']:.2f}x), FAISS bytes {size:.2f}x, one query {ratio['search_ms']:.2f}x")
    save(args.out, None, {
        "benchmark": "bench_regions", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1), "options": OPTIONS,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average": os.getloadavg()},
        "ratios": {**ratio, "faiss_bytes": size}, "rows": rows})


def save(out: Path | None, mode: str | None, result: dict) -> None:
    """Write result as JSON to out, or to benchmarks/results/bench_regions[-mode]-<time>.json; say where."""
    name = f"bench_regions{'-' + mode if mode else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = (out or RESULTS / name).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
