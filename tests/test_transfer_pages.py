"""Tests for api.transfer and predicted_label: the neighbours' vote, the evaluation page, the network page, filters PNG."""
from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from api import create_app
from indexer.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.evaluation import evaluate_index
from retrieval.model_info import layer_table

QUERY = "green_stripes/green_stripes_002.jpg"


def image_id(sample_index, path: str) -> int:
    cat = Catalog(sample_index.index_dir)
    try:
        return cat.file_states()[path][0]
    finally:
        cat.close()


def test_search_predicts_the_label_by_the_neighbours_vote(client, sample_index):
    data = (sample_index.data_dir / QUERY).read_bytes()
    body = client.post("/search?k=5", data={"image": (io.BytesIO(data), "q.jpg")}).get_json()

    labels = [r["label"] for r in body["results"]]
    prediction = body["predicted_label"]
    assert prediction == {"label": "green_stripes", "votes": labels.count("green_stripes"), "k": 5}
    assert prediction["votes"] == max(labels.count(x) for x in set(labels))


def test_neighbours_answer_predicts_too_without_counting_the_image_itself(client, sample_index):
    own = image_id(sample_index, QUERY)
    body = client.get(f"/images/{own}/neighbours?k=4").get_json()
    assert own not in [r["id"] for r in body["results"]]
    assert body["predicted_label"]["k"] == 4
    assert body["predicted_label"]["label"] == "green_stripes"


def test_no_prediction_for_a_collection_without_labels(tmp_path, index_images):
    data = tmp_path / "flat"
    make_sample_collection(tmp_path / "nested", per_class=2, size=(64, 48), classes=["red_circles"])
    data.mkdir()
    for p in (tmp_path / "nested" / "red_circles").iterdir():
        p.rename(data / p.name)                        # files at the top level have no label
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0})
    try:
        client = app.test_client()
        body = client.post("/search", data={"image": (io.BytesIO((data / "red_circles_000.jpg").read_bytes()), "q.jpg")}).get_json()
        assert body["results"] and "predicted_label" not in body
        assert client.get("/gallery/1").status_code == 200
        assert b'id="prediction"' not in client.get("/gallery/1").data
        page = client.get("/evaluation")
        assert page.status_code == 200
        assert b"cannot be evaluated" in page.data
    finally:
        app.extensions["retrieval"].close()


def test_gallery_page_shows_the_prediction_above_the_neighbours(client, sample_index):
    own = image_id(sample_index, QUERY)
    html = client.get(f"/gallery/{own}?k=6").get_data(as_text=True)
    match = re.search(r'id="prediction">predicted: <strong>(\w+)</strong>, (\d+) of (\d+)', html)
    assert match, html[:2000]
    assert match.group(1) == "green_stripes" and match.group(3) == "6"
    assert html.index('id="prediction"') < html.index('id="neighbours"')


def test_evaluation_page_shows_the_evaluate_index_numbers_and_a_chart(client, sample_index):
    expected = evaluate_index(sample_index.index_dir)
    html = client.get("/evaluation").get_data(as_text=True)

    assert "<svg" in html and "</svg>" in html, "the chart is inline SVG, readable without JavaScript"
    assert "<script" not in html.split('id="precision-chart"')[1].split("</figure>")[0]
    for k in expected["ks"]:
        assert f"<td>precision@{k}</td><td>{expected['retrieval']['precision_at_k'][str(k)]:.3f}</td>" in html
    assert f"{expected['retrieval']['map']:.3f}" in html
    assert f"{expected['linear_probe']['accuracy']:.3f}" in html
    for label in expected["labels"]:
        assert label in html
    assert 'id="confusion"' in html


def test_model_page_shows_the_layer_table_and_the_filters(client):
    html = client.get("/model").get_data(as_text=True)
    table = layer_table("alexnet")
    assert f"{table.weights:,}" in html and f"{table.activations:,}" in html
    assert 'class="features-layer"><td>fc7</td>' in html
    assert 'src="/model/filters.png"' in html


def test_filters_png_is_a_grid_of_the_first_layer_filters(client):
    response = client.get("/model/filters.png")
    assert response.status_code == 200 and response.mimetype == "image/png"
    img = Image.open(io.BytesIO(response.data))
    pixels = np.asarray(img.convert("RGB"))
    assert img.width >= 8 * 33 and img.height >= 8 * 33, "64 AlexNet 11x11 filters in an 8x8 grid, each enlarged 3x"
    assert pixels.min() == 0 and pixels.max() == 255, "each filter rescaled to the full 0..255 range"
    rows = np.flatnonzero((pixels != 255).any(axis=(1, 2)))
    top, left = rows[0], np.flatnonzero((pixels != 255).any(axis=(0, 2)))[0]
    first_cell = pixels[top:top + 33, left:left + 33]
    assert (first_cell[::3, ::3] == first_cell[1::3, 1::3]).all(), "enlarged with nearest-neighbour (3x3 blocks)"


# --- the evaluation is computed once per loaded index version, off the request thread ----------------------

@pytest.fixture
def live_app(tmp_path, index_images):
    """(app, data folder) over a small labelled index with hot reload every 0.1 s."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=4, size=(64, 48), seed=2, classes=["red_circles", "blue_squares"])
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0.1,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    yield app, data
    app.extensions["retrieval"].close()


def test_evaluation_is_computed_once_per_loaded_index_version(tmp_path, index_images, live_app, monkeypatch):
    import api.transfer

    app, data = live_app
    client = app.test_client()
    runs: list[str] = []

    def counted(index_dir, **options):  # noqa: ANN001, ANN003
        runs.append(str(index_dir))
        return evaluate_index(index_dir, **options)
    monkeypatch.setattr(api.transfer, "evaluate_index", counted)

    for _ in range(3):
        assert b'id="summary-table"' in client.get("/evaluation").data
    service = app.extensions["retrieval"]
    service.index.catalog.touch()          # what every indexing batch does: no new loaded version, no new run
    assert b'id="summary-table"' in client.get("/evaluation").data
    assert len(runs) == 1, runs

    make_sample_collection(data, per_class=2, size=(64, 48), seed=3, classes=["green_stripes"])
    index_images(data, tmp_path / "index")
    deadline = time.monotonic() + 20
    while service.index.version == 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    html = client.get("/evaluation").get_data(as_text=True)
    assert "green_stripes" in html and len(runs) == 2
    client.get("/evaluation")
    assert len(runs) == 2
    assert app.extensions["transfer"].evaluations.runs == 2, "the cache lives on the app"


def test_a_slow_evaluation_answers_computing_at_once_and_the_page_refreshes_itself(live_app, monkeypatch):
    import api.transfer

    app, _data = live_app
    client = app.test_client()
    release = threading.Event()

    def slow(index_dir, **options):  # noqa: ANN001, ANN003
        release.wait(30)
        return evaluate_index(index_dir, **options)
    monkeypatch.setattr(api.transfer, "evaluate_index", slow)
    monkeypatch.setattr(api.transfer, "EVALUATION_WAIT_S", 0.05)

    started = time.monotonic()
    page = client.get("/evaluation")
    assert time.monotonic() - started < 5, "the request does not wait for the evaluation"
    assert page.status_code == 200 and 'id="computing"' in page.get_data(as_text=True)
    assert page.headers["Refresh"] == str(api.transfer.EVALUATION_REFRESH_S)
    assert 'id="computing"' in client.get("/evaluation").get_data(as_text=True)
    release.set()
    deadline = time.monotonic() + 20
    html = client.get("/evaluation").get_data(as_text=True)
    while 'id="computing"' in html and time.monotonic() < deadline:
        time.sleep(0.1)
        html = client.get("/evaluation").get_data(as_text=True)
    assert 'id="summary-table"' in html and "Refresh" not in client.get("/evaluation").headers
    assert app.extensions["transfer"].evaluations.runs == 1


def test_filters_png_is_cached_on_the_app(app, client):
    assert client.get("/model/filters.png").status_code == 200
    cached = app.extensions["transfer"].filters
    assert len(cached) == 1 and next(iter(cached))[0] == "alexnet"
