"""Evaluation on held-out images only: fine-tune's history names its split by content hash, index-images keeps the
training hashes in the catalog, and evaluate-index (CLI, Python API, /evaluation) leaves those images out of the
queries by default and says how many (issue 19).

The in-process tests stand a seeded random state dict in for fine-tune's weights file, with a history beside it
naming a real split of the sample collection; the slow tests run the user's path: fine-tune, index-images and
evaluate-index as commands, and serve-images."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from api import create_app
from helpers.indexes import build_index
from helpers.servers import serve_images
from helpers.training_history import make_history, write_history
from helpers.waiting import wait_for
from retrieval import quality
from retrieval.catalog import Catalog
from retrieval.features.backbones import random_state_dict
from retrieval.features.digests import file_sha256, files_sha256
from retrieval.learning.evaluation import EvaluationError, compare_indexes, evaluate_index, load_labelled_vectors
from retrieval.learning.finetune_data import stratified_split
from retrieval.learning.metrics import pairwise_distances
from retrieval.samples import make_colour_collection


def labelled_paths(data_dir: Path) -> list[str]:
    return sorted(p.relative_to(data_dir).as_posix() for p in data_dir.glob("*/*") if p.is_file())


def fine_tune_files(data_dir: Path, out: Path, *, seed: int, hashes: bool = True, improved: bool = True) -> dict:
    """A weights file as fine-tune leaves one (a seeded random AlexNet backbone) and its history beside it, with a
    stratified split of data_dir; hashes=False writes the history an older fine-tune wrote. -> the split."""
    torch.save(random_state_dict("alexnet", seed), out)
    paths = labelled_paths(data_dir)
    classes = sorted({p.split("/")[0] for p in paths})
    train, val = stratified_split(np.array([classes.index(p.split("/")[0]) for p in paths]), 0.25, seed)
    split = {"train": [paths[i] for i in train], "val": [paths[i] for i in val]}
    history = {**make_history(data_dir, classes), "split": split, "improved": improved}
    if hashes:
        history["split_sha256"] = {part: files_sha256(data_dir, names) for part, names in split.items()}
        history["weights_sha256"] = file_sha256(out)
    write_history(out.with_name(out.stem + ".history.json"), history)
    return split


@pytest.fixture(scope="module")
def tuned(sample_index, tmp_path_factory) -> dict:
    """The sample collection indexed with a "fine-tuned" weights file whose history splits it (read-only)."""
    root = tmp_path_factory.mktemp("held_out")
    split = fine_tune_files(sample_index.data_dir, root / "tuned.pt", seed=3)
    build_index(sample_index.data_dir, root / "index", weights=str(root / "tuned.pt"))
    return {"root": root, "index": root / "index", "weights": root / "tuned.pt", "split": split}


def per_class(paths: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.split("/")[0]] = counts.get(p.split("/")[0], 0) + 1
    return dict(sorted(counts.items()))


def test_training_images_are_left_out_and_counted(tuned):
    r = evaluate_index(tuned["index"], [1, 5])
    train, val = tuned["split"]["train"], tuned["split"]["val"]
    assert r["excluded_training_images"] == len(train) and r["evaluated_images"] == len(val) == 30 - len(train)
    assert r["training_images"] == {"status": "excluded", "in_index": len(train), "reason": None}
    assert {name: c["images"] for name, c in r["per_class"].items()} == per_class(val), "the queries are the held-out images"
    assert sum(map(sum, r["knn"]["confusion"])) == len(val)
    assert r["linear_probe"]["split"] == "held_out"
    assert (r["linear_probe"]["train"], r["linear_probe"]["test"]) == (len(train), len(val))
    assert any(f"{len(train)} labelled image(s) the network was fine-tuned on left out" in n for n in r["notes"])

    # brute force: each held-out image searches all 30 stored vectors (training images included), itself left out
    catalog = Catalog(tuned["index"])
    try:
        stored = load_labelled_vectors(catalog)
    finally:
        catalog.close()
    rows = [stored.paths.index(p) for p in val]
    d = pairwise_distances(stored.vectors[rows], stored.vectors)
    d[np.arange(len(rows)), rows] = np.inf
    nearest = d.argmin(1)
    hits = [stored.labels[n] == stored.labels[q] for n, q in zip(nearest, rows)]
    assert r["retrieval"]["precision_at_k"]["1"] == pytest.approx(np.mean(hits))


def test_including_the_training_images_is_labelled(tuned):
    r = evaluate_index(tuned["index"], [1, 5], include_training_images=True)
    assert (r["evaluated_images"], r["excluded_training_images"]) == (30, 0)
    assert r["training_images"]["status"] == "included" and r["training_images"]["in_index"] == len(tuned["split"]["train"])
    assert r["linear_probe"]["split"] == "seeded"
    assert any("training images included" in n and "flatters" in n for n in r["notes"])
    assert "training images included" in quality.Evaluation.from_result(r)._repr_html_()


def test_the_index_keeps_knowing_its_training_images_when_the_files_move(tuned, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    history = tuned["weights"].with_name("tuned.history.json")
    shutil.move(history, moved / history.name)
    try:
        r = evaluate_index(tuned["index"], [1])
    finally:
        shutil.move(moved / history.name, history)
    assert r["excluded_training_images"] == len(tuned["split"]["train"])


def test_python_api_leaves_them_out_too(tuned, sample_index):
    ev = quality.evaluate(tuned["index"], [1, 5])
    assert (ev.images, ev.excluded_training_images, ev.training_images) == (
        len(tuned["split"]["val"]), len(tuned["split"]["train"]), "excluded")
    assert f"({len(tuned['split']['train'])} training images left out)" in ev._repr_html_()
    both = quality.compare(sample_index.index_dir, tuned["index"], [1, 5])
    assert both.a.images == both.b.images == len(tuned["split"]["val"])
    assert quality.compare(sample_index.index_dir, tuned["index"], [1], include_training_images=True).a.images == 30


def test_compare_scores_both_sides_on_the_same_held_out_images(tuned, sample_index):
    c = compare_indexes(sample_index.index_dir, tuned["index"], [1, 5])
    train, val = tuned["split"]["train"], tuned["split"]["val"]
    assert c["matched"]["excluded_training_images"] == len(train) and c["matched"]["evaluated_images"] == len(val)
    for side in ("a", "b"):
        assert (c[side]["evaluated_images"], c[side]["excluded_training_images"]) == (len(val), len(train))
        assert {name: x["images"] for name, x in c[side]["per_class"].items()} == per_class(val)
    assert c["a"]["training_images"]["status"] == "none" and c["b"]["training_images"]["status"] == "excluded"
    alone = evaluate_index(tuned["index"], [1, 5])
    assert c["b"]["retrieval"] == alone["retrieval"], "the tuned side's numbers are its own held-out numbers"
    assert c["a"]["linear_probe"]["train"] == c["b"]["linear_probe"]["train"] == len(train)


def test_compare_leaves_out_the_union_of_both_networks_training_images(tuned, sample_index, tmp_path):
    other = fine_tune_files(sample_index.data_dir, tmp_path / "other.pt", seed=5)
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(tmp_path / "other.pt"))
    union = set(tuned["split"]["train"]) | set(other["train"])
    assert len(union) > len(tuned["split"]["train"]), "the two splits differ"
    c = compare_indexes(tmp_path / "index", tuned["index"], [1])
    assert c["matched"]["excluded_training_images"] == len(union)
    assert c["a"]["evaluated_images"] == c["b"]["evaluated_images"] == 30 - len(union)


def test_an_older_history_without_hashes_evaluates_everything_and_says_so(sample_index, tmp_path):
    fine_tune_files(sample_index.data_dir, tmp_path / "old.pt", seed=4, hashes=False)
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(tmp_path / "old.pt"))
    r = evaluate_index(tmp_path / "index", [1])
    assert (r["evaluated_images"], r["excluded_training_images"]) == (30, 0)
    assert r["training_images"]["status"] == "unknown" and "older fine-tune" in r["training_images"]["reason"]
    assert any("cannot be told apart" in n for n in r["notes"])
    assert "cannot be told apart" in quality.evaluate(tmp_path / "index", [1]).evaluated_on


def test_weights_fine_tune_kept_unimproved_hold_nothing_out(sample_index, tmp_path):
    """Reproduces: fine-tune found no better epoch and wrote its starting weights ("improved": false), yet an index
    built with them left every training-split image out of evaluations (81% of a small collection), saying the
    network was fine-tuned on them. No image was learned into those weights: all are held out, and it says why."""
    fine_tune_files(sample_index.data_dir, tmp_path / "kept.pt", seed=6, improved=False)
    build_index(sample_index.data_dir, tmp_path / "index", weights=str(tmp_path / "kept.pt"))
    r = evaluate_index(tmp_path / "index", [1])
    assert (r["evaluated_images"], r["excluded_training_images"]) == (30, 0)
    assert r["training_images"]["status"] == "none"
    assert any("fine-tune's starting weights" in n and "all 30 labelled images are held out" in n for n in r["notes"])
    assert not any("fine-tuned on left out" in n for n in r["notes"])


def test_an_index_made_before_the_record_learns_it_on_its_next_run(sample_index, tuned, tmp_path):
    shutil.copytree(tuned["index"], tmp_path / "index")
    with sqlite3.connect(tmp_path / "index" / "catalog.db") as db:
        db.execute("DROP TABLE weights_training")
    r = evaluate_index(tmp_path / "index", [1])
    assert r["training_images"]["status"] == "unknown" and "run index-images on it again" in r["training_images"]["reason"]
    report = build_index(sample_index.data_dir, tmp_path / "index", weights=str(tuned["weights"]))
    assert report.indexed == 0, "nothing to extract: the record comes from the history alone"
    assert evaluate_index(tmp_path / "index", [1])["excluded_training_images"] == len(tuned["split"]["train"])


def test_nothing_left_to_evaluate_is_a_clear_error(sample_index, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_index.data_dir, data)
    split = fine_tune_files(data, tmp_path / "tuned.pt", seed=3)
    for path in split["val"]:
        (data / path).unlink()
    build_index(data, tmp_path / "index", weights=str(tmp_path / "tuned.pt"))
    with pytest.raises(EvaluationError, match="none is left to evaluate on.*--include-training-images"):
        evaluate_index(tmp_path / "index", [1])


def finished(client, url: str) -> str:  # noqa: ANN001 - Flask test client
    """The page at url once its evaluation is done (computed off the request thread), whitespace collapsed."""
    deadline = time.monotonic() + 120
    html = client.get(url).get_data(as_text=True)
    while 'id="computing"' in html and time.monotonic() < deadline:
        time.sleep(0.2)
        html = client.get(url).get_data(as_text=True)
    return " ".join(html.split())


def test_evaluation_page_compares_on_the_held_out_images_and_can_include_the_rest(tuned, sample_index, tmp_path):
    app = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs"), "COMPARE_INDEX": str(tuned["index"])})
    train, val = len(tuned["split"]["train"]), len(tuned["split"]["val"])
    try:
        client = app.test_client()
        html = finished(client, "/evaluation")
        held = html.split('id="held-out"')[1].split("</p>")[0]
        assert f"Evaluated on {val} held-out images ({train} training images left out)" in held
        assert f"The {train} images a network was fine-tuned on are left out of the queries" in held
        per_class = html.split('id="per-class"')[1].split("</table>")[0]
        assert sum(int(n) for n in re.findall(r"</a></td><td>(\d+)</td>", per_class)) == val
        html = finished(client, "/evaluation?training_images=include")
        held = html.split('id="held-out"')[1].split("</p>")[0]
        assert "Evaluated on 30 labelled images, training images included" in held and "flatters" in held
    finally:
        app.extensions["retrieval"].close()


# --- the user's path: fine-tune, index-images, evaluate-index, serve-images as commands ----------------------------

BIN = Path(sys.executable).parent      # the console scripts live next to the interpreter (the venv's bin/)
COMMAND_S = 600


def command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A console script run in cwd as a user types it (this checkout first on the import path)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")},
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=COMMAND_S)
    assert result.returncode == 0, f"$ {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def user_path(tmp_path_factory) -> dict:
    """A labelled folder fine-tuned on from random weights (two epochs), then indexed whole with the tuned weights
    (index-tuned) and with random weights (index-random), all as commands in the folder."""
    root = tmp_path_factory.mktemp("user_path")
    make_colour_collection(root / "data", per_class=8, seed=0)
    command(["fine-tune", "data", "--out", "tuned.pt", "--weights", "random", "--epochs", "2"], root)
    command(["index-images", "data", "--index-dir", "index-tuned", "--weights", "tuned.pt"], root)
    command(["index-images", "data", "--index-dir", "index-random", "--weights", "random"], root)
    history = json.loads((root / "tuned.history.json").read_text())
    return {"root": root, "history": history, "train": history["split"]["train"], "val": history["split"]["val"]}


@pytest.mark.slow
def test_evaluate_index_leaves_out_exactly_the_training_split(user_path):
    root, train, val = user_path["root"], user_path["train"], user_path["val"]
    assert len(train) + len(val) == 24 and val
    catalog = Catalog(root / "index-tuned")
    try:
        stored = {r.path: r.sha256 for r in catalog.list_images(limit=100)}
    finally:
        catalog.close()
    assert user_path["history"]["split_sha256"] == {"train": [stored[p] for p in train], "val": [stored[p] for p in val]}, \
        "the history names each split image by the hash the catalog keeps"

    r = json.loads(command(["evaluate-index", "--index-dir", "index-tuned", "--json"], root).stdout)
    assert (r["excluded_training_images"], r["evaluated_images"]) == (len(train), len(val))
    assert {name: c["images"] for name, c in r["per_class"].items()} == per_class(val), "no training image queried"
    assert sum(map(sum, r["knn"]["confusion"])) == len(val)
    text = command(["evaluate-index", "--index-dir", "index-tuned"], root).stdout
    assert f"evaluated on {len(val)} held-out images ({len(train)} training images left out)" in text


@pytest.mark.slow
def test_compare_scores_both_indexes_on_the_same_held_out_images(user_path):
    root, train, val = user_path["root"], user_path["train"], user_path["val"]
    c = json.loads(command(["evaluate-index", "--index-dir", "index-random", "--compare", "index-tuned", "--json"],
                           root).stdout)
    assert c["matched"]["images"] == 24 and c["matched"]["excluded_training_images"] == len(train)
    for side in ("a", "b"):
        assert (c[side]["evaluated_images"], c[side]["excluded_training_images"]) == (len(val), len(train))
        assert {name: x["images"] for name, x in c[side]["per_class"].items()} == per_class(val)
    assert (c["a"]["training_images"]["status"], c["b"]["training_images"]["status"]) == ("none", "excluded")
    text = command(["evaluate-index", "--index-dir", "index-random", "--compare", "index-tuned"], root).stdout
    assert f"evaluated on {len(val)} held-out images ({len(train)} training images left out), the same for both" in text


@pytest.mark.slow
def test_include_training_images_brings_them_back_labelled(user_path):
    root, train = user_path["root"], user_path["train"]
    r = json.loads(command(["evaluate-index", "--index-dir", "index-tuned", "--include-training-images", "--json"],
                           root).stdout)
    assert (r["evaluated_images"], r["excluded_training_images"]) == (24, 0)
    assert r["training_images"] == {"status": "included", "in_index": len(train), "reason": None}
    c = json.loads(command(["evaluate-index", "--index-dir", "index-random", "--compare", "index-tuned",
                            "--include-training-images", "--json"], root).stdout)
    assert c["a"]["evaluated_images"] == c["b"]["evaluated_images"] == 24
    text = command(["evaluate-index", "--index-dir", "index-random", "--compare", "index-tuned",
                    "--include-training-images"], root).stdout
    assert "evaluated on 24 labelled images, training images included" in text
    text = command(["evaluate-index", "--index-dir", "index-tuned", "--include-training-images"], root).stdout
    assert f"evaluated on 24 labelled images, training images included ({len(train)} of them trained on)" in text
    assert "flatters" in text


@pytest.mark.slow
def test_evaluation_page_of_a_real_server_says_how_many_were_left_out(user_path, tmp_path):
    root, train, val = user_path["root"], user_path["train"], user_path["val"]
    with serve_images(root / "index-tuned", tmp_path / "server.log") as base:
        html = ""
        def done() -> bool:
            nonlocal html
            html = " ".join(requests.get(base + "/evaluation", timeout=30).text.split())
            return 'id="computing"' not in html
        assert wait_for(done, 180, interval=0.5), "the evaluation did not finish"
        held = html.split('id="held-out"')[1].split("</p>")[0]
        assert f"Evaluated on {len(val)} held-out images ({len(train)} training images left out)" in held
        assert f"The {len(train)} images the network was fine-tuned on are left out of the queries" in held
