"""Measure: how much scoring a fine-tuned index on its own training images flatters it (issue 19).

Generates the colour collection (retrieval.samples.make_colour_collection: 3 classes, a shape or texture in the
class's colour on a random background), fine-tunes AlexNet on it from seeded random weights, indexes the whole
folder with the tuned weights and with the random ones, and evaluates the pair with evaluate-index --compare's
code twice: on the held-out images only (the default) and with the training images included (what
evaluate-index reported before). Several seeds (the collection, the split and the weights); prints a table of
medians and saves JSON under benchmarks/results/.
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

# the recipe the fine-tune tests use from random weights (a random network's features are tiny: AdamW, no dropout)
RANDOM_START = {"optimizer": "adamw", "lr": 1e-3, "dropout": 0.0}


def one_run(folder: Path, seed: int, per_class: int, epochs: int, recipe: str) -> dict:
    from indexer import index_folder
    from retrieval.learning.evaluation import compare_indexes
    from retrieval.learning.finetune import FineTuneConfig, fine_tune
    from retrieval.samples import make_colour_collection

    data = folder / "data"
    make_colour_collection(data, per_class=per_class, seed=seed)
    options = RANDOM_START if recipe == "advice" else {}
    started = time.process_time()
    tuned = fine_tune(FineTuneConfig(data_dir=data, out=folder / "tuned.pt", weights="random", seed=seed,
                                     epochs=epochs, device="cpu", **options))
    cpu_seconds = time.process_time() - started
    index_folder(data, folder / "index-random", weights="random", seed=seed)
    index_folder(data, folder / "index-tuned", weights=tuned.weights_path)
    row = {"seed": seed, "train_images": len(tuned.history["split"]["train"]),
           "val_images": len(tuned.history["split"]["val"]), "fine_tune_cpu_seconds": round(cpu_seconds, 1)}
    for name, include in (("held_out", False), ("with_training", True)):
        c = compare_indexes(folder / "index-random", folder / "index-tuned", [1, 10],
                            include_training_images=include)
        row[name] = {"evaluated_images": c["a"]["evaluated_images"],
                     **{f"{side}_{measure}": round(value, 4) for side in ("a", "b") for measure, value in (
                         ("knn10", c[side]["knn"]["accuracy"]["10"]), ("map", c[side]["retrieval"]["map"]),
                         ("p1", c[side]["retrieval"]["precision_at_k"]["1"]))}}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipe", choices=("defaults", "advice"), default="advice",
                        help="fine-tune's defaults, or AdamW lr 1e-3 without dropout (the tests' recipe from random)")
    args = parser.parse_args()

    rows = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_run(Path(tmp), seed, args.per_class, args.epochs, args.recipe))
        print(f"seed {seed}: {json.dumps(rows[-1])}", flush=True)

    def median(part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in rows)

    print(f"\n{args.seeds} seeds, 3 classes x {args.per_class} images, fine-tune --weights random ({args.recipe}), "
          f"{args.epochs} epochs; medians. A: random weights, B: tuned.")
    print(f"{'evaluated on':<28}{'images':>7}{'kNN@10 A':>10}{'kNN@10 B':>10}{'mAP A':>8}{'mAP B':>8}{'B-A mAP':>9}")
    for part, label in (("held_out", "held-out images (default)"), ("with_training", "training images included")):
        a, b = median(part, "a_map"), median(part, "b_map")
        print(f"{label:<28}{median(part, 'evaluated_images'):>7.0f}{median(part, 'a_knn10'):>10.3f}"
              f"{median(part, 'b_knn10'):>10.3f}{a:>8.3f}{b:>8.3f}{statistics.median(r[part]['b_map'] - r[part]['a_map'] for r in rows):>+9.3f}")
    import torch
    hardware = {"machine": platform.machine(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"held_out_flattery_{args.recipe}.json"
    out.write_text(json.dumps({"args": vars(args), "hardware": hardware, "runs": rows}, indent=1))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
