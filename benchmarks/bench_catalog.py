"""Benchmark: the catalog on SQLite (the default) and on PostgreSQL: batch commits, a full vector read, a replica's catch-up.

For each back end, in the same run: commit N images as batches of B rows with 4096-d float32 vectors
(one transaction each, as index-images does), read every vector back (what a server does when it
starts without a FAISS file), and bring a copy of the served vectors up to date after one more batch
(what a replica does when the writer commits). Each figure is the median of --runs runs; ratios are
PostgreSQL over SQLite. PostgreSQL is the server at --db-url, or a private one started from Debian's
binaries (as the tests do, but with fsync on) on 127.0.0.1, over TCP. SQLite runs as the catalog does
(WAL, synchronous=NORMAL). Saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RESULTS = ROOT / "benchmarks" / "results"
DIM = 4096


def rows(start: int, n: int) -> list[dict]:
    return [{"path": f"class_{i % 5}/img_{i:06d}.jpg", "label": f"class_{i % 5}", "size": 1000 + i, "mtime_ns": i,
             "width": 160, "height": 120, "sha256": f"{i:064x}"} for i in range(start, start + n)]


def measure(url: str | None, folder: Path, n: int, batch: int) -> dict[str, float]:
    from retrieval.catalog import Catalog, IndexSettings
    from retrieval.vectors.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    catalog = Catalog(folder, create=True, url=url)
    try:
        catalog.save_settings(IndexSettings("alexnet", "fc7", "random", "random:sha256=0", 0, DIM, True, "p", "/data"))
        started = time.perf_counter()
        for start in range(0, n, batch):
            catalog.write_batch(rows(start, batch), rng.standard_normal((batch, DIM), dtype=np.float32), [])
        commit_s = time.perf_counter() - started

        started = time.perf_counter()
        served = VectorIndex(DIM)
        served.reconcile(catalog)                       # every vector from the catalog, as at a start without FAISS
        read_s = time.perf_counter() - started
        assert len(served) == n

        catalog.write_batch(rows(n, batch), rng.standard_normal((batch, DIM), dtype=np.float32), [])
        started = time.perf_counter()
        fresh = served.copy()
        fresh.reconcile(catalog)                        # a replica catching up with one committed batch
        catch_up_s = time.perf_counter() - started
        assert len(fresh) == n + batch
    finally:
        catalog.close()
    return {"commit_images_per_s": n / commit_s, "read_all_s": read_s, "catch_up_one_batch_s": catch_up_s}


@contextlib.contextmanager
def postgres_database(url: str | None):
    """A fresh database on the server at url (its default database), or on a private server; dropped afterwards."""
    import psycopg

    if url is None:
        from helpers.postgres import running_postgres   # tests/helpers: the tests' private server

        with running_postgres(durable=True) as server:   # every commit flushed, as in production
            with server.new_database() as db_url:
                yield db_url
        return
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images committed per run")
    parser.add_argument("--batch", type=int, default=32, help="rows per transaction (index-images' CPU batch size)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db-url", default=None, help="a PostgreSQL server's URL (a database is created and dropped)")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"sqlite": [], "postgresql": []}
    with postgres_database(args.db_url) as pg_base:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                results["sqlite"].append(measure(None, Path(tmp) / "sqlite", args.images, args.batch))
            with postgres_database(pg_base) as url, tempfile.TemporaryDirectory() as tmp:
                results["postgresql"].append(measure(url, Path(tmp) / "pg", args.images, args.batch))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    medians = {backend: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for backend, runs in results.items()}
    print(f"{args.images} images x {DIM}-d float32, batches of {args.batch}, median of {args.runs} runs")
    print(f"{'':<28}{'sqlite':>12}{'postgresql':>12}{'pg/sqlite':>11}")
    for key in medians["sqlite"]:
        a, b = medians["sqlite"][key], medians["postgresql"][key]
        print(f"{key:<28}{a:>12.3f}{b:>12.3f}{b / a:>10.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"catalog-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"images": args.images, "batch": args.batch, "runs": args.runs, "dim": DIM,
                               "machine": platform.platform(), "medians": medians, "all": results}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
