"""Benchmark: what the Prometheus metrics (api.metrics) cost a request, and what a scrape of /metrics costs.

Per request: the calls one POST /search makes (request counter and latency, decode, network,
search, batch size), in prometheus-client's multiprocess mode (values in memory-mapped files, as
under serve-images) against its in-memory mode (the baseline), in fresh processes. Per scrape: the
text of every metric summed over 1, 2, 4 and 8 worker processes' files, as GET /metrics makes it.
Prints a table of medians and saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

PER_REQUEST = """
import time
from api import metrics as m
def request():
    m.REQUESTS.labels("api.search", "POST", "200").inc()
    m.REQUEST_SECONDS.labels("api.search").observe(0.042)
    m.DECODE_SECONDS.observe(0.003)
    m.NETWORK_SECONDS.observe(0.03)
    m.SEARCH_SECONDS.observe(0.001)
    m.BATCH_SIZE.observe(3)
for _ in range(1000):
    request()
times = []
for _ in range({runs}):
    started = time.perf_counter()
    for _ in range({calls}):
        request()
    times.append((time.perf_counter() - started) / {calls})
print(min(times), sorted(times)[len(times) // 2])
"""


def per_request_us(multiprocess: bool, runs: int, calls: int) -> float:
    """Median microseconds of one request's metric calls, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        out = subprocess.run([sys.executable, "-c", PER_REQUEST.format(runs=runs, calls=calls)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]) * 1e6


def _worker(folder: str, requests: int) -> None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    sys.path.insert(0, str(ROOT))
    from api import metrics as m
    endpoints = ("api.search", "api.neighbours", "gallery.home", "api.thumbnail")
    for i in range(requests):
        endpoint = endpoints[i % len(endpoints)]
        m.REQUESTS.labels(endpoint, "GET", "200").inc()
        m.REQUEST_SECONDS.labels(endpoint).observe(0.01 * (i % 7))
        m.BATCH_SIZE.observe(1 + i % 8)
    m.ERRORS.labels("400", "missing_image").inc()
    m.INDEX_IMAGES.set(10_000)


def scrape_ms(workers: int, runs: int) -> float:
    """Median milliseconds of one /metrics text over the files of `workers` worker processes."""
    ctx = multiprocessing.get_context("spawn")   # each worker imports prometheus-client with the folder set
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        procs = [ctx.Process(target=_worker, args=(folder, 200)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        text = generate_latest(registry)
        assert b"retrieval_http_requests_total" in text
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            generate_latest(registry)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians are reported)")
    parser.add_argument("--calls", type=int, default=20_000, help="requests' metric calls timed per run")
    args = parser.parse_args()

    rows = {"in-memory (baseline)": per_request_us(False, args.runs, args.calls),
            "multiprocess (serve-images)": per_request_us(True, args.runs, args.calls)}
    base = rows["in-memory (baseline)"]
    print(f"{'metric calls of one /search request':<40}{'µs':>8}{'ratio':>8}")
    for name, us in rows.items():
        print(f"{name:<40}{us:>8.1f}{us / base:>7.2f}x")
    scrapes = {workers: scrape_ms(workers, args.runs * 4) for workers in (1, 2, 4, 8)}
    print(f"\n{'GET /metrics text, worker processes':<40}{'ms':>8}{'ratio':>8}")
    for workers, ms in scrapes.items():
        print(f"{workers:<40}{ms:>8.2f}{ms / scrapes[1]:>7.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "metrics.json"
    out.write_text(json.dumps({"per_request_us": rows, "scrape_ms_by_workers": scrapes,
                               "runs": args.runs, "calls": args.calls, "python": platform.python_version(),
                               "cpus": os.cpu_count()}, indent=2))
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
