"""The `evaluate-index` command: the readable report, --json, and clear exits for indexes it cannot evaluate."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from indexer.evaluate_cli import confusion_lines, format_report, main
from indexer.samples import make_sample_collection
from retrieval.evaluation import evaluate_vectors


def run(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(main, list(args))


def test_report_on_the_sample_index(sample_index):
    result = run("--index-dir", str(sample_index.index_dir))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("30 labelled images in 5 classes", "precision@1", "precision@5", "precision@10", "mAP",
                 "k=10 accuracy", "linear probe", "test accuracy", "chance", "per class",
                 "confusion matrix, kNN k=10", "confusion matrix, linear probe"):
        assert text in out, text
    for name in ("red_circles", "blue_squares", "green_stripes", "orange_triangles", "purple_checks"):
        assert out.count(name) == 3    # per-class table and both confusion matrices
    assert out.isascii()


def test_json_and_k_list(sample_index):
    result = run("--index-dir", str(sample_index.index_dir), "-k", "3,1", "--seed", "7", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["ks"] == [1, 3] and set(r["retrieval"]["precision_at_k"]) == {"1", "3"}
    assert r["linear_probe"]["seed"] == 7 and r["index"]["model"] == "alexnet"
    assert r["retrieval"]["precision_at_k"]["1"] > r["chance"]["retrieval_precision"]
    assert sum(map(sum, r["knn"]["confusion"])) == 30


def test_missing_index_exits_2(tmp_path):
    result = run("--index-dir", str(tmp_path / "none"))
    assert result.exit_code == 2 and "run index-images first" in result.output and "Traceback" not in result.output


def test_bad_k_exits_2(sample_index):
    for bad in ("0", "a,b", ","):
        result = run("--index-dir", str(sample_index.index_dir), "-k", bad)
        assert result.exit_code == 2 and "-k" in result.output


def test_unevaluable_indexes_exit_2_with_a_message(tmp_path, index_images):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(64, 48), seed=0, classes=["red_circles"])
    Image.new("RGB", (64, 48), (10, 200, 10)).save(data / "loose.png")
    index_images(data, tmp_path / "index")
    result = run("--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 2 and "at least two classes" in result.output and "'red_circles'" in result.output

    (data / "blue_squares").mkdir()
    Image.new("RGB", (64, 48), (10, 10, 200)).save(data / "blue_squares" / "one.png")
    index_images(data, tmp_path / "index")
    result = run("--index-dir", str(tmp_path / "index"))
    assert result.exit_code == 2 and "single image: 'blue_squares'" in result.output
    assert "Traceback" not in result.output


def test_many_classes_leave_the_matrix_to_json():
    rng = np.random.default_rng(0)
    labels = [f"class{i:02d}" for i in range(21) for _ in range(2)]
    r = evaluate_vectors(rng.normal(size=(42, 4)).astype(np.float32), labels, [1], probe=False)
    r["index"] = {"dir": "x", "model": "alexnet", "layer": "fc7", "weights": "random", "dim": 4, "normalize": True}
    text = format_report(r)
    assert "confusion matrices left out for 21 classes" in text and "probe" not in text.split("per class")[0]


def test_confusion_lines_are_plain_ascii():
    lines = confusion_lines(["cats", "dogs", "a_long_label"], [[10, 2, 0], [0, 12, 0], [1, 0, 100]])
    assert lines[0].split() == ["1", "2", "3"]
    assert lines[1].split() == ["1", "cats", "10", "2", "."]
    assert lines[3].split() == ["3", "a_long_label", "1", ".", "100"]
    assert len({len(line) for line in lines}) == 1 and all(line.isascii() for line in lines)
