"""Benchmark: a CPU fine-tune of a few hundred images (AlexNet, fc6 + fc7 + head, convolutions cached).

Generates N labelled pictures (retrieval.samples, 4 classes), then runs retrieval.learning.finetune.fine_tune
several times from seeded random weights and times the two halves: decoding plus the convolutional
cache (every training image's --cache-views augmented views and every validation image's centre
crop through the convolutions, once), and the training epochs on the cached output. Prints a table
of medians and saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

from retrieval.system import available_cores  # noqa: E402 - after the path is set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache-views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch

    from retrieval.samples import SAMPLE_CLASSES, make_sample_collection
    from retrieval.learning.finetune import FineTuneConfig, fine_tune

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        data = Path(tmp) / "data"
        make_sample_collection(data, per_class=args.images // args.classes, size=(320, 240), seed=0,
                               classes=list(SAMPLE_CLASSES)[:args.classes])
        for run in range(args.runs):
            cfg = FineTuneConfig(data_dir=data, out=Path(tmp) / "tuned.pt", model="alexnet", weights="random",
                                 train="fc", epochs=args.epochs, patience=args.epochs, optimizer="adamw", lr=5e-4,
                                 dropout=0.0, batch_size=args.batch_size, cache_batch_size=32,
                                 cache_views=args.cache_views, device="cpu", overwrite=True)   # the runs repeat one
            started = time.perf_counter()
            result = fine_tune(cfg)
            total = time.perf_counter() - started
            h = result.history
            training = sum(e["seconds"] for e in h["epochs_run"])
            runs.append({"total_s": total, "cache_s": result.cache_seconds, "training_s": training,
                         "epoch_s": training / len(h["epochs_run"]), "epochs": len(h["epochs_run"]),
                         "train_images": len(h["split"]["train"]), "val_images": len(h["split"]["val"]),
                         "best_val_accuracy": h["best_val_accuracy"]})
            print(f"run {run + 1}: cache {result.cache_seconds:.1f} s, training {training:.1f} s "
                  f"({len(h['epochs_run'])} epochs), total {total:.1f} s, best val acc {h['best_val_accuracy']:.3f}",
                  flush=True)

    median = {key: statistics.median(r[key] for r in runs) for key in ("total_s", "cache_s", "training_s", "epoch_s")}
    first = runs[0]
    print(f"\nAlexNet --train fc, random weights, {first['train_images']} train / {first['val_images']} val images, "
          f"{args.cache_views} cached views per training image, {args.epochs} epochs, batch {args.batch_size}; "
          f"{available_cores()} cores, torch {torch.__version__}; medians of {args.runs} runs")
    print(f"{'step':<34}{'seconds':>10}")
    for key, label in (("cache_s", "decode + convolutional cache"), ("training_s", "training (all epochs)"),
                       ("epoch_s", "one epoch"), ("total_s", "whole fine_tune call")):
        print(f"{label:<34}{median[key]:>10.1f}")
    save_results(RESULTS / "finetune.json", args, median, runs)


def save_results(out: Path, args: argparse.Namespace, median: dict, runs: list, **extra: object) -> None:
    """The fine-tune benchmarks' JSON: the machine, the settings, the medians and every run (and extra)."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cores": available_cores(), "cpu": platform.processor() or platform.machine(),
                                           "torch": torch.__version__},
                               "settings": vars(args), **extra, "median": median, "runs": runs}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
