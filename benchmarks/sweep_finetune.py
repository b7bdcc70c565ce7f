"""How fine-tune's defaults were chosen: objectives and settings swept on one pair of real-photo crop sets.

The training folder (crop_collection, --train-seed) and the test folder (--test-seed) are cut from the same 19 real
photos with different seeds. The convolutions are frozen (--train fc), so their output is computed once per run
(the same cache fine_tune builds: random views of each training image, centre crops) and every setting trains on
it with retrieval.learning.epochs.train_epochs, the loop fine_tune runs, keeping the epoch it keeps (the best
validation kNN@10). Each line: the validation kNN@10 of the kept epoch, and the test images' kNN@10 and mAP
searched among the training folder's images (fc7, L2-normalised) with that epoch's network, against epoch 0 (the
starting weights). Test numbers never choose anything. Saves JSON under benchmarks/results/.

This is for choosing settings; bench_finetune_quality.py measures the chosen defaults, end to end, on other seeds.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=25, help="crops per photo in each of the two folders")
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--test-seed", type=int, default=2)
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--objectives", default="ce,ce+proxy-anchor,proxy-anchor,ce+norm-softmax,ce+supcon,ce+triplet")
    parser.add_argument("--optimizers", default="adamw")
    parser.add_argument("--lrs", default="1e-3")
    parser.add_argument("--dropouts", default="0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-views", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/sweep_finetune-*.json)")
    args = parser.parse_args()

    import numpy as np
    import torch

    import retrieval.learning.epochs as epochs_module
    import retrieval.learning.finetune as ft
    from real_photos import crop_collection
    from retrieval.features.backbones import preprocessing_for, random_state_dict
    from retrieval.learning.classifier import Classifier
    from retrieval.learning.finetune_data import labelled_files, prepare_samples, stratified_split
    from retrieval.learning.metrics import query_scores

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sweep-finetune-") as tmp:
        tmp = Path(tmp)
        crop_collection(tmp / "train", args.per_class, args.train_seed)
        crop_collection(tmp / "test", args.per_class, args.test_seed)
        base_cfg = ft.FineTuneConfig(data_dir=tmp / "train", out=tmp / "unused.pt", weights="random",
                                     seed=args.weights_seed, cache_views=args.cache_views, device="cpu",
                                     batch_size=args.batch_size)
        device = torch.device("cpu")
        prep = preprocessing_for("alexnet")
        state = random_state_dict("alexnet", args.weights_seed)
        data = labelled_files(base_cfg.data_dir)
        test = labelled_files(tmp / "test")
        assert data.classes == test.classes
        net = Classifier("alexnet", state, len(data.classes), args.weights_seed, 0.0)
        train_idx, val_idx = stratified_split(data.codes, base_cfg.val_fraction, base_cfg.seed)
        gen = torch.Generator().manual_seed(base_cfg.seed)
        t0 = time.perf_counter()
        noop = lambda *_: None  # noqa: E731
        train_set, _ = prepare_samples(net, data, train_idx, prep, base_cfg, gen, device, train=True, report=noop)
        val_set, _ = prepare_samples(net, data, val_idx, prep, base_cfg, gen, device, train=False, report=noop)
        test_set, _ = prepare_samples(net, test, np.arange(len(test.files)), prep, base_cfg, gen, device, train=False,
                                      report=noop)
        print(f"cached {len(train_set)} train ({args.cache_views} views + centre), {len(val_set)} val, "
              f"{len(test_set)} test images in {time.perf_counter() - t0:.0f} s", flush=True)
        # the folder's images as the index holds them: training and validation centre crops
        folder_conv = torch.cat([train_set.centre, val_set.features[:, 0]]).float()
        folder_codes = torch.cat([train_set.codes, val_set.codes]).numpy()
        test_conv = test_set.features[:, 0].float()

        @torch.no_grad()
        def test_scores(model: Classifier) -> dict:
            model.eval()
            emb = lambda x: torch.nn.functional.normalize(model.to_fc7(x), dim=1).numpy()  # noqa: E731
            return query_scores(emb(test_conv), test_set.codes.numpy(), emb(folder_conv), folder_codes, 10)

        start = test_scores(net)
        print(f"epoch 0 (random fc7): test kNN@10 {start['knn_accuracy']:.3f}  mAP {start['map']:.3f}", flush=True)
        rows = []
        for objective, optimizer, lr, dropout in itertools.product(
                args.objectives.split(","), args.optimizers.split(","), map(float, args.lrs.split(",")),
                map(float, args.dropouts.split(","))):
            cfg = copy.copy(base_cfg)
            cfg.objective, cfg.optimizer, cfg.lr, cfg.dropout = objective, optimizer, lr, dropout
            cfg.epochs, cfg.patience = args.epochs, args.patience
            model = Classifier("alexnet", state, len(data.classes), args.weights_seed, dropout)
            kept: dict = {}
            per_epoch: list = []

            def keep(_state, cfg_, _history, model=model, kept=kept):   # instead of writing 233 MB (and a history):
                kept["fc"] = copy.deepcopy(model.fc.state_dict())        # the fc layers in memory
                return Path(cfg_.out)

            def report(event, facts, model=model, per_epoch=per_epoch):
                if event == "epoch":
                    per_epoch.append({"epoch": facts["epoch"], "val_knn": facts["val_knn_accuracy"],
                                      "val_acc": facts["val_accuracy"], "test": test_scores(model)["knn_accuracy"]})

            epochs_module.save_checkpoint = keep
            history = {"classes": data.classes, "epochs_run": [], "stopped": "completed"}
            t1 = time.perf_counter()
            epochs_module.train_epochs(model, train_set, val_set, cfg, prep, device,
                                       torch.Generator().manual_seed(cfg.seed), history, report)
            seconds = time.perf_counter() - t1
            model.fc.load_state_dict(kept["fc"])
            scores = test_scores(model)
            by_acc = max(per_epoch, key=lambda e: e["val_acc"])   # what the old selection (val accuracy) kept
            row = {"objective": objective, "optimizer": optimizer, "lr": lr, "dropout": dropout,
                   "best_epoch": history["best_epoch"], "val_knn": history["best_retrieval"]["knn_accuracy"],
                   "test_knn": scores["knn_accuracy"], "test_map": scores["map"], "seconds": seconds,
                   "test_by_val_accuracy": by_acc["test"], "per_epoch": per_epoch}
            rows.append(row)
            print(f"{objective:<18}{optimizer:<6} lr {lr:<7g} dropout {dropout:<4g} best epoch {row['best_epoch']:>2}  "
                  f"val kNN {row['val_knn']:.3f}  test kNN {row['test_knn']:.3f} (mAP {row['test_map']:.3f})  "
                  f"[old selection: {row['test_by_val_accuracy']:.3f}]  per epoch test "
                  f"{' '.join('%.2f' % e['test'] for e in per_epoch)}  {seconds:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"sweep_finetune-{int(time.time())}.json"
    out.write_text(json.dumps({"settings": vars(args), "start": start, "rows": rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
