"""A reader's FAISS file (a server, search-images, a replica on PostgreSQL) when it is missing or another catalog's:
the index is searched as index-images built it, whitened where it is, never its raw vectors or another catalog's."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers.indexes import build_index
from retrieval.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.samples import make_sample_collection
from retrieval.search.index import ImageIndex
from retrieval.vectors.index_types import IndexTypeConfig


def whitened_index(root, seed: int):
    """40 drawings, whitened to 32 dimensions (PCAW32,L2norm,Flat)."""
    make_sample_collection(root / "data", per_class=8, size=(96, 72), seed=seed)
    build_index(root / "data", root / "index", vector_index=IndexTypeConfig(whiten_dim=32))
    return root / "index"


def searched(index_dir, k: int = 5) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every stored vector searched as a reader searches: -> (ids, distances, the served type's description)."""
    index = ImageIndex(index_dir, load_network=False)
    try:
        snapshot = index.snapshot()
        ids, vectors = next(snapshot.catalog.vectors())
        hits = snapshot.search_vectors(vectors, k)
        return (np.array([[h.id for h in row] for row in hits]), np.array([[h.distance for h in row] for row in hits]),
                snapshot.describe_vectors())
    finally:
        index.close()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    return whitened_index(root / "a", seed=1), whitened_index(root / "b", seed=2)


def test_a_reader_without_the_faiss_file_searches_as_the_writers_file_does(two, tmp_path):
    """Reproduces (a replica folder started with no vectors.faiss, as docs/postgresql.md allows; or the file deleted):
    the reader searched the raw fc7 vectors (distances 0.07-0.17 where the writer's were 0.24-1.09, other neighbours)
    while /stats said PCAW32,L2norm,Flat. It builds the recorded type from the catalog now, trained among the same
    images, so it ranks and measures as the writer's file."""
    written = two[0]
    ids, distances, served = searched(written)
    assert served["type"] == "PCAW32,L2norm,Flat"
    reader = tmp_path / "replica"
    shutil.copytree(written, reader)
    (reader / FAISS_FILE).unlink()
    again_ids, again_distances, again_served = searched(reader)
    assert again_served["type"] == "PCAW32,L2norm,Flat"
    assert np.array_equal(again_ids, ids)
    assert np.allclose(again_distances, distances, atol=1e-4)
    assert not (reader / FAISS_FILE).exists(), "a reader writes nothing"


def test_another_catalogs_whitened_file_is_not_searched(two, tmp_path):
    """Reproduces (a database made anew under a replica, or another index's vectors.faiss copied in): ids given out
    again met the old file's vectors, and a photo's search answered other images at distance 0. Only exact files were
    compared with the catalog; a whitened one is searched with a few of the catalog's vectors now."""
    mine, other = two
    reader = tmp_path / "replica"
    shutil.copytree(mine, reader)
    shutil.copyfile(other / FAISS_FILE, reader / FAISS_FILE)
    catalog = Catalog(mine)
    try:
        assert catalog.ids().tolist() == Catalog(other).ids().tolist(), "the test needs ids that coincide"
    finally:
        catalog.close()
    ids, distances, _ = searched(reader)
    own_ids, own_distances, _ = searched(mine)
    assert np.array_equal(ids, own_ids) and np.allclose(distances, own_distances, atol=1e-4)
    assert np.array_equal(ids[:, 0], np.sort(ids[:, 0])) and distances[:, 0].max() < 1e-3   # each finds itself first


def test_a_replaced_catalog_is_closed_once_no_query_holds_it(two, tmp_path):
    """Reproduces (an index folder swapped or deleted and restored under a running server): every replaced catalog
    stayed open, 15 handles to a deleted catalog.db after 14 swaps, its disk space held until restart; they waited for
    the garbage collector. A replaced catalog closes when the last query holding its snapshot lets it go."""
    import os

    folder = tmp_path / "index"
    shutil.copytree(two[0], folder)

    def held() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(tmp_path)) and "catalog.db" in target:
                found.append(target)
        return found

    index = ImageIndex(folder, load_network=False)
    try:
        in_flight = index.snapshot()           # a query that started before the swaps
        for i in range(3):
            folder.rename(tmp_path / f"old{i}")
            shutil.copytree(two[0], folder)
            shutil.rmtree(tmp_path / f"old{i}")
            assert index.refresh()
            index.snapshot().catalog.settings()
        assert in_flight.catalog.settings() is not None, "a query holding the first snapshot still reads its catalog"
        del in_flight
        assert [t for t in held() if "(deleted)" in t] == []
    finally:
        index.close()
