"""Training a FAISS PCAMatrix (PCA, PCAW, PCAR in front of an index; find-duplicates' whitening) in seconds, not a minute.

FAISS's PCAMatrix.train decomposes the whole d_in x d_in scatter matrix (all 4,096 eigenpairs of fc7, in double
precision) though a PCA keeps only its top d_out <= 256 of them: 49 of index-images' 111 s on 10,000 images on
two cores. train_pca computes the same thing, only the components that are kept: the same sample (FAISS's
seeded subsample above max_points_per_d * d_in vectors), the mean, the scatter matrix of the centred vectors by
float32 BLAS (FAISS: the same product, uncentred, less accurate), its top d_out eigenpairs in double precision
(LAPACK's dsyevr on an index range; in a server's background thread NumPy's eigh of every pair, which lets the
request threads run), by decreasing eigenvalue; then it installs them into the PCAMatrix and lets
FAISS's own prepare_Ab turn them into the applied map (eigen_power, epsilon, random rotation, balanced bins), so
the FAISS file and everything that reads it stay as they were. What differs: the result is an exact PCA's to
float rounding, where FAISS's own float32 sums turn the weaker components of vectors that all point one way (fc7)
by up to 39 degrees and move whitened distances by up to 4e-3 (benchmarks/bench_whitening.py, docs/benchmarks.md);
each component's sign is fixed (its largest coordinate positive) where LAPACK leaves it to the build (no distance
changes); and only the d_out kept eigenvalues and eigenvectors are stored (FAISS keeps all d_in, which
index-images drops after training anyway).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import faiss

FAISS_SUBSAMPLE_SEED = 1234   # faiss::fvecs_maybe_subsample's default, which PCAMatrix.train uses
SCATTER_CHUNK = 8192          # vectors centred at a time for the scatter matrix (128 MiB at 4096-d), not all at once
# SciPy's LAPACK wrappers hold Python's GIL while they run (dsyevr on 2,660 vectors: 0.65 s in which no other thread
# of the process runs: a server's searches waited that long behind find-duplicates' whitening); NumPy's eigh lets
# other threads run, computing every eigenpair (about 3x the time). A thread serving next to request threads asks
# for it (background_linear_algebra).
_LETS_OTHERS_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("pca_lets_others_run", default=False)


@contextlib.contextmanager
def background_linear_algebra() -> Iterator[None]:
    """Within it (in this thread), train_pca uses linear algebra that releases the GIL, at the cost of time: for
    work in a server's background threads, whose request threads must keep answering."""
    token = _LETS_OTHERS_RUN.set(True)
    try:
        yield
    finally:
        _LETS_OTHERS_RUN.reset(token)


def _top_eigenpairs(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of the symmetric matrix shape=(m, m) float64 (its upper triangle is read) ->
    (values ascending shape=(k,), vectors shape=(m, k))."""
    m = len(matrix)
    if _LETS_OTHERS_RUN.get():
        values, vecs = np.linalg.eigh(matrix, UPLO="U")          # every pair, the GIL released
        return values[m - k:], vecs[:, m - k:]
    from scipy.linalg import eigh

    return eigh(matrix, lower=False, subset_by_index=(m - k, m - 1), driver="evr", overwrite_a=True,
                check_finite=False)                              # LAPACK's dsyevr on an index range


def train_pca(pca: "faiss.PCAMatrix", vectors: np.ndarray) -> "faiss.PCAMatrix":
    """Train pca on vectors shape=(n, pca.d_in) float32, as pca.train(vectors) does, keeping only the top
    pca.d_out components. -> pca, trained."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    k = pca.d_out
    assert d == pca.d_in, f"the PCA takes {pca.d_in}-d vectors, got {d}-d"
    assert k <= min(n, d), f"a PCA to {k} dimensions needs at least {k} vectors of at least {k} dimensions, got {x.shape}"
    x = faiss_subsample(x, int(pca.max_points_per_d) * d)
    n = len(x)
    mean = x.mean(axis=0, dtype=np.float64) if pca.have_bias else np.zeros(d)   # (d,)
    if n >= d:
        # scatter matrix sum_i (x_i - mean)(x_i - mean)^T, not divided by n (FAISS's eigenvalues are of this); FAISS
        # sums x_i x_i^T - n mean mean^T instead, which loses digits in float32 when the vectors share a large mean
        # (float32 GEMM through NumPy: it lets other threads run, and here it took half the time of SciPy's ssyrk)
        scatter = np.zeros((d, d), dtype=np.float32)
        for start in range(0, n, SCATTER_CHUNK):
            centred = x[start:start + SCATTER_CHUNK] - mean.astype(np.float32)     # (chunk, d)
            scatter += centred.T @ centred                                          # (d, d)
        values, vecs = _top_eigenpairs(scatter.astype(np.float64), k)              # ascending, vecs (d, k)
        components = vecs[:, ::-1].T                                                # (k, d), by decreasing value
    else:
        centred = x - mean.astype(np.float32)                                       # (n, d), n < d
        # fewer vectors than dimensions: the Gram matrix of the centred vectors has the same nonzero eigenvalues,
        # and each of its eigenvectors v gives the component centred^T v (normalised), as FAISS does too
        gram = centred @ centred.T                                                  # (n, n)
        values, vecs = _top_eigenpairs(gram.astype(np.float64), k)                  # vecs (n, k)
        components = (centred.T.astype(np.float64) @ vecs[:, ::-1]).T               # (k, d)
        components /= np.maximum(np.linalg.norm(components, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    values = values[::-1]
    # a sign that does not depend on the LAPACK build: each component's largest coordinate positive
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    faiss.copy_array_to_vector(mean.astype(np.float32), pca.mean)
    faiss.copy_array_to_vector(values.astype(np.float32), pca.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(components, dtype=np.float32).ravel(), pca.PCAMat)
    pca.prepare_Ab()
    pca.is_trained = True
    return pca


def faiss_subsample(x: np.ndarray, nmax: int) -> np.ndarray:
    """The vectors FAISS trains on when given x shape=(n, d): x itself up to nmax, else the nmax that
    faiss::fvecs_maybe_subsample picks (the first nmax of its seeded permutation, in that order)."""
    import faiss

    if len(x) <= nmax:
        return x
    perm = np.empty(len(x), dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), len(x), FAISS_SUBSAMPLE_SEED)
    return x[perm[:nmax]]


def train_front_pca(index: "faiss.Index", vectors: np.ndarray) -> bool:
    """Train, with train_pca, the untrained PCAMatrix at the front of index's pre-transform chain (reached through
    IDMap wrappers, which pass the vectors on unchanged); index.train(vectors) then trains the rest of the chain
    and the index behind it on the vectors the PCA gives, as it would have. -> whether there was one."""
    import faiss

    part = faiss.downcast_index(index)
    while isinstance(part, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        part = faiss.downcast_index(part.index)
    if not isinstance(part, faiss.IndexPreTransform) or part.chain.size() == 0:
        return False
    front = faiss.downcast_VectorTransform(part.chain.at(0))
    if not isinstance(front, faiss.PCAMatrix) or front.is_trained:
        return False
    train_pca(front, vectors)
    return True
