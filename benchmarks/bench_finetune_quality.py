"""Benchmark: does fine-tune, with its default options, make the index retrieve better? Held-out real photos, CPU.

Each run cuts two folders from the 19 real photos of benchmarks/real_photos.py (a photo is a class, random crops
are its images): a training folder and a test folder, drawn with different seeds. For each network, both folders'
images go through it exactly as index-images takes them (decode, centre crop, fc7, L2-normalised), and every test
image searches the training folder's images (exact L2): kNN@10 accuracy (the majority vote of its 10 nearest,
metrics.vote_labels) and mAP. The networks, all AlexNet:
  random        seeded random weights (--weights random --seed RUN), the starting point of the two below
  old defaults  fine-tune --weights random with the options that were the defaults before (--objective ce,
                --optimizer sgd --lr 0.01 --dropout 0.5 --epochs 10 --patience 3), on the training folder
  defaults      fine-tune --weights random with today's default options, on the training folder
with the wall and CPU time each fine-tune took (process CPU time, all threads). Prints a table, the medians over
the runs, and saves JSON under benchmarks/results/. The default settings were chosen with sweep_finetune.py on
the crop seeds 1 (train) and 2 (test) and weights seed 0; the runs here use other seeds (--runs N: train seed
11 + 2i, test seed 12 + 2i, weights seed i + 1), so nothing measured here was tuned on.
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
OLD_DEFAULTS = {"objective": "ce", "optimizer": "sgd", "lr": 0.01, "dropout": 0.5, "epochs": 10, "patience": 3}
K = 10


def one_run(i: int, args: argparse.Namespace) -> dict:
    """Run i: its two folders, the random network and the fine-tunes, each scored on the test folder."""
    import numpy as np
    import torch

    if args.jobs > 1:
        torch.set_num_threads(1)         # runs side by side: one core each, not two threads fighting for one

    from real_photos import crop_collection
    from retrieval.features.backbones import FeatureExtractor, preprocessing_for, random_state_dict
    from retrieval.images.decode import decode_for_model
    from retrieval.learning.finetune import FineTuneConfig, fine_tune
    from retrieval.learning.finetune_data import labelled_files
    from retrieval.learning.metrics import query_scores

    def pixels_of(folder: Path, prep) -> tuple[np.ndarray, np.ndarray, list[str]]:  # noqa: ANN001
        data = labelled_files(folder)
        crops = np.stack([decode_for_model(folder / f.path, prep).pixels for f in data.files])   # (n, 3, 224, 224)
        return crops, data.codes, data.classes

    @torch.no_grad()
    def fc7(state: dict, crops: np.ndarray, conv_cache: dict) -> np.ndarray:
        """index-images' fc7 of the crops, L2-normalised. The convolutions' output is computed once per folder and
        set of convolution weights (--train fc leaves them as they started; checked by their bytes)."""
        ex = FeatureExtractor("alexnet", "fc7", state, torch.device("cpu"), "fp32")   # fine-tune trains in fp32; auto
        # may choose a bf16 network, whose layers the float input below cannot go through
        conv, fc = ex.net[:3], ex.net[3:]                       # features, avgpool, flatten | fc6 .. fc7's ReLU
        key = (id(crops), hash(tuple(float(state[k].double().sum()) for k in state if k.startswith("features."))))
        if key not in conv_cache:
            conv_cache[key] = torch.cat([conv(ex.preprocessing.normalise(torch.from_numpy(crops[i:i + 64])))
                                         for i in range(0, len(crops), 64)])              # (n, 9216)
        v = fc(conv_cache[key]).numpy()                                                   # (n, 4096)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)   # as indexed

    def score(state: dict, train, test, conv_cache: dict) -> dict:  # noqa: ANN001
        return query_scores(fc7(state, test[0], conv_cache), test[1], fc7(state, train[0], conv_cache), train[1], K)

    train_seed, test_seed, weights_seed = 11 + 2 * i, 12 + 2 * i, i + 1
    with tempfile.TemporaryDirectory(prefix="bench-ftq-") as tmp_name:
        tmp = Path(tmp_name)
        crop_collection(tmp / "train", args.per_class, train_seed)
        crop_collection(tmp / "test", args.per_class, test_seed)
        prep = preprocessing_for("alexnet")
        train, test = pixels_of(tmp / "train", prep), pixels_of(tmp / "test", prep)
        assert train[2] == test[2]
        row = {"train_seed": train_seed, "test_seed": test_seed, "weights_seed": weights_seed,
               "train_images": len(train[1]), "test_images": len(test[1]), "classes": len(train[2])}
        conv_cache: dict = {}
        row["random"] = score(random_state_dict("alexnet", weights_seed), train, test, conv_cache)
        print(f"run {i + 1}: random fc7: test kNN@{K} {row['random']['knn_accuracy']:.3f} "
              f"mAP {row['random']['map']:.3f}", flush=True)
        variants = {"defaults": {}} if args.skip_old else {"defaults": {}, "old defaults": OLD_DEFAULTS}   # defaults first
        for name, options in variants.items():
            cfg = FineTuneConfig(data_dir=tmp / "train", out=tmp / f"{name}.pt", weights="random",
                                 seed=weights_seed, device="cpu", **options)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fine_tune(cfg)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            h = result.history
            state = torch.load(result.weights_path, map_location="cpu", weights_only=True)
            row[name] = {**score(state, train, test, conv_cache), "wall_s": wall, "cpu_s": cpu,
                         "best_epoch": h["best_epoch"],
                         "epochs_run": len(h["epochs_run"]), "val_before": h["initial_retrieval"],
                         "val_after": h["best_retrieval"], "settings": {k: h[k] for k in (
                             "objective", "optimizer", "lr", "dropout", "epochs", "train", "batch_size")}}
            print(f"run {i + 1}: {name}: test kNN@{K} {row[name]['knn_accuracy']:.3f} mAP {row[name]['map']:.3f} "
                  f"(kept epoch {h['best_epoch']} of {len(h['epochs_run'])}; validation kNN "
                  f"{h['initial_retrieval']['knn_accuracy']:.3f} -> {h['best_retrieval']['knn_accuracy']:.3f}), "
                  f"{wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--first-run", type=int, default=0, help="run numbers first..first+runs-1 (their seeds: see "
                                                                 "above); a later first run gives sets never measured")
    parser.add_argument("--per-class", type=int, default=20, help="crops per photo in each folder")
    parser.add_argument("--skip-old", action="store_true", help="leave out the old defaults (half the time)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (CPU time is "
                                                              "per process; wall time then includes waiting for cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from retrieval.system import available_cores

    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(one_run, range(args.first_run, args.first_run + args.runs), [args] * args.runs))
    else:
        runs = [one_run(i, args) for i in range(args.first_run, args.first_run + args.runs)]

    names = ["random"] + (["defaults"] if args.skip_old else ["old defaults", "defaults"])
    median = {n: {m: statistics.median(r[n][m] for r in runs) for m in ("knn_accuracy", "map")} for n in names}
    for n in names[1:]:
        median[n].update({m: statistics.median(r[n][m] for r in runs) for m in ("wall_s", "cpu_s")})
        median[n]["knn_gain"] = statistics.median(r[n]["knn_accuracy"] - r["random"]["knn_accuracy"] for r in runs)
        median[n]["runs_worse_than_random"] = sum(r[n]["knn_accuracy"] < r["random"]["knn_accuracy"] for r in runs)
    first = runs[0]
    print(f"\nAlexNet from random weights, {first['classes']} real photos as classes, {first['train_images']} training "
          f"/ {first['test_images']} test crops a run (different seeds); test images searched among the training "
          f"images, fc7 L2-normalised; {available_cores()} cores, torch {torch.__version__}; medians of {args.runs} runs")
    print(f"{'network':<14}{'kNN@10':>8}{'mAP':>8}{'kNN gain':>10}{'worse runs':>12}{'wall s':>8}{'CPU s':>8}   per run kNN@10")
    for n in names:
        m = median[n]
        extra = (f"{m['knn_gain']:>+10.3f}{m['runs_worse_than_random']:>9}/{args.runs:<2}{m['wall_s']:>8.0f}"
                 f"{m['cpu_s']:>8.0f}" if n != "random" else f"{'':>10}{'':>12}{'':>8}{'':>8}")
        print(f"{n:<14}{m['knn_accuracy']:>8.3f}{m['map']:>8.3f}{extra}   "
              f"{' '.join('%.3f' % r[n]['knn_accuracy'] for r in runs)}")
    save_results(Path(args.out) if args.out else RESULTS / "finetune_quality.json", args, median, runs,
                 old_defaults=OLD_DEFAULTS)


if __name__ == "__main__":
    main()
