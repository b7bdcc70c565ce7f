"""Recall of an approximate index against exact IndexFlatL2 search over the catalog's vectors."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator

import faiss
import numpy as np

from retrieval.vectors.faiss_parts import SearchParams, apply_search_params
from retrieval.vectors.vector_index import VectorIndex

K = 10


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """One measurement: how often the approximate index finds what exact search finds."""
    search_params: dict           # {"nprobe": 32} or {"ef_search": 64}; {} for types without any
    recall_1_at_1: float          # the exact nearest neighbour ranked first
    recall_1_at_10: float         # the exact nearest neighbour among the first 10
    recall_10_at_10: float        # overlap of the first 10 with the exact first 10, / 10
    ms_per_query: float           # median over the query sample of one search of a batch (not a latency)

    def to_json(self) -> dict:
        return {"search_params": self.search_params, "1-recall@1": round(self.recall_1_at_1, 4),
                "1-recall@10": round(self.recall_1_at_10, 4), "10-recall@10": round(self.recall_10_at_10, 4),
                "ms_per_query": round(self.ms_per_query, 4)}


def exact_neighbours(vector_chunks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
                     query_ids: np.ndarray, k: int = K) -> np.ndarray:
    """Ground truth: the k nearest ids of each query by exact L2 (IndexFlatL2), each query's own id left out.

    vector_chunks: (ids shape=(n,) int64, vectors shape=(n, d) float32), streamed (the catalog's vectors need
    not fit in memory); queries shape=(q, d) float32 -> ids shape=(q, k) int64 (-1 past the collection's end)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k + 1)
    flat = faiss.IndexFlatL2(queries.shape[1])
    for ids, vecs in vector_chunks:
        flat.reset()
        flat.add(np.ascontiguousarray(vecs, dtype=np.float32))
        sq, pos = flat.search(queries, min(k + 1, len(ids)))
        heap.add_result(sq, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    heap.finalize()
    return without_self(heap.I, query_ids, k)


def without_self(found: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """found shape=(q, k+1) -> shape=(q, k): each row without its query's own id (or without its last entry)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(found, query_ids)):
        rest = ids[ids != own][:k]
        out[row, :len(rest)] = rest
    return out


def score(approx: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """approx, exact shape=(q, 10) ids -> (1-recall@1, 1-recall@10, 10-recall@10)."""
    assert approx.shape == exact.shape and approx.shape[1] == K, f"need (q, {K}) ids, got {approx.shape}"
    nearest = exact[:, :1]
    r1_1 = float(np.mean(approx[:, 0] == exact[:, 0]))
    r1_10 = float(np.mean((approx == nearest).any(axis=1)))
    overlap = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / K for a, e in zip(approx, exact)]
    return r1_1, r1_10, float(np.mean(overlap))


def measure(index: VectorIndex, queries: np.ndarray, query_ids: np.ndarray, exact: np.ndarray,
            params: SearchParams) -> RecallResult:
    """Search the queries (which are in the index) with params and score them against exact."""
    apply_search_params(index.index, params)
    started = time.perf_counter()
    _, found = index.search(queries, K + 1, threads=1)
    ms = (time.perf_counter() - started) * 1000 / max(1, len(queries))
    if found.shape[1] < K + 1:   # a collection of at most K vectors
        found = np.pad(found, ((0, 0), (0, K + 1 - found.shape[1])), constant_values=-1)
    r1_1, r1_10, r10_10 = score(without_self(found, query_ids, K), exact)
    return RecallResult(params.to_json(), r1_1, r1_10, r10_10, ms)


def sample_vectors(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Gather (ids, vectors) chunks into one pair of arrays."""
    parts = list(chunks)
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
