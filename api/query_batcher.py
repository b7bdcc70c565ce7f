"""Micro-batching: one worker thread runs concurrent queries as one forward pass and one FAISS search."""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from retrieval.search.snapshot import Hit, IndexUnavailable
from retrieval.system import available_cores

from api import metrics

log = logging.getLogger(__name__)

RECENT_BATCHES = 8   # the concurrency to wait for is the largest seen over this many batches


class EmbeddingIndex(Protocol):
    """What the batcher needs of retrieval.search.index.ImageIndex."""

    def embed(self, pixels: torch.Tensor) -> np.ndarray: ...

    def search_vectors(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None,
                       threads: int = 1) -> list[list[Hit]]: ...


@runtime_checkable
class SnapshotSource(Protocol):
    """An index that hot reload can swap (retrieval.search.index.ImageIndex): a batch takes one snapshot for its whole run."""

    def snapshot(self) -> EmbeddingIndex: ...


@dataclasses.dataclass(frozen=True)
class BatchedAnswer:
    """One query's share of a batch."""
    vector: np.ndarray     # the query's feature vector, shape=(dim,), float32
    hits: list[Hit]        # nearest first, at most k
    features_ms: float     # from submit to features ready: wait for the batch + forward pass
    search_ms: float       # the batch's FAISS search and catalog lookup
    batch_size: int        # how many queries shared the forward pass
    index: EmbeddingIndex | None = None   # what the batch embedded and searched with (a snapshot, on a swappable index)


@dataclasses.dataclass
class _Pending:
    pixels: torch.Tensor   # uint8, shape=(3, H, W)
    k: int
    future: Future
    submitted: float       # time.perf_counter()


@dataclasses.dataclass
class BatchStats:
    """Counters for /stats, tests and logs (written by the worker thread only)."""
    batches: int = 0
    queries: int = 0
    largest: int = 0
    forward_s: float = 0.0   # total time in forward passes
    search_s: float = 0.0    # total time in batch searches


class QueryBatcher:
    """One worker thread owns the network: it stacks concurrent queries into one embed() and one search_vectors().

    Batching: the worker takes the first waiting query plus every query already queued (at most
    max_batch); then, for at most max_wait_s, it waits for queries on their way: ones request threads
    are decoding now (see incoming()), and up to as many as were in flight together during the last
    few batches (clients whose answer has just gone out come straight back). A lone client's query
    never waits; after a burst, a lone query waits at most max_wait_s for a few batches.

    Threads: a forward pass uses torch_threads (0: one per core) when nothing else wants the cores,
    and one fewer while request threads are decoding (two busy OpenMP teams on the same cores are far
    slower than one). The search, of a lone query or a batch, uses search_threads (0: one per core).
    """

    def __init__(self, index: EmbeddingIndex, *, max_batch: int = 8, max_wait_s: float = 0.03,
                 torch_threads: int = 0, search_threads: int = 0):
        assert max_batch >= 1, "max_batch must be at least 1"
        assert max_wait_s >= 0, "max_wait_s must not be negative"
        self.index, self.max_batch, self.max_wait_s = index, max_batch, max_wait_s
        self.idle_threads = torch_threads or available_cores()
        self.busy_threads = max(1, self.idle_threads - 1)
        self.search_threads = search_threads or available_cores()
        self.stats = BatchStats()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._lock = threading.Lock()   # guards the three counters below
        self._incoming = 0              # queries request threads are decoding
        self._in_flight = 0             # queries submitted and not yet answered
        self._peak = 1                  # most queries decoding or in flight at once since the last batch
        self._recent_peaks: collections.deque[int] = collections.deque([1], maxlen=RECENT_BATCHES)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap the decoding of a query that will be submitted: the worker waits for it (briefly)."""
        with self._lock:
            self._incoming += 1
            self._peak = max(self._peak, self._incoming + self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._incoming -= 1

    def submit(self, pixels: torch.Tensor, k: int) -> Future:
        """pixels: uint8 shape=(3, H, W) -> a Future of BatchedAnswer."""
        assert pixels.dtype == torch.uint8 and pixels.ndim == 3, f"want uint8 (3,H,W), got {pixels.dtype} {tuple(pixels.shape)}"
        if self._closed:
            raise RuntimeError("the query batcher is closed")
        future: Future = Future()
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._incoming + self._in_flight)
        future.add_done_callback(self._answered)
        self._queue.put(_Pending(pixels, int(k), future, time.perf_counter()))
        return future

    def search(self, pixels: torch.Tensor, k: int, timeout: float | None = None) -> BatchedAnswer:
        """Submit and wait. Raises TimeoutError when the answer takes longer than timeout seconds."""
        future = self.submit(pixels, k)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Answer the queued queries, then stop the worker thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _answered(self, _future: Future) -> None:
        with self._lock:
            self._in_flight -= 1

    # worker thread
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            self._answer(batch)
            if closing:
                return

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """-> (up to max_batch queries, whether the close sentinel was met)."""
        batch = [first]
        with self._lock:
            expected = min(self.max_batch, max(self._peak, *self._recent_peaks))
        deadline = time.perf_counter() + self.max_wait_s
        closing = False
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or (self._incoming <= 0 and len(batch) >= expected):
                    break
                try:
                    item = self._queue.get(timeout=min(remaining, 0.001))   # re-check the counters each ms
                except queue.Empty:
                    continue
            if item is None:
                closing = True
                break
            batch.append(item)
        with self._lock:
            self._recent_peaks.append(self._peak)
            self._peak = max(1, self._in_flight + self._incoming)   # start counting afresh for the next batch
        return batch, closing

    def _answer(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]   # drop queries whose caller gave up
        if not live:
            return
        alone = self._incoming <= 0 and self._queue.empty()   # nothing else wants a core during this pass
        try:
            started = time.perf_counter()
            # OpenMP thread counts are per calling thread, and PyTorch and FAISS share them: set each before use.
            torch.set_num_threads(self.idle_threads if alone else self.busy_threads)
            # one network and its own vectors for the whole batch, whatever a reload swaps in meanwhile
            index = self.index.snapshot() if isinstance(self.index, SnapshotSource) else self.index
            pixels = torch.stack([p.pixels for p in live])                      # (B, 3, H, W) uint8
            vectors = index.embed(pixels)                                       # (B, 3, H, W) -> (B, dim)
            embedded = time.perf_counter()
            k = max(p.k for p in live)
            hits = index.search_vectors(vectors, k, threads=self.search_threads)   # one search for the batch
            searched = time.perf_counter()
        except IndexUnavailable as exc:   # the index on disk cannot be served: the reload logged why
            for p in live:
                p.future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - handed to every caller (as concurrent.futures does); the worker lives on
            log.exception("a batch of %d queries failed", len(live))
            for p in live:
                p.future.set_exception(exc)
            return
        s = self.stats
        s.batches, s.queries, s.largest = s.batches + 1, s.queries + len(live), max(s.largest, len(live))
        s.forward_s += embedded - started
        s.search_s += searched - embedded
        metrics.NETWORK_SECONDS.observe(embedded - started)
        metrics.SEARCH_SECONDS.observe(searched - embedded)
        metrics.BATCH_SIZE.observe(len(live))
        for i, p in enumerate(live):
            p.future.set_result(BatchedAnswer(
                vector=vectors[i], hits=hits[i][:p.k], features_ms=(embedded - p.submitted) * 1000.0,
                search_ms=(searched - embedded) * 1000.0, batch_size=len(live), index=index))
