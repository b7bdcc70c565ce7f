"""Hot reload checks what it loads: another network swapped in, a catalog deleted or corrupted, a thumbnail folder
deleted, a watcher that meets an unexpected error, and weights files shown without their path."""
from __future__ import annotations

import io
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from api import create_app
from api.index_watcher import FAILING_CHECKS, IndexWatcher
from retrieval.samples import make_sample_collection
from retrieval.features.backbones import WeightsUnavailable, random_weights_file
from retrieval.catalog import CATALOG_FILE, Catalog
from retrieval.search.index import ImageIndex, WeightsMismatch
from retrieval.search.snapshot import IndexUnavailable

from helpers.waiting import wait_for as poll

RELOAD_WITHIN_S = 20.0
CLASSES = ["red_circles", "blue_squares"]
QUERY = "red_circles/red_circles_001.jpg"


def wait_for(condition, timeout: float = RELOAD_WITHIN_S) -> bool:  # noqa: ANN001 - zero-argument callable
    return poll(condition, timeout)


def upload(client, data: bytes, url: str = "/search?k=3"):  # noqa: ANN001, ANN201 - Flask test client and response
    return client.post(url, data={"image": (io.BytesIO(data), "q.jpg")}, content_type="multipart/form-data")


def top_hit(client, data: bytes) -> dict:  # noqa: ANN001
    r = upload(client, data)
    assert r.status_code == 200, r.data
    return r.get_json()["results"][0]


def assert_unavailable(response) -> dict:  # noqa: ANN001 - a Flask response
    assert response.status_code == 503, response.data[:300]
    body = response.get_json()
    assert body["error"]["code"] == "unavailable", body
    assert response.headers["Retry-After"] == "5"   # when a client may look again (the next reload's look)
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


@pytest.fixture
def collection(tmp_path) -> Path:
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(96, 72), seed=5, classes=CLASSES)
    return data


@pytest.fixture
def served(tmp_path, collection, index_images):
    """(app, index folder) over an AlexNet fc7 index (random weights, seed 0) with hot reload every 0.1 s."""
    index = tmp_path / "index"
    index_images(collection, index)
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0.1, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    yield app, index
    app.extensions["retrieval"].close()


def swap_folders(index: Path, other: Path, retired: Path) -> None:
    """Put the index in `other` where `index` is, with renames, as a user does next to a running server."""
    os.rename(index, retired)
    os.rename(other, index)


# --- another network swapped in ------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"seed": 1}, {"layer": "fc6"}], ids=["other-random-weights", "fc6"])
def test_a_swapped_in_index_is_answered_with_its_own_network(tmp_path, collection, index_images, served, options):
    app, index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    assert top_hit(client, query)["distance"] < 1e-3
    index_images(collection, tmp_path / "other", **options)
    before = client.get("/stats").get_json()

    swapped_in = Catalog(tmp_path / "other")
    try:
        wanted = swapped_in.settings()
    finally:
        swapped_in.close()
    swap_folders(index, tmp_path / "other", tmp_path / "retired")

    def serving_the_new_index() -> bool:
        # A reload may first catch the two renames half done (old catalog, new FAISS file); the next one serves the
        # new index whole. What counts is that the server settles on it, with its own network.
        try:
            return app.extensions["retrieval"].index.snapshot().settings == wanted
        except IndexUnavailable:
            return False
    assert wait_for(serving_the_new_index), "the swapped-in index was not loaded"

    stats = client.get("/stats").get_json()
    assert stats["layer"] == options.get("layer", "fc7") and stats["count"] == before["count"]
    # the same image through the served network lands on its own stored vector: query network == stored network
    hit = top_hit(client, query)
    assert hit["path"] == QUERY and hit["distance"] < 1e-3, hit
    image_id = hit["id"]
    neighbours = client.get(f"/images/{image_id}/neighbours?k=2").get_json()["results"]
    assert neighbours and neighbours[0]["distance"] > 1e-3
    fresh = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t2")})
    try:   # a server started on the new index gives the same answer, distances included
        expected = upload(fresh.test_client(), query).get_json()["results"]
    finally:
        fresh.extensions["retrieval"].close()
    got = upload(client, query).get_json()["results"]
    assert [h["path"] for h in got] == [h["path"] for h in expected]
    assert [h["distance"] for h in got] == pytest.approx([h["distance"] for h in expected], abs=1e-4)
    assert client.get("/healthz").status_code == 200


def test_a_vgg16_index_swapped_for_an_alexnet_one_is_answered_by_vgg16(tmp_path, collection, index_images, served):
    app, index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    index_images(collection, tmp_path / "other", model="vgg16", batch_size=2)

    swap_folders(index, tmp_path / "other", tmp_path / "retired")
    assert wait_for(lambda: client.get("/stats").get_json().get("model") == "vgg16", 120), "vgg16 was not loaded"
    hit = top_hit(client, query)
    assert hit["path"] == QUERY and hit["distance"] < 1e-3, hit
    assert client.get("/model").status_code == 200 and b"vgg16" in client.get("/model").data


def test_an_index_whose_network_cannot_be_loaded_is_not_answered_until_it_can(tmp_path, collection, index_images,
                                                                             served, caplog):
    app, index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    index_images(collection, tmp_path / "other", seed=1)
    weights = random_weights_file(tmp_path / "other", "alexnet")
    weights.rename(tmp_path / "kept.pt")                       # the new index's network is missing

    caplog.set_level(logging.ERROR, logger="retrieval.search.index")
    swap_folders(index, tmp_path / "other", tmp_path / "retired")
    # 503 at once ("replaced", until the reload looks), then why the new index cannot be served
    assert wait_for(lambda: "cannot be loaded" in (client.get("/healthz").get_json().get("reason") or "")), \
        client.get("/healthz").get_json()
    health = client.get("/healthz")
    assert health.status_code == 503 and "random weights file" in health.get_json()["reason"], health.get_json()
    assert_unavailable(upload(client, query))                  # never the old network on the new vectors
    assert_unavailable(client.get("/stats"))
    assert any("cannot be served" in r.getMessage() for r in caplog.records)

    (tmp_path / "kept.pt").rename(random_weights_file(index, "alexnet"))
    assert wait_for(lambda: client.get("/healthz").status_code == 200), client.get("/healthz").get_json()
    hit = top_hit(client, query)
    assert hit["path"] == QUERY and hit["distance"] < 1e-3


def test_random_weights_damaged_under_a_running_server_are_refused_until_index_images_makes_them_again(
        collection, index_images, served):
    """Reproduces (a newcomer): one byte of the index's random weights flipped while the server ran: /healthz stayed
    ok and searches went on (the weights are memory-mapped: the network read the damaged file), while search-images
    refused the index and serve-images would refuse to start. The running server now notices the file changed,
    answers 503 with the reason, and serves again once index-images made the file anew."""
    app, index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    assert top_hit(client, query)["path"] == QUERY
    weights = random_weights_file(index, "alexnet")
    with open(weights, "r+b") as f:             # damaged in place, deep in its tensors
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert wait_for(lambda: client.get("/healthz").status_code == 503), client.get("/healthz").get_json()
    assert "is not the one recorded (damaged or replaced): run index-images" in client.get("/healthz").get_json()["reason"]
    assert_unavailable(upload(client, query))
    report = index_images(collection, index)
    assert any("was damaged" in r for r in report.repairs), report.repairs
    assert wait_for(lambda: client.get("/healthz").status_code == 200), client.get("/healthz").get_json()
    hit = top_hit(client, query)
    assert hit["path"] == QUERY and hit["distance"] < 1e-3


# --- the catalog deleted, corrupted, restored ---------------------------------------------------------------

def catalog_files(index: Path) -> list[Path]:
    return [p for p in index.iterdir() if p.name.startswith(CATALOG_FILE)]


@pytest.mark.parametrize("damage", ["delete", "garbage", "garbage-in-place"])
def test_a_broken_catalog_answers_503_until_it_is_restored(tmp_path, collection, served, damage, caplog):
    app, index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    image_id = top_hit(client, query)["id"]
    backup = tmp_path / "backup"
    backup.mkdir()
    service = app.extensions["retrieval"]
    service.index.catalog.engine.dispose()                     # let a checkpoint fold the WAL into catalog.db
    shutil.copy2(index / CATALOG_FILE, backup / CATALOG_FILE)

    caplog.set_level(logging.ERROR)
    if damage == "delete":
        for p in catalog_files(index):
            p.unlink()
    elif damage == "garbage":
        for p in catalog_files(index):
            p.unlink()
        (index / CATALOG_FILE).write_bytes(os.urandom(8192))
    else:
        (index / CATALOG_FILE).write_bytes(b"not a database " * 1000)
    assert wait_for(lambda: client.get("/healthz").status_code == 503), "healthz stayed 200"
    health = client.get("/healthz")
    assert health.get_json()["status"] == "unavailable" and health.headers["Retry-After"] == "5"   # as every 503
    for response in (upload(client, query), client.get("/stats"), client.get(f"/images/{image_id}/neighbours"),
                     client.get(f"/images/{image_id}/thumbnail"), client.get(f"/images/{image_id}")):
        assert str(tmp_path) not in assert_unavailable(response)["message"], "no server paths in answers"
    assert str(tmp_path) not in client.get("/healthz").get_data(as_text=True)
    page = client.get("/")
    assert page.status_code == 503 and page.mimetype == "text/html" and "Traceback" not in page.get_data(as_text=True)
    assert not [r for r in caplog.records if r.name == "api.errors" and "unhandled" in r.getMessage()], "no 500s"

    for p in catalog_files(index):
        p.unlink()
    shutil.copy2(backup / CATALOG_FILE, index / CATALOG_FILE)   # restored (a new file)
    assert wait_for(lambda: client.get("/healthz").status_code == 200), client.get("/healthz").get_json()
    assert top_hit(client, query)["path"] == QUERY
    assert client.get("/stats").status_code == 200


def test_an_index_folder_moved_away_and_back_is_served_again(tmp_path, collection, served):
    app, index = served
    client = app.test_client()
    os.rename(index, tmp_path / "elsewhere")
    assert wait_for(lambda: client.get("/healthz").status_code == 503)
    assert "missing" in client.get("/healthz").get_json()["reason"]
    os.rename(tmp_path / "elsewhere", index)
    assert wait_for(lambda: client.get("/healthz").status_code == 200)
    assert top_hit(client, (collection / QUERY).read_bytes())["distance"] < 1e-3


def test_without_hot_reload_healthz_still_sees_a_deleted_catalog(tmp_path, collection, index_images):
    index = tmp_path / "index"
    index_images(collection, index)
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        client = app.test_client()
        assert client.get("/healthz").get_json() == {"status": "ok", "count": 6}
        for p in catalog_files(index):
            p.unlink()
        r = client.get("/healthz")
        assert r.status_code == 503 and "missing" in r.get_json()["reason"]
        assert_unavailable(client.get("/stats"))
    finally:
        app.extensions["retrieval"].close()


# --- the thumbnail folder deleted --------------------------------------------------------------------------

def test_a_deleted_thumbnail_folder_is_made_again(tmp_path, collection, served):
    app, _index = served
    client = app.test_client()
    query = (collection / QUERY).read_bytes()
    image_id = top_hit(client, query)["id"]
    assert client.get(f"/images/{image_id}/thumbnail").status_code == 200
    first = upload(client, query, "/gallery/search")
    assert first.status_code == 303

    shutil.rmtree(tmp_path / "thumbs")
    r = client.get(f"/images/{image_id}/thumbnail")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    again = upload(client, query, "/gallery/search")
    assert again.status_code == 303, again.data[:300]
    page = client.get(again.headers["Location"])
    assert page.status_code == 200 and QUERY in page.get_data(as_text=True)
    assert client.get(again.headers["Location"].split("?")[0] + "/image").status_code == 200
    assert (tmp_path / "thumbs" / "recent-queries.db").exists()
    assert client.get(first.headers["Location"]).status_code == 404, "searches kept in the deleted store are gone"


# --- the watcher -----------------------------------------------------------------------------------------

class FlakyIndex:
    """refresh() raises unexpected errors while `failing` is set, then reports a reload once."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.calls = 0

    def refresh(self) -> bool:
        self.calls += 1
        if self.failing.is_set():
            raise KeyError("something nobody expected")
        return self.calls % 2 == 0


def test_the_watcher_survives_an_unexpected_error_and_reports_it(caplog):
    caplog.set_level(logging.DEBUG, logger="api.index_watcher")
    index = FlakyIndex()
    watcher = IndexWatcher(index, 0.02)
    try:
        assert wait_for(lambda: index.calls >= FAILING_CHECKS + 2, 10)
        state = watcher.state()
        assert state.alive and state.failing and state.last_error == "KeyError: 'something nobody expected'"
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1, "logged with its traceback once, not at every check"
        index.failing.clear()
        assert wait_for(lambda: watcher.reloads >= 1, 10)
        state = watcher.state()
        assert state.alive and not state.failing and state.last_error is not None
    finally:
        watcher.close()
    assert not watcher.alive


def test_healthz_reports_a_failing_or_dead_watcher(served, monkeypatch):
    app, _index = served
    client = app.test_client()
    service = app.extensions["retrieval"]
    assert client.get("/healthz").get_json()["reload"]["alive"] is True

    def broken(**_kwargs) -> bool:
        raise ZeroDivisionError("a bug in the reload")
    monkeypatch.setattr(service.index, "refresh", broken)
    assert wait_for(lambda: client.get("/healthz").status_code == 503, 10)
    body = client.get("/healthz").get_json()
    assert "ZeroDivisionError" in body["reason"] and body["reload"]["alive"] is True
    monkeypatch.undo()
    assert wait_for(lambda: client.get("/healthz").status_code == 200, 10)

    service.watcher.close()
    r = client.get("/healthz")
    assert r.status_code == 503 and "watcher" in r.get_json()["reason"]


# --- weights: a file's name, never its path; a mismatch has its own exception ---------------------------

def test_weights_from_a_file_are_shown_by_name_and_a_changed_file_is_a_weights_mismatch(tmp_path, collection,
                                                                                       index_images):
    first = tmp_path / "first"
    index_images(collection, first)
    weights = tmp_path / "private" / "my-weights.pt"
    weights.parent.mkdir()
    shutil.copy(random_weights_file(first, "alexnet"), weights)
    index = tmp_path / "index"
    index_images(collection, index, weights=str(weights))
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        client = app.test_client()
        stats = client.get("/stats")
        assert stats.get_json()["weights"].startswith("my-weights.pt (sha256 ")
        model_page = client.get("/model").get_data(as_text=True)
        assert "my-weights.pt (sha256 " in model_page
        for text in (stats.get_data(as_text=True), model_page, client.get("/").get_data(as_text=True)):
            assert str(weights.parent) not in text
    finally:
        app.extensions["retrieval"].close()

    torch.save({k: v + 1 for k, v in torch.load(weights, weights_only=True).items()}, weights)   # other weights
    with pytest.raises(WeightsMismatch, match="not the ones this index was built with") as caught:
        ImageIndex(index)
    assert isinstance(caught.value, WeightsUnavailable), "callers that catch WeightsUnavailable catch it too"
    assert str(weights.parent) not in str(caught.value)


def test_a_search_setting_the_index_has_no_use_for_is_said_once_not_at_every_reload(tmp_path, collection,
                                                                                     index_images, caplog):
    """serve-images --nprobe 8 on a Flat index warns that it is not used: at its first load, not again at each reload
    that index-images' runs bring (one more line per worker per run)."""
    from retrieval.vectors.faiss_parts import SearchParams

    index_images(collection, tmp_path / "index")
    index = ImageIndex(tmp_path / "index", search_params=SearchParams(nprobe=8))
    try:
        with caplog.at_level(logging.WARNING, logger="retrieval.search.index"):
            index.snapshot()
            for n in range(2):   # two runs that add an image: two reloads
                shutil.copy(collection / CLASSES[0] / f"{CLASSES[0]}_000.jpg", collection / CLASSES[0] / f"copy_{n}.jpg")
                index_images(collection, tmp_path / "index")
                assert index.refresh()
        assert caplog.text.count("--nprobe 8 (or RETRIEVAL_NPROBE) is not used") == 1, caplog.text
        assert len(index.snapshot().catalog.ids()) == 3 * len(CLASSES) + 2
    finally:
        index.close()
