"""Tests for api.recent_queries: uploads kept under random tokens, shared through SQLite, expired and capped."""
from __future__ import annotations

import threading
import time

import numpy as np

from api.recent_queries import RecentQueries, RecentQuery


def query(seed: int, created: float | None = None) -> RecentQuery:
    vector = np.random.default_rng(seed).standard_normal(4096).astype(np.float32)
    return RecentQuery(vector, b"\xff\xd8 jpeg %d" % seed, 640, 480, f"photo{seed}.jpg",
                       time.time() if created is None else created)


def test_a_query_comes_back_whole_from_another_store_on_the_same_file(tmp_path):
    writer, reader = RecentQueries(tmp_path / "q.db"), RecentQueries(tmp_path / "q.db")   # two worker processes
    original = query(1)
    token = writer.add(original)
    got = reader.get(token)

    assert got is not None and np.array_equal(got.vector, original.vector) and got.vector.dtype == np.float32
    assert (got.preview_jpeg, got.width, got.height, got.filename) == (original.preview_jpeg, 640, 480, "photo1.jpg")
    assert writer.add(query(1)) != token, "every upload gets a fresh random token"
    assert reader.get("not-a-token") is None
    writer.close()
    reader.close()


def test_queries_expire_after_their_time_and_the_oldest_go_past_capacity(tmp_path):
    store = RecentQueries(tmp_path / "sub" / "q.db", capacity=3, ttl_s=60)
    stale = store.add(query(0, created=time.time() - 120))
    tokens = [store.add(query(i)) for i in range(1, 5)]

    assert store.get(stale) is None
    assert store.get(tokens[0]) is None, "pushed out by three newer ones"
    assert all(store.get(t) is not None for t in tokens[1:])
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM recent_queries").scalar() == 3, "old rows are deleted"
    store.close()


def rows_on_disk(path) -> list[str]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return [name for (name,) in conn.execute("SELECT filename FROM recent_queries")]


def test_a_visitors_upload_leaves_the_file_after_its_hour_and_the_file_is_the_servers_alone(tmp_path, monkeypatch):
    """Reproduces (security review): an expired upload (its preview, a visitor's photo, and its file name) stayed in
    the file until somebody uploaded again, and for good once the server stopped; the file was world-readable."""
    import api.recent_queries

    monkeypatch.setattr(api.recent_queries, "SWEEP_EVERY_S", 1)
    path = tmp_path / "q.db"
    store = RecentQueries(path, ttl_s=1)
    store.add(query(1))
    assert path.stat().st_mode & 0o777 == 0o600
    time.sleep(1.1)
    assert store.get("x") is None and rows_on_disk(path) == [], "swept as it was looked at"
    store.add(query(2))
    monkeypatch.setattr(api.recent_queries, "SWEEP_EVERY_S", 3600)
    time.sleep(1.1)
    store.get("x")   # throttled: not swept again so soon
    assert rows_on_disk(path) == ["photo2.jpg"]
    store.close()
    assert rows_on_disk(path) == [], "swept as the server stops"
    for part in (path, path.with_name(path.name + "-wal")):   # nor left in the file's free pages or its log
        assert not part.exists() or b"jpeg 1" not in part.read_bytes() and b"photo1.jpg" not in part.read_bytes(), part

    path.chmod(0o644)   # a store made before
    RecentQueries(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_worker_processes_starting_together_on_a_fresh_folder_all_open_the_store(tmp_path):
    path = tmp_path / "fresh" / "q.db"
    stores, errors = [], []

    def open_store():
        try:
            stores.append(RecentQueries(path))
        except Exception as exc:   # noqa: BLE001 - any failure is what this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    token = stores[0].add(query(7))
    assert all(s.get(token) is not None for s in stores)
    for s in stores:
        s.close()


def test_a_deleted_store_or_folder_is_made_again(tmp_path):
    import shutil

    path = tmp_path / "thumbs" / "q.db"
    store, other_worker = RecentQueries(path), RecentQueries(path)
    store.add(query(1))
    for p in path.parent.glob("q.db*"):
        p.unlink()
    token = store.add(query(2))                        # file gone: made again, table included
    assert store.get(token) is not None and other_worker.get(token) is not None, "the other worker follows"

    shutil.rmtree(path.parent)
    token = other_worker.add(query(3))                 # folder gone too
    assert other_worker.get(token) is not None and store.get(token) is not None
    store.close()
    other_worker.close()


def test_a_store_file_without_its_table_gets_it_back(tmp_path):
    path = tmp_path / "q.db"
    store = RecentQueries(path)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE recent_queries")
    token = store.add(query(4))
    assert store.get(token) is not None
    store.close()


def test_a_query_made_with_another_network_is_not_returned(tmp_path):
    served = ["alexnet-fc7"]
    store = RecentQueries(tmp_path / "q.db", network=lambda: served[0])
    token = store.add(query(5))
    assert store.get(token).network == "alexnet-fc7"
    served[0] = "vgg16-fc7"                            # the server reloaded another network
    assert store.get(token) is None, "its vector would be compared with another network's vectors"
    served[0] = "alexnet-fc7"
    assert store.get(token) is not None
    store.close()
