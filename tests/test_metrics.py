"""GET /metrics (api.metrics) from a real serve-images with two gunicorn workers: counts summed over the workers."""
from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from helpers.servers import serve_images
from helpers.waiting import wait_for

CONCURRENCY = 6     # clients at once: a worker's threads share forward passes


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    response = requests.get(base + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def booted_workers(metrics_dir: Path) -> list[int]:
    """The live gunicorn workers of the server whose metrics folder this is that have built their app: each sets the
    index-size gauge as its service starts, in its own file (the file itself appears earlier, when the worker imports
    api.metrics while it is still loading)."""
    images = worker_values(metrics_dir, "gauge_livemostrecent", "retrieval_index_images")
    return sorted(pid for pid, value in images.items() if value > 0 and psutil.pid_exists(pid))


def wait_for_booted_workers(metrics_dir: Path, count: int, exclude: list[int] | None = None) -> list[int]:
    """Wait for count booted workers (not counting those in exclude); -> their pids. A request sent to a booted
    worker is answered: at most it waits in the listening socket's queue while the worker enters its loop."""
    deadline = time.monotonic() + 180
    while len(booted := [pid for pid in booted_workers(metrics_dir) if pid not in (exclude or [])]) < count:
        assert metrics_dir.is_dir(), "the metrics folder was removed while the server runs"
        assert time.monotonic() < deadline, f"expected {count} booted gunicorn worker(s) within 180 s, found {booted}"
        time.sleep(0.5)
    return booted


def worker_values(metrics_dir: Path, kind: str, name: str, labels: dict[str, str] | None = None) -> dict[int, float]:
    """pid -> a sample's value in that worker's own file of the multiprocess folder (kind: the files' prefix,
    "counter", "gauge_livemostrecent", ...), each file copied to a folder of its own and read there."""
    values = {}
    for file in metrics_dir.glob(f"{kind}_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        alone = metrics_dir.parent / f"one-worker-{pid}"
        alone.mkdir(exist_ok=True)
        try:
            shutil.copy(file, alone / file.name)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(alone))
            values[pid] = registry.get_sample_value(name, labels or {}) or 0.0
        except FileNotFoundError:      # a dead worker's live gauge file, which the server removed meanwhile
            pass
        finally:
            shutil.rmtree(alone)
    return values


def searches_by_worker(metrics_dir: Path) -> dict[int, float]:
    """pid -> POST /search requests that worker answered 200, read from its own file in the multiprocess folder."""
    return worker_values(metrics_dir, "counter", "retrieval_http_requests_total",
                         {"endpoint": "api.search", "method": "POST", "status": "200"})


def test_metrics_of_a_single_process_app(client):
    # without PROMETHEUS_MULTIPROC_DIR (flask run, the test client) the process's own registry is served
    def samples() -> dict:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}

    before = samples()
    assert client.post("/search", data={"k": "2"}).status_code == 400
    assert client.get("/nowhere").status_code == 404
    assert client.get("/images/1/neighbours?k=2").status_code == 200
    after = samples()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("retrieval_errors_total", status="400", code="missing_image") == 1
    assert delta("retrieval_http_requests_total", endpoint="unmatched", method="GET", status="404") == 1
    assert delta("retrieval_http_requests_total", endpoint="api.neighbours", method="GET", status="200") == 1
    assert delta("retrieval_http_requests_total", endpoint="metrics.metrics", method="GET", status="200") == 1
    assert delta("retrieval_search_seconds_count") == 1
    assert value(after, "retrieval_index_images") == 30


@pytest.mark.slow
def test_metrics_are_summed_over_gunicorn_workers(sample_index, tmp_path):
    query = sorted((sample_index.data_dir / "red_circles").glob("*.jpg"))[0].read_bytes()
    with serve_images(sample_index.index_dir, tmp_path / "serve.log", "--workers", "2", "--threads", "4") as base:
        port = int(base.rsplit(":", 1)[1])   # the server's workers, by their listening socket, and their metric files
        listening = {c.pid for c in psutil.net_connections("tcp")
                     if c.pid and c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
        # its files open or mapped (prometheus-client maps them; the descriptor may be closed by the time we look)
        held = [f.path for pid in listening for f in [*psutil.Process(pid).open_files(), *psutil.Process(pid).memory_maps()]]
        folders = {Path(path).parent for path in held if Path(path).parent.name.startswith("serve-images-metrics-")}
        assert len(folders) == 1, f"expected serve-images' one metrics folder, found {folders}"
        metrics_dir = folders.pop()
        # in memory where there is room: mapped files on a full /tmp killed the workers (SIGBUS)
        assert metrics_dir.parent == Path("/dev/shm") or not Path("/dev/shm").is_dir(), metrics_dir

        def search(_: int) -> int:
            return requests.post(base + "/search?k=3", files={"image": ("q.jpg", query, "image/jpeg")},
                                 timeout=120).status_code

        # The kernel hands connections to whichever worker accepts first (on an idle machine often the same one), so
        # each worker in turn answers a round while the other is stopped: both must have answered some.
        workers = wait_for_booted_workers(metrics_dir, 2)
        assert len(workers) == 2, f"expected 2 gunicorn workers, found {workers}"
        sent = 0
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for answering in workers:
                others = [pid for pid in workers if pid != answering]
                for pid in others:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    assert list(pool.map(search, range(CONCURRENCY))) == [200] * CONCURRENCY
                finally:
                    for pid in others:
                        os.kill(pid, signal.SIGCONT)
                sent += CONCURRENCY
        per_worker = searches_by_worker(metrics_dir)
        assert sorted(per_worker.get(pid, 0) for pid in workers) == [CONCURRENCY, CONCURRENCY], per_worker
        neighbours = requests.get(base + "/images/1/neighbours?k=3", timeout=60)
        assert neighbours.status_code == 200, neighbours.text
        missing = requests.post(base + "/search", data={"k": "3"}, timeout=60)      # no image
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_image"
        unknown = requests.get(base + "/images/999999", timeout=60)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"

        # every scrape, whichever worker answers it, shows the requests of both workers
        scrapes = [scrape(base) for _ in range(4)]
        for samples in scrapes:
            assert value(samples, "retrieval_http_requests_total",
                         endpoint="api.search", method="POST", status="200") == sent
            assert value(samples, "retrieval_http_requests_total",
                         endpoint="api.search", method="POST", status="400") == 1
            assert value(samples, "retrieval_http_requests_total",
                         endpoint="api.neighbours", method="GET", status="200") == 1
            assert value(samples, "retrieval_http_requests_total",
                         endpoint="api.image_file", method="GET", status="404") == 1
        m = scrapes[-1]
        assert sum(per_worker.values()) == sent
        # latency histogram: every search request observed, the failed one too; buckets cumulative up to +Inf
        assert value(m, "retrieval_http_request_duration_seconds_count", endpoint="api.search") == sent + 1
        assert value(m, "retrieval_http_request_duration_seconds_bucket", endpoint="api.search", le="+Inf") == sent + 1
        assert value(m, "retrieval_http_request_duration_seconds_sum", endpoint="api.search") > 0
        # where the time went: one decode per upload, one forward pass and one search per micro-batch
        assert value(m, "retrieval_decode_seconds_count") == sent
        assert value(m, "retrieval_decode_seconds_sum") > 0
        batches = value(m, "retrieval_network_seconds_count")
        assert 1 <= batches <= sent and value(m, "retrieval_network_seconds_sum") > 0
        assert value(m, "retrieval_batch_size_count") == batches
        assert value(m, "retrieval_batch_size_sum") == sent             # every query in exactly one batch
        assert value(m, "retrieval_search_seconds_count") == batches + 1  # the batches, and the neighbours lookup
        # errors by code, and the index
        assert value(m, "retrieval_errors_total", status="400", code="missing_image") == 1
        assert value(m, "retrieval_errors_total", status="404", code="not_found") == 1
        assert value(m, "retrieval_index_images") == sample_index.report.total == 30
        assert value(m, "retrieval_index_reloads_total") == 0

        # workers that end, one killed (as by the kernel out of memory), one stopped (it exits through Python, as on a
        # timeout or max-requests, and so through serve-images' main): gunicorn starts others, which boot; the dead
        # ones' counts stay, their live gauges go
        killed, stopped = workers
        os.kill(killed, signal.SIGKILL)
        os.kill(stopped, signal.SIGTERM)
        wait_for_booted_workers(metrics_dir, 2, exclude=workers)   # and the server is not stopped mid-boot
        assert wait_for(lambda: not any((metrics_dir / f"gauge_livemostrecent_{pid}.db").exists() for pid in workers),
                        60, interval=0.2), "the gauge files of the dead workers were not removed"
        after = scrape(base)
        assert value(after, "retrieval_http_requests_total", endpoint="api.search", method="POST", status="200") == sent
        assert value(after, "retrieval_index_images") == 30
    assert not metrics_dir.exists(), "serve-images left its metrics folder behind"


def test_a_metric_says_when_the_index_cannot_be_served(tmp_path, index_images):
    """Reproduces: with the catalog moved away (or its database down) /healthz and /search answered 503, while
    /metrics showed no failure and the image count unchanged: nothing to alert on."""
    from api import create_app
    from retrieval.samples import make_sample_collection

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    client = app.test_client()

    def available() -> float:
        samples = {s.name: s.value for family in text_string_to_metric_families(client.get("/metrics").get_data(
            as_text=True)) for s in family.samples}
        return samples["retrieval_index_available"]

    try:
        assert available() == 1
        (tmp_path / "index" / "catalog.db").rename(tmp_path / "moved.db")
        assert client.get("/healthz").status_code == 503 and available() == 0
        (tmp_path / "moved.db").rename(tmp_path / "index" / "catalog.db")
        assert available() == 1
    finally:
        app.extensions["retrieval"].close()


@pytest.mark.slow
def test_the_metrics_folder_of_a_killed_server_is_removed_by_the_next_one(sample_index, tmp_path):
    """Reproduces: `kill -KILL` of serve-images (the out-of-memory killer, a supervisor) left its metrics folder in
    /dev/shm, about 200 kB a worker, and every restart after such a kill added one."""
    import subprocess
    import tempfile

    from commands.serve_images import METRICS_PREFIX, metrics_parent, remove_dead_servers_metrics
    from helpers.servers import SERVE, START_S, healthy
    from tools.ports import free_port

    parent = Path(metrics_parent() or tempfile.gettempdir())
    port = free_port()
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([*SERVE, "--index-dir", str(sample_index.index_dir), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "RETRIEVAL_RELOAD_INTERVAL_S": "0"})
    try:
        assert wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), START_S, interval=0.25)
        left = list(parent.glob(f"{METRICS_PREFIX}{killed.pid}-*"))
        assert len(left) == 1, left
        remove_dead_servers_metrics(parent)   # as another server starting (another container, say) looks
        assert left[0].exists(), "a running server's folder is kept (its lock is held, whatever its pid says)"
    finally:
        killed.kill()
        killed.wait()
    assert left[0].exists(), "a killed server cannot clean up after itself"
    with serve_images(sample_index.index_dir, tmp_path / "next.log"):
        assert not left[0].exists(), "the next server removed the dead one's folder"
