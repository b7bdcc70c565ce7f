"""Realistic fine-tuning history files (the fine-tune contract's fields) for the tests of what reads and draws them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def make_history(data_dir: Path, classes: list[str], *, per_class: int = 6, epochs: int = 6, best_epoch: int = 4,
                 stopped: str = "early_stopping", train: str = "fc", sanity: bool = True,
                 retrieval: bool = False) -> dict:
    """A history as fine-tune writes it: the loss starts near ln(C) and falls, accuracies rise, then validation flattens.

    retrieval: also the retrieval fields fine-tune writes since it keeps the best-retrieving epoch (validation kNN@10
    0.5 before training, rising to 0.5 + 0.05 x epoch until best_epoch, then falling; best_epoch 0: never better)."""
    c = len(classes)
    val_per_class = max(1, per_class // 4)
    split = {"train": [f"{name}/{name}_{i:03d}.jpg" for name in classes for i in range(val_per_class, per_class)],
             "val": [f"{name}/{name}_{i:03d}.jpg" for name in classes for i in range(val_per_class)]}
    rows = []
    for e in range(1, epochs + 1):
        t = min(e, best_epoch)
        rows.append({"epoch": e, "train_loss": math.log(c) * 0.55 ** e, "train_accuracy": min(1.0, 1 / c + 0.2 * e),
                     "val_loss": math.log(c) * (0.6 ** t) + 0.02 * max(0, e - best_epoch),
                     "val_accuracy": min(0.95, 1 / c + 0.15 * t) - 0.01 * max(0, e - best_epoch),
                     "lr": 0.01 * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)), "seconds": 3.0 + 0.1 * e})
    history = {
        "version": 1, "created_at": "2026-11-29T19:30:00Z", "data_dir": str(Path(data_dir).resolve()),
        "model": "alexnet", "weights": "random", "weights_seed": 0, "train": train, "head": "dropped",
        "optimizer": "sgd", "lr": 0.01, "lr_schedule": "cosine", "weight_decay": 5e-4, "momentum": 0.9,
        "epochs": 10, "batch_size": 32, "patience": 2, "val_fraction": 0.25, "seed": 0, "classes": list(classes),
        "split": split, "initial_loss": math.log(c) * 1.03, "chance_loss": math.log(c),
        "sanity": {"subset_size": 10, "steps": 100, "final_train_loss": 0.012, "passed": True} if sanity else None,
        "epochs_run": rows, "best_epoch": best_epoch, "best_val_accuracy": rows[best_epoch - 1]["val_accuracy"],
        "stopped": stopped, "seconds": sum(r["seconds"] for r in rows) + 4.0,
    }
    if retrieval:
        for r in rows:
            e = r["epoch"]
            r.update(train_objective_loss=2 * r["train_loss"], val_knn_accuracy=0.5 + 0.05 * min(e, best_epoch)
                     - (0.02 * e if best_epoch == 0 else 0.01 * max(0, e - best_epoch)), val_map=0.4 + 0.04 * min(e, best_epoch))
        kept = rows[best_epoch - 1] if best_epoch else None
        before = {"knn_accuracy": 0.5, "map": 0.4}
        history.update(objective="ce+proxy-anchor", dropout=0.0, selection="val kNN@10 accuracy, then val mAP",
                       retrieval_k=10, initial_retrieval=before, improved=best_epoch > 0,
                       best_retrieval={"knn_accuracy": kept["val_knn_accuracy"], "map": kept["val_map"]} if kept else before)
        if not best_epoch:
            history["best_val_accuracy"] = 1 / c
    return history


def write_history(path: Path, history: dict, *, filters: bool = False, seed: int = 0) -> Path:
    """Write history as <stem>.history.json (json.dump, as fine-tune does); with filters, <stem>.filters.npz too
    (64 AlexNet-shaped 11x11 first-layer filters, 'after' a small move from 'before')."""
    path.write_text(json.dumps(history, indent=1))
    if filters:
        rng = np.random.default_rng(seed)
        before = rng.normal(0, 0.05, (64, 3, 11, 11)).astype(np.float32)
        after = (before + rng.normal(0, 0.01, before.shape)).astype(np.float32)
        np.savez(path.with_name(path.name.replace(".history.json", ".filters.npz")), before=before, after=after)
    return path
