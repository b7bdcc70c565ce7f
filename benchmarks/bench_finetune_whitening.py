"""Benchmark: does the index's whitening keep what fine-tuning gained? Held-out real photos, the product's own path.

A review found that an index of fine-tuned weights searched with the default whitening (PCAW64 at 380 images) gave
back most of what the fine-tune had won: mAP +0.07 whitened against +0.23 without (one set, the tuning seeds). Here,
for each run, as a user does it: fine-tune (default options, --weights random --seed S) on a training folder of crops
of the real photos; index a test folder of other crops (images the fine-tune never saw) four ways, with
index_folder: the starting random weights and the tuned weights, each whitened (--whiten) and not (--no-whiten); then
evaluate-index each (leave-one-out on the test folder: precision@10, kNN@10, mAP). Runs use the held-out seeds of
bench_finetune_quality.py (train 11 + 2i, test 12 + 2i, weights i + 1), never the seeds the defaults were chosen on.
Prints a table and the medians, saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_finetune import save_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = [("random", True), ("random", False), ("tuned", True), ("tuned", False)]
METRICS = ("precision@10", "knn@10", "map")


def one_run(i: int, per_class: int) -> dict:
    import retrieval
    from indexer import index_folder
    from real_photos import crop_collection
    from retrieval.learning.finetune import FineTuneConfig, fine_tune
    from retrieval.vectors.index_types import IndexTypeConfig

    train_seed, test_seed, weights_seed = 11 + 2 * i, 12 + 2 * i, i + 1
    row: dict = {"train_seed": train_seed, "test_seed": test_seed, "weights_seed": weights_seed}
    with tempfile.TemporaryDirectory(prefix="bench-ftw-") as tmp_name:
        tmp = Path(tmp_name)
        crop_collection(tmp / "train", per_class, train_seed)
        crop_collection(tmp / "test", per_class, test_seed)
        started = time.perf_counter()
        result = fine_tune(FineTuneConfig(data_dir=tmp / "train", out=tmp / "tuned.pt", weights="random",
                                          seed=weights_seed, device="cpu"))
        row["fine_tune_s"] = round(time.perf_counter() - started, 1)
        row["kept_epoch"] = result.history["best_epoch"]
        for weights, whiten in SETTINGS:
            name = f"{weights} {'whitened' if whiten else 'raw'}"
            index_dir = tmp / name.replace(" ", "-")
            report = index_folder(tmp / "test", index_dir, seed=weights_seed,
                                  weights="random" if weights == "random" else str(result.weights_path),
                                  vector_index=IndexTypeConfig(whiten=whiten))
            evaluation = retrieval.evaluate(index_dir, ks=(10,), probe=False)
            row[name] = {"precision@10": evaluation.precision_at_k[10], "knn@10": evaluation.knn_accuracy[10],
                         "map": evaluation.map, "factory": report.vector_index["factory"],
                         "evaluated": evaluation.images, "training_images": evaluation.training_images}
            print(f"run {i + 1} {name:<16} {report.vector_index['factory']:<20} P@10 {evaluation.precision_at_k[10]:.3f} "
                  f"kNN@10 {evaluation.knn_accuracy[10]:.3f} mAP {evaluation.map:.3f} ({evaluation.images} images)",
                  flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=20, help="crops per photo in each folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from retrieval.system import available_cores

    runs = [one_run(i, args.per_class) for i in range(args.runs)]
    names = [f"{w} {'whitened' if wh else 'raw'}" for w, wh in SETTINGS]
    median = {n: {m: statistics.median(r[n][m] for r in runs) for m in METRICS} for n in names}
    print(f"\nAlexNet fc7, fine-tuned from random weights with fine-tune's defaults on {args.per_class} crops per photo "
          f"(19 photos); evaluated on a test folder of other crops, leave-one-out; {available_cores()} cores, "
          f"torch {torch.__version__}; medians of {args.runs} runs")
    print(f"{'index':<18}" + "".join(f"{m:>14}" for m in METRICS) + "   per run mAP")
    for n in names:
        print(f"{n:<18}" + "".join(f"{median[n][m]:>14.3f}" for m in METRICS)
              + "   " + " ".join("%.3f" % r[n]["map"] for r in runs))
    for whiten in ("whitened", "raw"):
        gain = {m: statistics.median(r[f"tuned {whiten}"][m] - r[f"random {whiten}"][m] for r in runs) for m in METRICS}
        median[f"gain {whiten}"] = gain
        print(f"{'gain, ' + whiten:<18}" + "".join(f"{gain[m]:>+14.3f}" for m in METRICS))
    save_results(Path(args.out) if args.out else RESULTS / "finetune_whitening.json", args, median, runs)


if __name__ == "__main__":
    main()
