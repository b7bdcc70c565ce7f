"""The /training page: the fine-tuning history of the index's network (or of TRAINING), in Flask and in headless Chromium."""
from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from api import create_app
from helpers.browser import PageErrors, broken_images, launch_chromium, screenshot
from helpers.servers import serve_in_thread
from retrieval.features.backbones import random_weights_file
from retrieval.learning.history import history_path_for
from helpers.training_history import make_history, write_history

CLASSES = ["red_circles", "blue_squares", "green_stripes", "orange_triangles", "purple_checks"]
HOSTILE = ['<img src=x onerror="window.__xss=1">', 'a&b "q"', "caf\udce9"]   # folder names; the last is Latin-1, not UTF-8


@pytest.fixture(scope="module")
def history_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def app_config(history_dir) -> dict:
    """The sample index served with TRAINING pointing at a history file the tests write (and rewrite)."""
    return {"TRAINING": str(history_dir / "tuned.history.json")}


@pytest.fixture
def history_file(history_dir):
    """(path, write(history, filters=False)): the TRAINING file, removed after each test."""
    path = history_dir / "tuned.history.json"
    yield path
    for p in history_dir.iterdir():
        p.unlink()


def test_shows_the_history_given_with_training(client, sample_index, history_file):
    history = make_history(sample_index.data_dir, CLASSES, per_class=6, epochs=6, best_epoch=4)
    write_history(history_file, history)
    response = client.get("/training")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "How alexnet was fine-tuned on 5 classes" in html and "tuned.history.json" in html
    assert "1.658" in html and "ln(5) = 1.609" in html and "at chance (+3%)" in html      # initial loss vs ln(C)
    assert "✓ passed" in html and "after 100 steps on 10 images" in html                     # the sanity check
    assert "early stopping" in html and "after epoch 6 of 10" in html
    assert 'class="features-layer"><td>4 (best)</td>' in html
    assert "sgd, lr 0.01 (cosine), momentum 0.9, weight decay 0.0005" in html
    split = html.split('id="split"')[1].split("</table>")[0]
    assert split.count("<tr>") == 1 + 5 + 1 and "<td>5</td><td>1</td>" in split
    for chart in ("loss-chart", "accuracy-chart"):
        figure = html.split(f'id="{chart}"')[1].split("</figure>")[0]
        assert "<svg" in figure and "<script" not in figure, "inline SVG, no JavaScript charting"
    assert 'id="filters"' not in html and "<script src=\"http" not in html
    assert str(history_file.parent) not in html, "the server's folders are not shown"


def test_retrieval_before_and_after_and_the_kept_epoch(client, sample_index, history_file):
    write_history(history_file, make_history(sample_index.data_dir, CLASSES, epochs=6, best_epoch=4, retrieval=True))
    html = client.get("/training").get_data(as_text=True)
    best = html.split('id="best"')[1].split("</div>\n  </div>")[0]
    assert "validation kNN@10" in best and "0.500 → 0.700" in best and "mAP 0.400 → 0.560" in best
    assert "✓ better than the starting weights" in best
    epochs = html.split('id="epochs"')[1].split("</table>")[0]
    assert "<th>val kNN@10</th>" in epochs and 'class="features-layer"><td>4 (best)</td>' in epochs
    assert "ce+proxy-anchor, dropout 0.0" in html


def test_a_run_that_kept_the_starting_weights_says_so(client, sample_index, history_file):
    write_history(history_file, make_history(sample_index.data_dir, CLASSES, epochs=3, best_epoch=0, retrieval=True,
                                             stopped="completed"))
    html = client.get("/training").get_data(as_text=True)
    best = html.split('id="best"')[1].split("</div>\n  </div>")[0]
    assert "0.500 → 0.500" in best and "✗ not improved" in best and "holds them unchanged" in best
    epochs = html.split('id="epochs"')[1].split("</table>")[0]
    assert "0 (before) (kept)" in epochs and "(best)" not in epochs


def test_filters_before_and_after_with_train_all(client, sample_index, history_file):
    write_history(history_file, make_history(sample_index.data_dir, CLASSES, train="all", stopped="completed"),
                  filters=True)
    html = client.get("/training").get_data(as_text=True)
    section = html.split('id="filters"')[1].split("</section>")[0]
    assert "before training" in section and "after training" in section and "<svg" in section
    assert "64 filters of 11×11" in section
    assert "completed" in html and "all 10 epochs asked for" in html


def test_a_failed_sanity_check_and_an_initial_loss_off_chance_are_flagged(client, sample_index, history_file):
    history = make_history(sample_index.data_dir, CLASSES, stopped="interrupted")
    history["sanity"].update(passed=False, final_train_loss=0.9)
    history["initial_loss"] = 3.2
    write_history(history_file, history)
    html = client.get("/training").get_data(as_text=True)
    assert "✗ failed" in html and "✗ +99% off chance" in html and "stopped by hand after epoch 6" in html


def test_without_a_history_the_page_says_how_to_make_one(client, history_file):
    response = client.get("/training")
    assert response.status_code == 200, "the page exists; it explains (a 404 would read as a broken link)"
    html = response.get_data(as_text=True)
    assert 'id="no-history"' in html and "tuned.history.json" in html and "fine-tune data" in html
    assert "--compare-index" in html
    # the recipe suggests the default options, from the network the served index uses (seeded random weights here)
    recipe = html.split('id="how-to"')[1].split("</pre>")[0]
    assert "fine-tune data --model alexnet --weights random --seed 0 --out tuned.pt\n" in recipe


def test_a_malformed_history_is_reported_not_crashed_on(client, sample_index, history_file):
    history = make_history(sample_index.data_dir, CLASSES)
    history["epochs_run"][1]["val_accuracy"] = "high"
    write_history(history_file, history)
    response = client.get("/training")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and 'id="training-problem"' in html
    assert "epochs_run[1].val_accuracy" in html and "Traceback" not in html
    assert str(history_file.parent) not in html
    history_file.write_text("{not json")
    assert "not valid JSON" in client.get("/training").get_data(as_text=True)


def test_hostile_class_names_are_escaped(client, sample_index, history_file):
    write_history(history_file, make_history(sample_index.data_dir, HOSTILE, per_class=4))
    html = client.get("/training").get_data(as_text=True)
    assert "<img src=x" not in html and "&lt;img src=x onerror=&#34;window.__xss=1&#34;&gt;" in html
    assert "a&amp;b &#34;q&#34;" in html and 'a&b "q"' not in html
    assert "caf\\xe9" in html, "a name that is not UTF-8 is shown escaped, as elsewhere"


def test_the_history_next_to_the_index_weights_file_is_found(tmp_path, sample_index, index_images):
    """An index built with --weights FILE shows FILE's sibling history without any setting."""
    weights = tmp_path / "tuned.pt"
    source = random_weights_file(sample_index.index_dir, "alexnet")
    try:
        os.link(source, weights)            # same tensors without another 233 MB copy
    except OSError:
        shutil.copyfile(source, weights)
    data = tmp_path / "data"
    shutil.copytree(sample_index.data_dir / "red_circles", data / "red_circles")
    shutil.copytree(sample_index.data_dir / "blue_squares", data / "blue_squares")
    index_images(data, tmp_path / "index", weights=str(weights))
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t")})
    try:
        client = app.test_client()
        html = client.get("/training").get_data(as_text=True)
        assert 'id="no-history"' in html and "no history file <code>tuned.history.json</code> next to its weights" in html
        write_history(history_path_for(weights), make_history(data, ["red_circles", "blue_squares"]))
        html = client.get("/training").get_data(as_text=True)
        assert "How alexnet was fine-tuned on 2 classes" in html and "was trained by <code>fine-tune</code>" in html
        assert "tuned.pt (sha256" in html
    finally:
        app.extensions["retrieval"].close()


# --- in a real browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_url(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.browser
def test_the_page_in_headless_chromium(base_url, sample_index, history_file):
    write_history(history_file, make_history(sample_index.data_dir, CLASSES[:3] + HOSTILE[:2], train="all"), filters=True)
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = PageErrors(page)
        page.goto(base_url + "/training")
        assert page.title().startswith("Fine-tuning")
        assert page.locator("#split tbody tr").count() == 5
        assert page.locator("#split tbody tr").nth(3).locator("td").first.inner_text() == HOSTILE[0]
        assert page.evaluate("() => window.__xss === undefined && !document.querySelector('#split img')")
        for chart in ("#loss-chart svg", "#accuracy-chart svg", "#filters svg"):
            box = page.locator(chart).bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150, chart
        assert broken_images(page) == []
        assert errors.take() == []
        page.evaluate("window.scrollTo(0, 0)")        # page coordinates = viewport coordinates from here
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        screenshot(page, "training")
        pixels = np.asarray(shot)
        assert shot.height > 1500, "the whole page: outcome, charts, filters, settings, epochs"
        assert pixels.std() > 20 and len(shot.getcolors(1_000_000)) > 500, "not a blank page"
        top = int(page.evaluate("document.querySelector('#loss-chart').getBoundingClientRect().top + window.scrollY"))
        charts = pixels[top:top + 400]
        assert (np.abs(charts.astype(int) - (0x4a, 0x7b, 0xd0)).max(axis=2) < 16).sum() > 100, "the train curve is drawn"


def test_charts_are_drawn_once_per_version_of_the_file(app, client, sample_index, history_file, monkeypatch):
    import api.transfer

    drawn = []

    def counted(history, filters=None):  # noqa: ANN001, ANN202
        drawn.append(history["best_epoch"])
        return real(history, filters)
    real = api.transfer.training_svgs
    monkeypatch.setattr(api.transfer, "training_svgs", counted)
    write_history(history_file, make_history(sample_index.data_dir, CLASSES, best_epoch=3))
    for _ in range(3):
        assert 'id="loss-chart"' in client.get("/training").get_data(as_text=True)
    assert drawn == [3]
    write_history(history_file, make_history(sample_index.data_dir, CLASSES, epochs=7, best_epoch=5))   # a new run
    html = client.get("/training").get_data(as_text=True)
    assert drawn == [3, 5] and "at epoch 5 of 7 run" in html
    assert len(app.extensions["transfer"].training_charts) <= api.transfer.TRAINING_CHARTS_KEPT
