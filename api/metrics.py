"""Prometheus metrics: requests, latency, time in decode, network and search, batch sizes, index size and reloads, errors.

The metric objects are module-level, as prometheus-client means them to be. Under serve-images they
live in prometheus-client's multiprocess mode: serve-images makes a fresh private folder, names it in
PROMETHEUS_MULTIPROC_DIR before any worker starts (prometheus-client reads it when it is first
imported), and each worker process writes its values there; `GET /metrics` sums them over the
workers. Without that variable (the Flask test client, `flask --app api run`) the process's own
registry is served. The registry an app serves is kept in `app.extensions["metrics"]`.
"""
from __future__ import annotations

import dataclasses
import os
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client import multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXTENSION_KEY = "metrics"
UNMATCHED = "unmatched"     # the endpoint label of requests no route matched (unknown URL, or method: 404, 405)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})   # others count as "other"

# Seconds; from a sub-millisecond FAISS search to a 30 s query timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

REQUESTS = Counter("retrieval_http_requests", "HTTP requests answered by the app, by endpoint, method and status.",
                   ["endpoint", "method", "status"])
REQUEST_SECONDS = Histogram("retrieval_http_request_duration_seconds",
                            "Time from the request reaching the app to its answer, by endpoint.",
                            ["endpoint"], buckets=LATENCY_BUCKETS)
ERRORS = Counter("retrieval_errors", "Error answers by HTTP status and error code (the `code` of the JSON error).",
                 ["status", "code"])
DECODE_SECONDS = Histogram("retrieval_decode_seconds",
                           "Time to decode an upload in a decoder process, the wait for a free decoder included.",
                           buckets=LATENCY_BUCKETS)
NETWORK_SECONDS = Histogram("retrieval_network_seconds", "Time of one forward pass of the network (one micro-batch).",
                            buckets=LATENCY_BUCKETS)
SEARCH_SECONDS = Histogram("retrieval_search_seconds",
                           "Time of one FAISS search and catalog lookup: a micro-batch of uploads, or one indexed "
                           "image's neighbours.", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("retrieval_batch_size", "Queries that shared one forward pass (micro-batch size).",
                       buckets=BATCH_BUCKETS)
INDEX_IMAGES = Gauge("retrieval_index_images", "Images in the index served (the value last set by a live worker).",
                     multiprocess_mode="livemostrecent")
INDEX_AVAILABLE = Gauge("retrieval_index_available",
                        "1 while every live worker serves the index, 0 while one cannot (its /healthz says why: "
                        "the catalog missing, damaged or out of reach, the network not loadable, hot reload failing).",
                        multiprocess_mode="livemin")
INDEX_RELOADS = Counter("retrieval_index_reloads", "Times hot reload swapped in a changed index, summed over workers.")
INDEX_RELOAD_FAILURES = Counter("retrieval_index_reload_failures",
                                "Looks at the index on disk that raised, summed over workers.")

bp = Blueprint("metrics", __name__)


@dataclasses.dataclass(frozen=True)
class MetricsState:
    """What an app serves at /metrics."""
    registry: CollectorRegistry      # a fresh registry over the multiprocess folder, or the process's own
    multiprocess_dir: str | None     # PROMETHEUS_MULTIPROC_DIR, when the values of several processes are summed


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def init_metrics(app: Flask) -> MetricsState:
    """Count every request of app and serve GET /metrics; the state goes in app.extensions["metrics"]."""
    folder = multiprocess_dir()
    if folder is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
    else:
        registry = REGISTRY
    state = MetricsState(registry, folder)
    app.extensions[EXTENSION_KEY] = state
    app.before_request(_started)
    app.after_request(_count)
    app.register_blueprint(bp)
    return state


def _started() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    started = g.get("metrics_started")
    endpoint = request.endpoint or UNMATCHED
    method = request.method if request.method in METHODS else "other"   # a client cannot mint label values
    REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
    if started is not None:
        REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
    return response


def count_error(status: int, code: str) -> None:
    ERRORS.labels(str(status), code).inc()


@bp.get("/metrics")
def metrics() -> Response:
    """Every metric in the Prometheus text format, summed over the server's worker processes."""
    service = current_app.extensions.get("retrieval")
    if service is not None:             # this worker's view is current; the others set theirs when they load
        INDEX_IMAGES.set(len(service.index))
        service.note_availability()
    state: MetricsState = current_app.extensions[EXTENSION_KEY]
    response = Response(generate_latest(state.registry), mimetype=None)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response
