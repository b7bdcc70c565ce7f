"""Benchmark: hostile uploads against a real `serve-images`: time, extra server memory, and /healthz during an attack.

Makes small files that used to cost the server gigabytes or tens of seconds (a 64 x 1,114,160 TIFF strip,
a 2 x 40,000,000 PNG line, 89-megapixel 16-bit, 32-bit, RGBA and RGB images, progressive JPEGs that repeat
an empty scan hundreds of times), indexes a tiny synthetic collection with random weights, starts
`serve-images` as a subprocess, and uploads each file on its own, then in concurrent bursts while a client
polls /healthz. Memory is the RSS of the whole server process tree (gunicorn master, worker, decoder
processes) sampled every 20 ms, minus its idle value; PSS of the tree is reported before and after.
Also reports a lone 640x480 JPEG query's server-side decode time. Prints a table; saves JSON under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.served import Server  # noqa: E402 - after the path is set
from tools.ports import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIDE = 9459                 # 9459 x 9459 = 89,472,681 pixels: just under Pillow's 89,478,485 limit
BOUNDARY = "benchhostileboundary"
CLIENT_TIMEOUT_S = 120      # a client gives up after this (the old server took up to 30 s for one file)


# --- hostile files --------------------------------------------------------------------------------------

def hostile_files(folder: Path) -> dict[str, bytes]:
    """name -> file bytes; made once and kept in folder."""
    from PIL import Image

    from retrieval.samples import encoded, many_scans_jpeg

    makers = {
        "tiff_strip_64x1114160": lambda: encoded(Image.new("1", (64, 1_114_160)), "TIFF", compression="group4"),
        "png_line_2x40M": lambda: encoded(Image.new("L", (40_000_000, 2)), "PNG"),
        "png16_89Mpx": lambda: encoded(Image.new("I;16", (SIDE, SIDE)), "PNG"),
        "tiff32_89Mpx": lambda: encoded(Image.new("I", (SIDE, SIDE)), "TIFF", compression="tiff_adobe_deflate"),
        "rgba_png_89Mpx": lambda: encoded(Image.new("RGBA", (SIDE, SIDE)), "PNG"),
        "rgb_png_89Mpx": lambda: encoded(Image.new("RGB", (SIDE, SIDE)), "PNG"),
        "rgba_png_24Mpx": lambda: encoded(Image.new("RGBA", (6000, 4000), (10, 200, 30, 128)), "PNG"),
        "jpeg_1200_scans": lambda: many_scans_jpeg(9000, 9000, 1200),
        "jpeg_100_scans": lambda: many_scans_jpeg(9000, 9000, 100),
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, make in makers.items():
        path = folder / name
        if not path.exists():
            path.write_bytes(make())
        files[name] = path.read_bytes()
    return files


def query_photo() -> bytes:
    from retrieval.samples import SAMPLE_CLASSES, draw_sample, encoded

    return encoded(draw_sample(list(SAMPLE_CLASSES)[0], (640, 480), random.Random(7)), "JPEG", quality=90)


# --- server and clients ------------------------------------------------------------------------------

def get(port: int, path: str, timeout: float = 10) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    return status, time.perf_counter() - started


def post_image(port: int, data: bytes) -> tuple[int, float, dict]:
    body = b"".join([f"--{BOUNDARY}\r\n".encode(),
                     b'Content-Disposition: form-data; name="image"; filename="upload"\r\n',
                     b"Content-Type: application/octet-stream\r\n\r\n", data, f"\r\n--{BOUNDARY}--\r\n".encode()])
    started = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
        conn.request("POST", "/search?k=3", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        response = conn.getresponse()
        status, raw = response.status, response.read()
        conn.close()
    except OSError as exc:   # timeouts included
        return 0, time.perf_counter() - started, {"client_error": type(exc).__name__}
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {}
    return status, time.perf_counter() - started, answer


class PeakMemory:
    """Samples the server tree's RSS every 20 ms while in a `with` block; .peak is the largest sample."""

    def __init__(self, server: Server):
        self.server, self.peak, self._stop = server, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())


def message(answer: dict) -> str:
    if "error" in answer:
        return answer["error"].get("message", "")[:90]
    if "results" in answer:
        return f"answered ({len(answer['results'])} results)"
    return answer.get("client_error", "")


# --- scenarios -----------------------------------------------------------------------------------------

def one_by_one(server: Server, files: dict[str, bytes], idle_rss: int) -> list[dict]:
    rows = []
    for name, data in files.items():
        with PeakMemory(server) as mem:
            status, seconds, answer = post_image(server.port, data)
        rows.append({"file": name, "kb": round(len(data) / 1024, 1), "status": status, "seconds": round(seconds, 2),
                     "extra_mb": round((mem.peak - idle_rss) / 2**20), "answer": message(answer)})
        print(f"  {name:24s} {rows[-1]['kb']:8.1f} KB  {status}  {seconds:6.2f} s  +{rows[-1]['extra_mb']:5d} MB  "
              f"{rows[-1]['answer']}", flush=True)
        time.sleep(0.3)
    return rows


def burst(server: Server, name: str, data: bytes, clients: int, idle_rss: int) -> dict:
    """clients uploads of data at once, while another client polls /healthz every 250 ms."""
    health: list[tuple[int, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            health.append(get(server.port, "/healthz", timeout=30))
            time.sleep(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    with PeakMemory(server) as mem, ThreadPoolExecutor(clients) as pool:
        poller.start()
        results = list(pool.map(lambda _: post_image(server.port, data), range(clients)))
        done.set()
        poller.join()
    statuses = sorted(r[0] for r in results)
    row = {"scenario": f"{clients} x {name}", "statuses": statuses, "max_seconds": round(max(r[1] for r in results), 2),
           "extra_mb": round((mem.peak - idle_rss) / 2**20), "healthz_checks": len(health),
           "healthz_ok": sum(s == 200 for s, _ in health),
           "healthz_max_s": round(max((t for _, t in health), default=0.0), 3)}
    print(f"  {row['scenario']:28s} statuses {statuses}  slowest {row['max_seconds']:.2f} s  +{row['extra_mb']} MB  "
          f"/healthz {row['healthz_ok']}/{row['healthz_checks']} ok, slowest {row['healthz_max_s']:.3f} s", flush=True)
    return row


def lone_queries(server: Server, photo: bytes, n: int) -> dict:
    decode_ms, total_ms = [], []
    for _ in range(n):
        status, seconds, answer = post_image(server.port, photo)
        assert status == 200, answer
        decode_ms.append(answer["timings_ms"]["decode"])
        total_ms.append(seconds * 1000)
    return {"queries": n, "decode_ms_p50": round(statistics.median(decode_ms), 2),
            "decode_ms_p95": round(sorted(decode_ms)[int(0.95 * (n - 1))], 2),
            "total_ms_p50": round(statistics.median(total_ms), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-hostile-uploads",
                        help="folder for the generated files, the collection and its index (reused)")
    parser.add_argument("--lone", type=int, default=50, help="lone 640x480 queries to time")
    parser.add_argument("--lone-only", action="store_true",
                        help="only time lone queries (safe against an old server that decodes in-process)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    print("making hostile files ...", flush=True)
    files = hostile_files(args.work / "files")
    data, index = args.work / "data", args.work / "index"
    if not (index / "catalog.db").exists():
        from retrieval.samples import make_sample_collection

        shutil.rmtree(data, ignore_errors=True)
        make_sample_collection(data, per_class=4, size=(160, 120), seed=3)
        subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir",
                        str(index), "--weights", "random"], check=True, stdout=subprocess.DEVNULL)

    server = Server(index, free_port(), RESULTS / "bench_hostile_uploads-server.log", settle_s=1.0)   # decoders import
    try:
        lone = lone_queries(server, query_photo(), args.lone)   # also warms the server up: idle is measured after
        print(f"lone 640x480 JPEG: server decode p50 {lone['decode_ms_p50']} ms (p95 {lone['decode_ms_p95']}), "
              f"request p50 {lone['total_ms_p50']} ms", flush=True)
        idle_rss, idle_pss = server.rss(), server.pss()
        print(f"server tree idle: RSS {idle_rss / 2**20:.0f} MB, PSS {idle_pss / 2**20:.0f} MB "
              f"({len(server.tree())} processes)", flush=True)
        if args.lone_only:
            return
        print("one at a time:", flush=True)
        singles = one_by_one(server, files, idle_rss)
        print("bursts (with /healthz polled every 250 ms):", flush=True)
        bursts = [burst(server, "tiff32_89Mpx", files["tiff32_89Mpx"], 4, idle_rss),
                  burst(server, "rgba_png_24Mpx", files["rgba_png_24Mpx"], 4, idle_rss),
                  burst(server, "jpeg_100_scans", files["jpeg_100_scans"], 8, idle_rss),
                  burst(server, "jpeg_1200_scans", files["jpeg_1200_scans"], 8, idle_rss)]
        after_pss = server.pss()
        health_after = get(server.port, "/healthz")[0]
        lone_after = lone_queries(server, query_photo(), 10)
    finally:
        server.stop()

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {k: v for k, v in os.environ.items() if k.startswith("RETRIEVAL_")},
        "idle": {"rss_mb": round(idle_rss / 2**20), "pss_mb": round(idle_pss / 2**20)},
        "pss_after_mb": round(after_pss / 2**20), "healthz_after": health_after,
        "lone_query": lone, "lone_query_after_attack": lone_after, "one_by_one": singles, "bursts": bursts,
    }
    out = RESULTS / f"bench_hostile_uploads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    worst_s = max([r["seconds"] for r in singles] + [b["max_seconds"] for b in bursts])
    worst_mb = max([r["extra_mb"] for r in singles] + [b["extra_mb"] for b in bursts])
    bad = [r for r in singles if r["status"] >= 500 and r["status"] != 503] + \
          [b for b in bursts if any(s >= 500 and s != 503 or s == 0 for s in b["statuses"])]
    print(f"\nslowest answer {worst_s:.2f} s, most extra server memory {worst_mb} MB, "
          f"PSS idle {idle_pss / 2**20:.0f} MB -> after {after_pss / 2**20:.0f} MB, /healthz after: {health_after}, "
          f"unexpected statuses: {len(bad)}")
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
