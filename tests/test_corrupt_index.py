"""Corrupt index folders under a running server: what a load balancer and a user are told."""
from __future__ import annotations

import io

import pytest

from api import create_app
from helpers.catalogs import corrupt_table_root, private_copy
from retrieval.catalog import CATALOG_FILE


@pytest.fixture
def served_copy(sample_index, tmp_path):
    """The app over a private copy of the sample index (hot reload off: it must notice failures by itself)."""
    index = private_copy(sample_index.index_dir, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbnails")})
    yield app, index
    app.extensions["retrieval"].close()


def test_healthz_says_503_while_searches_fail_on_a_corrupt_catalog_page(served_copy, sample_index):
    app, index = served_copy
    client = app.test_client()
    query = next(sample_index.data_dir.rglob("*.jpg")).read_bytes()

    def search():
        return client.post("/search?k=3", data={"image": (io.BytesIO(query), "q.jpg")},
                           content_type="multipart/form-data")

    assert search().status_code == 200 and client.get("/healthz").status_code == 200
    corrupt_table_root(index / CATALOG_FILE, "images")

    failed = search()
    assert failed.status_code == 503, failed.data
    health = client.get("/healthz")
    assert health.status_code == 503, health.get_json()
    assert "failed to read the catalog" in health.get_json()["reason"]


def test_a_corrupt_catalog_under_the_server_is_told_with_what_to_do(served_copy, sample_index, caplog):
    """Reproduces: a search on a catalog damaged under a running server answered 'try again shortly', and /healthz and
    the log gave SQLite's words alone; the commands name the two ways out (restore it, or re-index into a new folder)."""
    app, index = served_copy
    client = app.test_client()
    query = next(sample_index.data_dir.rglob("*.jpg")).read_bytes()
    corrupt_table_root(index / CATALOG_FILE, "images")

    failed = client.post("/search?k=3", data={"image": (io.BytesIO(query), "q.jpg")}, content_type="multipart/form-data")

    assert failed.status_code == 503, failed.data
    assert "try again" not in failed.get_json()["error"]["message"], "waiting cannot mend a damaged file"
    reason = client.get("/healthz").get_json()["reason"]
    ways_out = f"restore it from a backup, or re-index into a new folder: index-images {sample_index.data_dir}"
    assert str(index / CATALOG_FILE) in reason and ways_out in reason, reason
    assert any(ways_out in r.getMessage() for r in caplog.records if r.levelname == "ERROR"), caplog.text
