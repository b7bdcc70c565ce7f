"""Query expansion (average and alpha-QE) and database-side augmentation (DBA): vectors averaged with their nearest ones.

Both replace a vector by a weighted mean of itself and its n nearest stored vectors (Chum et al. 2007; alpha-QE and
DBA as in Radenovic et al. 2018): the query at search time, every stored vector when the index is built. Weights
are similarity^alpha (the vector itself weighs 1); alpha 0 is the plain average. The mean is taken of the catalog's
raw vectors with weights summing to 1: an index that whitens (an affine map, then L2) sees the same mean of its
whitened vectors, before their L2 normalisation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

MAX_EXPANSION = 50   # top results a query may be averaged with


class ExpansionError(ValueError):
    """Query-expansion settings out of range; the message names the one."""


@dataclasses.dataclass(frozen=True)
class QueryExpansion:
    """How a query is expanded: averaged with its top n results (0: not expanded), weighted by similarity^alpha."""
    n: int = 0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or not 0 <= self.n <= MAX_EXPANSION:
            raise ExpansionError(f"query expansion takes a whole number of top results from 0 to {MAX_EXPANSION}, "
                                 f"not {self.n!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.integer, np.floating)) \
                or not 0 <= self.alpha <= 100:
            raise ExpansionError(f"the query-expansion alpha is a number from 0 to 100, not {self.alpha!r}")

    def __bool__(self) -> bool:
        return self.n > 0

    def to_json(self) -> dict:
        return {"n": self.n, "alpha": self.alpha}


def similarities(distances: np.ndarray) -> np.ndarray:
    """L2 distances between unit vectors -> cosine similarities, clipped to [0, 1]; any shape."""
    return np.clip(1.0 - np.square(distances) / 2.0, 0.0, 1.0)


def weighted_means(vectors: np.ndarray, neighbours: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each vector averaged with its neighbours, itself weighing 1, the weights scaled to sum to 1.

    vectors shape=(q, d) float32; neighbours shape=(q, n, d) float32; weights shape=(q, n), 0 where a neighbour
    is missing -> shape=(q, d) float32."""
    total = 1.0 + weights.sum(axis=1, keepdims=True)                                        # (q, 1)
    mixed = vectors + np.einsum("qn,qnd->qd", weights, neighbours)                          # (q, d)
    return (mixed / total).astype(np.float32)


def gather(ids: np.ndarray, lookup: Callable[[np.ndarray], dict[int, np.ndarray]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """ids shape=(q, n) int64 (-1: none) -> (vectors shape=(q, n, dim) float32, found shape=(q, n) bool), the
    vectors from lookup({id: vector} for the ids it still has)."""
    wanted = np.unique(ids[ids >= 0])
    found_vectors = lookup(wanted) if len(wanted) else {}
    out = np.zeros(ids.shape + (dim,), np.float32)
    found = np.zeros(ids.shape, bool)
    for (row, col), i in np.ndenumerate(ids):
        vec = found_vectors.get(int(i)) if i >= 0 else None
        if vec is not None:
            out[row, col], found[row, col] = vec, True
    return out, found


def expand(vectors: np.ndarray, distances: np.ndarray, ids: np.ndarray, expansion: QueryExpansion,
           lookup: Callable[[np.ndarray], dict[int, np.ndarray]], renormalize: bool = False) -> np.ndarray:
    """Vectors averaged with their first expansion.n results -> shape=(q, d) float32.

    distances, ids shape=(q, >= n) from a search of the index's space (L2 between unit vectors there: a whitened or
    a normalised index); -1 ids and ids lookup no longer has are left out. renormalize: L2-normalise the means
    (for an index of unit raw vectors; not for a whitening one, which normalises after its affine map)."""
    ids, distances = ids[:, :expansion.n], distances[:, :expansion.n]
    neighbours, found = gather(ids, lookup, vectors.shape[1])
    weights = np.where(found, np.power(np.maximum(similarities(distances), 1e-6), expansion.alpha), 0.0)   # (q, n)
    means = weighted_means(np.asarray(vectors, np.float32), neighbours, weights)
    if renormalize:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return means
