"""Benchmark: training the PCA whitening (PCAW256) on fc7 vectors, FAISS's PCAMatrix.train against train_pca.

FAISS's PCAMatrix.train computes all 4,096 eigenpairs of the scatter matrix; retrieval.vectors.pca.train_pca only
the d kept. For each training size (--sizes, default 2,000 / 10,000 / 16,384: 16,384 is the most a PCA in front of
an index-images index trains on, PCA_POINTS_PER_D x 4096) both train a PCAMatrix(4096, --dim, eigen_power -0.5)
set up as index-images sets it up (max_points_per_d PCA_POINTS_PER_D), alternately, --runs times each; the table
gives the medians and their ratio. Then the two whitenings are compared with each other and each with an exact
PCA (float64 throughout, every eigenpair, numpy's eigh) on --queries held-out vectors: |cosine| of each output
component between the two (1: the same axis, up to its sign), the largest difference of a distance between
whitened, L2-normalised vectors (queries to training vectors), and whether each query's nearest and 10 nearest
training vectors are the same under both.

The vectors are the fc7 vectors (AlexNet, random weights) of an index of generated pictures
(retrieval.samples.make_sample_collection, 160 x 120), built with index-images unless --index names one: at
least max(--sizes) + --queries of them. Saves JSON under benchmarks/results/ (or --out FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.index_probes import child_env  # noqa: E402 - after the path is set

RESULTS = ROOT / "benchmarks" / "results"
IMAGE_SIZE = (160, 120)
K = 10


def build_index(work: Path, images: int) -> Path:
    """An index of `images` generated pictures under work (reused when its catalog already holds them)."""
    from retrieval.catalog import Catalog
    from retrieval.samples import SAMPLE_CLASSES, make_sample_collection

    per_class = -(-images // len(SAMPLE_CLASSES))
    data, index = work / f"data-{per_class * len(SAMPLE_CLASSES)}", work / f"index-{per_class * len(SAMPLE_CLASSES)}"
    if (index / "catalog.db").exists():
        catalog = Catalog(index)
        try:
            if catalog.count() >= images:
                return index
        finally:
            catalog.close()
    if not (data / ".complete").exists():
        print(f"making {per_class * len(SAMPLE_CLASSES)} pictures in {data} ...", file=sys.stderr)
        make_sample_collection(data, per_class=per_class, size=IMAGE_SIZE, seed=0)
        (data / ".complete").touch()
    print(f"indexing them into {index} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir",
                    str(index), "--weights", "random", "--batch-size", "64", "--json"], check=True, env=child_env(),
                   stdout=subprocess.DEVNULL)
    return index


def catalog_vectors(index: Path) -> np.ndarray:
    """Every vector of the index's catalog, shape=(N, 4096) float32, in id order."""
    from retrieval.catalog import Catalog

    catalog = Catalog(index)
    try:
        return np.concatenate([vecs for _, vecs in catalog.vectors()])
    finally:
        catalog.close()


def new_pca(d_in: int, d_out: int):  # noqa: ANN201 - faiss.PCAMatrix
    """The PCAMatrix index-images puts in front of its index: PCAW{d_out} (eigen_power -0.5), max_points_per_d as set."""
    import faiss

    from retrieval.vectors.index_types import PCA_POINTS_PER_D

    pca = faiss.PCAMatrix(d_in, d_out, -0.5)
    pca.max_points_per_d = PCA_POINTS_PER_D
    return pca


def exact_pca(train: np.ndarray, d_out: int):  # noqa: ANN201 - a function
    """The whitening an exact PCA gives: float64 throughout, the centred scatter matrix, every eigenpair (numpy's
    eigh, LAPACK's dsyevd: neither FAISS's code nor train_pca's). -> vectors (n, d_in) -> (n, d_out) float64."""
    x = train.astype(np.float64)
    mean = x.mean(axis=0)
    x -= mean
    values, vecs = np.linalg.eigh(x.T @ x)                                  # ascending
    values, vecs = values[::-1][:d_out], vecs[:, ::-1][:, :d_out]
    return lambda v: (v.astype(np.float64) - mean) @ vecs * values ** -0.5


def agreement(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    """How two whitenings differ: a and b are each (queries, training vectors) after the PCA, before normalisation.
    |cosine| of each output component over the queries (1: the same axis up to its sign), the largest difference of
    a distance between L2-normalised vectors (query to training vector), and whether each query's nearest and 10
    nearest training vectors are the same."""
    import faiss

    (qa, ta), (qb, tb) = a, b
    cos = np.abs(np.sum(qa * qb, axis=0)) / (np.linalg.norm(qa, axis=0) * np.linalg.norm(qb, axis=0))

    def distances(q: np.ndarray, t: np.ndarray) -> np.ndarray:   # (nq, nt) L2 between the normalised vectors
        q, t = (np.ascontiguousarray(v / np.linalg.norm(v, axis=1, keepdims=True), dtype=np.float32) for v in (q, t))
        return np.sqrt(np.maximum(faiss.pairwise_distances(q, t), 0))

    da, db = distances(qa, ta), distances(qb, tb)
    na, nb = np.argsort(da, axis=1)[:, :K], np.argsort(db, axis=1)[:, :K]
    return {"min_abs_cosine_per_component": round(float(cos.min()), 7),
            "median_abs_cosine_per_component": round(float(np.median(cos)), 7),
            "max_abs_distance_difference": float(np.abs(da - db).max()),
            "nearest_identical": round(float(np.mean(na[:, 0] == nb[:, 0])), 4),
            f"top{K}_lists_identical": round(float(np.mean(np.all(na == nb, axis=1))), 4),
            f"{K}-recall@{K}": round(float(np.mean([len(set(x) & set(y)) / K for x, y in zip(na, nb)])), 4)}


def compare(pcas: dict, train: np.ndarray, queries: np.ndarray, d_out: int) -> dict:
    """train_pca against FAISS, and each against the exact PCA (exact_pca)."""
    print("  the exact PCA ...", file=sys.stderr)
    exact = exact_pca(train, d_out)
    out = {name: (pca.apply(queries), pca.apply(train)) for name, pca in pcas.items()}
    out["exact"] = (exact(queries), exact(train))
    return {"train_pca_vs_faiss": agreement(out["train_pca"], out["faiss"]),
            "faiss_vs_exact": agreement(out["faiss"], out["exact"]),
            "train_pca_vs_exact": agreement(out["train_pca"], out["exact"])}


def main() -> None:
    from retrieval.vectors.pca import train_pca

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 10_000, 16_384],
                        help="comma-separated training sizes")
    parser.add_argument("--dim", type=int, default=256, help="whitened dimensions (auto's largest)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out vectors the two whitenings are compared on")
    parser.add_argument("--runs", type=int, default=3, help="timed trainings per method and size; medians reported")
    parser.add_argument("--index", type=Path, default=None,
                        help="an index folder whose catalog vectors to use [default: build one of generated pictures "
                             "under benchmarks/results/whitening-bench]")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file [default: benchmarks/results/bench_whitening-TIME.json]")
    args = parser.parse_args()

    import faiss
    import scipy

    from benchmarks.bench_query import cpu_model

    need = max(args.sizes) + args.queries
    index = args.index or build_index(RESULTS / "whitening-bench", need)
    vectors = catalog_vectors(index)
    assert len(vectors) >= need, f"{index} holds {len(vectors)} vectors; {need} are needed"
    order = np.random.default_rng(0).permutation(len(vectors))
    queries = vectors[order[:args.queries]]
    load = {"before": os.getloadavg()}
    rows = []
    for n in args.sizes:
        train = np.ascontiguousarray(vectors[order[args.queries:args.queries + n]])
        seconds: dict[str, list[float]] = {"faiss": [], "train_pca": []}
        pcas = {}
        for run in range(args.runs):
            for method in ("faiss", "train_pca") if run % 2 == 0 else ("train_pca", "faiss"):
                pca = new_pca(train.shape[1], args.dim)
                started = time.perf_counter()
                pca.train(train) if method == "faiss" else train_pca(pca, train)
                seconds[method].append(time.perf_counter() - started)
                pcas[method] = pca
                print(f"n={n} {method}: {seconds[method][-1]:.2f} s", file=sys.stderr)
        medians = {m: statistics.median(s) for m, s in seconds.items()}
        rows.append({"n": n, "seconds": {m: [round(x, 3) for x in s] for m, s in seconds.items()},
                     "median_s": {m: round(v, 3) for m, v in medians.items()},
                     "speedup": round(medians["faiss"] / medians["train_pca"], 2),
                     "agreement": compare(pcas, train, queries, args.dim)})
    load["after"] = os.getloadavg()
    report = {"benchmark": "bench_whitening", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": cpu_model(), "load_average": load,
                          "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
                          "scipy": scipy.__version__},
              "settings": {"vectors": f"fc7 of {index} (AlexNet, random weights)", "available": int(len(vectors)),
                           "dim_in": int(vectors.shape[1]), "dim_out": args.dim, "queries": args.queries,
                           "runs": args.runs, "sizes": args.sizes},
              "results": rows}
    out = (args.out or RESULTS / f"bench_whitening-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\nTraining PCAW{args.dim} on {vectors.shape[1]}-d fc7 vectors (medians of {args.runs}; "
          f"{report['machine']['cpus']} cores, {report['machine']['processor']}; load {load['before'][0]:.1f} -> "
          f"{load['after'][0]:.1f})")
    print(f"| n | FAISS train s | train_pca s | speed-up | compared | min \\|cos\\| per component "
          f"| max \\|Δ distance\\| | nearest identical | top-{K} identical |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        for i, (pair, a) in enumerate(r["agreement"].items()):
            timing = (f"| {r['n']:,} | {r['median_s']['faiss']:.2f} | {r['median_s']['train_pca']:.2f} "
                      f"| {r['speedup']:.1f}x ") if i == 0 else "| | | | "
            print(f"{timing}| {pair.replace('_vs_', ' vs ')} | {a['min_abs_cosine_per_component']:.6f} "
                  f"| {a['max_abs_distance_difference']:.1e} | {a['nearest_identical']:.3f} "
                  f"| {a[f'top{K}_lists_identical']:.3f} |")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
