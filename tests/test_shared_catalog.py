"""Shared metadata in PostgreSQL: two real serve-images processes on their own index folders serve one catalog and follow the writer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from retrieval.samples import make_sample_collection
from retrieval.features.backbones import random_weights_file
from retrieval.names import FAISS_FILE

from helpers.postgres import PASSWORD
from helpers.scripts import console_script
from helpers.servers import serve_images
from helpers.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]   # a PostgreSQL server and two serve-images


def ranked(folder, data, db_url: str) -> list[tuple[str, float]]:  # noqa: ANN001 - paths
    """The ten nearest to red_circles_000.jpg, by the index in folder (path, distance to 4 places)."""
    from retrieval.search.index import ImageIndex

    index = ImageIndex(folder, db_url=db_url)
    try:
        hits = index.search_image((data / "red_circles" / "red_circles_000.jpg").read_bytes(), 10)[0]
        return [(h.path, round(h.distance, 4)) for h in hits]
    finally:
        index.close()


def search(base: str, image: bytes, k: int = 3) -> list[dict]:
    answer = requests.post(base + "/search", params={"k": k}, data=image, headers={"Content-Type": "image/jpeg"},
                           timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_two_servers_on_their_own_index_folders_serve_one_postgresql_catalog(tmp_path, postgres_url, index_images):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(96, 72), classes=["red_circles", "blue_squares"], seed=2)
    writer = tmp_path / "writer"
    index_images(data, writer, db_url=postgres_url)
    replicas = [tmp_path / "api-a", tmp_path / "api-b"]
    for folder in replicas:   # each host has the index's network (random weights: the file; imagenet: the hub cache)
        folder.mkdir()
        os.link(random_weights_file(writer, "alexnet"), random_weights_file(folder, "alexnet"))
    shutil.copy(writer / FAISS_FILE, replicas[0] / FAISS_FILE)   # one starts from a copy, one from the database alone
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]

    with serve_images(replicas[0], logs[0], "--db-url", postgres_url, RETRIEVAL_RELOAD_INTERVAL_S="0.3") as a, \
            serve_images(replicas[1], logs[1], RETRIEVAL_DB_URL=postgres_url, RETRIEVAL_RELOAD_INTERVAL_S="0.3") as b:
        for base in (a, b):
            hits = search(base, query)
            assert hits[0]["path"] == "red_circles/red_circles_000.jpg" and hits[0]["distance"] < 1e-3
            stats = requests.get(base + "/stats", timeout=30)
            assert stats.json()["count"] == 6 and stats.json()["catalog"] == "postgresql"
            assert PASSWORD not in stats.text

        # the writer, in its own folder, adds one image and removes another: both servers follow the catalog
        Image.new("RGB", (90, 70), (20, 200, 30)).save(data / "blue_squares" / "green.jpg", quality=95)
        (data / "red_circles" / "red_circles_001.jpg").unlink()
        report = index_images(data, writer, db_url=postgres_url)
        assert (report.indexed, report.removed, report.total) == (1, 1, 6)
        green = (data / "blue_squares" / "green.jpg").read_bytes()
        for base in (a, b):
            assert wait_for(lambda: search(base, green, k=1)[0]["path"] == "blue_squares/green.jpg", 60, interval=0.2), \
                f"{base} did not pick up the new image from the database"
            paths = [h["path"] for h in search(base, query, k=10)]
            assert "red_circles/red_circles_001.jpg" not in paths and len(paths) == 6
            health = requests.get(base + "/healthz", timeout=30).json()
            assert health["status"] == "ok" and health["count"] == 6
            deadline = time.monotonic() + 60   # the evaluation page reads the same catalog (in the background)
            while 'id="precision-chart"' not in (page := requests.get(base + "/evaluation", timeout=60).text):
                assert "cannot be evaluated" not in page, page
                assert time.monotonic() < deadline, "the evaluation page never showed its numbers"
                time.sleep(0.5)
    assert not (replicas[1] / "catalog.db").exists() and not (writer / "catalog.db").exists()
    evaluated = subprocess.run([sys.executable, "-c", "from commands.evaluate_index import main; main()", "--index-dir",
                                str(replicas[1]), "--json"], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "RETRIEVAL_DB_URL": postgres_url})
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["images"]["labelled"] == 6
    searched = subprocess.run([sys.executable, "-c", "from commands.search_images import main; main()",
                               str(data / "blue_squares" / "green.jpg"), "-k", "2", "--index-dir", str(replicas[1]),
                               "--db-url", postgres_url, "--json"], capture_output=True, text=True, timeout=300)
    assert searched.returncode == 0, searched.stderr
    assert json.loads(searched.stdout)["results"][0]["path"] == "blue_squares/green.jpg"
    for log in logs:
        text = log.read_text()
        assert "catalog postgresql://retrieval:***@127.0.0.1" in text, text[-2000:]
        assert PASSWORD not in text, "the database password never appears in a log"


def test_a_replica_follows_the_writer_across_a_change_of_faiss_type(tmp_path, postgres_url, index_images):
    """Reproduces: a replica serving while the writer's collection passed 128 images went on searching raw vectors
    after the writer switched to whitening (PCAW32), and to its own stale type after the next retraining, while
    /stats reported the writer's: it answered unlike the writer, unlike a replica started later, and unlike
    search-images (the same catalog and FAISS file signature made it bring its old index up to date instead)."""
    from retrieval.search.index import ImageIndex
    from retrieval.vectors.whitening import whitening_of

    data = tmp_path / "data"
    make_sample_collection(data, per_class=4, size=(64, 48), seed=2)           # 20 images: Flat, whitening waits
    writer = tmp_path / "writer"
    index_images(data, writer, db_url=postgres_url)
    replicas = [tmp_path / "replica", tmp_path / "later"]
    for folder in replicas:
        folder.mkdir()
        os.link(random_weights_file(writer, "alexnet"), random_weights_file(folder, "alexnet"))
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
    serving = ImageIndex(replicas[0], db_url=postgres_url)
    try:
        assert whitening_of(serving.snapshot().vectors.index) is None
        make_sample_collection(data, per_class=28, size=(64, 48), seed=2)      # 140 images: whitened from now on
        report = index_images(data, writer, db_url=postgres_url)
        assert report.vector_index["factory"].startswith("PCAW"), report.vector_index
        assert serving.refresh()
        assert whitening_of(serving.snapshot().vectors.index) is not None, "the replica searches what the writer does"
        later = ImageIndex(replicas[1], db_url=postgres_url)
        try:
            served, fresh = serving.search_image(query, 10)[0], later.search_image(query, 10)[0]
        finally:
            later.close()
        assert [h.path for h in served] == [h.path for h in fresh]
        assert [round(h.distance, 4) for h in served] == [round(h.distance, 4) for h in fresh]
    finally:
        serving.close()


def test_a_replica_with_its_own_faiss_file_of_an_earlier_build_ranks_as_the_writer(tmp_path, postgres_url, index_images):
    """Reproduces (scale-out review): a replica folder that had its own FAISS file (index-images run there, as the
    server's message advised) kept that file's whitening after the writer retrained (the collection doubled): its ids
    were reconciled, its whitening was not, and it ranked unlike the writer and the other replicas, without a word."""
    from retrieval.vectors.builder import build_file

    data = tmp_path / "data"
    make_sample_collection(data, per_class=26, size=(64, 48), seed=2)          # 130 images: whitened (trained)
    writer, replica = tmp_path / "writer", tmp_path / "replica"
    index_images(data, writer, db_url=postgres_url)
    replica.mkdir()
    os.link(random_weights_file(writer, "alexnet"), random_weights_file(replica, "alexnet"))
    shutil.copy(writer / FAISS_FILE, replica / FAISS_FILE)                     # the writer's file and its build note
    shutil.copy(build_file(writer / FAISS_FILE), build_file(replica / FAISS_FILE))
    make_sample_collection(data, per_class=54, size=(64, 48), seed=2)          # 270: doubled, the writer retrains
    report = index_images(data, writer, db_url=postgres_url)
    assert report.vector_index["train"]["count"] >= 260, report.vector_index
    assert ranked(replica, data, postgres_url) == ranked(writer, data, postgres_url)


def test_a_catalog_database_out_of_reach_is_told_to_clients_without_its_address(tmp_path, postgres, postgres_url,
                                                                                  index_images, caplog):
    """Reproduces: with PostgreSQL down, a search answered 503 with 'connection to server at "127.0.0.1", port ...
    failed ...; restore it or run index-images': the database's address to any client, and advice that cannot help."""
    import logging

    from retrieval.search.index import ImageIndex
    from retrieval.search.snapshot import IndexUnavailable

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "writer", db_url=postgres_url)
    name = postgres_url.rsplit("/", 1)[1]
    index = ImageIndex(tmp_path / "writer", db_url=postgres_url)
    try:
        postgres.admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
        postgres.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        with caplog.at_level(logging.ERROR, logger="retrieval.search.index"):
            assert not index.refresh()
        assert index.problem == ("the catalog database cannot be read now; searches are answered again once it is "
                                 "back (the server log says why)")
        with pytest.raises(IndexUnavailable):
            index.snapshot()
        assert "not currently accepting connections" in caplog.text, "the operator's log says why"
        postgres.admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        index.refresh()
        assert index.problem is None and len(index.snapshot().vectors) == 4
    finally:
        postgres.admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        index.close()


def test_a_catalog_database_that_stops_answering_makes_healthz_503_until_it_answers(tmp_path, postgres, postgres_url,
                                                                                     index_images, caplog):
    """Reproduces (scale-out review): PostgreSQL frozen (connections open, nothing answering: a hung host, a half-open
    balancer) left searches failing as 'overloaded' after 30 s while /healthz said ok, so a balancer kept sending
    traffic; the server logged nothing."""
    import logging

    from api import create_app

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "writer", db_url=postgres_url)
    app = create_app({"INDEX_DIR": str(tmp_path / "writer"), "DB_URL": postgres_url, "RELOAD_INTERVAL_S": 1,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    client = app.test_client()
    try:
        assert client.get("/healthz").status_code == 200
        with postgres.frozen(), caplog.at_level(logging.WARNING, logger="api.database_probe"):
            started = time.monotonic()
            health = client.get("/healthz")
            assert health.status_code == 503 and time.monotonic() - started < 10
            assert health.get_json()["reason"].startswith("the catalog database has not answered for"), health.get_json()
            assert "has not answered SELECT 1" in caplog.text
        assert wait_for(lambda: client.get("/healthz").status_code == 200, 30), client.get("/healthz").get_json()
    finally:
        app.extensions["retrieval"].close()


def test_an_index_folder_with_its_own_catalog_is_not_filled_anew_into_an_empty_database(tmp_path, postgres_url,
                                                                                       index_images):
    """Reproduces (scale-out review): `index-images data --index-dir idx --db-url postgresql://.../empty` on a folder
    holding a SQLite index extracted every image again into the database, replaced the folder's FAISS file and left
    its catalog.db beside it, without a word; and a second data folder on a shared catalog was told to use another
    index folder, where the database is what holds the other index."""
    from indexer.config import ConfigError
    from retrieval.names import FAISS_FILE

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "index")
    before = (tmp_path / "index" / FAISS_FILE).read_bytes()
    with pytest.raises(ConfigError, match=r"holds an index of 4 images in its own SQLite catalog \(catalog.db\).*"
                                          r"folder of its own \(--index-dir\)"):
        index_images(data, tmp_path / "index", db_url=postgres_url)
    assert (tmp_path / "index" / FAISS_FILE).read_bytes() == before

    index_images(data, tmp_path / "pg", db_url=postgres_url)
    from indexer.check import check_index, describe

    report = check_index(data, tmp_path / "pg", postgres_url)   # (SQLite's quick_check named for a server's catalog)
    assert report["ok"] and describe(report).splitlines()[0].endswith(": answers"), describe(report)
    other = tmp_path / "other"
    make_sample_collection(other, per_class=1, size=(64, 48), seed=3, classes=["red_circles"])
    with pytest.raises(ConfigError, match=r"the catalog database postgresql://\S+:\*\*\*@\S+ holds the index of .*"
                                          r"use another database for another data folder"):
        index_images(other, tmp_path / "pg2", db_url=postgres_url)


def test_a_sqlite_index_is_carried_into_postgresql_without_extracting_anything(tmp_path, postgres_url, index_images):
    """`index-images data --index-dir idx --db-url URL --import-sqlite`: the folder's SQLite catalog copied into the empty
    database (ids, vectors, skipped files, settings as they are), nothing extracted again, catalog.db set aside; the
    index searches as before, and ids stay never reused (a removed image's id is not handed out again)."""
    from retrieval.catalog import Catalog
    from retrieval.search.index import ImageIndex

    data, index = tmp_path / "data", tmp_path / "index"
    make_sample_collection(data, per_class=3, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    (data / "red_circles" / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    index_images(data, index)
    (data / "red_circles" / "red_circles_002.jpg").unlink()            # the newest id removed: SQLite never reuses it
    index_images(data, index)
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
    before = ImageIndex(index)
    try:
        expected = [(h.id, h.path, round(h.distance, 5)) for h in before.search_image(query, 5)[0]]
        highest = max(before.catalog.ids())
    finally:
        before.close()

    done = subprocess.run([console_script("index-images"), "data", "--index-dir", "index", "--db-url", postgres_url,
                           "--import-sqlite", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr                                   # as a user types it, relative paths
    report = json.loads(done.stdout)
    assert report["indexed"] == 0 and report["unchanged"] == 5, report
    assert report["repairs"][0].startswith("imported 5 images from catalog.db into postgresql://"), report["repairs"]
    assert PASSWORD not in done.stdout + done.stderr
    assert not (index / "catalog.db").exists() and (index / "catalog.db.imported").is_file()
    served = ImageIndex(index, db_url=postgres_url)
    try:
        assert [(h.id, h.path, round(h.distance, 5)) for h in served.search_image(query, 5)[0]] == expected
        assert [p for p, _ in served.catalog.skipped()] == ["red_circles/broken.jpg"]
    finally:
        served.close()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(data / "new.jpg")
    assert index_images(data, index, db_url=postgres_url).indexed == 1
    catalog = Catalog(index, url=postgres_url)
    try:
        assert max(catalog.ids()) == highest + 2, "the removed image's id (highest + 1) is not handed out again"
    finally:
        catalog.close()
    from indexer.config import ConfigError

    with pytest.raises(ConfigError, match="already holds an index"):
        index_images(data, index, db_url=postgres_url, import_sqlite=True)


def test_an_index_older_than_its_records_is_imported_as_it_was(tmp_path, postgres_url, index_images):
    """Review of --import-sqlite: a catalog.db made by an older version (no vector_index, extraction or
    weights_training table) failed with 'no such table', blamed on PostgreSQL ('run the same command again', which
    failed alike); imported, it must keep its raw exact search, not take a new index's whitening."""
    import sqlite3

    from retrieval.search.index import ImageIndex
    from retrieval.vectors.index_types import IndexTypeConfig

    data, index = tmp_path / "data", tmp_path / "index"
    make_sample_collection(data, per_class=27, size=(48, 36), seed=6)          # 135: a new index would whiten
    index_images(data, index, vector_index=IndexTypeConfig(whiten=False))
    with sqlite3.connect(index / "catalog.db") as conn:                         # as the first versions left it
        for table in ("vector_index", "extraction", "weights_training"):
            conn.execute(f"DROP TABLE {table}")
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
    before = ImageIndex(index)
    try:
        expected = [(h.path, round(h.distance, 4)) for h in before.search_image(query, 6)[0]]
    finally:
        before.close()
    report = index_images(data, index, db_url=postgres_url, import_sqlite=True)
    assert report.repairs[0].startswith("imported 135 images"), report.repairs
    served = ImageIndex(index, db_url=postgres_url)
    try:
        record = served.catalog.vector_index_record()
        assert record["factory"] == "Flat" and record["whiten"]["on"] is False, record
        assert [(h.path, round(h.distance, 4)) for h in served.search_image(query, 6)[0]] == expected
    finally:
        served.close()


def test_index_images_in_a_replica_folder_after_the_writer_retrained_ranks_as_the_writer(tmp_path, postgres_url,
                                                                                        index_images, caplog):
    """Review of the build note: index-images run in a replica folder (as a server's message once advised) kept its
    file's old whitening but wrote the writer's newer build into its note, so nothing noticed again; and two folders
    that built alike called each other's file earlier (the note held the training's time), rebuilding at each start."""
    import logging

    from retrieval.search.index import ImageIndex
    from retrieval.vectors.index_types import IndexTypeConfig

    data, writer, replica = tmp_path / "data", tmp_path / "writer", tmp_path / "replica"
    make_sample_collection(data, per_class=26, size=(64, 48), seed=2)          # 130 images: whitened (trained)
    index_images(data, writer, db_url=postgres_url)
    index_images(data, replica, db_url=postgres_url)
    with caplog.at_level(logging.WARNING):
        ImageIndex(writer, db_url=postgres_url).close()
    assert "earlier build" not in caplog.text, "the same build, trained a second later in another folder"
    make_sample_collection(data, per_class=32, size=(64, 48), seed=2)          # 160 images
    index_images(data, writer, db_url=postgres_url, vector_index=IndexTypeConfig(rebuild=True))   # retrained: 160
    index_images(data, replica, db_url=postgres_url)
    assert ranked(replica, data, postgres_url) == ranked(writer, data, postgres_url)
