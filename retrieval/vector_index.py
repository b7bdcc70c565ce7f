"""The FAISS vector index: IndexIDMap2 over IndexFlatL2, keyed by catalog row id, saved atomically."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from .catalog import Catalog
from .system import available_cores

log = logging.getLogger(__name__)


# A few queries (a lone upload, a micro-batch) are searched by _scan: the stored vectors are split across
# threads, each reading its share once, in blocks of about SCAN_BLOCK_BYTES that stay in cache while
# every query of the batch goes over them, with FAISS's own exact kernel. FAISS's flat search gives a
# query one thread and reads all the vectors once per query. 10k x 4096 vectors, FAISS 1.15, 2-core CI
# machine, medians: one query 9.7 -> 6.6 ms (two threads), eight 37 -> 22 ms. Larger batches go to FAISS.
SCAN_BLOCK_BYTES = 1 << 20
SCAN_MAX_QUERIES = 64

_scan_pool: ThreadPoolExecutor | None = None
_scan_pool_lock = threading.Lock()


def _scan_threads() -> ThreadPoolExecutor:
    """One pool per process, a thread per core, each with single-threaded FAISS (OpenMP settings are per thread)."""
    global _scan_pool
    with _scan_pool_lock:
        if _scan_pool is None:
            _scan_pool = ThreadPoolExecutor(available_cores(), thread_name_prefix="vector-scan",
                                            initializer=faiss.omp_set_num_threads, initargs=(1,))
        return _scan_pool


def _scan_rows(vectors: np.ndarray, queries: np.ndarray, k: int, start: int, stop: int,
               block: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest of rows [start, stop) for each query -> (squared distances, row positions), shape=(q, k) each."""
    heap = faiss.ResultHeap(len(queries), k)
    for lo in range(start, stop, block):
        hi = min(lo + block, stop)
        sq, pos = faiss.knn(queries, vectors[lo:hi], k)           # FAISS's exact L2 kernel; -1 where hi - lo < k
        heap.add_result(sq, np.where(pos >= 0, pos + lo, -1))
    heap.finalize()
    return heap.D, heap.I


class VectorIndex:
    """Exact L2 search over (id, vector) pairs. Not thread-safe for writes; searches may run concurrently."""

    def __init__(self, dim: int, index: faiss.Index | None = None):
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        assert self.index.d == dim, f"FAISS index has dimension {self.index.d}, expected {dim}"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """shape=(N,), dtype=int64, in insertion order."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids shape=(n,) int64; vectors shape=(n, dim) float32."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape} do not match ({len(ids)}, {self.dim})"
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids) -> int:  # noqa: ANN001 - any int sequence
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def search(self, queries: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """queries shape=(q, dim) float32 -> (distances shape=(q, k') float32 L2 (not squared), ids shape=(q, k') int64).

        k' = min(k, len(self)); nearest first. Exact. threads: how many threads scan the vectors for a
        few queries (at most one per core), or FAISS's OpenMP threads for a large batch.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries must be (q, {self.dim}), got {queries.shape}"
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if len(queries) <= SCAN_MAX_QUERIES:
            sq, pos = self._scan(queries, k, threads)
            ids = self.ids()[pos]                      # k <= len(self): every position is a real row
        else:
            faiss.omp_set_num_threads(max(1, threads))   # per calling thread
            sq, ids = self.index.search(queries, k)
        return np.sqrt(np.maximum(sq, 0.0)), ids

    def _scan(self, queries: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN over the stored vectors, split across threads -> (squared distances, row positions)."""
        flat = faiss.downcast_index(self.index.index)
        n = flat.ntotal
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)   # FAISS's storage, no copy
        # one query gains nothing from blocks (nothing to reuse); a batch reads each block once for all its queries
        block = n if len(queries) == 1 else max(1, SCAN_BLOCK_BYTES // (4 * self.dim))
        bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(int).tolist()
        if len(bounds) == 2:
            faiss.omp_set_num_threads(1)   # per calling thread: FAISS over one query is slower with more
            return _scan_rows(vectors, queries, k, 0, n, block)
        parts = [_scan_threads().submit(_scan_rows, vectors, queries, k, lo, hi, block)
                 for lo, hi in zip(bounds, bounds[1:])]
        heap = faiss.ResultHeap(len(queries), k)
        for part in parts:
            heap.add_result(*part.result())
        heap.finalize()
        return heap.D, heap.I

    def save(self, path: Path) -> None:
        """Write to a temporary file, fsync, then rename over path: readers see the old or the new file, whole."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:   # through Python's file: any path works (FAISS's own takes UTF-8 names only)
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int) -> "VectorIndex | None":
        """The saved index, or None when it is missing, unreadable or of another shape (it is a cache)."""
        try:
            with open(path, "rb") as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except FileNotFoundError:
            return None
        except RuntimeError as exc:
            if Path(path).exists():
                log.warning("ignoring unreadable FAISS file %s (%s); rebuilding from the catalog", path, exc)
            return None
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            log.warning("ignoring FAISS file %s of another shape; rebuilding from the catalog", path)
            return None
        return cls(dim, index)

    def copy(self) -> "VectorIndex":
        """An independent copy (searches of this one may go on while the copy is changed)."""
        return VectorIndex(self.dim, faiss.clone_index(self.index))

    def reconcile(self, catalog: Catalog) -> bool:
        """Make the index agree with the catalog: ids missing here are added from the catalog's vectors, ids no
        longer in the catalog are removed. -> whether anything changed."""
        have = self.ids()
        want = catalog.ids()
        stale = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(stale):
            self.remove(stale)
        if len(missing):
            for ids, vecs in catalog.vectors(missing):
                self.add(ids, vecs)
        if len(stale) or len(missing):
            log.info("reconciled FAISS with the catalog: %d added, %d removed", len(missing), len(stale))
        return bool(len(stale) or len(missing))

    @classmethod
    def open_reconciled(cls, path: Path, catalog: Catalog, dim: int) -> tuple["VectorIndex", bool]:
        """Load the FAISS file and make it agree with the catalog (DESIGN invariant 1).

        Ids missing from FAISS are added from the catalog's vectors; ids no longer in the catalog are removed.
        -> (index, changed) where changed says whether it differs from the file.
        """
        index = cls.load(path, dim)
        if index is not None and not index.agrees_with(catalog):
            log.warning("the FAISS file %s holds other vectors than the catalog under the same ids (saved from "
                        "another catalog?); rebuilding it from the catalog", path)
            index = None
        changed = index is None
        index = index or cls(dim)
        return index, index.reconcile(catalog) or changed

    def agrees_with(self, catalog: Catalog, sample: int = 8) -> bool:
        """Whether a few ids spread over the index hold the catalog's vectors for them (a FAISS file of another
        catalog, whose ids were handed out again, does not). Indexes that cannot give vectors back pass."""
        have = self.ids()
        if len(have) == 0:
            return True
        picked = np.unique(have[np.linspace(0, len(have) - 1, min(sample, len(have))).astype(int)])
        for ids, vecs in catalog.vectors(picked):
            for i, vec in zip(ids.tolist(), vecs):
                try:
                    stored = self.index.reconstruct(int(i))
                except RuntimeError:   # a type that keeps no vectors to give back
                    return True
                if not np.allclose(stored, vec, atol=1e-5):
                    return False
        return True
