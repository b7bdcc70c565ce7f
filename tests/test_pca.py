"""Tests for training a FAISS PCAMatrix with only the kept components (retrieval.vectors.pca): the same whitening and
the same search results as FAISS's own PCAMatrix.train.

"The same" up to FAISS's own rounding: it sums the scatter matrix of the uncentred vectors in float32, which on vectors
that all point one way (as fc7 does) leaves its weakest kept components about 1e-4 off in cosine from an exact
(float64) PCA and its whitened distances about 1e-3 off; train_pca centres first and is about 1e-7 off."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from helpers.vectors import one_way
from retrieval.vectors.pca import train_pca
from retrieval.vectors.vector_index import VectorIndex
from retrieval.vectors.whitening import learn_whitening, whiten

DIM = 128


def faiss_trained(factory: str, train: np.ndarray) -> VectorIndex:
    """The index as FAISS alone trains it (PCAMatrix.train on every eigenpair)."""
    index = VectorIndex.empty(DIM, factory)
    index.index.train(train)
    return index


def searched(index: VectorIndex, ids: np.ndarray, stored: np.ndarray, queries: np.ndarray, k: int = 10):
    index.add(ids, stored)
    return index.search(queries, k)


def pca_of(index: VectorIndex) -> faiss.PCAMatrix:
    inner = faiss.downcast_index(index.index)
    while not isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return faiss.downcast_VectorTransform(inner.chain.at(0))


@pytest.mark.parametrize("factory, n_train", [
    ("PCAW32,L2norm,Flat", 600),   # more vectors than dimensions: the covariance's top eigenpairs
    ("PCAW16,L2norm,Flat", 80),    # fewer: the Gram matrix's, as FAISS does then
    ("PCAR16,Flat", 600),          # a random rotation after the PCA (auto's type above 50,000 without whitening)
])
def test_an_index_trained_with_only_the_kept_components_finds_what_faiss_trained_finds(factory, n_train):
    vectors, _ = one_way(2000, seed=3, items=500)   # near-copies of 500 items, all pointing one way like fc7
    train, stored, queries = vectors[:n_train], vectors[:1500], vectors[1500:]
    ids = np.arange(1500, dtype=np.int64) + 7
    fast = VectorIndex.empty(DIM, factory)
    fast.train(train)
    assert faiss.vector_to_array(pca_of(fast).eigenvalues).size == pca_of(fast).d_out   # FAISS keeps all DIM
    distances, found = searched(fast, ids, stored, queries)
    want_distances, want = searched(faiss_trained(factory, train), ids, stored, queries)
    assert np.array_equal(found[:, 0], want[:, 0])   # each held-out query's nearest: the same image
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, want)])
    assert overlap >= 0.99                           # its 10 nearest: the same but where two are about equally near
    np.testing.assert_allclose(distances, want_distances, rtol=5e-3, atol=1e-4)


def test_a_pca_trained_on_more_than_it_takes_uses_faiss_own_subsample():
    vectors, _ = one_way(3000, seed=4)
    queries = one_way(200, seed=5)[0]
    outputs = []
    for trainer in (faiss.PCAMatrix.train, train_pca):
        pca = faiss.PCAMatrix(DIM, 16, -0.5)
        pca.max_points_per_d = 2   # FAISS trains on a seeded 256 of the 3,000; another 256 gives another PCA
        trainer(pca, vectors)
        outputs.append(pca.apply(queries))
    assert min_abs_cosine(*outputs) > 0.999   # every component the same axis, up to its sign


def test_find_duplicates_whitening_gives_the_components_and_distances_faiss_whitening_gives():
    vectors, _ = one_way(400, seed=6, items=100)
    held_out = one_way(200, seed=7, items=100)[0]
    fast = learn_whitening(vectors, 64)                # min(64, 400 // 4): 64 components, epsilon 1e-6
    reference = faiss.PCAMatrix(DIM, fast.d_out, -0.5)
    reference.epsilon = fast.epsilon
    reference.train(vectors)
    assert min_abs_cosine(fast.apply(held_out), reference.apply(held_out)) > 0.999   # each axis, up to its sign
    a, b = whiten(fast, held_out), whiten(reference, held_out)
    np.testing.assert_allclose(faiss.pairwise_distances(a, a), faiss.pairwise_distances(b, b), atol=5e-3)


@pytest.mark.parametrize("n", [300, 2 * DIM])   # fewer vectors than dimensions (the Gram matrix), and more
def test_the_background_linear_algebra_trains_the_same_pca(n):
    """A server's background thread (find-duplicates' grouping, a replica's reload) trains with NumPy's eigh, which
    lets the request threads run where SciPy's held the GIL (0.65 s on 2,660 vectors): the same PCA."""
    from retrieval.vectors.pca import background_linear_algebra

    vectors, _ = one_way(n, seed=8)
    queries = one_way(100, seed=9)[0]
    default = train_pca(faiss.PCAMatrix(DIM, 32, -0.5), vectors)
    with background_linear_algebra():
        background = train_pca(faiss.PCAMatrix(DIM, 32, -0.5), vectors)
    np.testing.assert_allclose(faiss.vector_to_array(background.eigenvalues), faiss.vector_to_array(default.eigenvalues),
                               rtol=1e-5)
    np.testing.assert_allclose(background.apply(queries), default.apply(queries), rtol=1e-3, atol=1e-4)   # signs fixed


def min_abs_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The least |cosine| between a column of a and the same column of b, shape=(n, d) each."""
    return float(np.min(np.abs(np.sum(a * b, axis=0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))))
