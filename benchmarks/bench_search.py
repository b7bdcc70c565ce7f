"""Benchmark: FAISS index types at 100k and 1M vectors (and real fc7 vectors): size, build time, memory, latency, recall.

For each size: synthetic clustered 4096-d vectors (unit length, non-negative like fc7 after its ReLU, around
seeded centres in a 64-d subspace), generated and added in chunks of CHUNK so at most a few GB are held; the
exact ground truth (IndexFlatL2, streamed over the same chunks) for held-out queries from the same
distribution. For each type (Flat, and the type `auto` chooses at that size): build time (training on the
sample index-images would use, and adding), index file bytes, the resident memory of a fresh process that
holds what serve-images holds (AlexNet and the index opened memory-mapped, after 200 queries), query
latency for 1 and for 64 queries (medians), and 1-recall@10 / 10-recall@10 against exact, with nprobe
tuned as index-images tunes it. With --real INDEX_DIR, the same on the catalog's vectors of an index.

    python benchmarks/bench_search.py --sizes 100000 1000000 --real path/to/index

Prints a table and saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402 - after the path is set

from retrieval.vectors.index_types import FLAT, RECALL_TARGET, auto_factory, train_size  # noqa: E402
from retrieval.vectors.faiss_parts import (PRECOMPUTED_TABLE_MAX_BYTES, SearchParams, apply_search_params,  # noqa: E402
                                           fit_precomputed_tables, precomputed_table_bytes, tuning_ladder, walk)
from retrieval.vectors.recall import K, score, without_self  # noqa: E402
from retrieval.system import available_cores  # noqa: E402
from retrieval.vectors.vector_index import VectorIndex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DIM = 4096
CHUNK = 50_000           # vectors generated (and added) at a time: 800 MB of float32
FLAT_MAX_BYTES = 4 << 30   # Flat is built only where its vectors fit this (not at 1M: 16 GB)


class Synthetic:
    """Seeded clustered vectors: chunk i is always the same, so the data can be streamed twice."""

    def __init__(self, n: int, seed: int = 0, clusters: int = 2000, rank: int = 64):
        rng = np.random.default_rng(seed)
        self.n, self.seed = n, seed
        self.basis = rng.standard_normal((rank, DIM)).astype(np.float32) / np.sqrt(rank)   # (64, 4096)
        self.centres = rng.standard_normal((clusters, rank)).astype(np.float32)

    def make(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = self.centres[rng.integers(0, len(self.centres), n)] + 0.35 * rng.standard_normal((n, self.basis.shape[0]))
        x = np.maximum(z.astype(np.float32) @ self.basis, 0)                    # (n, 64) -> (n, 4096), ReLU
        x += 0.01 * np.abs(rng.standard_normal(x.shape, dtype=np.float32))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunks(self):
        for i, start in enumerate(range(0, self.n, CHUNK)):
            m = min(CHUNK, self.n - start)
            yield np.arange(start, start + m, dtype=np.int64), self.make(m, self.seed * 1000 + i + 1)

    def sample(self, n: int) -> np.ndarray:
        """n more vectors of the same distribution (training sample, queries): not in the collection."""
        return self.make(n, self.seed * 1000 + 999)


class CatalogVectors:
    """The vectors of an indexed collection, from its catalog."""

    def __init__(self, index_dir: Path, seed: int = 0):
        from retrieval.catalog import Catalog
        self.catalog = Catalog(index_dir)
        self.ids = self.catalog.ids()
        self.n = len(self.ids)
        self.rng = np.random.default_rng(seed)

    def chunks(self):
        yield from self.catalog.vectors(chunk=CHUNK)

    def sample(self, n: int) -> np.ndarray:
        pick = np.sort(self.rng.choice(self.ids, min(n, self.n), replace=False))
        self.sample_ids = pick        # members of the collection: each query's own id is left out of both sides
        return np.concatenate([v for _, v in self.catalog.vectors(pick)])


def ground_truth(data, queries: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """Exact 10 nearest ids per query (IndexFlatL2 over streamed chunks), without the query's own id where it is a member."""
    heap = faiss.ResultHeap(len(queries), K + 1)
    flat = faiss.IndexFlatL2(DIM)
    for ids, vecs in data.chunks():
        flat.reset()
        flat.add(vecs)
        d, pos = flat.search(queries, K + 1)
        heap.add_result(d, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return top10(heap.I, own)


def top10(found: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """(q, 11) ids -> (q, 10): without each query's own id when the queries are members, else the first 10."""
    return without_self(found, own, K) if own is not None else found[:, :K]


def build(data, factory: str, train: np.ndarray | None) -> tuple[VectorIndex, dict]:
    started = time.perf_counter()
    index = VectorIndex.empty(DIM, factory)
    if not index.is_trained:
        index.train(train)
    trained = time.perf_counter()
    for ids, vecs in data.chunks():
        index.add(ids, vecs)
    done = time.perf_counter()
    return index, {"train_s": round(trained - started, 2), "add_s": round(done - trained, 2),
                   "build_s": round(done - started, 2), "train_size": 0 if train is None else len(train)}


def latency_ms(index: VectorIndex, queries: np.ndarray, batch: int, runs: int) -> float:
    times = []
    for r in range(runs):
        q = queries[(r * batch) % len(queries):][:batch]
        if len(q) < batch:
            q = queries[:batch]
        started = time.perf_counter()
        index.search(q, K, threads=available_cores())
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def tune(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, own: np.ndarray | None) -> tuple[dict, list[dict]]:
    """nprobe / efSearch as index-images chooses it: the smallest reaching RECALL_TARGET 1-recall@10."""
    ladder = tuning_ladder(index.index) or [SearchParams()]
    tried = []
    for params in ladder:
        apply_search_params(index.index, params)
        found = top10(index.search(queries, K + 1, threads=available_cores())[1], own)
        r1_1, r1_10, r10_10 = score(found, exact)
        tried.append({"search_params": params.to_json(), "1-recall@1": round(r1_1, 4), "1-recall@10": round(r1_10, 4),
                      "10-recall@10": round(r10_10, 4)})
        if r1_10 >= RECALL_TARGET:
            break
    return tried[-1], tried


def with_precomputed_table(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, own: np.ndarray | None) -> dict:
    """For an IVFPQ whose precomputed table is over the budget (not built): the same searches with it built, then
    freed again. -> its size, and latency and recall with it (empty for other types)."""
    size = sum(precomputed_table_bytes(p) for p in walk(index.index) if isinstance(p, faiss.IndexIVFPQ))
    if size <= PRECOMPUTED_TABLE_MAX_BYTES:
        return {"precomputed_table_bytes": size} if size else {}
    without = top10(index.search(queries, K + 1, threads=available_cores())[1], own)
    fit_precomputed_tables(index.index, max_bytes=size)
    found = top10(index.search(queries, K + 1, threads=available_cores())[1], own)
    with_table = {"precomputed_table_bytes": size, "precomputed_table_same_ids": float(np.mean(found == without)),
                  "precomputed_table_1-recall@10": round(score(found, exact)[1], 4),
                  "precomputed_table_10-recall@10": round(score(found, exact)[2], 4),
                  "precomputed_table_latency_1_ms": latency_ms(index, queries, 1, min(200, len(queries))),
                  "precomputed_table_latency_64_ms": latency_ms(index, queries, 64, 7)}
    fit_precomputed_tables(index.index)
    return with_table


SERVER_PROBE = r"""
import sys, json
def rss():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    keys = (("rss_mb", "VmRSS"), ("rss_anon_mb", "RssAnon"), ("rss_file_mb", "RssFile"))
    return {k: round(int(status[key].split()[0]) / 1024, 1) for k, key in keys}
stages = {"python": rss()}
sys.path.insert(0, sys.argv[1])
from retrieval.system import leave_out_triton
leave_out_triton()                                     # as serve-images does
import numpy as np, torch
stages["import torch"] = rss()
import torchvision
stages["import torchvision"] = rss()
from retrieval.vectors.vector_index import VectorIndex
from retrieval.vectors.faiss_parts import SearchParams, apply_search_params
net = torchvision.models.alexnet().eval()              # what serve-images holds: the network...
stages["AlexNet"] = rss()
index = VectorIndex.load(sys.argv[2], 4096, factory=None, mmap=True)   # ...and the index, memory-mapped
apply_search_params(index.index, SearchParams.from_json(sys.argv[3]))
stages["index opened"] = rss()
queries = np.load(sys.argv[4])
with torch.inference_mode():
    net(torch.zeros(1, 3, 224, 224))
stages["a forward pass"] = rss()
for q in queries:
    index.search(q[None, :], 10)
print(json.dumps({**rss(), "mapped": index.mapped, "stages": stages}))
"""


def server_memory(path: Path, params: dict, queries: np.ndarray, work: Path) -> dict:
    qfile = work / "queries.npy"
    np.save(qfile, queries[:200])
    done = subprocess.run([sys.executable, "-c", SERVER_PROBE, str(ROOT), str(path), json.dumps(params), str(qfile)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(name: str, data, types: list[str], n_queries: int, work: Path) -> list[dict]:
    print(f"[{name}] {data.n:,} vectors: queries and exact ground truth", file=sys.stderr, flush=True)
    queries = data.sample(n_queries)
    own = getattr(data, "sample_ids", None)
    started = time.perf_counter()
    exact = ground_truth(data, queries, own)
    print(f"[{name}] ground truth {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for factory in types:
        if factory == FLAT and data.n * DIM * 4 > FLAT_MAX_BYTES:
            print(f"[{name}] Flat skipped: {data.n * DIM * 4 / 2**30:.0f} GB of vectors", file=sys.stderr)
            continue
        n_train = train_size(factory, data.n)
        train = data.sample(n_train) if n_train else None
        print(f"[{name}] {factory}: training on {n_train:,}, adding", file=sys.stderr, flush=True)
        index, times = build(data, factory, train)
        del train
        best, tried = tune(index, queries, exact, own)
        path = work / f"{name}-{factory.replace(',', '_')}.faiss"
        index.save(path)
        row = {"collection": name, "n": data.n, "type": factory, **times, "index_bytes": path.stat().st_size,
               **best, "tuning": tried,
               "latency_1_ms": latency_ms(index, queries, 1, min(200, len(queries))),
               "latency_64_ms": latency_ms(index, queries, 64, 7)}
        row.update(with_precomputed_table(index, queries, exact, own))
        del index
        row["server"] = server_memory(path, best["search_params"], queries, work)
        path.unlink()
        rows.append(row)
        print(f"[{name}] {factory}: {json.dumps({k: v for k, v in row.items() if k != 'tuning'})}", file=sys.stderr,
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--real", type=Path, default=None, help="an index folder whose catalog vectors to use too")
    parser.add_argument("--queries", type=int, default=500, help="held-out queries for recall and latency")
    parser.add_argument("--work", type=Path, default=None, help="folder for the index files (default: a temporary one)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(available_cores())
    load_before = os.getloadavg()   # the machine is shared: its load is part of the result
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.real is not None:
            data = CatalogVectors(args.real)
            rows += run_size(f"fc7-{data.n}", data, [FLAT, auto_factory(data.n, DIM, flat_max=0)], args.queries, work)
        for n in args.sizes:
            data = Synthetic(n)
            rows += run_size(f"synthetic-{n}", data, [FLAT, auto_factory(n, DIM)], args.queries, work)
    print(f"\n{'collection':<18} {'type':<24} {'build s':>8} {'MB':>8} {'RSS MB':>7} {'anon':>5} {'file':>5} "
          f"{'1 q ms':>7} {'64 q ms':>8} {'params':<14} {'1-R@10':>7} {'10-R@10':>8}")
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["search_params"].items()) or "-"
        print(f"{r['collection']:<18} {r['type']:<24} {r['build_s']:>8.1f} {r['index_bytes'] / 2**20:>8.1f} "
              f"{r['server']['rss_mb']:>7.0f} {r['server']['rss_anon_mb']:>5.0f} {r['server']['rss_file_mb']:>5.0f} "
              f"{r['latency_1_ms']:>7.2f} {r['latency_64_ms']:>8.2f} {params:<14} "
              f"{r['1-recall@10']:>7.3f} {r['10-recall@10']:>8.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_search-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cores": available_cores(),
                                           "processor": platform.processor(), "faiss": faiss.__version__},
                               "load_average_before_after": [load_before[0], os.getloadavg()[0]],
                               "date": time.strftime("%Y-%m-%d"), "queries": args.queries, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
