"""Tests for whitening learned on the collection and database-side augmentation, as index-images keeps them (no network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.vectors import one_way
from retrieval.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.vectors.builder import maintain_vectors
from retrieval.vectors.index_types import IndexTypeConfig
from retrieval.vectors.vector_index import VectorIndex
from retrieval.vectors.whitening import VECTORS_PER_DIM, WHITEN_MIN_DIM, min_whiten_vectors, whitening_of

DIM = 128


def fill(catalog: Catalog, vectors: np.ndarray, start: int = 0) -> np.ndarray:
    rows = [{"path": f"img{start + i:05d}.png", "label": None, "size": 1, "mtime_ns": 1, "width": 1, "height": 1,
             "sha256": "x"} for i in range(len(vectors))]
    return np.asarray(catalog.write_batch(rows, vectors, [])[0], dtype=np.int64)


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path, create=True)
    yield cat
    cat.close()


def run(catalog: Catalog, tmp_path: Path, **config) -> tuple[dict, VectorIndex]:
    """One index-images run's FAISS side with no new images (the no-network path) -> (record, the saved index)."""
    maintain_vectors(catalog, tmp_path / FAISS_FILE, DIM, IndexTypeConfig(recall_queries=100, **config))
    record = catalog.vector_index_record()
    return record, VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory=record["factory"])


def test_a_new_index_whitens_and_an_indexed_vector_finds_itself_at_distance_zero(catalog, tmp_path):
    vectors, _ = one_way(600)
    ids = fill(catalog, vectors)
    record, index = run(catalog, tmp_path, whiten_dim=64)
    assert record["factory"] == "PCAW64,L2norm,Flat" and record["whitened_dim"] == 64
    assert record["whiten"] == {"on": True, "dim": 64} and record["file_bytes"] == (tmp_path / FAISS_FILE).stat().st_size
    distances, found = index.search(vectors[:50], 3)
    assert np.array_equal(found[:, 0], ids[:50]) and distances[:, 0].max() < 1e-3
    # the search is exact in the whitened space: brute force over the whitening the file applies
    whiten = whitening_of(index.index)
    space = whiten(vectors)
    assert space.shape == (600, 64) and np.allclose(np.linalg.norm(space, axis=1), 1, atol=1e-4)
    brute = np.argsort(((space[50:80, None, :] - space[None, :, :]) ** 2).sum(-1), axis=1)[:, :5]
    assert np.array_equal(index.search(vectors[50:80], 5)[1], ids[brute])
    # exact there (the brute force above), so no recall is measured: it scored 0.998 only where ties came apart
    assert record["recall"] is None


def test_auto_whitening_takes_a_quarter_of_the_collection_in_dimensions(catalog, tmp_path):
    vectors, _ = one_way(4 * WHITEN_MIN_DIM * 2 + 7)
    fill(catalog, vectors[:4 * WHITEN_MIN_DIM - 1])
    record, _ = run(catalog, tmp_path)                                   # a new index: whitening on, auto
    assert record["factory"] == "Flat" and record["whiten"] == {"on": True, "dim": None}
    assert record["whiten_waits_for"] == 4 * WHITEN_MIN_DIM
    fill(catalog, vectors[4 * WHITEN_MIN_DIM - 1:], start=4 * WHITEN_MIN_DIM - 1)
    record, _ = run(catalog, tmp_path)                                   # 263 images: 65 -> 64 dimensions
    assert record["factory"] == f"PCAW{2 * WHITEN_MIN_DIM},L2norm,Flat"


def test_whitening_spreads_vectors_that_all_point_one_way(catalog, tmp_path):
    vectors, _ = one_way(800, seed=1)
    fill(catalog, vectors)
    _, whitened = run(catalog, tmp_path, whiten=True, whiten_dim=64)
    cosines = vectors[:100] @ vectors[:100].T
    assert np.median(cosines) > 0.8                               # raw: the pairs point the same way
    space = whitening_of(whitened.index)(vectors[:100])
    assert abs(np.median(space @ space.T)) < 0.2                  # whitened: spread out


def test_a_small_collection_waits_for_whitening_then_grows_into_it(catalog, tmp_path):
    smallest = min_whiten_vectors(256)
    vectors, _ = one_way(int(2 * VECTORS_PER_DIM * WHITEN_MIN_DIM) + 1)
    fill(catalog, vectors[:smallest - 1])
    record, index = run(catalog, tmp_path, whiten_dim=256)
    assert record["factory"] == "Flat" and record["whitened_dim"] is None
    assert record["whiten_waits_for"] == smallest and record["whiten"]["on"]
    fill(catalog, vectors[smallest - 1:smallest], start=smallest - 1)   # enough for the smallest whitening
    record, _ = run(catalog, tmp_path)
    assert record["factory"] == f"PCAW{WHITEN_MIN_DIM},L2norm,Flat" and record["whiten_waits_for"] is None
    fill(catalog, vectors[smallest:], start=smallest)
    record, _ = run(catalog, tmp_path)   # doubled: retrained with twice the dimensions
    assert record["factory"] == f"PCAW{2 * WHITEN_MIN_DIM},L2norm,Flat" and record["train"]["count"] == len(vectors)


def test_whitening_is_recorded_and_an_index_recorded_without_it_keeps_raw_vectors(catalog, tmp_path):
    vectors, _ = one_way(300)
    fill(catalog, vectors)
    record, _ = run(catalog, tmp_path, whiten=False)
    assert record["factory"] == "Flat"
    legacy = {k: v for k, v in record.items() if k not in ("whiten", "whitened_dim", "whiten_waits_for", "dba")}
    catalog.save_vector_index_record(legacy)                    # as an index saved before whitening existed
    record, _ = run(catalog, tmp_path)
    assert record["factory"] == "Flat" and record["whiten"]["on"] is False
    record, _ = run(catalog, tmp_path, whiten=True, whiten_dim=64)   # asked for: rebuilt without the network
    assert record["factory"] == "PCAW64,L2norm,Flat"
    record, _ = run(catalog, tmp_path)                                # and kept by later runs
    assert record["factory"] == "PCAW64,L2norm,Flat"
    record, _ = run(catalog, tmp_path, whiten=False)
    assert record["factory"] == "Flat"


def test_whitening_in_front_of_a_compressed_type_measures_recall_in_the_whitened_space(catalog, tmp_path):
    vectors, _ = one_way(1200, seed=2)
    fill(catalog, vectors)
    record, index = run(catalog, tmp_path, whiten_dim=32, index_type="IVF16,Flat", nprobe=2)
    assert record["factory"] == "PCAW32,L2norm,IVF16,Flat"
    measured = record["recall"]["results"][0]
    assert measured["search_params"] == {"nprobe": 2} and 0.3 < measured["1-recall@10"] < 1.0
    record, _ = run(catalog, tmp_path, nprobe=16)                      # every list: exact in the whitened space
    assert record["recall"]["results"][0]["1-recall@10"] == 1.0


def test_database_side_augmentation_moves_stored_vectors_towards_their_neighbours(catalog, tmp_path):
    vectors, item = one_way(400, seed=3, items=100)                     # four noisy copies of each of 100 items
    ids = fill(catalog, vectors)
    record, index = run(catalog, tmp_path, whiten_dim=32, dba=3)
    assert record["dba"] == 3 and record["recall"]["results"][0]["1-recall@1"] == 1.0   # exact over what it holds
    item_of = np.vectorize(dict(zip(ids.tolist(), item.tolist())).get)
    distances, found = index.search(vectors[:100], 4)
    together = (item_of(found) == item[:100, None]).mean()
    assert distances[:, 0].min() > 1e-3                                 # stored: averages, not the image itself
    record, index = run(catalog, tmp_path, dba=0)                       # turned off: the raw vectors again
    distances, found = index.search(vectors[:100], 4)
    assert record["dba"] == 0 and distances[:, 0].max() < 1e-3
    assert together > (item_of(found) == item[:100, None]).mean()      # DBA brought each item's copies together


def test_an_unchanged_folder_leaves_a_whitened_flat_file_as_it_is(tmp_path, index_images):
    """Reproduces (a review of the change that stopped measuring a whitened Flat's recall): every run on an unchanged
    folder of 128 images or more saved the FAISS file again ("no recall yet" was FAISS work), so every server
    reloaded after each cron run: an unchanged folder is a no-op run (DESIGN invariant)."""
    from retrieval.samples import make_sample_collection

    make_sample_collection(tmp_path / "data", per_class=26, size=(48, 36), seed=2)   # 130 images: PCAW32,L2norm,Flat
    first = index_images(tmp_path / "data", tmp_path / "index")
    assert first.vector_index["factory"] == "PCAW32,L2norm,Flat" and first.vector_index["recall"] is None
    saved = (tmp_path / "index" / FAISS_FILE).stat()
    again = index_images(tmp_path / "data", tmp_path / "index")
    assert again.unchanged == 130
    after = (tmp_path / "index" / FAISS_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns), "the FAISS file was written again"


@pytest.mark.parametrize("explicit", ["PCAW32,L2norm,Flat", "PCAW32,Flat", "PCAWR32,Flat"])
def test_an_explicit_whitening_type_waits_for_one_vector_more_than_its_dimensions(catalog, tmp_path, explicit):
    """Reproduces (a Python user's index_folder with vector_index="PCAW32,L2norm,Flat" and a first batch of 32): the
    whitening trained on exactly 32 vectors, which centred span 31 directions; the last was divided by a zero
    eigenvalue, every stored vector and query came out NaN, and the 60-image index answered no neighbours at all."""
    vectors, _ = one_way(60)
    fill(catalog, vectors[:32])
    record, _ = run(catalog, tmp_path, index_type=explicit, whiten=False)
    assert record["factory"] == "Flat", "32 vectors cannot train a 32-d whitening: exact search until they can"
    ids = catalog.ids()
    ids = np.concatenate([ids, fill(catalog, vectors[32:33], start=32)])
    record, index = run(catalog, tmp_path, index_type=explicit, whiten=False)
    assert record["factory"] == explicit
    distances, found = index.search(vectors[:33], 5)
    assert np.isfinite(distances).all() and (found >= 0).all()
    assert np.array_equal(found[:, 0], ids) and distances[:, 0].max() < 1e-3   # each finds itself
