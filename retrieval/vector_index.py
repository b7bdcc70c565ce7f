"""The FAISS vector index: IndexIDMap2 over IndexFlatL2, keyed by catalog row id, saved atomically."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from .catalog import Catalog

log = logging.getLogger(__name__)

FAISS_FILE = "vectors.faiss"


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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries shape=(q, dim) float32 -> (distances shape=(q, k') float32 L2 (not squared), ids shape=(q, k') int64).

        k' = min(k, len(self)); nearest first.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries must be (q, {self.dim}), got {queries.shape}"
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        sq, ids = self.index.search(queries, k)
        return np.sqrt(np.maximum(sq, 0.0)), ids

    def save(self, path: Path) -> None:
        """Write to a temporary file, fsync, then rename over path: readers see the old or the new file, whole."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int) -> "VectorIndex | None":
        """The saved index, or None when it is missing, unreadable or of another shape (it is a cache)."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            if Path(path).exists():
                log.warning("ignoring unreadable FAISS file %s (%s); rebuilding from the catalog", path, exc)
            return None
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            log.warning("ignoring FAISS file %s of another shape; rebuilding from the catalog", path)
            return None
        return cls(dim, index)

    @classmethod
    def open_reconciled(cls, path: Path, catalog: Catalog, dim: int) -> tuple["VectorIndex", bool]:
        """Load the FAISS file and make it agree with the catalog (DESIGN invariant 1).

        Ids missing from FAISS are added from the catalog's vectors; ids no longer in the catalog are removed.
        -> (index, changed) where changed says whether it differs from the file.
        """
        index = cls.load(path, dim) or cls(dim)
        changed = not Path(path).exists()
        have = index.ids()
        want = catalog.ids()
        stale = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(stale):
            index.remove(stale)
            changed = True
        if len(missing):
            for ids, vecs in catalog.vectors(missing):
                index.add(ids, vecs)
            changed = True
        if len(stale) or len(missing):
            log.info("reconciled FAISS with the catalog: %d added, %d removed", len(missing), len(stale))
        return index, changed
