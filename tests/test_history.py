"""retrieval.learning.history: the one format of a fine-tune's history and filters files, written, found and read back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.learning.history import (HISTORY_VERSION, HistoryError, HistoryNotFound, filters_path_for, history_path_for,
                                        load_filters, load_history, split_counts, training_record, write_filters,
                                        write_history)
from helpers.training_history import make_history
from helpers.training_history import write_history as write_test_history

CLASSES = ["red_circles", "blue_squares", "green_stripes", "orange_triangles", "purple_checks"]


@pytest.fixture
def history_file(tmp_path) -> Path:
    return write_test_history(tmp_path / "tuned.history.json", make_history(tmp_path / "data", CLASSES))


def test_history_sits_next_to_its_weights_file():
    assert history_path_for("/w/tuned.pt") == Path("/w/tuned.history.json")
    assert history_path_for("/w/tuned.v2.pt") == Path("/w/tuned.v2.history.json")
    assert history_path_for("/w/tuned") == Path("/w/tuned.history.json")


def test_filters_sit_next_to_the_history_of_the_same_weights():
    for weights in ("/w/tuned.pt", "/w/tuned.v2.pt", "/w/tuned"):
        stem = weights[:-3] if weights.endswith(".pt") else weights
        assert filters_path_for(history_path_for(weights)) == Path(stem + ".filters.npz")


def test_written_history_and_filters_read_back(tmp_path):
    history = make_history(tmp_path / "data", CLASSES, train="all")
    path = history_path_for(tmp_path / "new" / "tuned.pt")           # the folder does not exist yet
    assert write_history(path, history) == path
    assert path.read_text() == json.dumps(history, indent=1)
    assert load_history(path) == history and history["version"] == HISTORY_VERSION
    assert load_filters(path) is None, "no filters file: no filters"
    rng = np.random.default_rng(0)
    before = rng.normal(size=(4, 3, 5, 5))                           # float64 in, float32 stored
    after = before + 0.1
    assert write_filters(path, before, after) == tmp_path / "new" / "tuned.filters.npz"
    got_before, got_after = load_filters(path)
    assert got_before.dtype == np.float32
    np.testing.assert_array_equal(got_before, before.astype(np.float32))
    np.testing.assert_array_equal(got_after, after.astype(np.float32))
    assert sorted(p.name for p in path.parent.iterdir()) == ["tuned.filters.npz", "tuned.history.json"]   # no temporary file


def test_split_counts_per_class(history_file):
    counts = split_counts(load_history(history_file))
    assert list(counts) == CLASSES
    assert counts["red_circles"] == {"train": 5, "val": 1}


def test_not_json_and_missing_files(tmp_path):
    (tmp_path / "x.history.json").write_text('{"version": 1, ')
    with pytest.raises(HistoryError, match="not valid JSON"):
        load_history(tmp_path / "x.history.json")
    (tmp_path / "y.history.json").write_text(json.dumps([1, 2]))
    with pytest.raises(HistoryError, match="expected a JSON object"):
        load_history(tmp_path / "y.history.json")
    with pytest.raises(HistoryNotFound, match="fine-tune DATA_DIR --out tuned.pt"):
        load_history(tmp_path / "none.history.json")


def test_split_hashes_must_name_each_split_image(tmp_path):
    history = make_history(tmp_path / "data", CLASSES)
    hashes = {part: ["ab" * 32] * len(paths) for part, paths in history["split"].items()}
    write_test_history(tmp_path / "ok.history.json", {**history, "split_sha256": hashes, "weights_sha256": "cd" * 32})
    assert load_history(tmp_path / "ok.history.json")["split_sha256"] == hashes
    short = {**hashes, "train": hashes["train"][1:]}
    write_test_history(tmp_path / "short.history.json", {**history, "split_sha256": short})
    with pytest.raises(HistoryError, match="split_sha256.train"):
        load_history(tmp_path / "short.history.json")


def test_training_record_says_why_training_images_cannot_be_told_apart(tmp_path):
    history = make_history(tmp_path / "data", CLASSES)
    weights = tmp_path / "tuned.pt"
    assert training_record(weights, "ef" * 32)["status"] == "no_history"
    write_test_history(history_path_for(weights), history)
    old = training_record(weights, "ef" * 32)
    assert old["status"] == "no_hashes" and "older fine-tune" in old["reason"] and old["train_sha256"] == []
    hashes = {"train": [f"{i:064x}" for i in range(len(history["split"]["train"]))],
              "val": [None] * len(history["split"]["val"])}
    write_test_history(history_path_for(weights), {**history, "split_sha256": hashes, "weights_sha256": "cd" * 32})
    assert training_record(weights, "ef" * 32)["status"] == "other_weights", "fine-tune ran again since these weights"
    record = training_record(weights, "cd" * 32)
    assert record["status"] == "recorded" and record["reason"] is None
    assert record["train_sha256"] == sorted(hashes["train"]) and record["val_sha256"] == []
