"""Tests for fine-tune (retrieval.learning.finetune, commands.fine_tune): split, chance loss, sanity overfit, retrieval
before and after with the best-retrieving epoch kept (checked through index-images), a run that cannot improve,
better features than the random network's on the same validation images, weights index-images loads, Ctrl-C, bad
files."""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from api import create_app

from commands.fine_tune import main
from retrieval.samples import COLOUR_CLASSES, make_colour_collection, make_sample_collection
from retrieval.features.backbones import random_state_dict
from retrieval.features.digests import file_sha256
from retrieval.catalog import Catalog
from retrieval.learning.evaluation import load_labelled_vectors
from retrieval.learning.finetune import FineTuneConfig, FineTuneError, fine_tune
from retrieval.learning.finetune_data import stratified_split
from retrieval.learning.metrics import vote_labels

from helpers.indexes import build_index
from helpers.scripts import console_script
from helpers.waiting import wait_for

PER_CLASS = 30          # 3 colour classes: 63 train / 27 validation images with --val-fraction 0.3
HISTORY_KEYS = {"version", "created_at", "data_dir", "model", "weights", "weights_seed", "train", "head", "objective",
                "dropout", "optimizer", "lr", "lr_schedule", "weight_decay", "momentum", "epochs", "batch_size",
                "patience", "val_fraction", "seed", "classes", "split", "initial_loss", "chance_loss", "sanity",
                "selection", "retrieval_k", "initial_retrieval", "best_retrieval", "improved", "epochs_run",
                "best_epoch", "best_val_accuracy", "stopped", "seconds", "split_sha256",
                "weights_sha256", "checkpoints_sha256"}
EPOCH_KEYS = {"epoch", "train_loss", "train_accuracy", "train_objective_loss", "val_loss", "val_accuracy",
              "val_knn_accuracy", "val_map", "lr", "seconds"}
# The default objective and optimisation, from seeded random weights; small batches for a small collection.
RANDOM_START = ["--model", "alexnet", "--weights", "random", "--val-fraction", "0.3", "--batch-size", "8"]
K = 10


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One fine-tune of fc6, fc7 and a head from seeded random AlexNet weights, on a folder with bad files."""
    root = tmp_path_factory.mktemp("finetune")
    data = root / "data"
    make_colour_collection(data, per_class=PER_CLASS, seed=0)
    (data / "reds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (data / "blues" / "empty.png").write_bytes(b"")
    (data / "loose.png").write_bytes((data / "greens" / "greens_000.png").read_bytes())   # unlabelled
    for i in range(3):                                                                   # byte-identical copies
        (data / "reds" / f"copy_of_{i}.png").write_bytes((data / "reds" / f"reds_{i:03d}.png").read_bytes())
    out = root / "tuned.pt"
    result = CliRunner().invoke(main, [str(data), "--out", str(out), *RANDOM_START, "--epochs", "6",
                                       "--patience", "6", "--sanity", "--json"])
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "out": out, "summary": json.loads(result.stdout),
            "history": json.loads((root / "tuned.history.json").read_text())}


def stored_split(index_dir: Path, split: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (training vectors, their labels, validation vectors, their labels) as an index stores them."""
    catalog = Catalog(index_dir)
    try:
        stored = load_labelled_vectors(catalog)
        paths = {i: r.path for i, r in catalog.get_many(stored.ids.tolist()).items()}
    finally:
        catalog.close()
    row = {paths[int(i)]: j for j, i in enumerate(stored.ids)}
    train = np.array([row[p] for p in split["train"]])
    val = np.array([row[p] for p in split["val"]])
    labels = np.array(stored.labels)
    return stored.vectors[train], labels[train], stored.vectors[val], labels[val]


def knn_accuracy(index_dir: Path, split: dict, k: int = 1) -> float:
    """The kNN vote (the project's one vote, metrics.vote_labels) of each validation image among the training images'
    stored vectors, by brute-force distances."""
    train, train_labels, val, val_labels = stored_split(index_dir, split)
    d = np.linalg.norm(val[:, None, :] - train[None, :, :], axis=2)             # (val, train)
    votes = [vote_labels(train_labels[np.argsort(r, kind="stable")[:k]].tolist(), np.sort(r)[:k].tolist())[0]
             for r in d]
    return float(np.mean(np.array(votes) == val_labels))


def mean_average_precision(index_dir: Path, split: dict) -> float:
    """Each validation image ranks every training image by distance; the mean of its average precision (same label)."""
    train, train_labels, val, val_labels = stored_split(index_dir, split)
    aps = []
    for v, label in zip(val, val_labels):
        ranked = train_labels[np.argsort(np.linalg.norm(train - v, axis=1), kind="stable")] == label
        aps.append(np.mean([ranked[:r + 1].mean() for r in np.flatnonzero(ranked)]))
    return float(np.mean(aps))


@pytest.mark.slow
def test_history_holds_the_settings_the_split_and_every_epoch(tuned):
    h = tuned["history"]
    assert set(h) == HISTORY_KEYS
    assert h["version"] == 1 and h["data_dir"] == str(tuned["data"]) and h["model"] == "alexnet"
    assert (h["weights"], h["weights_seed"], h["train"], h["head"]) == ("random", 0, "fc", "dropped")
    defaults = FineTuneConfig(data_dir=tuned["data"], out=tuned["out"])
    assert (h["objective"], h["optimizer"], h["lr"]) == (defaults.objective, defaults.optimizer, defaults.lr)
    assert h["classes"] == sorted(COLOUR_CLASSES)
    assert h["epochs"] == 6 and 1 <= len(h["epochs_run"]) <= 6 and h["stopped"] in ("completed", "early_stopping")
    assert all(set(e) == EPOCH_KEYS for e in h["epochs_run"])
    assert [e["epoch"] for e in h["epochs_run"]] == list(range(1, len(h["epochs_run"]) + 1))
    lrs = [e["lr"] for e in h["epochs_run"]]
    assert lrs[0] == pytest.approx(defaults.lr) and all(a > b for a, b in zip(lrs, lrs[1:])), "the learning rate decays"


@pytest.mark.slow
def test_retrieval_before_and_after_are_in_the_summary_and_the_history(tuned):
    h, summary = tuned["history"], tuned["summary"]
    before, after = h["initial_retrieval"], h["best_retrieval"]
    assert h["retrieval_k"] == K and set(before) == set(after) == {"knn_accuracy", "map"}
    assert summary["retrieval"]["before"] == before and summary["retrieval"]["after"] == after
    assert summary["retrieval"]["k"] == K and summary["retrieval"]["improved"] is h["improved"] is True
    assert after["knn_accuracy"] > before["knn_accuracy"], "the default fine-tune retrieves better than its start"


@pytest.mark.slow
def test_the_kept_epoch_retrieves_best_and_index_images_with_its_weights_agrees(tuned):
    h = tuned["history"]
    seen = [(0, h["initial_retrieval"]["knn_accuracy"], h["initial_retrieval"]["map"])]
    seen += [(e["epoch"], e["val_knn_accuracy"], e["val_map"]) for e in h["epochs_run"]]
    best = max(seen, key=lambda s: (s[1], s[2], -s[0]))            # the first epoch with the best (kNN, mAP)
    assert h["best_epoch"] == best[0] and (h["best_retrieval"]["knn_accuracy"], h["best_retrieval"]["map"]) == best[1:]
    # The written weights, indexed by index-images: the validation images among the training images retrieve as the
    # history says (up to one vote: training cached the convolutions' output in float16, index-images does not).
    split, index_dir = h["split"], tuned_index(tuned)
    assert knn_accuracy(index_dir, split, k=K) == pytest.approx(best[1], abs=1 / len(split["val"]) + 1e-9)
    assert mean_average_precision(index_dir, split) == pytest.approx(best[2], abs=0.02)


@pytest.mark.slow
def test_on_classes_the_starting_weights_already_tell_apart_it_says_so_instead_of_more_epochs(tmp_path):
    # make demo's collection: random fc7 already finds the right class for every validation image
    make_sample_collection(tmp_path / "data", per_class=12)
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"), *RANDOM_START, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    h = json.loads((tmp_path / "t.history.json").read_text())
    assert h["initial_retrieval"]["knn_accuracy"] == 1.0 and h["improved"] is False, h["best_retrieval"]
    assert "NOT IMPROVED" in result.output and "these classes need no fine-tuning" in result.output
    assert "more --epochs" not in result.output
    assert "note: the kept head" not in result.output   # the head is dropped: nothing to say about it
    kept = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "h.pt"), *RANDOM_START,
                                     "--epochs", "2", "--keep-head"])
    h = json.loads((tmp_path / "h.history.json").read_text())
    assert h["best_epoch"] == 0 and h["best_val_accuracy"] <= 0.2, h   # the starting weights: a head never trained
    assert ("note: the kept head (epoch 0) classifies the validation images at chance" in kept.output
            and "do not use that head as a classifier" in kept.output), kept.output


@pytest.mark.slow
def test_a_run_that_cannot_improve_says_so_and_keeps_the_starting_weights(tuned, tmp_path):
    # --train head trains only the classification layer: fc7, what the index stores, cannot change.
    out = tmp_path / "head.pt"
    result = CliRunner().invoke(main, [str(tuned["data"]), "--out", str(out), *RANDOM_START, "--train", "head",
                                       "--epochs", "2"])
    assert result.exit_code == 0, result.output
    h = json.loads((tmp_path / "head.history.json").read_text())
    assert h["improved"] is False and h["best_epoch"] == 0 and len(h["epochs_run"]) == 2
    assert h["best_retrieval"] == h["initial_retrieval"]
    before = h["initial_retrieval"]
    assert f"epoch   0  (the starting weights)  val kNN@{K} {before['knn_accuracy']:.3f}" in result.output
    assert "NOT IMPROVED" in result.output and f"kNN@{K} {before['knn_accuracy']:.3f}" in result.output
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ") and "train loss" in line]
    assert len(epoch_lines) == 2 and "left)" in epoch_lines[0] and "left" not in epoch_lines[1], epoch_lines
    state = torch.load(out, map_location="cpu", weights_only=True)
    start = random_state_dict("alexnet", 0)
    assert set(state) == {k for k in start if not k.startswith("classifier.6.")}
    assert all(torch.equal(state[k], start[k]) for k in state), "the starting weights, unchanged"


@pytest.mark.slow
def test_split_is_stratified_seeded_and_leaves_out_bad_and_unlabelled_files(tuned):
    split = tuned["history"]["split"]
    assert not set(split["train"]) & set(split["val"])
    good = {p.relative_to(tuned["data"]).as_posix() for p in tuned["data"].glob("*/*.png") if p.stat().st_size}
    assert set(split["train"]) | set(split["val"]) == good
    for name in COLOUR_CLASSES:
        in_val = [p for p in split["val"] if p.startswith(name + "/")]
        files = len(list((tuned["data"] / name).iterdir()))
        # less a bad file drawn there; more by one where a copy followed its original over the line
        assert round(0.3 * files) - 1 <= len(in_val) <= round(0.3 * files) + 1, name


@pytest.mark.slow
def test_copies_of_an_image_are_all_trained_on_or_all_validated(tuned):
    h = tuned["history"]
    train, val = set(h["split_sha256"]["train"]), set(h["split_sha256"]["val"])
    assert len(h["split_sha256"]["train"]) + len(h["split_sha256"]["val"]) - len(train | val) == 3   # the copies
    assert not train & val, "a validation image is a copy of a training image: its score says nothing"
    for i in range(3):
        side = "train" if f"reds/reds_{i:03d}.png" in h["split"]["train"] else "val"
        assert f"reds/copy_of_{i}.png" in h["split"][side]


@pytest.mark.slow
def test_bad_files_are_skipped_with_their_reason(tuned):
    skipped = {s["path"]: s["reason"] for s in tuned["summary"]["skipped"]}
    assert set(skipped) == {"reds/broken.jpg", "blues/empty.png"}
    assert "empty" in skipped["blues/empty.png"]
    assert skipped["reds/broken.jpg"]
    assert tuned["summary"]["unlabelled"] == 1


@pytest.mark.slow
def test_initial_loss_is_the_chance_loss(tuned):
    h = tuned["history"]
    assert h["chance_loss"] == pytest.approx(math.log(3))
    assert abs(h["initial_loss"] - h["chance_loss"]) <= 0.1 * h["chance_loss"]
    assert tuned["summary"]["initial_loss"] == h["initial_loss"]


@pytest.mark.slow
def test_sanity_check_overfits_a_tiny_subset(tuned):
    sanity = tuned["history"]["sanity"]
    assert sanity["subset_size"] == 6                       # 2 images per class
    assert sanity["passed"] and sanity["final_train_loss"] < 0.05 and sanity["steps"] >= 1
    assert tuned["summary"]["sanity"] == sanity


@pytest.mark.slow
def test_fine_tuned_features_beat_the_random_features_on_the_same_validation_images(tuned):
    root, data, split = tuned["root"], tuned["data"], tuned["history"]["split"]
    build_index(data, root / "random-index", weights="random", seed=0)       # the network training started from
    random_knn = knn_accuracy(root / "random-index", split, k=K)
    tuned_knn = knn_accuracy(tuned_index(tuned), split, k=K)

    assert tuned_knn > random_knn, (tuned_knn, random_knn)
    # epoch 0's numbers are the starting network's, as index-images sees it (up to one vote: float16 cache)
    before = tuned["history"]["initial_retrieval"]["knn_accuracy"]
    assert random_knn == pytest.approx(before, abs=1 / len(split["val"]) + 1e-9)


def tuned_index(tuned) -> Path:
    """The fine-tune's data folder indexed with the fine-tuned weights (built once, shared by the tests)."""
    index_dir = tuned["root"] / "tuned-index"
    if not (index_dir / "catalog.db").exists():
        build_index(tuned["data"], index_dir, weights=str(tuned["out"]))
    return index_dir


@pytest.mark.slow
def test_charts_are_drawn_next_to_the_weights_and_served_on_the_training_page(tuned, tmp_path):
    plots = [Path(p) for p in tuned["summary"]["plots"]]
    assert sorted(p.name for p in plots) == ["tuned.accuracy.png", "tuned.loss.png"]
    for png in plots:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
    # An index built with the fine-tuned weights shows their history on /training, with no option needed.
    app = create_app({"INDEX_DIR": str(tuned_index(tuned)), "THUMBNAIL_DIR": str(tmp_path / "thumbs"),
                      "RELOAD_INTERVAL_S": 0})
    html = app.test_client().get("/training").get_data(as_text=True)
    best = tuned["history"]["best_val_accuracy"]
    assert "tuned.history.json" in html and f"{len(COLOUR_CLASSES)} classes" in html
    assert f"{best:.3f}" in html, "the best validation accuracy of the run"
    assert html.count("<svg") >= 2, "the loss and accuracy charts"


@pytest.mark.slow
def test_weights_file_is_the_backbone_that_index_images_loads_and_records(tuned):
    out = tuned["out"]
    state = torch.load(out, map_location="cpu", weights_only=True)
    start = random_state_dict("alexnet", 0)
    assert set(state) == {k for k in start if not k.startswith("classifier.6.")}, "the head is dropped"
    assert torch.equal(state["features.0.weight"], start["features.0.weight"]), "convolutions were frozen"
    assert not torch.equal(state["classifier.4.weight"], start["classifier.4.weight"]), "fc7 was trained"

    catalog = Catalog(tuned_index(tuned))
    try:
        settings = catalog.settings()
    finally:
        catalog.close()
    assert settings.weights == str(out)
    assert settings.weights_identity == f"file:{out}:sha256={file_sha256(out)}"


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_best_checkpoint(tuned, tmp_path):
    out = tmp_path / "stopped.pt"
    # Ctrl-C reaches a command a terminal started with SIGINT at its default. A shell starts a background job with
    # SIGINT ignored, an ignored signal stays ignored in children, and Python then never raises KeyboardInterrupt:
    # under a test run started that way the command would run all 50 epochs. A handler here (not SIG_IGN) is reset
    # to the default in the child when it execs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "commands.fine_tune", str(tuned["data"]), "--out", str(out),
                                 *RANDOM_START, "--epochs", "50", "--patience", "50"],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if previous is not None:     # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)
    try:
        wait_for(lambda: out.exists() or proc.poll() is not None, 300, interval=0.2)
        assert out.exists(), proc.poll()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "kept the best checkpoint" in stderr and str(out) in stderr
    # the starting weights are written first: the interrupt may land before epoch 1 ends (then they are kept)
    assert "img/s]" not in stderr and "epoch   0  (the starting weights)  val kNN@10" in stderr, \
        "redirected: a plain line per epoch, no progress bars"
    history = json.loads((tmp_path / "stopped.history.json").read_text())
    assert history["stopped"] == "interrupted" and 0 <= history["best_epoch"] <= len(history["epochs_run"]) < 50
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert "classifier.4.weight" in state


@pytest.mark.slow
def test_a_run_killed_mid_training_leaves_the_history_of_the_weights_it_left(tuned, tmp_path):
    """Reproduces: a hang-up (the terminal closed) or a crash mid-run left the weights without their history, which
    was written at the end only; an index of them then evaluated the training images as if held out."""
    from retrieval.features.digests import file_sha256
    from retrieval.quality import evaluate

    out = tmp_path / "hup.pt"
    proc = subprocess.Popen([sys.executable, "-m", "commands.fine_tune", str(tuned["data"]), "--out", str(out),
                             *RANDOM_START, "--epochs", "50", "--patience", "50"],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    history_file = tmp_path / "hup.history.json"

    def learned() -> bool:   # an epoch better than the starting weights in the file (those hold no training image)
        if not (history_file.exists() and out.exists()):
            return False
        return file_sha256(out) in json.loads(history_file.read_text()).get("checkpoints_sha256", [])[1:]
    try:
        wait_for(lambda: learned() or proc.poll() is not None, 300, interval=0.2)
        assert learned(), proc.communicate()[1]
        proc.send_signal(signal.SIGHUP)   # not handled: the process ends where it is
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGHUP
    history = json.loads(history_file.read_text())
    assert history["stopped"] == "unfinished" and file_sha256(out) in history["checkpoints_sha256"]
    build_index(tuned["data"], tmp_path / "index", weights=str(out))
    ev = evaluate(tmp_path / "index", ks=(1,), probe=False)
    assert ev.training_images == "excluded" and ev.excluded_training_images == len(history["split"]["train"]) > 0


def test_fewer_than_two_classes_is_a_clear_error(tmp_path):
    make_colour_collection(tmp_path / "data", per_class=3)
    for name in list(COLOUR_CLASSES)[1:]:
        for f in (tmp_path / "data" / name).iterdir():
            f.unlink()
        (tmp_path / "data" / name).rmdir()
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"), "--weights", "random"])
    assert result.exit_code == 2, result.output
    assert "at least two classes" in result.output and "only the class 'reds'" in result.output
    assert not (tmp_path / "t.pt").exists()


def test_an_existing_out_file_is_kept_unless_overwrite_is_asked(tmp_path):
    """Reproduces: a second fine-tune run with the same --out wrote its starting weights over the file at once, and
    the index made with the first run's weights stopped answering ("not the ones this index was built with")."""
    make_colour_collection(tmp_path / "data", per_class=3)
    out = tmp_path / "tuned.pt"
    out.write_bytes(b"the first run's weights")
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(out), "--weights", "random"])
    assert result.exit_code == 2, result.output
    assert f"--out {out} exists" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"the first run's weights"
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(out), *RANDOM_START, "--epochs", "1",
                                       "--train", "head", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"the first run's weights"


def test_an_out_ending_in_a_slash_is_refused_before_anything_is_written(tmp_path):
    """Reproduces: `--out tuned/` (meaning "into that folder") trained and wrote a file named "tuned"."""
    make_colour_collection(tmp_path / "data", per_class=3)
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", f"{tmp_path / 'tuned'}/", "--weights", "random"])
    assert result.exit_code == 2, result.output
    assert "ends with '/', so it names a folder; give a file's name" in result.output
    assert not (tmp_path / "tuned").exists()


def test_an_out_of_another_suffix_keeps_the_history_of_the_weights_beside_it(tmp_path):
    """Reproduces: --out tuned.pth next to tuned.pt wrote over tuned.history.json, tuned.pt's history, without
    --overwrite; an index of tuned.pt then could not tell its training images apart and scored them as held out."""
    make_colour_collection(tmp_path / "data", per_class=3)
    history = tmp_path / "tuned.history.json"
    history.write_text('{"the first run": "its history"}')
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "tuned.pth"), *RANDOM_START])
    assert result.exit_code == 2, result.output
    assert f"--out {tmp_path / 'tuned.pth'} would write its history to {history}, which holds another run's" \
        in result.output
    assert "--overwrite" in result.output and history.read_text() == '{"the first run": "its history"}'
    with pytest.raises(FineTuneError, match="holds another run's.*overwrite=True"):
        fine_tune(FineTuneConfig(data_dir=tmp_path / "data", out=tmp_path / "tuned.pth", weights="random"))
    assert history.read_text() == '{"the first run": "its history"}'


def test_fine_tune_from_python_keeps_an_existing_out_file_unless_overwrite(tmp_path):
    """The command refused a second run's --out, but fine_tune(FineTuneConfig(...)) from Python (a notebook's
    re-run cell) still wrote over the weights an index was made with."""
    make_colour_collection(tmp_path / "data", per_class=3)
    out = tmp_path / "tuned.pt"
    out.write_bytes(b"the first run's weights")
    with pytest.raises(FineTuneError, match="overwrite=True"):
        fine_tune(FineTuneConfig(data_dir=tmp_path / "data", out=out, weights="random"))
    assert out.read_bytes() == b"the first run's weights"
    fine_tune(FineTuneConfig(data_dir=tmp_path / "data", out=out, weights="random", epochs=1, train="head",
                             device="cpu", overwrite=True))
    assert out.read_bytes() != b"the first run's weights"


def test_a_class_with_nothing_to_validate_on_is_named(tmp_path):
    """Reproduces: a class of one image was trained on without a word, with no validation image to check it."""
    import shutil

    make_colour_collection(tmp_path / "data", per_class=3)
    (tmp_path / "data" / "lonely").mkdir()
    first = sorted((tmp_path / "data" / list(COLOUR_CLASSES)[0]).iterdir())[0]
    shutil.copy(first, tmp_path / "data" / "lonely" / "only.png")
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"), *RANDOM_START,
                                       "--epochs", "1", "--train", "head"])
    assert result.exit_code == 0, result.output
    assert ("note: 1 class(es) with no validation image (one image, or copies of one): trained on, but never checked, "
            "and their search not measured: 'lonely'") in result.output


def test_a_learning_rate_that_blows_the_loss_up_is_named(tmp_path):
    """Reproduces: --lr 0.1 reached a training loss of 138,017 (chance 1.6) and nothing said the rate was too high."""
    make_colour_collection(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"), *RANDOM_START,
                                       "--epochs", "2", "--lr", "50", "--objective", "ce"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "training is diverging" in line]
    assert len(notes) == 1 and notes[0].startswith("note: the training loss (") and "try a lower --lr" in notes[0]
    calm = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "u.pt"), *RANDOM_START,
                                     "--epochs", "1", "--train", "head"])
    assert calm.exit_code == 0 and "diverging" not in calm.output, calm.output


def test_split_keeps_groups_whole_and_still_validates_every_class_it_can():
    codes = np.array([0] * 6 + [1] * 3 + [2] * 4)
    groups = ["a", "a", "a", "b", None, None,      # class 0: a group of three, a pair, two of their own
              "c", "c", "c",                        # class 1: one image three times: nothing to validate against
              "d", "e", "e", "a"]                   # class 2: the same file as class 0's group "a"
    for seed in range(20):
        train, val = stratified_split(codes, 0.3, seed, groups=groups)
        assert sorted(train.tolist() + val.tolist()) == list(range(len(codes)))
        side = {}
        for i in range(len(codes)):
            if groups[i] is not None:
                assert side.setdefault(groups[i], i in val) == (i in val), (seed, groups[i])
        assert not set(val.tolist()) & {6, 7, 8}, "a class of one group trains only"
        for c in (0, 2):
            assert 0 < int((codes[train] == c).sum()) < (codes == c).sum(), (seed, c)
    assert stratified_split(codes, 0.3, 0, groups=list(range(13)))[1].tolist() == stratified_split(codes, 0.3, 0)[1].tolist()


def test_split_puts_every_class_with_two_images_on_both_sides():
    codes = np.array([0] * 10 + [1] * 2 + [2] * 1 + [3] * 5)
    train, val = stratified_split(codes, 0.2, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(codes)))
    assert [int((codes[val] == c).sum()) for c in range(4)] == [2, 1, 0, 1]
    assert set(codes[train].tolist()) == {0, 1, 2, 3}
    again, _ = stratified_split(codes, 0.2, seed=0)
    other, _ = stratified_split(codes, 0.2, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_help_answers_without_importing_torch():
    probe = "import sys, commands.fine_tune; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["head", "all"])
def test_train_head_only_or_the_whole_network(mode, tmp_path):
    make_colour_collection(tmp_path / "data", per_class=4, size=(64, 64))
    out = tmp_path / "t.pt"
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(out), *RANDOM_START, "--val-fraction", "0.25",
                                       "--train", mode, "--epochs", "2", "--keep-head", "--json"])
    assert result.exit_code == 0, result.output
    state = torch.load(out, map_location="cpu", weights_only=True)
    start = random_state_dict("alexnet", 0)
    assert state["classifier.6.weight"].shape == (3, 4096), "--keep-head: the head for the 3 classes"
    history = json.loads((tmp_path / "t.history.json").read_text())
    # the weights written are the epoch that retrieved best: the starting ones unless an epoch beat them (never
    # with --train head, which cannot change fc7)
    kept_start = not history["improved"]
    assert kept_start == (history["best_epoch"] == 0) and (mode != "head" or kept_start)
    assert torch.equal(state["classifier.4.weight"], start["classifier.4.weight"]) == kept_start
    assert torch.equal(state["features.0.weight"], start["features.0.weight"]) == (mode == "head" or kept_start)
    filters = tmp_path / "t.filters.npz"
    assert filters.exists() == (mode == "all")
    if mode == "all":
        with np.load(filters) as f:
            assert f["before"].shape == f["after"].shape == (64, 3, 11, 11) and f["after"].dtype == np.float32
            assert np.array_equal(f["before"], start["features.0.weight"].numpy())
            assert np.array_equal(f["after"], state["features.0.weight"].numpy())


@pytest.mark.parametrize("train_images, advice", [(53, "try --batch-size 8 --patience 20"),
                                                  (400, "Try more images per class, more --epochs or another --lr")])
def test_not_improved_on_a_small_collection_names_the_batch_size_and_patience(capsys, train_images, advice):
    """Reproduces (4 classes x 15 pictures): with batches of 32 an epoch was 2 optimiser steps and the default
    patience stopped after 10; the advice said more --epochs (which changed nothing). --batch-size 8 --patience 20
    improved kNN@10 0.750 -> 0.833 there. A collection large enough for the defaults keeps the general advice."""
    from commands.fine_tune import _print_summary

    same = {"knn_accuracy": 0.75, "map": 0.386}
    _print_summary({"weights": "t.pt", "history": "t.history.json", "plots": [], "stopped": "early_stopping",
                    "best_epoch": 0, "best_val_accuracy": 0.0, "epochs_run": 5, "classes": ["a", "b", "c", "d"],
                    "train_images": train_images, "val_images": 12, "cache_seconds": 1.0, "seconds": 9.0,
                    "train": "fc", "unlabelled": 0, "skipped": [], "batch_size": 32, "patience": 5,
                    "retrieval": {"k": 10, "before": same, "after": same, "improved": False, "selection": "knn"}})
    out = capsys.readouterr().out
    assert "NOT IMPROVED" in out and advice in out, out


def test_skipped_names_with_control_characters_print_escaped(tmp_path):
    """Reproduces: a file named 'bad\\nname\\x1b[31mRED.jpg' split fine-tune's skipped line in two (and sent the escape
    sequence to the terminal), on stderr and again in the summary; index-images escaped the same name."""
    make_colour_collection(tmp_path / "data", per_class=4, seed=0)
    (tmp_path / "data" / "reds" / "bad\nname\x1b[31mRED.jpg").write_bytes(b"not an image")
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--out", str(tmp_path / "t.pt"), *RANDOM_START,
                                       "--epochs", "1", "--train", "head"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert result.output.count("reds/bad\\nname\\x1b[31mRED.jpg: not an image") == 2, result.output


@pytest.mark.parametrize("name", ["epochs", "batch_size", "cache_batch_size", "cache_views", "patience"])
@pytest.mark.parametrize("value", [0, "3", 2.5, True])
def test_a_setting_below_one_or_of_another_kind_is_refused_by_its_name(tmp_path, name, value):
    """It said "epochs, batch sizes, cache views and patience must each be at least 1", whichever it was; and
    epochs="3" or batch_size="auto" (the command's default) from Python raised a bare TypeError ('<' not supported)."""
    with pytest.raises(FineTuneError, match=f"^{name} must be a whole number of at least 1( or \"auto\")?, "
                                            f"not {re.escape(repr(value))}$"):
        FineTuneConfig(data_dir=tmp_path, out=tmp_path / "t.pt", **{name: value})


@pytest.mark.slow
def test_fine_tune_from_python_has_the_commands_defaults(tmp_path):
    """Reproduces (Python API review): the docs say FineTuneConfig has the command's defaults, but its batch size
    was 32 where `fine-tune --train all` (batch size auto) trains on batches of 10 on a CPU, and "auto" was refused."""
    make_colour_collection(tmp_path / "data", per_class=4, size=(64, 64))
    for train in ("fc", "all"):
        ran = subprocess.run([console_script("fine-tune"), "data", "--out", f"cli-{train}.pt", "--weights", "random",
                              "--train", train, "--epochs", "1", "--device", "cpu", "--json"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600, env=cli_env())
        assert ran.returncode == 0, ran.stderr
        fine_tune(FineTuneConfig(data_dir=tmp_path / "data", out=tmp_path / f"py-{train}.pt", weights="random",
                                 train=train, epochs=1, device="cpu"))
        cli, py = (json.loads((tmp_path / f"{who}-{train}.history.json").read_text()) for who in ("cli", "py"))
        settings = ("model", "weights", "weights_seed", "train", "head", "objective", "dropout", "optimizer", "lr",
                    "lr_schedule", "weight_decay", "momentum", "epochs", "batch_size", "patience", "val_fraction", "seed",
                    "classes", "split", "selection", "retrieval_k")
        assert {k: py[k] for k in settings} == {k: cli[k] for k in settings}, train
    assert json.loads((tmp_path / "py-all.history.json").read_text())["batch_size"] < \
        json.loads((tmp_path / "py-fc.history.json").read_text())["batch_size"], "smaller batches for the whole network"


def test_a_gain_on_few_validation_images_or_with_a_lower_map_comes_with_a_caution(capsys):
    """Reproduces: "kNN@10 0.579 -> 0.737, mAP 0.580 -> 0.572" on 19 validation images (3 images) was reported as any
    gain is, and on pictures the fine-tune never saw it was none. Ctrl-C before any better epoch was told to "try
    more images per class"."""
    from commands.fine_tune import _print_summary

    def summary(val_images: int, before: tuple, after: tuple, stopped: str = "completed", improved: bool = True) -> dict:
        return {"weights": "t.pt", "history": "t.history.json", "plots": [], "stopped": stopped, "best_epoch": 3,
                "best_val_accuracy": 0.5, "epochs_run": 5, "classes": ["a", "b"], "train_images": 200,
                "val_images": val_images, "cache_seconds": 1.0, "seconds": 10.0, "skipped": [], "unlabelled": 0,
                "train": "fc", "batch_size": 32, "patience": 5,
                "retrieval": {"k": 10, "improved": improved, "before": dict(zip(("knn_accuracy", "map"), before)),
                              "after": dict(zip(("knn_accuracy", "map"), after))}}

    _print_summary(summary(19, (0.579, 0.580), (0.737, 0.572)))
    said = capsys.readouterr().out
    assert "note: measured on 19 validation images, where kNN@10 found 3 more right and mAP fell (0.580 -> 0.572)" in said
    _print_summary(summary(114, (0.640, 0.553), (0.860, 0.793)))
    assert "note:" not in capsys.readouterr().out, "a gain on 114 images with mAP up too needs no caution"
    _print_summary(summary(114, (0.640, 0.553), (0.640, 0.553), stopped="interrupted", improved=False))
    said = capsys.readouterr().out
    assert "NOT IMPROVED before it was stopped" in said and "more images per class" not in said
    assert "run it again with --overwrite" in said   # (without it, the rerun is refused: --out exists)


def test_an_index_folder_or_a_folder_without_class_folders_is_named_as_such(sample_index, tmp_path):
    """It said "found no labelled images" for both, as if the folder were empty."""
    result = CliRunner().invoke(main, [str(sample_index.index_dir), "--out", str(tmp_path / "t.pt"), "--weights", "random"])
    assert result.exit_code == 2 and "it is an index folder: give the folder of pictures it indexed" in result.output
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list((sample_index.data_dir / "red_circles").iterdir())[:3]:
        (flat / f.name).write_bytes(f.read_bytes())
    result = CliRunner().invoke(main, [str(flat), "--out", str(tmp_path / "t.pt"), "--weights", "random"])
    assert result.exit_code == 2 and "(3 image(s) directly in it, outside any class folder)" in result.output


@pytest.mark.slow
def test_an_index_that_follows_its_moved_weights_keeps_their_training_images(tuned, tmp_path):
    """Reproduces (a review): repointing an index at its weights file moved elsewhere, without the history beside it,
    read the history again at the new place, found none, and forgot which images the weights were trained on."""
    import shutil

    from retrieval.quality import evaluate

    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    moved.mkdir()
    shutil.copy(tuned["out"], first / "tuned.pt")
    shutil.copy(tuned["root"] / "tuned.history.json", first / "tuned.history.json")
    build_index(tuned["data"], tmp_path / "index", weights=str(first / "tuned.pt"))
    before = evaluate(tmp_path / "index", ks=(1,), probe=False)
    assert before.training_images == "excluded" and before.excluded_training_images > 0
    (first / "tuned.pt").rename(moved / "tuned.pt")   # the weights alone: the history stays behind
    report = build_index(tuned["data"], tmp_path / "index", weights=str(moved / "tuned.pt"))
    assert any("the weights file moved" in r for r in report.repairs)
    after = evaluate(tmp_path / "index", ks=(1,), probe=False)
    assert (after.training_images, after.excluded_training_images) == ("excluded", before.excluded_training_images)


def test_fine_tune_from_python_names_a_missing_folder_and_the_ways_past_offline_weights(tmp_path, offline_hub):
    """Reproduces (Python API review): fine_tune of a folder that is not there said "found no labelled images", and
    offline ImageNet weights raised without the ways forward that the command and index_folder give."""
    from retrieval.features.weights import WeightsUnavailable

    (tmp_path / "notes.txt").write_text("not a folder")
    for missing, says in (("nodata", "does not exist"), ("notes.txt", "is not a folder")):
        with pytest.raises(FineTuneError, match=f"{missing} {says}: data_dir is the folder of class folders"):
            fine_tune(FineTuneConfig(data_dir=tmp_path / missing, out=tmp_path / "t.pt", weights="random"))
    make_colour_collection(tmp_path / "data", per_class=3)
    with pytest.raises(WeightsUnavailable) as caught:
        fine_tune(FineTuneConfig(data_dir=tmp_path / "data", out=tmp_path / "t.pt", device="cpu"))   # imagenet
    assert "Ways forward:" in str(caught.value) and 'weights="random"' in str(caught.value)
    assert str(offline_hub) in str(caught.value) and not (tmp_path / "t.pt").exists()
