"""Hot reload: while index-images rewrites the index in another process, every query succeeds and new images appear."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from api import create_app
from retrieval.samples import make_sample_collection

from helpers.waiting import wait_for

RELOAD_WITHIN_S = 10.0


def run_index_images(data: Path, index: Path) -> dict:
    """The real command in its own process, as a user runs it next to a live server. -> its --json report.

    (In-process would not do: torchvision's feature-extractor tracing patches nn.Module.__call__ for the
    whole process while it builds the network, which breaks forward passes running in other threads.)
    """
    result = subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data),
                             "--index-dir", str(index), "--workers", "0", "--batch-size", "4", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_the_server_answers_from_the_rewritten_index_without_failing_a_request(tmp_path, index_images):
    data, index = tmp_path / "data", tmp_path / "index"
    make_sample_collection(data, per_class=4, size=(96, 72), seed=3, classes=["red_circles", "blue_squares"])
    index_images(data, index)
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0.2, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
    kept_id = app.extensions["retrieval"].index.catalog.file_states()["red_circles/red_circles_000.jpg"][0]
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def drive_queries() -> None:
        nonlocal answered
        client = app.test_client()
        while not stop.is_set():
            for r in (client.post("/search?k=20", data={"image": (io.BytesIO(query), "q.jpg")},
                                  content_type="multipart/form-data"),
                      client.get("/stats"), client.get("/"), client.get(f"/images/{kept_id}/neighbours")):
                if r.status_code != 200:
                    failures.append(f"{r.request.path}: {r.status_code} {r.get_data(as_text=True)[:200]}")
            answered += 1
            stop.wait(0.05)   # a steady stream, leaving the indexer some CPU

    driver = threading.Thread(target=drive_queries)
    driver.start()
    try:
        client = app.test_client()
        assert client.get("/stats").get_json()["count"] == 8
        removed_id = app.extensions["retrieval"].index.catalog.file_states()["blue_squares/blue_squares_000.jpg"][0]
        assert client.get(f"/images/{removed_id}/thumbnail").status_code == 200
        assert list((tmp_path / "thumbs").glob(f"{removed_id}-*.jpg")), "cached"
        make_sample_collection(data, per_class=4, size=(96, 72), seed=4, classes=["green_stripes", "purple_checks"])
        (data / "blue_squares" / "blue_squares_000.jpg").unlink()
        before = answered
        report = run_index_images(data, index)
        assert (report["indexed"], report["removed"], report["total"]) == (8, 1, 15)
        assert answered > before, "queries kept being answered while the index was rewritten"

        assert wait_for(lambda: client.get("/stats").get_json()["count"] == 15, RELOAD_WITHIN_S), \
            f"the server did not pick up the new index within {RELOAD_WITHIN_S} s"
        new = (data / "green_stripes" / "green_stripes_002.jpg").read_bytes()
        hits = client.post("/search?k=20", data={"image": (io.BytesIO(new), "q.jpg")},
                           content_type="multipart/form-data").get_json()["results"]
        assert hits[0]["path"] == "green_stripes/green_stripes_002.jpg" and hits[0]["distance"] < 1e-3
        assert "blue_squares/blue_squares_000.jpg" not in [h["path"] for h in hits], "removed images leave the results"
        labels = {item["label"] for item in client.get("/stats").get_json()["labels"]}
        assert labels == {"red_circles", "blue_squares", "green_stripes", "purple_checks"}
        # the removed image's cached thumbnail goes with the reload (it stayed until a worker restarted)
        assert wait_for(lambda: not list((tmp_path / "thumbs").glob(f"{removed_id}-*.jpg")), 10)
    finally:
        stop.set()
        driver.join(60)
        app.extensions["retrieval"].close()
    assert not failures, failures[:5]


def test_an_index_of_another_network_swapped_in_under_load_is_never_mixed_with_the_old_one(tmp_path, index_images):
    """Folders swapped with renames while queries run: every answer comes from one network and its own vectors
    (an indexed image finds itself at distance 0), never the old network's query against the new vectors."""
    data, index, other = tmp_path / "data", tmp_path / "index", tmp_path / "other"
    make_sample_collection(data, per_class=3, size=(96, 72), seed=3, classes=["red_circles", "blue_squares"])
    index_images(data, index)                       # AlexNet fc7, random weights seed 0
    index_images(data, other, seed=7)               # the same images through other weights
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0.2, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    query = (data / "red_circles" / "red_circles_001.jpg").read_bytes()
    service = app.extensions["retrieval"]
    image_id = service.index.catalog.file_states()["red_circles/red_circles_001.jpg"][0]
    failures: list[str] = []
    unavailable = answered = 0
    stop = threading.Event()

    def drive_queries() -> None:
        nonlocal answered, unavailable
        client = app.test_client()
        while not stop.is_set():
            r = client.post("/search?k=3", data={"image": (io.BytesIO(query), "q.jpg")},
                            content_type="multipart/form-data")
            n = client.get(f"/images/{image_id}/neighbours?k=3")
            for response in (r, n):
                if response.status_code == 503 and response.get_json()["error"]["code"] == "unavailable":
                    unavailable += 1        # the instant between the two renames: said, never mixed
                elif response.status_code != 200:
                    failures.append(f"{response.request.path}: {response.status_code} {response.data[:200]!r}")
            if r.status_code == 200:
                top = r.get_json()["results"][0]
                if top["path"] != "red_circles/red_circles_001.jpg" or top["distance"] > 1e-3:
                    failures.append(f"mixed networks: {top}")
            answered += 1
            stop.wait(0.02)   # leave the watcher some CPU to load the new network

    driver = threading.Thread(target=drive_queries)
    driver.start()
    try:
        assert wait_for(lambda: answered >= 3, 30)
        os.rename(index, tmp_path / "retired")
        os.rename(other, index)
        assert wait_for(lambda: service.index.version == 2, RELOAD_WITHIN_S), "the swap was not loaded"
        settled = answered
        assert wait_for(lambda: answered >= settled + 3, 30)
    finally:
        stop.set()
        driver.join(60)
        service.close()
    assert not failures, failures[:5]
    assert answered > unavailable / 2, "503 only while the new network was loading"


def test_an_answer_describes_the_index_version_that_answered_it(tmp_path, index_images):
    """Reproduces: a search answered from 50 images said "count": 250 when a reload landed between the search and
    its JSON (the index block, the label vote and an expansion's second search read whatever was current then)."""
    from api.search_api import answer_json

    data, index = tmp_path / "data", tmp_path / "index"
    make_sample_collection(data, per_class=2, size=(96, 72), seed=3, classes=["red_circles", "blue_squares"])
    index_images(data, index)
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    service = app.extensions["retrieval"]
    try:
        query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()
        first_id = service.index.catalog.file_states()["red_circles/red_circles_000.jpg"][0]
        with app.test_request_context():
            answers = [service.search_upload(query, 10), service.neighbours(first_id, 10)]
        make_sample_collection(data, per_class=5, size=(96, 72), seed=3, classes=["red_circles", "blue_squares"])
        run_index_images(data, index)
        assert service.index.refresh() and len(service.index.snapshot().vectors) == 10
        with app.test_request_context():
            for answer in answers:
                body = json.loads(answer_json(answer).get_data())
                assert body["index"]["count"] == 4 and len(body["results"]) <= 4, body["index"]
                assert body["predicted_label"]["k"] == len(body["results"])
    finally:
        service.close()


def test_healthz_says_unavailable_while_searches_do_after_the_folder_is_swapped(tmp_path, index_images):
    """Reproduces: after `mv index index-old; mv index-new index`, searches answered 503 "the index on disk was
    replaced" until the next reload while /healthz said ok, so a load balancer kept sending them here."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(96, 72), seed=3, classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "index")
    index_images(data, tmp_path / "index-new", seed=1)
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 3600,   # no reload in this test
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        (tmp_path / "index").rename(tmp_path / "index-old")
        (tmp_path / "index-new").rename(tmp_path / "index")
        search = client.post("/search", data=(data / "red_circles" / "red_circles_000.jpg").read_bytes(),
                             content_type="image/jpeg")
        health = client.get("/healthz")
        assert search.status_code == 503 and health.status_code == 503, health.get_data(as_text=True)
        assert "replaced" in health.get_json()["reason"]
    finally:
        app.extensions["retrieval"].close()


def test_a_search_between_a_removal_and_the_reload_still_gets_k_results(tmp_path, index_images):
    """An image removed from the catalog stays in the loaded FAISS file until the next reload; a search in between
    leaves it out and still answers k others (it answered short before: 25 images left, k=25, 20 came back)."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=6, size=(96, 72), seed=4)
    index_images(data, tmp_path / "index")
    from retrieval.search.index import ImageIndex

    index = ImageIndex(tmp_path / "index")
    try:
        snapshot = index.snapshot()
        everything = snapshot.catalog.list_images(limit=100)
        vector = next(vecs for _, vecs in snapshot.catalog.vectors([everything[0].id]))
        nearest = snapshot.search_vectors(vector, 5)[0]

        from retrieval.catalog import Catalog
        writer = Catalog(tmp_path / "index")   # as index-images removes files gone from the folder
        try:
            writer.remove_paths([hit.path for hit in nearest])
        finally:
            writer.close()

        left = len(everything) - 5
        hits = snapshot.search_vectors(vector, left)[0]
        assert len(hits) == left
        assert not {hit.id for hit in nearest} & {hit.id for hit in hits}
        assert len({hit.id for hit in hits}) == left
    finally:
        index.close()
