"""PCA whitening learned on the collection: the front of a FAISS index (PCAW + L2norm), its size for a collection, applying it.

Raw fc7 vectors of a network all point one way (with random weights every pair has cosine above 0.8); centring,
rotating onto the collection's principal axes, scaling each by eigenvalue^-1/2 and L2-normalising again spreads
them out. FAISS does it: `PCAW{d},L2norm,` in front of the index type (a PCAMatrix with eigen_power -0.5 and a
NormalizationTransform in an IndexPreTransform), trained with the index on the catalog's vectors, stored in the
FAISS file and applied by FAISS to every vector added and every query. The catalog keeps the raw vectors.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import faiss

# Chosen by benchmarks/bench_quality.py on seed 0's sets (docs/quality.md): copy-search recall@1 rises with the
# dimension up to the collection's limit below, and not after.
WHITEN_DIM = 256
# A PCA of n vectors has at most n - 1 axes, and whitening scales the last ones (noise) as much as the first: at
# d = n - 1 every vector of the collection ends up equally far from every other. Whitening keeps d <= n / 2
# (measured: at n/d = 2 recall is no worse than at higher ratios, below it falls).
VECTORS_PER_DIM = 2
WHITEN_MIN_DIM = 32   # below this many dimensions whitening waits for more images (searches raw vectors until then)

_PREFIX = re.compile(r"^PCAW(\d+),L2norm,")


def whitened_dim(requested: int, n: int) -> int | None:
    """The dimension whitening has for a collection of n vectors: requested while n allows it (n >= VECTORS_PER_DIM
    * requested), else the largest power of two n allows (so the index is retrained only when the collection
    doubles), None while that is below WHITEN_MIN_DIM (whitening deferred)."""
    allowed = n // VECTORS_PER_DIM
    if allowed >= requested:
        return requested
    if allowed < WHITEN_MIN_DIM:
        return None
    return 2 ** int(np.log2(allowed))


def min_whiten_vectors(requested: int) -> int:
    """The fewest vectors whitening is applied at."""
    return VECTORS_PER_DIM * min(requested, WHITEN_MIN_DIM)


def whiten_prefix(dim: int) -> str:
    return f"PCAW{dim},L2norm,"


def split_whitening(factory: str) -> tuple[int | None, str]:
    """"PCAW64,L2norm,Flat" -> (64, "Flat"); a factory without whitening in front -> (None, factory)."""
    m = _PREFIX.match(factory)
    return (int(m.group(1)), factory[m.end():]) if m else (None, factory)


def whitening_of(index: "faiss.Index") -> Callable[[np.ndarray], np.ndarray] | None:
    """The whitening the index applies to vectors before it stores or searches them (the PCAW and L2norm at the
    front of its IndexPreTransform's chain), or None for an index without whitening.
    vectors shape=(n, d_in) float32 -> shape=(n, d) float32, unit length."""
    import faiss

    from retrieval.vectors.index_types import walk

    pre = next((p for p in walk(index) if isinstance(p, faiss.IndexPreTransform)), None)
    if pre is None:
        return None
    chain = [faiss.downcast_VectorTransform(pre.chain.at(i)) for i in range(min(2, pre.chain.size()))]
    if len(chain) < 2 or not isinstance(chain[0], faiss.PCAMatrix) or chain[0].eigen_power != -0.5 \
            or not isinstance(chain[1], faiss.NormalizationTransform):
        return None

    def apply(vectors: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(vectors, dtype=np.float32)
        for transform in chain:
            out = transform.apply(out)
        return out

    return apply
