"""Tests for api.transfer and predicted_label: the neighbours' vote, the evaluation page (one index, or two side by
side), the network page, filters PNG."""
from __future__ import annotations

import io
import re
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from helpers.training_history import make_history, write_history
from helpers.waiting import wait_for
from api import create_app
from retrieval.samples import make_sample_collection
from retrieval.features.backbones import random_weights_file
from retrieval.catalog import Catalog
from retrieval.learning.evaluation import compare_indexes, evaluate_index
from retrieval.learning.history import history_path_for
from retrieval.features.model_info import layer_table

QUERY = "green_stripes/green_stripes_002.jpg"


def image_id(sample_index, path: str) -> int:
    cat = Catalog(sample_index.index_dir)
    try:
        return cat.file_states()[path][0]
    finally:
        cat.close()


def finished_page(client) -> str:  # noqa: ANN001 - Flask test client
    """/evaluation once its evaluation is done (it is computed off the request thread; a loaded CI machine takes a
    while to import scikit-learn), whitespace collapsed."""
    deadline = time.monotonic() + 60
    html = client.get("/evaluation").get_data(as_text=True)
    while 'id="computing"' in html and time.monotonic() < deadline:
        time.sleep(0.2)
        html = client.get("/evaluation").get_data(as_text=True)
    return " ".join(html.split())


def test_search_predicts_the_label_by_the_neighbours_vote(client, sample_index):
    data = (sample_index.data_dir / QUERY).read_bytes()
    body = client.post("/search?k=5", data={"image": (io.BytesIO(data), "q.jpg")}).get_json()

    labels = [r["label"] for r in body["results"]]
    prediction = body["predicted_label"]
    votes = labels.count("green_stripes")
    assert prediction == {"label": "green_stripes", "votes": votes, "k": 5, "weak": votes * 2 <= 5}
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
        assert client.get("/evaluation").status_code == 200
        assert "cannot be evaluated" in finished_page(client)
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
    html = finished_page(client)

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
    wait_for(lambda: service.index.version != 1, 20)
    html = finished_page(client)
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
    # asked again by the page's script, shown in place (an HTTP Refresh reloaded it, focus and scroll lost, every
    # 2 s); without script a <noscript> refresh
    html = page.get_data(as_text=True)
    assert "Refresh" not in page.headers and f'data-poll-s="{api.transfer.EVALUATION_REFRESH_S}"' in html
    assert f'<noscript><meta http-equiv="refresh" content="{api.transfer.EVALUATION_REFRESH_S}"></noscript>' in html
    assert 'id="computing"' in client.get("/evaluation").get_data(as_text=True)
    release.set()
    deadline = time.monotonic() + 20
    html = client.get("/evaluation").get_data(as_text=True)
    while 'id="computing"' in html and time.monotonic() < deadline:
        time.sleep(0.1)
        html = client.get("/evaluation").get_data(as_text=True)
    assert 'id="summary-table"' in html and 'http-equiv="refresh"' not in html
    assert app.extensions["transfer"].evaluations.runs == 1


def test_switching_the_evaluation_between_its_views_computes_each_once(live_app, monkeypatch):
    """Reproduces: the cache held one result, so each switch between "held-out images only" and "include the training
    images" computed again, showing meanwhile the other view's numbers as "the previous version's", and its Reload
    link dropped ?training_images=include."""
    import api.transfer

    app, _data = live_app
    client = app.test_client()
    monkeypatch.setattr(api.transfer, "EVALUATION_WAIT_S", 0.0)   # every first look is the "computing" page

    def finished(url: str) -> tuple[str, list[str]]:
        pages = [client.get(url).get_data(as_text=True)]
        deadline = time.monotonic() + 60
        while 'id="computing"' in pages[-1] and time.monotonic() < deadline:
            time.sleep(0.2)
            pages.append(client.get(url).get_data(as_text=True))
        return pages[-1], pages[:-1]

    held_out, _ = finished("/evaluation")
    included, computing = finished("/evaluation?training_images=include")
    assert 'id="summary-table"' in held_out and 'id="summary-table"' in included
    assert computing, "the included view was computed, not taken from the other"
    assert all('id="summary-table"' not in page for page in computing), "no other view's numbers meanwhile"
    assert all('href="/evaluation?training_images=include">Reload' in page for page in computing)
    for url in ("/evaluation", "/evaluation?training_images=include", "/evaluation"):
        assert 'id="computing"' not in client.get(url).get_data(as_text=True), url
    assert app.extensions["transfer"].evaluations.runs == 2


def test_filters_png_is_cached_on_the_app(app, client):
    assert client.get("/model/filters.png").status_code == 200
    cached = app.extensions["transfer"].filters
    assert len(cached) == 1 and next(iter(cached))[0] == "alexnet"


# --- a second index side by side (COMPARE_INDEX) --------------------------------------------------------------------

def compare_app(sample_index, compare_dir, tmp_path):  # noqa: ANN201 - Flask app
    return create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                       "THUMBNAIL_DIR": str(tmp_path / "thumbs"), "COMPARE_INDEX": str(compare_dir)})


def test_evaluation_page_shows_two_indexes_side_by_side(tmp_path, sample_index, compare_index):
    expected = compare_indexes(sample_index.index_dir, compare_index.index_dir)
    app = compare_app(sample_index, compare_index.index_dir, tmp_path)
    try:
        client = app.test_client()
        html = finished_page(client)
        a, b = expected["a"], expected["b"]
        assert "on the same 30 labelled images in 5 classes" in html
        assert "this index: alexnet fc7, weights random (seed 0)" in html
        assert "the index given with --compare-index: alexnet fc7, weights random (seed 1)" in html
        table = html.split('id="compare-table"')[1].split("</table>")[0]
        for k in a["ks"]:
            va, vb = a["retrieval"]["precision_at_k"][str(k)], b["retrieval"]["precision_at_k"][str(k)]
            assert f"<td>precision@{k}</td><td>{va:.3f}</td><td>{vb:.3f}</td>" in table
        assert f"<td>mAP</td><td>{a['retrieval']['map']:.3f}</td><td>{b['retrieval']['map']:.3f}</td>" in table
        assert f"{a['chance']['retrieval_precision']:.3f}" in table and "same split" in table
        assert html.count('aria-label="precision at k"') == 2 and 'id="precision-chart-b"' in html
        per_class = html.split('id="per-class"')[1].split("</table>")[0]
        assert per_class.count("<tr>") == 1 + 5
        for _ in range(2):
            client.get("/evaluation")
        assert app.extensions["transfer"].evaluations.runs == 1, "computed once for both indexes' versions"
    finally:
        app.extensions["retrieval"].close()


def test_a_served_fine_tuned_index_is_b_and_its_baseline_a(tmp_path, sample_index, compare_index, index_images):
    """One order everywhere: the baseline is A and the fine-tuned network B, whichever of the two is served."""
    tuned_weights = tmp_path / "tuned.pt"
    shutil.copy(random_weights_file(compare_index.index_dir, "alexnet"), tuned_weights)   # a network from a file...
    classes = sorted(p.name for p in sample_index.data_dir.iterdir())
    write_history(history_path_for(tuned_weights), make_history(sample_index.data_dir, classes))   # ...that fine-tune made
    tuned = tmp_path / "index-tuned"
    index_images(sample_index.data_dir, tuned, weights=str(tuned_weights))
    app = create_app({"INDEX_DIR": str(tuned), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbs"),
                      "COMPARE_INDEX": str(sample_index.index_dir)})
    try:
        client = app.test_client()
        html = finished_page(client)
        expected = compare_indexes(sample_index.index_dir, tuned)          # baseline as A
        assert '<span class="side">A</span> the index given with --compare-index: alexnet fc7, weights random (seed 0)' in html
        assert '<span class="side">B</span> this index (fine-tuned): alexnet fc7, weights tuned.pt' in html
        assert "The baseline network's features (A) and the fine-tuned network's (B)" in html
        va, vb = expected["a"]["retrieval"]["map"], expected["b"]["retrieval"]["map"]
        assert f"<td>mAP</td><td>{va:.3f}</td><td>{vb:.3f}</td>" in html
        training = client.get("/training").get_data(as_text=True)
        recipe = training.split('id="compare-recipe"')[1].split("</p>")[0]
        assert "--compare index-tuned" in recipe and "--compare-index index-base" in recipe, recipe
        assert "--compare-index index-tuned" not in recipe, "never a recipe that compares the index with itself"
    finally:
        app.extensions["retrieval"].close()


def test_evaluation_page_compares_only_the_shared_images(tmp_path, sample_index, compare_index, index_images):
    data = tmp_path / "data"
    for label in ("red_circles", "green_stripes"):
        shutil.copytree(sample_index.data_dir / label, data / label)
    (data / "green_stripes" / "green_stripes_005.jpg").unlink()
    make_sample_collection(data, per_class=2, size=(64, 48), seed=4, classes=["orange_triangles"])
    index_images(data, tmp_path / "index", weights=str(random_weights_file(compare_index.index_dir, "alexnet")))
    app = compare_app(sample_index, tmp_path / "index", tmp_path)
    try:
        html = finished_page(app.test_client())
        assert "on the same 11 labelled images in 2 classes" in html
        assert "left out: 17 only in A, 0 only in B, 2 with another label or content" in html
        assert "A: 19 labelled image(s) of this index left out" in html
        assert html.split('id="per-class"')[1].split("</table>")[0].count("<tr>") == 1 + 2
    finally:
        app.extensions["retrieval"].close()


def test_evaluation_page_says_when_two_indexes_share_nothing(tmp_path, sample_index, compare_index, index_images):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), seed=4, classes=["red_circles", "blue_squares"])
    for p in list(data.rglob("*.jpg")):
        p.rename(p.with_name("other_" + p.name))
    index_images(data, tmp_path / "index", weights=str(random_weights_file(compare_index.index_dir, "alexnet")))
    app = compare_app(sample_index, tmp_path / "index", tmp_path)
    try:
        response = app.test_client().get("/evaluation")
        html = finished_page(app.test_client())
        assert response.status_code == 200
        assert "cannot be compared with the second index" in html and "share no labelled image" in html
    finally:
        app.extensions["retrieval"].close()
