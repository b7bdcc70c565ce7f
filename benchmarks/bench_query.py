"""Benchmark: POST /search over HTTP against `serve-images` on a 10,000-image index, for 1 and 8 concurrent clients.

Builds (or reuses) a collection of small synthetic JPEGs and its index (`index-images --weights random`:
random weights time the same as ImageNet ones), starts `serve-images` as a subprocess, and drives it
with N client threads, each on its own keep-alive connection, uploading fresh query photos (not in the
index) as multipart forms. Reports p50/p95/p99 latency and requests/s, and the server's own
decode/features/search breakdown from `timings_ms`; each figure is the median over --runs runs.
With --compare-batching it also measures the server with micro-batching off (BATCH_MAX_SIZE=1).
The naive server (benchmarks/naive_server.py: Flask, Pillow, torchvision transforms, one forward pass, numpy brute
force) runs beside it on the same index, its runs alternating with serve-images', and each figure is also given as
a ratio against it; then benchmarks/query_stages.py times a lone query's stages in this process (--stage-rounds).
With --device cuda the server computes query features on the GPU (serve-images --device; the index is built
there too), and each run records the GPU's utilisation (NVML, when there). Saves JSON under benchmarks/results/
(or --out FILE).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.index_probes import child_env  # noqa: E402 - after the path is set
from benchmarks.served import Server  # noqa: E402
from tools.ports import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMAGE_SIZE = (160, 120)      # indexed pictures: small, so building 10,000 takes minutes, not hours
QUERY_SIZE = (640, 480)      # uploaded queries: a typical web photo
BOUNDARY = "benchqueryboundary"


def make_collection(folder: Path, n: int) -> None:
    """n JPEGs in class folders; reused when a previous run made the same collection."""
    from retrieval.samples import SAMPLE_CLASSES, draw_sample

    marker = folder / f".complete-{n}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(0)
    classes = list(SAMPLE_CLASSES)
    started = time.perf_counter()
    for i in range(n):
        kind = classes[i % len(classes)]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        draw_sample(kind, IMAGE_SIZE, rng).save(folder / kind / f"{kind}_{i:05d}.jpg", "JPEG", quality=90)
    marker.touch()
    print(f"made {n} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def build_index(data: Path, index: Path, n: int, device: str | None = None) -> float | None:
    """Run index-images (on device, or its default) unless the index already holds n images; -> seconds taken
    (None when reused)."""
    from retrieval.catalog import Catalog

    if (index / "catalog.db").exists():
        catalog = Catalog(index)
        try:
            if catalog.count() == n:
                return None
        finally:
            catalog.close()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir", str(index),
                    "--weights", "random", "--batch-size", "64", *(["--device", device] if device else [])],
                   check=True, env=child_env())
    return time.perf_counter() - started


def query_bodies(count: int) -> list[bytes]:
    """Multipart bodies of fresh query photos (a seed the collection never used)."""
    from retrieval.samples import SAMPLE_CLASSES, draw_sample

    rng = random.Random(12345)
    classes = list(SAMPLE_CLASSES)
    bodies = []
    for i in range(count):
        out = io.BytesIO()
        draw_sample(classes[i % len(classes)], QUERY_SIZE, rng).save(out, "JPEG", quality=90)
        bodies.append(b"".join([
            f"--{BOUNDARY}\r\n".encode(),
            b'Content-Disposition: form-data; name="image"; filename="query.jpg"\r\n',
            b"Content-Type: image/jpeg\r\n\r\n", out.getvalue(), f"\r\n--{BOUNDARY}--\r\n".encode()]))
    return bodies


def batching_counters(port: int) -> dict:
    """The server's own counters: queries answered, batches, time in forward passes and searches."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stats")
    queries = json.loads(conn.getresponse().read())["queries"]
    conn.close()
    return queries


def drive(port: int, clients: int, seconds: float, bodies: list[bytes], k: int, naive: bool = False) -> dict:
    """clients threads post queries back to back for `seconds`; -> latency stats and server timings (naive: a server
    without /stats or timings_ms, the baseline)."""
    before = None if naive else batching_counters(port)
    latencies: list[float] = []
    server_timings: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        rng = random.Random(seed)
        mine: list[tuple[float, dict]] = []
        start.wait()
        while time.perf_counter() < stop_at[0]:
            body = bodies[rng.randrange(len(bodies))]
            t0 = time.perf_counter()
            conn.request("POST", f"/search?k={k}", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - t0
            if response.status != 200:
                with lock:
                    errors.append(f"{response.status} {payload[:200]!r}")
                continue
            mine.append((elapsed, json.loads(payload).get("timings_ms")))
        conn.close()
        with lock:
            latencies.extend(e for e, _ in mine)
            server_timings.extend(t for _, t in mine)

    from benchmarks.index_probes import GpuSampler

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    with GpuSampler() as gpu:
        stop_at[0] = time.perf_counter() + seconds
        began = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
    if not latencies:
        raise SystemExit(f"no successful requests: {errors[:3]}")
    ms = sorted(x * 1000.0 for x in latencies)
    summary = {
        "requests": len(ms), "errors": len(errors), "seconds": round(wall, 2),
        "requests_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1), "mean_ms": round(statistics.fmean(ms), 1),
        "gpu": gpu.stats(),   # None without NVML or a GPU
    }
    if naive:
        return summary
    after = batching_counters(port)
    batches = max(1, after["batches"] - before["batches"])
    batching = {"mean_batch": round((after["answered"] - before["answered"]) / batches, 2),
                "forward_ms_per_batch": round((after["mean_forward_ms"] * after["batches"]
                                               - before["mean_forward_ms"] * before["batches"]) / batches, 1),
                "search_ms_per_batch": round((after["mean_search_ms"] * after["batches"]
                                              - before["mean_search_ms"] * before["batches"]) / batches, 1)}
    return {**summary,
            "server_ms": {key: round(statistics.median(t[key] for t in server_timings), 2)
                          for key in ("decode", "features", "search")},
            "batching": batching}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, round(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median_of_runs(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms")
    out = {key: round(statistics.median(r[key] for r in runs), 1) for key in keys}
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    if "server_ms" not in runs[0]:     # the naive server
        return out
    out["server_ms"] = {key: round(statistics.median(r["server_ms"][key] for r in runs), 2)
                        for key in ("decode", "features", "search")}
    out["batching"] = {key: round(statistics.median(r["batching"][key] for r in runs), 2)
                       for key in ("mean_batch", "forward_ms_per_batch", "search_ms_per_batch")}
    utils = [r["gpu"]["util_mean"] for r in runs if r.get("gpu") and r["gpu"]["util_mean"] is not None]
    out["gpu_util_mean"] = statistics.median(utils) if utils else None
    return out


def measure(index: Path, args: argparse.Namespace, bodies: list[bytes], batching: bool, with_naive: bool) -> dict:
    """serve-images (and, with_naive, the naive server beside it) driven by each client count, runs alternating
    between the two so both see the same load; -> {clients: {"median", "runs", "naive": {...}, "ratios"}}."""
    env = {"RETRIEVAL_BATCH_MAX_SIZE": str(args.batch_max_size if batching else 1),
           "RETRIEVAL_BATCH_WAIT_MS": str(args.batch_wait_ms)}
    if args.torch_threads:
        env["RETRIEVAL_TORCH_THREADS"] = str(args.torch_threads)
    if args.search_threads:
        env["RETRIEVAL_SEARCH_THREADS"] = str(args.search_threads)
    server = Server(index, free_port(), RESULTS / "bench_query-server.log", threads=args.threads, env=env,
                    device=args.device)
    naive = None
    try:
        if with_naive:
            port = free_port()
            naive = Server(index, port, RESULTS / "bench_query-naive.log",
                           command=[sys.executable, str(ROOT / "benchmarks" / "naive_server.py"),
                                    "--index-dir", str(index), "--port", str(port)])
            drive(naive.port, max(args.clients), args.warmup, bodies, args.k, naive=True)
        drive(server.port, max(args.clients), args.warmup, bodies, args.k)          # warm caches and allocator
        results = {}
        for clients in args.clients:
            runs, baseline, loads = [], [], []
            for _ in range(args.runs):
                loads.append(os.getloadavg()[0])
                runs.append(drive(server.port, clients, args.duration, bodies, args.k))
                if naive is not None:
                    baseline.append(drive(naive.port, clients, args.duration, bodies, args.k, naive=True))
            results[str(clients)] = {"median": median_of_runs(runs), "runs": runs, "load_average": loads}
            m = results[str(clients)]["median"]
            gpu = f", GPU util {m['gpu_util_mean']:.0f}%" if m["gpu_util_mean"] is not None else ""
            line = (f"  batching {'on ' if batching else 'off'} {clients:>2} client(s): p50 {m['p50_ms']:.1f} ms, "
                    f"{m['requests_per_s']:.1f} req/s{gpu}")
            if baseline:
                n = median_of_runs(baseline)
                ratios = {"p50": round(n["p50_ms"] / m["p50_ms"], 2),
                          "requests_per_s": round(m["requests_per_s"] / n["requests_per_s"], 2),
                          # run by run (the pairs ran back to back), then their median
                          "p50_pairs": sorted(round(b["p50_ms"] / r["p50_ms"], 2) for r, b in zip(runs, baseline)),
                          "requests_per_s_pairs": sorted(round(r["requests_per_s"] / b["requests_per_s"], 2)
                                                         for r, b in zip(runs, baseline))}
                results[str(clients)].update(naive={"median": n, "runs": baseline}, ratios=ratios)
                line += (f"; naive p50 {n['p50_ms']:.1f} ms, {n['requests_per_s']:.1f} req/s: "
                         f"{ratios['p50']:.2f}x faster, {ratios['requests_per_s']:.2f}x the throughput")
            print(line, file=sys.stderr)
        return results
    finally:
        server.stop()
        if naive is not None:
            naive.stop()


def cpu_model() -> str:
    """The CPU's model name and its bf16 units, e.g. "AMD EPYC (avx512_bf16)"."""
    from retrieval.features.precision import cpu_bf16_instructions

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()} ({cpu_bf16_instructions() or 'no bf16 units'})"


def print_table(title: str, results: dict) -> None:
    print(f"\n{title}")
    print("| clients | p50 ms | p95 ms | p99 ms | req/s | decode ms | features ms | search ms | batch | forward ms/batch |")
    print("|--------:|-------:|-------:|-------:|------:|----------:|------------:|----------:|------:|-----------------:|")
    for clients, r in results.items():
        m, s, b = r["median"], r["median"]["server_ms"], r["median"]["batching"]
        print(f"| {clients:>7} | {m['p50_ms']:>6.1f} | {m['p95_ms']:>6.1f} | {m['p99_ms']:>6.1f} | {m['requests_per_s']:>5.1f} "
              f"| {s['decode']:>9.1f} | {s['features']:>11.1f} | {s['search']:>9.1f} | {b['mean_batch']:>5.1f} "
              f"| {b['forward_ms_per_batch']:>16.1f} |")
    print("(decode, features, search: the server's own timings_ms, medians; features include the wait for a batch;"
          " batch: mean queries per forward pass)")
    if any("naive" in r for r in results.values()):
        print("\n| clients | naive p50 ms | naive req/s | p50: naive / ours | req/s: ours / naive | pairs (p50; req/s) |")
        print("|--------:|-------------:|------------:|------------------:|--------------------:|---|")
        for clients, r in results.items():
            n, x = r["naive"]["median"], r["ratios"]
            print(f"| {clients:>7} | {n['p50_ms']:>12.1f} | {n['requests_per_s']:>11.1f} | {x['p50']:>17.2f}x "
                  f"| {x['requests_per_s']:>18.2f}x | {x['p50_pairs']}; {x['requests_per_s_pairs']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="indexed images")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--runs", type=int, default=3, help="runs per client count; the medians are reported")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before measuring")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                        help="comma-separated concurrent client counts")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--threads", type=int, default=8, help="serve-images --threads")
    parser.add_argument("--batch-max-size", type=int, default=8, help="RETRIEVAL_BATCH_MAX_SIZE")
    parser.add_argument("--batch-wait-ms", type=float, default=30.0, help="RETRIEVAL_BATCH_WAIT_MS")
    parser.add_argument("--torch-threads", type=int, default=0, help="RETRIEVAL_TORCH_THREADS (0: the server's default)")
    parser.add_argument("--search-threads", type=int, default=0, help="RETRIEVAL_SEARCH_THREADS (0: the server's default)")
    parser.add_argument("--compare-batching", action="store_true", help="also measure with micro-batching off")
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="leave out the naive server (benchmarks/naive_server.py), measured by default alternately "
                             "with serve-images as the baseline")
    parser.add_argument("--stage-rounds", type=int, default=30,
                        help="rounds of the in-process stage timing (benchmarks/query_stages.py); 0 leaves it out")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None,
                        help="serve-images --device (where query features are computed), and index-images --device "
                             "for the index build [default: each command's own: cpu for the server, auto for the build]")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file [default: benchmarks/results/bench_query-TIME.json]")
    parser.add_argument("--work-dir", type=Path, default=RESULTS / "query-bench",
                        help="where the collection and its index are kept (reused between runs)")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    data, index = args.work_dir / f"data-{args.images}", args.work_dir / f"index-{args.images}"
    make_collection(data, args.images)
    index_seconds = build_index(data, index, args.images, args.device)
    bodies = query_bodies(32)

    configurations = {"batching": True, "no_batching": False} if args.compare_batching else {"batching": True}
    results = {}
    load = {"before": os.getloadavg()}
    for name, batching in configurations.items():
        print(f"measuring {name.replace('_', ' ')} ...", file=sys.stderr)
        results[name] = measure(index, args, bodies, batching, with_naive=args.naive and batching)
    stages = None
    if args.stage_rounds:
        from benchmarks.query_stages import stage_table

        print("timing the stages ...", file=sys.stderr)
        stages = stage_table(index, bodies, args.k, args.stage_rounds)
    load["after"] = os.getloadavg()

    report = {
        "benchmark": "bench_query", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": cpu_model(), "load_average": load,
                    "python": platform.python_version()},
        "settings": {"images": args.images, "image_size": IMAGE_SIZE, "query_size": QUERY_SIZE, "k": args.k,
                     "duration_s": args.duration, "runs": args.runs, "threads": args.threads,
                     "batch_max_size": args.batch_max_size, "batch_wait_ms": args.batch_wait_ms,
                     "torch_threads": args.torch_threads, "search_threads": args.search_threads,
                     "model": "alexnet fc7 (random weights)", "index_seconds": index_seconds,
                     "device": args.device or "cpu (serve-images' default)"},
        "results": results,
        "stages_ms": stages,
        "targets": {"p50_ms_1_client": 40, "requests_per_s_8_clients": 40,
                    "against_naive": {"p50_1_client": 3.0, "requests_per_s_8_clients": 3.0}},
    }
    out = (args.out or RESULTS / f"bench_query-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name in results:
        print_table(f"{args.images:,} images, AlexNet fc7, features on {args.device or 'cpu'}, {name.replace('_', ' ')} "
                    f"(medians of {args.runs} runs of {args.duration:g} s)", results[name])
    if stages:
        from benchmarks.query_stages import print_stage_table

        lone = results["batching"].get("1")
        print_stage_table(stages, {"ours": lone["median"]["p50_ms"], "naive": lone["naive"]["median"]["p50_ms"]}
                          if lone and "naive" in lone else None)
    print(f"load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after; {cpu_model()}")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
