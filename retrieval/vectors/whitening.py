"""PCA whitening learned on the collection: the front of a FAISS index (PCAW + L2norm), its size for a collection, applying it.

Raw fc7 vectors of a network all point one way (with random weights every pair has cosine above 0.8); centring,
rotating onto the collection's principal axes, scaling each by eigenvalue^-1/2 and L2-normalising again spreads
them out. FAISS does it: `PCAW{d},L2norm,` in front of the index type (a PCAMatrix with eigen_power -0.5 and a
NormalizationTransform in an IndexPreTransform), trained with the index on the catalog's vectors, stored in the
FAISS file and applied by FAISS to every vector added and every query. The catalog keeps the raw vectors.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable

import numpy as np

from retrieval.vectors.pca import train_pca

if TYPE_CHECKING:
    import faiss

# --whiten-dim auto (the default): the power of two nearest below n / AUTO_VECTORS_PER_DIM, at most AUTO_MAX_DIM.
# Measured by benchmarks/bench_quality.py (docs/quality.md): on ~370-image collections copy-search recall@1 rises
# with the dimension up to about n / 3 and then stays, while kNN classification falls once d passes about n / 4
# (seed 1: kNN@10 0.83 at d 64, 0.77 at 128, 0.57 at 256; raw fc7 0.69): the noise axes of a small sample are
# scaled up as much as the real ones.
AUTO_VECTORS_PER_DIM = 4
AUTO_MAX_DIM = 256     # Babenko et al. 2014: PCA-whitened fc6/fc7 at 128-256 d lose nothing
# An explicit --whiten-dim D is kept while n >= VECTORS_PER_DIM * D: a PCA of n vectors has at most n - 1 axes, and
# near that every vector of the collection ends up about equally far from every other (seed 0, n = 361: copy
# recall@1 0.829 at d 256, 0.787 at 340, 0.627 at 360).
VECTORS_PER_DIM = 1.25
WHITEN_MIN_DIM = 32    # below this many dimensions whitening waits for more images (searches raw vectors until then)

_PREFIX = re.compile(r"^PCAW(\d+),L2norm,")


def whitened_dim(requested: int | None, n: int, dim: int = 4096) -> int | None:
    """The dimension whitening has for a collection of n vectors of dimension dim.

    requested None (auto): the largest power of two <= n / AUTO_VECTORS_PER_DIM, at most AUTO_MAX_DIM and dim.
    requested D: D while n >= VECTORS_PER_DIM * D, else the largest power of two n allows. Powers of two: the
    index is retrained only when the collection doubles. None while that is below WHITEN_MIN_DIM (deferred)."""
    if requested is None:
        allowed, ceiling = n // AUTO_VECTORS_PER_DIM, min(AUTO_MAX_DIM, dim)
    else:
        allowed, ceiling = int(n / VECTORS_PER_DIM), min(requested, dim)
        if allowed >= ceiling:
            return ceiling
    if allowed < min(WHITEN_MIN_DIM, ceiling):
        return None
    return min(ceiling, 2 ** int(math.log2(allowed)))


def min_whiten_vectors(requested: int | None) -> int:
    """The fewest vectors whitening is applied at."""
    if requested is None:
        return AUTO_VECTORS_PER_DIM * WHITEN_MIN_DIM
    return math.ceil(VECTORS_PER_DIM * min(requested, WHITEN_MIN_DIM))


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

    from retrieval.vectors.faiss_parts import walk

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


# Whitening as plain arrays, outside a FAISS index: find-duplicates learns it on the catalog's raw vectors
# (retrieval.search.duplicates), whatever the index's own type.
def learn_whitening(vectors: np.ndarray, dim: int) -> faiss.PCAMatrix:
    """PCA whitening learned on vectors shape=(n, d) float32: centre, rotate, scale each component by
    1/sqrt(eigenvalue) and keep min(dim, n // 4, d) components (a few images cannot estimate many: their weakest
    components are noise, which whitening would blow up to the size of the real ones). Apply with whiten().

    Raw fc7 vectors of a random network all point one way (every pair's cosine above 0.8); after whitening the
    directions along which images really differ carry the distance."""
    import faiss

    n, d = vectors.shape
    assert n >= 2, f"whitening needs at least 2 vectors, got {n}"
    out = max(1, min(dim, n // 4, d))
    pca = faiss.PCAMatrix(d, out, -0.5)   # eigen_power -0.5: whitened
    pca.epsilon = 1e-6   # components with (almost) no variance are not blown up to noise
    return train_pca(pca, vectors)   # what pca.train gives, in a fraction of the time (retrieval.vectors.pca)


def whiten(pca: faiss.PCAMatrix | None, vectors: np.ndarray) -> np.ndarray:
    """vectors shape=(n, d) float32 -> whitened and L2-normalised, shape=(n, pca.d_out) float32 (pca None: only
    L2-normalised, shape=(n, d))."""
    import faiss

    out = pca.apply(np.ascontiguousarray(vectors, dtype=np.float32)) if pca is not None else \
        np.array(vectors, dtype=np.float32, copy=True)   # (n, d) -> (n, d_out)
    faiss.normalize_L2(out)
    return out
