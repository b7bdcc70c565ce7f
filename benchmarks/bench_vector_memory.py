"""Benchmark: what each way of opening vectors.faiss costs a running serve-images in memory, disk and start time.

The server must survive the FAISS file being truncated or rewritten in place (a mapping of the file itself dies of
SIGBUS at the next search), so it opens one of:

  shared-map    the file itself memory-mapped (before issue 20; the baseline, unsafe): page cache shared by workers
  private-copy  an unlinked copy of the file, next to it, memory-mapped and verified against the catalog's digest
                (what serve-images does now)
  read          the file read into each worker's memory (RETRIEVAL_MMAP=false)

For each size (--sizes, default 10,000 and 100,000 vectors of 4096-d float32: 164 MB and 1.64 GB) it builds an index
once (a few synthetic pictures through index-images --weights random for the network and settings, then N unit
vectors added to the catalog and an exact Flat FAISS file saved as index-images saves it), starts serve-images with
the default worker count (and --workers W for each W in --workers), sends --queries uploads (every exact search reads
every vector, so all pages are in), and reads each process's RSS, PSS and USS with psutil (memory_full_info). Each
figure is the median of --runs runs; ratios are against shared-map in the same run. Saves JSON under
benchmarks/results/. Needs about 3 x the largest index on disk (catalog, FAISS file, one private copy per worker).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.served import Server  # noqa: E402 - after the path is set
from tools.ports import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DIM = 4096
MB = 2**20
KEYS = ("rss", "pss", "uss", "rss_anon", "rss_file", "rss_shmem")

# Run in the server's main process before it starts (its workers fork from it): vectors.faiss mapped as before.
SHARED_MAP = """
import faiss
import retrieval.vectors.vector_index as vector_index
_read = vector_index._read
def _shared_map(path, mmap, expected=None):
    if not mmap:
        return _read(path, mmap, expected)
    flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags), True
vector_index._read = _shared_map
"""
OPTIONS = {"shared-map": ({}, SHARED_MAP), "private-copy": ({}, ""), "read": ({"RETRIEVAL_MMAP": "false"}, "")}


def build(index: Path, n: int) -> None:
    """An index of n random unit vectors (plus the handful of real pictures that made its settings); reused."""
    import subprocess

    from benchmarks.index_probes import child_env
    from retrieval.catalog import Catalog
    from retrieval.files import sample_digest
    from retrieval.names import FAISS_FILE
    from retrieval.samples import make_sample_collection
    from retrieval.vectors.vector_index import VectorIndex

    marker = index / f".complete-{n}"
    if marker.exists():
        return
    started = time.perf_counter()
    data = index.parent / f"data-{n}"
    make_sample_collection(data, per_class=2, size=(96, 72), seed=5)
    subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir",
                    str(index), "--weights", "random", "--workers", "0"], check=True, env=child_env(),
                   capture_output=True)
    catalog = Catalog(index)
    try:
        rng = np.random.default_rng(0)
        have = catalog.count()
        for start in range(have, n, 1000):
            count = min(1000, n - start)
            vecs = rng.standard_normal((count, DIM), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            rows = [{"path": f"synthetic/{i:07d}.jpg", "label": "synthetic", "size": 1, "mtime_ns": 1, "width": 96,
                     "height": 72, "sha256": f"{i:064x}"} for i in range(start, start + count)]
            catalog.write_batch(rows, vecs, [])
        state = catalog.updated_at()
        vectors = VectorIndex(DIM)
        vectors.reconcile(catalog)
        vectors.save(index / FAISS_FILE)
        catalog.save_faiss_digest(*sample_digest(index / FAISS_FILE))   # as index-images records it
        catalog.mark_vectors_saved(state)
    finally:
        catalog.close()
    marker.touch()
    print(f"built {n:,} vectors in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def memory(server: Server) -> dict:
    """RSS, PSS, USS in MB of each worker (the processes under the gunicorn master) and of the whole tree."""
    workers, total = [], {"rss": 0, "pss": 0, "uss": 0}
    for proc in server.tree():
        try:
            info = proc.memory_full_info()
            cmd = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        row = {"rss": info.rss / MB, "pss": info.pss / MB, "uss": info.uss / MB, **_rss_kinds(proc.pid)}
        for key in total:
            total[key] += row[key]
        if proc.pid != server.proc.pid and proc.ppid() == server.proc.pid and "multiprocessing" not in cmd:
            workers.append(row)
    return {"workers": workers, "total": total,
            "index_mapped_mb": [mapped_index_mb(p, server_index(server)) for p in workers_of(server)]}


def server_index(server: Server) -> Path:
    args = server.proc.args
    return Path(args[args.index("--index-dir") + 1])


def _rss_kinds(pid: int) -> dict:
    """The resident memory's kinds in MB: anonymous (the process's own, never evicted), file-backed (page cache,
    evictable: a mapping), shared memory."""
    try:
        status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
    except OSError:
        return {}
    return {key.lower().replace("rss", "rss_"): int(status[key].split()[0]) / 1024
            for key in ("RssAnon", "RssFile", "RssShmem") if key in status}


def mapped_index_mb(proc: psutil.Process, index: Path) -> float:
    """Resident MB of proc's mappings of the index's vectors: the FAISS file itself, or its private copy (an unlinked
    file in the index folder, named '#INODE' in the maps); 0 when it reads the vectors into memory."""
    total = 0
    for m in proc.memory_maps(grouped=True):
        if m.path.startswith(str(index)) and (m.path.endswith("vectors.faiss") or Path(m.path).name.startswith("#")):
            total += m.rss
    return total / MB


def workers_of(server: Server) -> list[psutil.Process]:
    return [p for p in server.tree() if p.pid != server.proc.pid and p.ppid() == server.proc.pid
            and "multiprocessing" not in " ".join(p.cmdline())]


def one_run(index: Path, option: str, workers: int | None, queries: int, work: Path) -> dict:
    env, prelude = OPTIONS[option]
    env = {**env, "RETRIEVAL_QUERY_TIMEOUT_S": "600"}   # a first scan of 1.6 GB on a busy 2-core machine is slow
    if workers:
        env = {**env, "SERVE_IMAGES_WORKERS": str(workers)}
    picture = next((index.parent / f"data-{index.name.split('-')[-1]}").rglob("*.jpg")).read_bytes()
    started = time.perf_counter()
    server = Server(index, free_port(), work / f"server-{option}.log", env=env, prelude=prelude)
    start_s = time.perf_counter() - started
    try:
        base = f"http://127.0.0.1:{server.port}"
        mapped = requests.get(f"{base}/stats", timeout=60).json()["vector_index"]["memory_mapped"]
        file_mb = (index / "vectors.faiss").stat().st_size / MB
        sent = 0
        # every worker must have scanned every vector (an exact search reads them all) before memory is read
        while sent < queries or (mapped and sent < 10 * queries and
                                 min(mapped_index_mb(p, index) for p in workers_of(server)) < 0.9 * file_mb):
            answer = requests.post(f"{base}/search?k=10", files={"image": ("q.jpg", picture)}, timeout=900)
            assert answer.status_code == 200, answer.text
            sent += 1
        time.sleep(1.0)
        found = memory(server)
    finally:
        server.stop()
    worker = {key: statistics.median(w[key] for w in found["workers"]) for key in KEYS}
    return {"start_s": start_s, "mapped": mapped, "workers": len(found["workers"]), "worker": worker,
            "total": found["total"], "queries": sent, "index_mapped_mb": found["index_mapped_mb"]}


def median_run(runs: list[dict]) -> dict:
    return {"start_s": statistics.median(r["start_s"] for r in runs), "mapped": runs[0]["mapped"],
            "workers": runs[0]["workers"],
            "worker": {k: statistics.median(r["worker"][k] for r in runs) for k in KEYS},
            "total": {k: statistics.median(r["total"][k] for r in runs) for k in ("rss", "pss", "uss")}}


def hardware() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="vector counts, comma-separated")
    ap.add_argument("--workers", default="2", help="worker counts measured besides the default, comma-separated "
                                                   "(empty: the default only)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each measurement; medians are reported")
    ap.add_argument("--queries", type=int, default=8, help="uploads searched before memory is read")
    ap.add_argument("--workdir", type=Path, default=RESULTS / "bench_vector_memory_work")
    ap.add_argument("--options", default=",".join(OPTIONS), help="which ways of opening, comma-separated")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"hardware": hardware(), "queries": args.queries, "runs": args.runs, "sizes": {},
               "started": time.strftime("%Y%m%d-%H%M%S")}
    counts = [None] + [int(w) for w in args.workers.split(",") if w]
    for n in (int(s) for s in args.sizes.split(",")):
        index = args.workdir / f"index-{n}"
        build(index, n)
        file_mb = (index / "vectors.faiss").stat().st_size / MB
        rows = results["sizes"][str(n)] = {"faiss_file_mb": file_mb, "rows": []}
        for workers in counts:
            for option in args.options.split(","):
                runs = [one_run(index, option, workers, args.queries, args.workdir) for _ in range(args.runs)]
                row = {"option": option, "workers_asked": workers or "default", **median_run(runs), "all_runs": runs}
                rows["rows"].append(row)
                save(results)
                print(f"[{n:,}] {option} workers={row['workers']}: {json.dumps(median_run(runs))}", file=sys.stderr,
                      flush=True)

    print(f"\n{results['hardware']['cpu']}, {results['hardware']['cores']} cores, "
          f"{results['hardware']['memory_gb']} GB; medians of {args.runs} runs; MB")
    print(f"{'vectors':>8} {'file':>6} {'option':<13} {'workers':>7} {'worker RSS':>10} {'anon':>6} {'file':>6} "
          f"{'worker PSS':>10} {'total PSS':>10} {'ratio':>6} {'start s':>7}")
    for n, size in results["sizes"].items():
        base = {r["workers"]: r["total"]["pss"] for r in size["rows"] if r["option"] == "shared-map"}
        for r in size["rows"]:
            ratio = r["total"]["pss"] / base[r["workers"]] if r["workers"] in base else float("nan")
            print(f"{int(n):>8,} {size['faiss_file_mb']:>6.0f} {r['option']:<13} {r['workers']:>7} "
                  f"{r['worker']['rss']:>10.0f} {r['worker']['rss_anon']:>6.0f} {r['worker']['rss_file']:>6.0f} "
                  f"{r['worker']['pss']:>10.0f} {r['total']['pss']:>10.0f} "
                  f"{ratio:>6.2f} {r['start_s']:>7.1f}")
    print(f"saved {save(results)}", file=sys.stderr)


def save(results: dict) -> Path:
    """Write results (again) to this run's JSON file under benchmarks/results/. -> its path."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_vector_memory-{results['started']}.json"
    out.write_text(json.dumps(results, indent=1))
    return out


if __name__ == "__main__":
    main()
