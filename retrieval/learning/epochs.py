"""The training loop of fine-tune: epoch 0 (the starting weights) then the epochs, each validated by retrieval, the
best kept as a checkpoint with the history naming it; the optimiser, the schedule, the sanity check's overfit.

The checkpoint kept is the epoch whose fc7 features retrieve best: the validation images' kNN@RETRIEVAL_K accuracy
(then mAP) searched against the training images, L2-normalised as index-images stores them.
"""
from __future__ import annotations

import copy
import hashlib
import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from retrieval.files import atomic_write
from retrieval.images.decode import Preprocessing
from retrieval.learning.classifier import Classifier
from retrieval.learning.finetune_data import Report, Samples, batch_input, centre_input
from retrieval.learning.history import write_history
from retrieval.learning.metrics import query_scores
from retrieval.learning.objectives import PROXY_LR_SCALE, Objective

if TYPE_CHECKING:
    from retrieval.learning.finetune import FineTuneConfig

RETRIEVAL_K = 10                           # kNN@k of the validation images among the training images (the API's k)
SANITY_PER_CLASS = 2                       # --sanity: images per class in the subset to overfit
SANITY_MAX_IMAGES = 20
SANITY_MAX_STEPS = 300
SANITY_TARGET_LOSS = 0.05


@torch.no_grad()
def evaluate_head(net: Classifier, samples: Samples, cfg: FineTuneConfig, prep: Preprocessing, device: torch.device,
              *, all_views: bool = False) -> tuple[float, float]:
    """-> (mean cross-entropy, accuracy) at inference (no dropout); every cached view when all_views, else view 0
    (the centre crop for validation; images are centre-cropped)."""
    was_training = net.training
    net.eval()
    views = samples.features.shape[1] if (all_views and samples.features is not None) else 1
    loss = correct = count = 0.0
    for v in range(views):
        for start in range(0, len(samples), cfg.batch_size):
            rows = torch.arange(start, min(len(samples), start + cfg.batch_size))
            x = batch_input(samples, rows, prep, device, None, view=torch.full((len(rows),), v))
            out = net.logits(x)
            y = samples.codes[rows].to(device)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(rows)
    net.train(was_training)
    return loss / count, correct / count


def _optimizer(params: list, cfg: FineTuneConfig, weight_decay: float) -> torch.optim.Optimizer:
    """params: parameters, or parameter groups (dicts with "params" and their own settings)."""
    # fused: one kernel over all parameters (CPU and CUDA); the step over AlexNet's 58M fc parameters on 2 cores
    # takes a fraction of the per-tensor loop's time
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in tensors) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay, **fused)


def sanity_check(net: Classifier, train_set: Samples, cfg: FineTuneConfig, prep: Preprocessing, device: torch.device,
            gen: torch.Generator, report: Report) -> dict:
    """Overfit a copy of the network on a tiny subset (SANITY_PER_CLASS images per class, at most SANITY_MAX_IMAGES),
    one fixed view each, weight decay and dropout off, full batches, up to SANITY_MAX_STEPS steps."""
    codes = train_set.codes
    rows = []
    for c in torch.unique(codes).tolist():
        rows += torch.nonzero(codes == c).flatten()[:SANITY_PER_CLASS].tolist()
    rows = torch.tensor(rows[:SANITY_MAX_IMAGES])
    probe = copy.deepcopy(net)
    params = probe.set_trainable(cfg.train)
    probe.eval()                                       # dropout off
    opt = _optimizer(params, cfg, weight_decay=0.0)
    x = batch_input(train_set, rows, prep, device, None, view=torch.zeros(len(rows), dtype=torch.int64))
    y = codes[rows].to(device)
    loss = float("inf")
    steps = 0
    while steps < SANITY_MAX_STEPS and loss >= SANITY_TARGET_LOSS:
        opt.zero_grad(set_to_none=True)
        out = nn.functional.cross_entropy(probe.logits(x), y)
        loss = float(out.detach())
        if loss < SANITY_TARGET_LOSS:
            break
        out.backward()
        opt.step()
        steps += 1
    del probe, opt
    result = {"subset_size": len(rows), "steps": steps, "final_train_loss": loss, "passed": loss < SANITY_TARGET_LOSS}
    report("sanity", result)
    return result


def _schedule(opt: torch.optim.Optimizer, cfg: FineTuneConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, math.ceil(cfg.epochs / 3)), gamma=0.1)


@torch.no_grad()
def retrieval_scores(net: Classifier, train_set: Samples, val_set: Samples, cfg: FineTuneConfig, prep: Preprocessing,
                     device: torch.device) -> dict:
    """Held-out retrieval with the network as it is: each validation image's centre-crop fc7, L2-normalised as
    index-images stores it, searched among the training images' (exact L2). -> metrics.query_scores' dict."""
    was_training = net.training
    net.eval()

    def fc7(samples: Samples) -> torch.Tensor:
        out = []
        for start in range(0, len(samples), cfg.cache_batch_size):
            rows = torch.arange(start, min(len(samples), start + cfg.cache_batch_size))
            out.append(nn.functional.normalize(net.fc7_and_logits(centre_input(samples, rows, prep, device))[0], dim=1)
                       .float().cpu())                                        # (b, 4096), unit rows
        return torch.cat(out)

    base, queries = fc7(train_set), fc7(val_set)
    net.train(was_training)
    k = min(RETRIEVAL_K, len(train_set))
    findable = torch.isin(val_set.codes, train_set.codes)     # a class whose training images were all unreadable: none
    if not bool(findable.any()):
        return {"knn_accuracy": 0.0, "map": 0.0, "k": k, "queries": 0}
    return query_scores(queries[findable].numpy(), val_set.codes[findable].numpy(), base.numpy(),
                        train_set.codes.numpy(), k)


def _two_views(samples: Samples, rows: torch.Tensor, prep: Preprocessing, device: torch.device,
               gen: torch.Generator) -> torch.Tensor:
    """Two different random views of each image of rows, stacked: the first len(rows) rows, then the second."""
    if samples.features is None:
        return torch.cat([batch_input(samples, rows, prep, device, gen), batch_input(samples, rows, prep, device, gen)])
    views = samples.features.shape[1]
    first = torch.randint(0, views, (len(rows),), generator=gen)
    second = (first + torch.randint(1, views, (len(rows),), generator=gen)) % views if views > 1 else first
    return torch.cat([batch_input(samples, rows, prep, device, None, view=first),
                      batch_input(samples, rows, prep, device, None, view=second)])


def _better(scores: dict, than: dict | None) -> bool:
    """Retrieval order: higher kNN accuracy, then higher mAP (SELECTION)."""
    return than is None or (scores["knn_accuracy"], scores["map"]) > (than["knn_accuracy"], than["map"])


def train_epochs(net: Classifier, train_set: Samples, val_set: Samples, cfg: FineTuneConfig, prep: Preprocessing,
                 device: torch.device, gen: torch.Generator, history: dict, report: Report) -> Path | None:
    """Epoch 0 (the starting weights: scored and written), then the epochs: train, validate, keep the best by
    retrieval, stop early. Fills history; -> the weights file, or None when even epoch 0 could not be written."""
    from tqdm import tqdm

    params = net.set_trainable(cfg.train)
    objective = Objective(cfg.objective, len(history["classes"]), net.head.in_features, cfg.seed).to(device)
    groups = [{"params": params}]
    if objective.proxies is not None:
        groups.append({"params": [objective.proxies], "lr": cfg.lr * PROXY_LR_SCALE, "weight_decay": 0.0})
    opt = _optimizer(groups, cfg, cfg.weight_decay)
    schedule = _schedule(opt, cfg)
    saved: Path | None = None
    since_best = 0
    try:
        before = retrieval_scores(net, train_set, val_set, cfg, prep, device)
        _, head_acc = evaluate_head(net, val_set, cfg, prep, device)
        best = {"knn_accuracy": before["knn_accuracy"], "map": before["map"]}
        history.update(retrieval_k=before["k"], initial_retrieval=dict(best), best_retrieval=dict(best))
        report("before", {**before, "val_images": len(val_set), "train_images": len(train_set)})
        history["best_epoch"], history["best_val_accuracy"] = 0, head_acc
        saved = save_checkpoint(net.backbone_state(cfg.keep_head), cfg, history)
        report("saved", {"epoch": 0, "path": str(saved), **best})
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            net.train_mode(cfg.train)
            order = torch.randperm(len(train_set), generator=gen)
            loss_sum = ce_sum = correct = seen = 0.0
            bar = tqdm(total=len(order), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True,
                       disable=not cfg.progress, leave=False)
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start:start + cfg.batch_size]
                if objective.views_per_image == 2:
                    x = _two_views(train_set, rows, prep, device, gen)
                    y = train_set.codes[rows].repeat(2).to(device)
                else:
                    x = batch_input(train_set, rows, prep, device, gen)
                    y = train_set.codes[rows].to(device)
                fc7, logits = net.fc7_and_logits(x)
                head_only = None if objective.cross_entropy else net.after_fc7(fc7.detach())
                loss = objective(fc7, logits, y, head_only)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                shown = logits if head_only is None else head_only
                loss_sum += float(loss.detach()) * len(y)
                ce_sum += float(nn.functional.cross_entropy(shown.detach(), y)) * len(y)
                correct += float((shown.argmax(1) == y).sum())
                seen += len(y)
                bar.update(len(rows))
                # what the step minimises: the epoch line's "train loss" is the head's cross-entropy, its sum "objective"
                bar.set_postfix({"loss" if cfg.objective == "ce" else "objective": f"{float(loss.detach()):.3f}"})
            bar.close()
            schedule.step()
            val_loss, val_acc = evaluate_head(net, val_set, cfg, prep, device)
            scores = retrieval_scores(net, train_set, val_set, cfg, prep, device)
            row = {"epoch": epoch, "train_loss": ce_sum / seen, "train_accuracy": correct / seen,
                   "train_objective_loss": loss_sum / seen, "val_loss": val_loss, "val_accuracy": val_acc,
                   "val_knn_accuracy": scores["knn_accuracy"], "val_map": scores["map"], "lr": float(lr),
                   "seconds": time.perf_counter() - t0}
            history["epochs_run"].append(row)
            report("epoch", row)
            if _better(scores, best):
                best = {"knn_accuracy": scores["knn_accuracy"], "map": scores["map"]}
                history.update(best_epoch=epoch, best_val_accuracy=val_acc, best_retrieval=dict(best), improved=True)
                saved = save_checkpoint(net.backbone_state(cfg.keep_head), cfg, history)
                report("saved", {"epoch": epoch, "path": str(saved), **best})
                since_best = 0
            else:
                since_best += 1
                if since_best >= cfg.patience and epoch < cfg.epochs:
                    history["stopped"] = "early_stopping"
                    break
    except KeyboardInterrupt:
        history["stopped"] = "interrupted"
        if saved is None:
            raise
    return saved


def save_checkpoint(state: dict[str, torch.Tensor], cfg: FineTuneConfig, history: dict) -> Path:
    """Write a checkpoint to cfg.out and the history as it stands, marked "unfinished" (the run's end writes it
    again), so that a run killed by a hang-up, a crash or the OOM killer leaves weights whose training images are
    known: an index made with them keeps scoring held-out images only. The history goes first, already naming the
    new weights among the run's checkpoints (hashed in memory): killed in between, the file still holds an earlier
    checkpoint, which it names too. -> cfg.out."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    digest = hashlib.sha256(buffer.getbuffer()).hexdigest()
    history["checkpoints_sha256"] = [*history.get("checkpoints_sha256", []), digest]   # the first: epoch 0's
    write_history(cfg.history_path, {**history, "stopped": "unfinished", "weights_sha256": digest})
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(cfg.out, buffer.getbuffer())

