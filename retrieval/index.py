"""An opened index for querying: settings, catalog, FAISS vectors and the exact network that made them."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from .backbones import FeatureExtractor, build_extractor
from .catalog import Catalog, IndexSettings
from .images import DEFAULT_MAX_PIXELS, DecodedImage, decode_for_model
from .vector_index import FAISS_FILE, VectorIndex

log = logging.getLogger(__name__)

INDEX_DIR_ENV = "RETRIEVAL_INDEX_DIR"


class IndexNotFound(FileNotFoundError):
    """No usable index in the folder; the message says what to run."""


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows to unit length; all-zero rows stay zero. shape=(n, d) float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def embed(extractor: FeatureExtractor, pixels: torch.Tensor, normalize: bool) -> np.ndarray:
    """uint8 images shape=(B, 3, H, W) -> features shape=(B, D) float32, L2-normalised when asked."""
    feats = extractor(pixels).numpy()                                   # (B, 3, 224, 224) -> (B, 4096)
    return l2_normalize(feats) if normalize else np.ascontiguousarray(feats, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    path: str
    label: str | None
    distance: float   # L2 distance in feature space (not squared)


class ImageIndex:
    """Query side of an index folder. Searches are safe from several threads; refresh() swaps in new data."""

    def __init__(self, index_dir: Path | str, *, device: str = "cpu", load_network: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.index_dir = Path(index_dir)
        try:
            self.catalog = Catalog(self.index_dir)
        except FileNotFoundError as exc:
            raise IndexNotFound(str(exc)) from exc
        settings = self.catalog.settings()
        if settings is None:
            raise IndexNotFound(f"the index at {self.index_dir} has no settings yet; run index-images first")
        self.settings: IndexSettings = settings
        self.data_dir = Path(settings.data_dir)
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._signature = self._current_signature()
        self.vectors, _ = VectorIndex.open_reconciled(self.faiss_path, self.catalog, settings.dim)
        self.extractor: FeatureExtractor | None = None
        if load_network:
            self.extractor, identity = build_extractor(settings.model, settings.layer, settings.weights,
                                                       self.index_dir, device, seed=settings.seed)
            if identity != settings.weights_identity:
                raise IndexNotFound(
                    f"the weights available now ({identity}) are not the ones this index was built with "
                    f"({settings.weights_identity}); re-index or restore the original weights")

    @property
    def faiss_path(self) -> Path:
        return self.index_dir / FAISS_FILE

    def close(self) -> None:
        self.catalog.close()

    def __len__(self) -> int:
        return len(self.vectors)

    # querying
    def decode(self, data: bytes) -> DecodedImage:
        """Query bytes -> crop, same path as indexing. Raises images.ImageDecodeError."""
        assert self.extractor is not None, "opened with load_network=False"
        return decode_for_model(data, self.extractor.preprocessing, max_pixels=self.max_pixels)

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, dim) float32, as the index's vectors were made."""
        assert self.extractor is not None, "opened with load_network=False"
        return embed(self.extractor, pixels, self.settings.normalize)

    def search_vectors(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None,
                       threads: int = 1) -> list[list[Hit]]:
        """queries shape=(q, dim) -> for each query its k nearest hits, nearest first (excluded ids left out).

        threads: how many threads search (see VectorIndex.search)."""
        vectors = self.vectors  # one consistent snapshot even if refresh() swaps meanwhile
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        distances, ids = vectors.search(queries, k + extra, threads)
        rows = self.catalog.get_many(int(i) for i in np.unique(ids) if i >= 0)
        results = []
        for qi in range(len(queries)):
            skip = exclude[qi] if exclude else set()
            hits = []
            for d, i in zip(distances[qi], ids[qi]):
                row = rows.get(int(i))
                if row is None or int(i) in skip:   # removed since the snapshot, or excluded
                    continue
                hits.append(Hit(row.id, row.path, row.label, float(d)))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def search_image(self, data: bytes, k: int) -> tuple[list[Hit], DecodedImage]:
        decoded = self.decode(data)
        query = self.embed(decoded.pixels.unsqueeze(0))
        return self.search_vectors(query, k)[0], decoded

    # freshness
    def _current_signature(self) -> tuple | None:
        """Identity of the FAISS file on disk; index-images replaces it (atomically) at the end of each run
        that changed anything, and every JobConfig.save_every_s during long runs."""
        try:
            st = os.stat(self.faiss_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def refresh(self) -> bool:
        """Swap in the index as it is on disk now, if its FAISS file changed. -> True when something new was loaded.

        Between two saves, rows the indexer deletes are already left out of results (search_vectors
        drops ids without a catalog row); rows it adds appear with the next save.
        """
        with self._lock:
            signature = self._current_signature()
            if signature == self._signature:
                return False
            vectors, _ = VectorIndex.open_reconciled(self.faiss_path, self.catalog, self.settings.dim)
            self.vectors = vectors   # atomic reference swap: in-flight searches keep the old object
            self._signature = signature
            log.info("index refreshed: %d vectors", len(vectors))
            return True
