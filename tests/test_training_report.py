"""retrieval.reports.training: a fine-tune history drawn as PNG files next to it and as inline SVG; nothing drawn from a bad file."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.learning.history import HistoryError, HistoryNotFound, load_filters, load_history
from retrieval.reports.training import training_svgs, write_training_plots
from helpers.training_history import make_history, write_history

CLASSES = ["red_circles", "blue_squares", "green_stripes", "orange_triangles", "purple_checks"]
TRAIN_RGB, VAL_RGB, CHANCE_RGB = (0x4a, 0x7b, 0xd0), (0xe0, 0x7b, 0x22), (0xc3, 0x33, 0x33)
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def history_file(tmp_path) -> Path:
    return write_history(tmp_path / "tuned.history.json", make_history(tmp_path / "data", CLASSES))


def pixels_near(img: Image.Image, rgb: tuple[int, int, int], tol: int = 12) -> int:
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())


def test_plots_are_written_next_to_the_history_as_real_pngs(history_file):
    written = write_training_plots(history_file)
    assert [p.name for p in written] == ["tuned.loss.png", "tuned.accuracy.png"]   # no filters file: no filters plot
    for path in written:
        with Image.open(path) as img:
            img.verify()
        img = Image.open(path)
        assert img.format == "PNG" and 500 <= img.width <= 1200 and 300 <= img.height <= 800
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
        assert len(colours) > 50, "a chart, not a blank image"
        assert pixels_near(img, TRAIN_RGB) > 100 and pixels_near(img, VAL_RGB) > 100, "both series are drawn"
        assert pixels_near(img, CHANCE_RGB, tol=60) > 100, "the chance line is drawn (dashed, antialiased)"


def test_filters_plot_only_with_a_filters_file(tmp_path):
    path = write_history(tmp_path / "tuned.history.json", make_history(tmp_path, CLASSES, train="all"), filters=True)
    written = write_training_plots(path)
    assert [p.name for p in written] == ["tuned.loss.png", "tuned.accuracy.png", "tuned.filters.png"]
    img = Image.open(written[2])
    assert img.format == "PNG" and img.width >= 600 and len(img.convert("RGB").getcolors(1_000_000)) > 1000
    before, after = load_filters(path)
    assert before.shape == after.shape == (64, 3, 11, 11)


def test_svg_charts_hold_the_series_and_reference_lines(history_file):
    history = load_history(history_file)
    svgs = training_svgs(history)
    assert set(svgs) == {"loss", "accuracy"}
    ids = []
    for name, svg in svgs.items():
        assert svg.startswith("<svg") and "<?xml" not in svg and "<script" not in svg
        root = ET.fromstring(svg)
        groups = {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}
        for series in ("train", "val", "chance"):
            assert f"{name}-{series}" in groups, (name, series)
        line = groups[f"{name}-train"].find(f".//{SVG}path")
        vertices = len(re.findall(r"[ML]", line.get("d")))
        assert vertices == len(history["epochs_run"]), "one point per epoch"
        ids += [e.get("id") for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids)), "ids are unique across the charts of one page"
    assert f"chance ln(5) = {math.log(5):.3f}" in svgs["loss"] and "initial loss" in svgs["loss"]
    assert "loss-initial" in svgs["loss"]
    assert "chance 1/5 = 0.200" in svgs["accuracy"] and "best: epoch 4" in svgs["accuracy"]


def test_an_interrupted_run_without_epochs_still_draws(tmp_path):
    history = make_history(tmp_path, CLASSES, stopped="interrupted")
    history["epochs_run"] = []
    path = write_history(tmp_path / "early.history.json", history)
    assert len(write_training_plots(path)) == 2


# --- malformed files are refused clearly, and nothing is drawn ------------------------------------------------

def broken(tmp_path, change) -> Path:  # noqa: ANN001 - change(history) edits it in place
    history = make_history(tmp_path, CLASSES)
    change(history)
    return write_history(tmp_path / "bad.history.json", history)


@pytest.mark.parametrize("change, message", [
    (lambda h: h.pop("epochs_run"), "missing field(s) epochs_run"),
    (lambda h: h.update(lr="fast"), "field 'lr' should be int or float"),
    (lambda h: h.update(classes=[]), "'classes' should be a non-empty list"),
    (lambda h: h["epochs_run"][2].update(val_loss=None), "'epochs_run[2].val_loss' should be a finite number"),
    (lambda h: h.update(best_epoch=99), "'best_epoch' 99 is neither 0 (the starting weights) nor one of the epochs run"),
    (lambda h: h.update(stopped="bored"), "'stopped' should be one of completed, early_stopping, interrupted"),
    (lambda h: h.update(version=2), "format version 2"),
    (lambda h: h.update(sanity={"passed": "yes"}), "'sanity.subset_size'"),
    (lambda h: h["split"].pop("val"), "'split.val' should be a list of paths"),
    (lambda h: h.update(momentum=True), "field 'momentum'"),
])
def test_malformed_history_is_refused_with_the_field_named(tmp_path, change, message):
    path = broken(tmp_path, change)
    with pytest.raises(HistoryError) as caught:
        write_training_plots(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert not list(tmp_path.glob("*.png")), "nothing drawn from a bad file"


def test_plots_of_a_missing_history_say_how_to_make_one(tmp_path):   # bad JSON: tests/test_history.py
    with pytest.raises(HistoryNotFound, match="fine-tune DATA_DIR --out tuned.pt"):
        write_training_plots(tmp_path / "none.history.json")
    assert not list(tmp_path.iterdir())


def test_a_bad_filters_file_is_refused(tmp_path):
    path = write_history(tmp_path / "t.history.json", make_history(tmp_path, CLASSES))
    np.savez(tmp_path / "t.filters.npz", before=np.zeros((4, 3, 5, 5), np.float32), after=np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(HistoryError, match="shape"):
        write_training_plots(path)
