"""Regional database vectors (index-images --regions): a side FAISS index beside the main one.

Each image of an index made with --regions has, besides its own vector, the vectors of its regions (four corners and
the centre, retrieval.images.preprocessing.region_boxes), kept in the catalog's region_vectors table. The side index
holds them under their IMAGE's id, repeated once per region (FAISS's id map takes repeated ids, and removing an id
removes all of an image's regions), in the main index's space: it is an empty copy of the main index (its trained
whitening in front, exact Flat behind) filled with the regions. Like the main file it is a cache of the catalog:
missing, unreadable, of another whitening or out of step, it is rebuilt or reconciled from the catalog.
A search scores each image by its nearest vector, its own or a region's (retrieval.search.snapshot).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.files import sample_digest
from retrieval.vectors.faiss_parts import structure
from retrieval.vectors.whitening import whitening_of

if TYPE_CHECKING:   # FAISS is imported where an index is made or read: index-images' no-op run never loads it
    from retrieval.catalog import Catalog
    from retrieval.vectors.vector_index import VectorIndex

log = logging.getLogger(__name__)


def regions_type_error(requested: str | None) -> str | None:
    """Why an index with regions cannot have the index type requested (None: it can: Flat or auto, whitened or not;
    the search over both indexes is exact only over exact ones)."""
    from retrieval.vectors.whitening import split_whitening

    if requested is None or split_whitening(requested)[1].strip().lower() in ("auto", "flat"):
        return None
    return (f"an index with regional vectors (--regions) is searched exactly: it takes index type Flat or auto, "
            f"not {requested!r}")


def empty_like(main: VectorIndex) -> VectorIndex:
    """An empty index of main's type, trained as main is (the same whitening): the regions' index."""
    from retrieval.vectors.vector_index import VectorIndex

    index = main.copy().index   # in memory, never a view of a memory-mapped file
    index.reset()               # the vectors go, the trained transform stays
    return VectorIndex(main.dim, index, factory=main.factory)


def same_space(side: VectorIndex, main: VectorIndex) -> bool:
    """Whether side maps vectors as main does (no whitening in either, or the same one: compared on a probe)."""
    mine, theirs = whitening_of(side.index), whitening_of(main.index)
    if mine is None or theirs is None:
        return mine is None and theirs is None
    probe = np.random.default_rng(0).standard_normal((4, main.dim)).astype(np.float32)   # (4, dim)
    return bool(np.allclose(mine(probe), theirs(probe), atol=1e-5))


def build_regions(catalog: Catalog, main: VectorIndex) -> VectorIndex:
    """The regions' index from the catalog, in main's space."""
    side = empty_like(main)
    for ids, vectors in catalog.region_vectors():
        side.add(ids, vectors)
    log.info("built the regional vectors' index from the catalog: %d vectors", len(side))
    return side


def reconcile_regions(side: VectorIndex, catalog: Catalog) -> bool:
    """Add the regions of images missing from side, remove those of images gone from the catalog. -> changed."""
    have = np.unique(side.ids())
    want = catalog.region_ids()
    stale, missing = np.setdiff1d(have, want), np.setdiff1d(want, have)
    if len(stale):
        side.remove(stale)
    for ids, vectors in catalog.region_vectors(missing):
        side.add(ids, vectors)
    if len(stale) or len(missing):
        log.info("reconciled the regional vectors with the catalog: %d images added, %d removed", len(missing),
                 len(stale))
    return bool(len(stale) or len(missing))


def open_regions(path: Path, catalog: Catalog, main: VectorIndex) -> tuple[VectorIndex, bool]:
    """The regions' index saved at path, brought in step with the catalog and main (whose space it must share).

    A file that is missing, unreadable, of another type or whitening than main, or that holds another number of
    vectors than the catalog once reconciled, is rebuilt from the catalog. -> (index, changed since the file)."""
    from retrieval.vectors.vector_index import VectorIndex

    side = VectorIndex.load(path, main.dim, factory=None)   # of main's structure, checked here
    if side is not None and structure(side.index) != structure(main.index):
        side = None
    if side is not None:
        side.factory = main.factory
    if side is None or not same_space(side, main):
        if side is not None:
            log.info("the regional vectors' index %s is not in the main index's space (retrained since): rebuilding",
                     path)
        return build_regions(catalog, main), True
    changed = reconcile_regions(side, catalog)
    if len(side) != catalog.region_count():
        log.warning("the regional vectors' index %s holds %d vectors, the catalog %d: rebuilding", path, len(side),
                    catalog.region_count())
        return build_regions(catalog, main), True
    return side, changed


def regions_file_state(path: Path) -> dict:
    """{"file_bytes", "digest"} of the regions' file as saved (the catalog's vector_index record keeps it): a later
    run that finds nothing to do still notices a file lost, replaced or damaged since (regions_file_in_step)."""
    try:
        size, digest = sample_digest(path)
    except OSError:
        return {"file_bytes": None, "digest": None}
    return {"file_bytes": size, "digest": digest}


def regions_file_in_step(path: Path, record: dict | None) -> bool:
    """Whether the regions' file is the one last saved with the main one (its size and digest as recorded)."""
    saved = (record or {}).get("regions") or {}
    return saved.get("digest") is not None and regions_file_state(path) == {"file_bytes": saved.get("file_bytes"),
                                                                            "digest": saved["digest"]}


def search_images(main: VectorIndex, side: VectorIndex | None, queries: np.ndarray, k: int, per_image: int,
                  threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest IMAGES of each query, each scored by its nearest vector, its own (main) or a region's (side).

    per_image: the regions each image has. Exact when both indexes are: main's k nearest and side's k * per_image
    nearest (at least k images) hold every vector that is some top-k image's nearest.
    queries shape=(q, dim) float32 -> (distances shape=(q, k') float32, ids shape=(q, k') int64), nearest first;
    id -1 (distance inf) pads rows with fewer than k' images."""
    distances, ids = main.search(queries, k, threads)
    if side is None or len(side) == 0:
        return distances, ids
    side_distances, side_ids = side.search(queries, k * max(1, per_image), threads)
    k_out = distances.shape[1]   # min(k, images in main)
    out_d = np.full((len(queries), k_out), np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k_out), -1, dtype=np.int64)
    for row in range(len(queries)):
        best: dict[int, float] = {}
        for d, i in zip(np.concatenate([distances[row], side_distances[row]]).tolist(),
                        np.concatenate([ids[row], side_ids[row]]).tolist()):
            if i >= 0 and d < best.get(i, np.inf):
                best[i] = d
        ranked = sorted(best.items(), key=lambda item: (item[1], item[0]))[:k_out]
        out_i[row, :len(ranked)] = [i for i, _ in ranked]
        out_d[row, :len(ranked)] = [d for _, d in ranked]
    return out_d, out_i
