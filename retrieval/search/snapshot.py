"""One loaded version of an index (IndexSnapshot): its settings, network, FAISS vectors and catalog, searched
together, so a query vector of one network never meets the stored vectors of another; the hits it returns."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import torch

from retrieval.catalog import Catalog, IndexSettings
from retrieval.features.backbones import FeatureExtractor
from retrieval.search.expansion import QueryExpansion, expand
from retrieval.vectors.faiss_parts import search_params_of
from retrieval.vectors.regions import search_images
from retrieval.vectors.vector_index import VectorIndex


class IndexUnavailable(RuntimeError):
    """The index on disk cannot be served right now (catalog missing or unreadable, its network not loadable).

    The message says why; a reload that finds the index servable again clears it."""


def network_key(settings: IndexSettings) -> str:
    """A short identity of the network that made an index's vectors: vectors of different keys never meet."""
    parts = (settings.model, settings.layer, settings.weights_identity, settings.seed, settings.dim,
             settings.normalize, settings.preprocessing) + ((settings.views,) if settings.views != "single" else ())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


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
    sha256: str = ""  # of the file's bytes, as indexed: what a versioned thumbnail or file URL is keyed on


@dataclasses.dataclass(frozen=True, eq=False)
class IndexSnapshot:
    """One loaded version of the index: its settings, the network that made its vectors, the vectors and their catalog.

    A query (or a batch) takes one snapshot and uses it from the forward pass to the catalog lookup, so a
    query vector of one network never meets the stored vectors of another, whatever a reload swaps in.
    """
    version: int                        # 1 for the first load, +1 for each reload that loaded something
    settings: IndexSettings
    catalog: Catalog
    vectors: VectorIndex
    extractor: FeatureExtractor | None  # None when opened with load_network=False
    faiss_signature: tuple | None       # (inode, mtime_ns, size) of the FAISS file these vectors came from
    catalog_file: tuple                 # Catalog.identity() when it was opened: (st_dev, st_ino) of an SQLite file,
                                        # ("database", created_at) on a database server
    catalog_updated_at: dt.datetime | None = None   # on a database server: the catalog's updated_at the vectors agree with
    vector_record: dict | None = None   # the FAISS type, training, search settings and recall index-images recorded
    regions: VectorIndex | None = None  # the regional vectors' index (index-images --regions), ids = image ids
    weights_stamp: tuple | None = None  # the weights file's (inode, times, size) when the network was loaded from it

    def describe_vectors(self) -> dict:
        """The FAISS index as served: type, memory-mapped or not, search settings, and the recall they gave."""
        from retrieval.vectors.builder import recall_for
        from retrieval.vectors.whitening import split_whitening

        record = self.vector_record or {}
        params = search_params_of(self.vectors.index)
        recall = record.get("recall") or {}
        factory = record.get("factory", self.vectors.factory)
        return {"type": factory, "requested": record.get("requested"),
                "exact": self.vectors.exact, "memory_mapped": self.vectors.mapped,
                # whitening in front of an exact Flat: exact in the whitened space (not "PCAW32,L2norm,IVF4,Flat")
                "exact_whitened": bool(record.get("whitened_dim")) and split_whitening(factory)[1].lower() == "flat",
                "train_size": (record.get("train") or {}).get("size"),
                "search_params": params.to_json(),
                "recall": recall_for(record, params),   # None: not measured with these settings (or exact)
                "recall_queries": recall.get("queries"), "recall_measured_at": recall.get("measured_at"),
                "recall_held_out": recall.get("held_out", True),   # False: the queries were in the training sample
                "recall_count": recall.get("count"), "file_bytes": record.get("file_bytes"),
                "whiten": record.get("whiten"), "whitened_dim": record.get("whitened_dim"), "dba": record.get("dba", 0),
                "whiten_waits_for": record.get("whiten_waits_for"),
                **({"regions": {"per_image": self.settings.regions, "count": len(self.regions),
                                "file_bytes": (record.get("regions") or {}).get("file_bytes")}}
                   if self.regions is not None else {})}

    def expand(self, queries: np.ndarray, expansion: QueryExpansion, exclude: list[set[int]] | None = None,
               threads: int = 1) -> np.ndarray:
        """queries shape=(q, dim) -> the same averaged with their first expansion.n results (query expansion).

        The results averaged are found among the images' own vectors only, never their regions'."""
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        distances, ids = self.vectors.search(queries, expansion.n + extra, threads)
        if exclude:
            for row, skip in enumerate(exclude):
                keep = ~np.isin(ids[row], list(skip))
                ids[row] = np.concatenate([ids[row][keep], np.full((~keep).sum(), -1)])
                distances[row] = np.concatenate([distances[row][keep], np.full((~keep).sum(), np.inf)])

        def lookup(wanted: np.ndarray) -> dict[int, np.ndarray]:
            return {int(i): v for chunk_ids, vecs in self.catalog.vectors(wanted) for i, v in zip(chunk_ids, vecs)}

        whitened = bool((self.vector_record or {}).get("whitened_dim"))
        return expand(queries, distances, ids, expansion, lookup, renormalize=self.settings.normalize and not whitened)

    @property
    def network(self) -> str:
        return network_key(self.settings)

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, dim) float32, as this snapshot's vectors were made."""
        assert self.extractor is not None, "opened with load_network=False"
        crop = self.extractor.preprocessing.crop_size
        if tuple(pixels.shape[-2:]) != (crop, crop):   # decoded for a network that a reload has replaced since
            raise IndexUnavailable("the index changed network while this query was decoded; send it again")
        return embed(self.extractor, pixels, self.settings.normalize)

    def search_vectors(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None,
                       threads: int = 1, expansion: QueryExpansion | None = None) -> list[list[Hit]]:
        """queries shape=(q, dim) -> for each query its k nearest hits, nearest first (excluded ids left out).

        threads: how many threads search (see VectorIndex.search). expansion: search again with each query
        averaged with its first results (retrieval.search.expansion; excluded ids are not averaged in)."""
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        if expansion:
            queries = self.expand(queries, expansion, exclude, threads)
        fetch = k + extra
        while True:
            # each image once, by its nearest vector: its own, or one of its regions' (index-images --regions)
            distances, ids = search_images(self.vectors, self.regions, queries, fetch, self.settings.regions, threads)
            rows = self.catalog.get_many(int(i) for i in np.unique(ids) if i >= 0)
            results, gone = [], 0
            for qi in range(len(queries)):
                skip = exclude[qi] if exclude else set()
                hits = []
                for d, i in zip(distances[qi], ids[qi]):
                    row = rows.get(int(i))
                    if row is None or int(i) in skip:   # removed since the snapshot, or excluded
                        continue
                    hits.append(Hit(row.id, row.path, row.label, float(d), row.sha256))
                    if len(hits) == k:
                        break
                results.append(hits)
                if len(hits) < k:
                    gone = max(gone, sum(1 for i in ids[qi] if i >= 0 and int(i) not in rows))
            # an image removed from the catalog stays in this snapshot's FAISS file until the next reload: where such
            # images took places in a top k, ask for more rather than answer short
            if not gone or fetch >= len(self.vectors):
                return results
            fetch = min(len(self.vectors), fetch + max(gone, fetch))
