"""Tests for retrieval.vectors.vector_index: exact search against brute force, atomic save, reconciliation with the catalog."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from retrieval.catalog import Catalog
from retrieval.files import sample_digest
from retrieval.vectors import vector_index
from retrieval.vectors.vector_index import VectorIndex


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def brute_force(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1))    # (q, n)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), ids[order]


def test_search_agrees_with_numpy_brute_force():
    base, queries = random_vectors(500, 64), random_vectors(20, 64, seed=1)
    ids = np.arange(1000, 1500, dtype=np.int64)[::-1].copy()     # ids need not follow positions
    index = VectorIndex(64)
    index.add(ids, base)

    dist, got = index.search(queries, 10)
    want_dist, want = brute_force(base, ids, queries, 10)

    assert np.array_equal(got, want)
    assert np.allclose(dist, want_dist, atol=1e-3)


def test_k_larger_than_the_index_and_an_empty_index():
    index = VectorIndex(8)
    dist, ids = index.search(random_vectors(2, 8), 5)
    assert ids.shape == (2, 0)
    index.add(np.array([7, 9]), random_vectors(2, 8))
    dist, ids = index.search(random_vectors(1, 8), 5)
    assert sorted(ids[0]) == [7, 9]


def test_remove_and_save_roundtrip(tmp_path):
    index = VectorIndex(16)
    base = random_vectors(10, 16)
    index.add(np.arange(10), base)
    assert index.remove([3, 4, 99]) == 2
    index.save(tmp_path / "v.faiss")

    loaded = VectorIndex.load(tmp_path / "v.faiss", 16)

    assert sorted(loaded.ids()) == [0, 1, 2, 5, 6, 7, 8, 9]
    _, ids = loaded.search(base[5:6], 1)
    assert ids[0, 0] == 5
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import faiss

    old = VectorIndex(16)
    old.add(np.arange(3), random_vectors(3, 16))
    old.save(tmp_path / "v.faiss")
    before = (tmp_path / "v.faiss").read_bytes()

    def full_disk(index, writer):   # the temporary file is open (empty) when the write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    with pytest.raises(OSError):
        VectorIndex(16).save(tmp_path / "v.faiss")

    assert (tmp_path / "v.faiss").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.faiss"]


def test_unreadable_or_wrong_shape_file_is_ignored(tmp_path):
    (tmp_path / "bad.faiss").write_bytes(b"garbage")
    assert VectorIndex.load(tmp_path / "bad.faiss", 16) is None
    VectorIndex(8).save(tmp_path / "eight.faiss")
    assert VectorIndex.load(tmp_path / "eight.faiss", 16) is None


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path, create=True)
    yield cat
    cat.close()


def add_rows(catalog: Catalog, names: list[str], vecs: np.ndarray) -> list[int]:
    rows = [{"path": n, "label": None, "size": 1, "mtime_ns": 1, "width": 1, "height": 1, "sha256": "x"} for n in names]
    return catalog.write_batch(rows, vecs, [])[0]


def test_reconcile_adds_missing_and_drops_stale_ids(tmp_path, catalog):
    vecs = random_vectors(6, 16)
    ids = add_rows(catalog, [f"img{i}.png" for i in range(6)], vecs)
    stale = VectorIndex(16)
    stale.add(np.array(ids[:3] + [999]), vecs[:4])       # 3 known rows, one id the catalog never had
    stale.save(tmp_path / "v.faiss")

    index, changed = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16)

    assert changed
    assert sorted(index.ids()) == sorted(ids)
    for i, vec in zip(ids, vecs):
        assert index.search(vec[None], 1)[1][0, 0] == i


def test_a_faiss_file_of_another_catalog_with_the_same_ids_is_rebuilt(tmp_path, catalog):
    """A database re-created under a replica hands out ids 1, 2, 3 again: its old FAISS file must not answer."""
    old = Catalog(tmp_path / "old", create=True)
    old_ids = add_rows(old, ["a.png", "b.png", "c.png"], random_vectors(3, 16, seed=1))
    old_index, _ = VectorIndex.open_reconciled(tmp_path / "v.faiss", old, 16)
    old_index.save(tmp_path / "v.faiss")
    old.close()
    vecs = random_vectors(3, 16, seed=2)
    ids = add_rows(catalog, ["x.png", "y.png", "z.png"], vecs)
    assert ids == old_ids, "the test needs ids that coincide"

    index, changed = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16)

    assert changed
    for i, vec in zip(ids, vecs):
        dist, got = index.search(vec[None], 1)
        assert got[0, 0] == i and dist[0, 0] < 1e-4, "the catalog's vectors, not the old file's"


def test_reconcile_rebuilds_a_missing_file(tmp_path, catalog):
    ids = add_rows(catalog, ["a.png", "b.png"], random_vectors(2, 16))
    index, changed = VectorIndex.open_reconciled(tmp_path / "absent.faiss", catalog, 16)
    assert changed and sorted(index.ids()) == sorted(ids)


def test_ids_are_never_reused_after_deletion(catalog):
    first = add_rows(catalog, ["a.png", "b.png"], random_vectors(2, 4))
    catalog.remove_paths(["b.png"])
    again = add_rows(catalog, ["c.png"], random_vectors(1, 4))
    assert again[0] > max(first)


@pytest.mark.parametrize("queries, threads", [(1, 1), (1, 2), (1, 3), (5, 2), (64, 2), (65, 2)])
def test_threaded_and_blocked_search_agrees_with_brute_force(queries, threads):
    """A lone query split across threads, a micro-batch scanned block by block, and a large batch (FAISS's own
    search) all give brute force's exact answer; 257 rows do not split evenly into threads or blocks."""
    base, qs = random_vectors(257, 4096), random_vectors(queries, 4096, seed=1)
    ids = np.arange(5000, 5257, dtype=np.int64)[::-1].copy()
    index = VectorIndex(4096)
    index.add(ids, base)

    dist, got = index.search(qs, 10, threads=threads)
    want_dist, want = brute_force(base, ids, qs, 10)

    assert np.array_equal(got, want)
    assert np.allclose(dist, want_dist, rtol=1e-4)


def test_threaded_search_with_k_beyond_a_thread_share_and_after_removals():
    base = random_vectors(7, 32)
    ids = np.arange(10, 17, dtype=np.int64)
    index = VectorIndex(32)
    index.add(ids, base)
    index.remove([12, 13])
    keep = np.isin(ids, [12, 13], invert=True)

    dist, got = index.search(base[:3], 10, threads=4)     # 5 rows over 4 threads: shares of 1 or 2 rows, k = 5
    want_dist, want = brute_force(base[keep], ids[keep], base[:3], 5)

    assert got.shape == (3, 5)
    assert np.array_equal(got, want)
    assert np.allclose(dist, want_dist, atol=1e-4)


def test_concurrent_threaded_searches_share_the_scan_threads_and_stay_exact():
    """Request threads (neighbour pages) and the query batcher search at once through one pool of scan threads."""
    from concurrent.futures import ThreadPoolExecutor

    base, qs = random_vectors(300, 256), random_vectors(24, 256, seed=2)
    ids = np.arange(300, dtype=np.int64) * 7
    index = VectorIndex(256)
    index.add(ids, base)
    _, want = brute_force(base, ids, qs, 5)
    slices = [slice(i, i + 1) for i in range(24)] + [slice(j, j + 8) for j in (0, 8, 16)] * 8   # lone and batches

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda part: index.search(qs[part], 5, threads=2)[1], slices))
    for part, got in zip(slices, results):
        assert np.array_equal(got, want[part]), part


# A process that maps an index, truncates its file in place and searches: before the private copy it died of SIGBUS.
TRUNCATE_UNDER_MAPPING = textwrap.dedent("""
    import sys, json, numpy as np
    from pathlib import Path
    from retrieval.vectors.vector_index import VectorIndex
    path, queries = Path(sys.argv[1]), np.load(sys.argv[2])
    index = VectorIndex.load(path, queries.shape[1], mmap=True)
    assert index.mapped
    with open(path, "r+b") as f:
        f.truncate(100)
    print(json.dumps(index.search(queries, 5)[1].tolist()))
""")


def test_a_mapped_index_keeps_answering_after_its_file_is_truncated_in_place(tmp_path):
    base, queries = random_vectors(3000, 64), random_vectors(4, 64, seed=1)   # 750 KB: many pages to lose
    ids = np.arange(3000, dtype=np.int64) * 3
    index = VectorIndex(64)
    index.add(ids, base)
    index.save(tmp_path / "v.faiss")
    np.save(tmp_path / "q.npy", queries)

    done = subprocess.run([sys.executable, "-c", TRUNCATE_UNDER_MAPPING, str(tmp_path / "v.faiss"),
                           str(tmp_path / "q.npy")], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, f"exit {done.returncode} (-7: SIGBUS): {done.stderr[-2000:]}"
    assert np.array_equal(np.array(eval(done.stdout)), brute_force(base, ids, queries, 5)[1])
    assert (tmp_path / "v.faiss").stat().st_size == 100 and sorted(p.name for p in tmp_path.iterdir()) == \
        ["q.npy", "v.faiss"], "the private copy has no name: nothing is left next to the file"


def _saved_with_digest(tmp_path, catalog, n: int = 40) -> tuple[list[int], np.ndarray]:
    vecs = random_vectors(n, 16)
    ids = add_rows(catalog, [f"img{i}.png" for i in range(n)], vecs)
    index, _ = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16)
    index.save(tmp_path / "v.faiss")
    catalog.save_faiss_digest(*sample_digest(tmp_path / "v.faiss"))   # as index-images records it
    return ids, vecs


@pytest.mark.parametrize("mmap", [True, False])
def test_a_faiss_file_rewritten_in_place_is_not_served_but_rebuilt_from_the_catalog(tmp_path, catalog, mmap,
                                                                                     monkeypatch, caplog):
    """Bytes flipped in the vectors (same size, still readable by FAISS): the digest says it is not the file saved."""
    monkeypatch.setattr(vector_index, "DIGEST_WAIT_S", 0.2)
    ids, vecs = _saved_with_digest(tmp_path, catalog)
    with open(tmp_path / "v.faiss", "r+b") as f:
        f.seek(-16 * 4 * 20 - 8 * 40, 2)          # the 20th vector from the end, before the 40 ids
        f.write(np.full(16, 50.0, np.float32).tobytes())

    index, changed = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16, mmap=mmap)

    assert changed and not index.mapped
    assert "not the one index-images recorded" in caplog.text
    _, got = index.search(vecs, 3)
    assert np.array_equal(got, brute_force(vecs, np.array(ids), vecs, 3)[1])


def test_a_digest_recorded_just_after_the_file_is_waited_for(tmp_path, catalog):
    """index-images renames the new file into place, then records its digest: a server reloading in between waits
    for the record instead of taking the new file for damaged."""
    ids, vecs = _saved_with_digest(tmp_path, catalog)
    more = random_vectors(5, 16, seed=3)
    index, _ = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16)
    index.add(np.array(add_rows(catalog, [f"new{i}.png" for i in range(5)], more)), more)
    index.save(tmp_path / "v.faiss")          # the digest recorded is still the old file's
    late = threading.Timer(1.0, lambda: catalog.save_faiss_digest(*sample_digest(tmp_path / "v.faiss")))
    late.start()
    try:
        loaded, changed = VectorIndex.open_reconciled(tmp_path / "v.faiss", catalog, 16, mmap=True)
    finally:
        late.join()
    assert loaded.mapped and not changed and len(loaded) == 45, "the new file itself, mapped, not a rebuild"


def test_a_search_while_the_process_shuts_its_thread_pools_still_answers(monkeypatch):
    """Reproduces (Ctrl-C or SIGQUIT to serve-images under load): once a worker's main thread ended, Python refused new
    work to every thread pool, and searches its request threads were finishing failed ('cannot schedule new futures
    after shutdown', 500 internal_error). Such a search scans in its own thread."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.vectors import exact_scan

    vecs = random_vectors(2000, 16)
    index = VectorIndex(16)
    index.add(np.arange(2000), vecs)
    expected = index.search(vecs[:3], 5, threads=4)
    closed = ThreadPoolExecutor(2)
    closed.shutdown()
    monkeypatch.setattr(exact_scan, "_scan_pool", closed)
    distances, ids = index.search(vecs[:3], 5, threads=4)
    assert np.array_equal(ids, expected[1]) and np.allclose(distances, expected[0])
    assert ids[:, 0].tolist() == [0, 1, 2]
