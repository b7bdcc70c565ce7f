"""Fine-tuning a backbone on the labelled folders: the settings, the training loop, the sanity check, checkpoints.

The checkpoint kept is the epoch whose fc7 features retrieve best: the validation images' kNN@RETRIEVAL_K accuracy
(then mAP) searched against the training images, L2-normalised as index-images stores them. The starting weights
are epoch 0 and are written first, so a run that does not improve on them keeps them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import io
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from retrieval.features.backbones import MODELS, load_state_dict, preprocessing_for, random_state_dict, resolve_device
from retrieval.features.digests import file_sha256, files_sha256
from retrieval.files import atomic_write
from retrieval.images.decode import DEFAULT_MAX_PIXELS, Preprocessing
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES
from retrieval.learning.classifier import Classifier
from retrieval.learning.finetune_data import (FineTuneError, Report, Samples, batch_input, centre_input, labelled_files,
                                              prepare_samples, stratified_split)
from retrieval.learning.history import HISTORY_VERSION, history_path_for, out_taken, write_filters, write_history
from retrieval.learning.metrics import query_scores
from retrieval.learning.objectives import OBJECTIVES, PROXY_LR_SCALE, Objective
from retrieval.names import DEFAULT_FINE_TUNE_OBJECTIVE

log = logging.getLogger(__name__)

TRAIN_MODES = ("head", "fc", "all")        # what is trained: the new head; fc6, fc7 and the head; everything
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}       # chosen by measurement (benchmarks/sweep_finetune.py)
DEFAULT_OBJECTIVE = DEFAULT_FINE_TUNE_OBJECTIVE
RETRIEVAL_K = 10                           # kNN@k of the validation images among the training images (the API's k)
SELECTION = f"val kNN@{RETRIEVAL_K} accuracy, then val mAP (validation images searched among the training images)"
SANITY_PER_CLASS = 2                       # --sanity: images per class in the subset to overfit
SANITY_MAX_IMAGES = 20
SANITY_MAX_STEPS = 300
SANITY_TARGET_LOSS = 0.05


@dataclasses.dataclass
class FineTuneConfig:
    data_dir: Path                 # labelled folders: data_dir/<class>/<image>
    out: Path                      # the weights file; <stem>.history.json is written next to it
    model: str = "alexnet"         # "alexnet" | "vgg16"
    weights: str = "imagenet"      # "imagenet" | "random" | a state dict file: where training starts
    seed: int = 0                  # split, head initialisation, augmentation, batch order, and --weights random
    train: str = "fc"              # "head" | "fc" | "all" (see TRAIN_MODES)
    objective: str = DEFAULT_OBJECTIVE   # see retrieval.learning.objectives.OBJECTIVES
    val_fraction: float = 0.2      # share of each class held out for validation
    epochs: int = 20               # at most this many passes over the training images
    lr: float | None = None        # None: DEFAULT_LR[optimizer]
    optimizer: str = "adamw"       # "adamw" | "sgd" (with momentum)
    momentum: float = 0.9          # SGD only
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"    # "cosine" (to 0 over `epochs`) | "step" (x0.1 every third of the epochs)
    patience: int = 5              # stop after this many epochs without better validation retrieval (kNN, then mAP)
    batch_size: int = 32           # training images per step
    cache_batch_size: int = 32     # images per forward pass when caching the convolutional output
    cache_views: int = 4           # augmented views cached per training image (head, fc)
    dropout: float | None = 0.0    # dropout before fc6 and fc7 while training; None: the network's own (0.5)
    sanity: bool = False           # also overfit a tiny subset with regularisation off
    keep_head: bool = False        # save the new classification head as the last layer too
    device: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    progress: bool = False         # tqdm bars (caching, and one per epoch)
    overwrite: bool = False        # replace out when it exists (an index made with it then no longer answers)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.out = Path(self.out).expanduser().resolve()
        if self.weights not in ("imagenet", "random"):
            self.weights = str(Path(self.weights).expanduser().resolve())
        if self.model not in MODELS:
            raise FineTuneError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        for name, value, allowed in (("train", self.train, TRAIN_MODES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES), ("objective", self.objective, OBJECTIVES)):
            if value not in allowed:
                raise FineTuneError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise FineTuneError(f"dropout must be in [0, 1), not {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FineTuneError(f"the validation share must be between 0 and 1, not {self.val_fraction}")
        for name in ("epochs", "batch_size", "cache_batch_size", "cache_views", "patience"):
            if getattr(self, name) < 1:
                raise FineTuneError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]

    @property
    def history_path(self) -> Path:
        return history_path_for(self.out)


@dataclasses.dataclass
class FineTuneResult:
    history: dict                  # what <stem>.history.json holds
    history_path: Path
    weights_path: Path | None      # None when no epoch finished (nothing was saved)
    skipped: dict[str, str]        # relative path -> reason: files left out (unreadable, refused)
    unlabelled: int                # images outside class folders, left out
    cache_seconds: float = 0.0     # decoding and (head, fc) the convolutional cache

    @property
    def stopped(self) -> str:
        return self.history["stopped"]


def fine_tune(cfg: FineTuneConfig, report: Report | None = None) -> FineTuneResult:
    """Train cfg.model on cfg.data_dir's classes; write cfg.out (best checkpoint) and its history; -> the result.

    A KeyboardInterrupt during training stops it: the best checkpoint so far stays, the history says
    "interrupted", and the result is returned (an interrupt before the first epoch ends propagates).
    Raises FineTuneError (data or settings; cfg.out exists and not cfg.overwrite), WeightsUnavailable (weights),
    DeviceUnavailable.
    """
    report = report or (lambda _event, _facts: None)
    if not cfg.overwrite and (taken := out_taken(cfg.out)) is not None:
        raise FineTuneError(f"{taken}; choose another out, or pass overwrite=True to replace it")
    started = time.perf_counter()
    data = labelled_files(cfg.data_dir, max_file_bytes=cfg.max_file_bytes)
    device = resolve_device(cfg.device)
    if cfg.weights == "random":
        state = random_state_dict(cfg.model, cfg.seed)
    else:
        state, _identity = load_state_dict(cfg.model, cfg.weights, None)
    prep = preprocessing_for(cfg.model)
    net = Classifier(cfg.model, state, len(data.classes), cfg.seed, cfg.dropout).to(device)
    del state
    # the content hash of each image (as the catalog keeps it): byte-identical copies stay on one side of the split,
    # and an index made with these weights knows which images they were trained on
    hashes = files_sha256(cfg.data_dir, [f.path for f in data.files])
    train_idx, val_idx = stratified_split(data.codes, cfg.val_fraction, cfg.seed, groups=hashes)
    if len(val_idx) == 0:
        raise FineTuneError("no class has two images, so nothing is left to validate on; add images")
    unvalidated = sorted(set(data.classes) - {data.classes[data.codes[i]] for i in val_idx})
    if unvalidated:   # trained on, never checked: a class of one image (or of one file's copies)
        report("unvalidated", {"classes": unvalidated})
    gen = torch.Generator().manual_seed(cfg.seed)
    skipped = dict(data.refused)
    for path, reason in data.refused.items():
        report("skipped", {"path": path, "reason": reason})
    t0 = time.perf_counter()
    train_set, bad = prepare_samples(net, data, train_idx, prep, cfg, gen, device, train=True, report=report)
    skipped.update(bad)
    val_set, bad = prepare_samples(net, data, val_idx, prep, cfg, gen, device, train=False, report=report)
    skipped.update(bad)
    cache_seconds = time.perf_counter() - t0
    if len(train_set) == 0 or len(val_set) == 0:
        raise FineTuneError(f"no readable {'training' if len(train_set) == 0 else 'validation'} images left "
                            f"({len(skipped)} file(s) skipped)")
    kept = lambda idx: [i for i in idx if data.files[i].path not in skipped]  # noqa: E731
    split = {"train": [data.files[i].path for i in kept(train_idx)], "val": [data.files[i].path for i in kept(val_idx)]}
    split_sha256 = {"train": [hashes[i] for i in kept(train_idx)], "val": [hashes[i] for i in kept(val_idx)]}

    chance = math.log(len(data.classes))
    net.set_trainable(cfg.train)
    initial = _evaluate(net, train_set, cfg, prep, device, all_views=True)[0]
    report("initial", {"initial_loss": initial, "chance_loss": chance, "cache_seconds": cache_seconds})
    sanity = _sanity(net, train_set, cfg, prep, device, gen, report) if cfg.sanity else None

    history = {
        "version": HISTORY_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(cfg.data_dir), "model": cfg.model, "weights": cfg.weights,
        "weights_seed": cfg.seed if cfg.weights == "random" else None, "train": cfg.train,
        "head": "kept" if cfg.keep_head else "dropped", "objective": cfg.objective,
        "dropout": float(net.dropout), "optimizer": cfg.optimizer, "lr": float(cfg.lr),
        "lr_schedule": cfg.lr_schedule, "weight_decay": float(cfg.weight_decay),
        "momentum": float(cfg.momentum) if cfg.optimizer == "sgd" else None, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "patience": cfg.patience, "val_fraction": float(cfg.val_fraction),
        "seed": cfg.seed, "classes": data.classes,
        "split": split, "split_sha256": split_sha256,
        "initial_loss": float(initial), "chance_loss": chance, "sanity": sanity,
        "selection": SELECTION, "retrieval_k": 0, "initial_retrieval": None, "best_retrieval": None,
        "improved": False, "epochs_run": [], "best_epoch": 0, "best_val_accuracy": 0.0, "stopped": "completed",
        "seconds": 0.0,
    }
    filters_before = net.net.features[0].weight.detach().cpu().numpy().copy() if cfg.train == "all" else None
    weights_path = train_epochs(net, train_set, val_set, cfg, prep, device, gen, history, report)
    history["seconds"] = time.perf_counter() - started
    history["weights_sha256"] = file_sha256(weights_path) if weights_path is not None else None   # whose split this is
    if filters_before is not None and weights_path is not None:   # "after": the saved (best) epoch's filters
        after = torch.load(weights_path, map_location="cpu", weights_only=True)["features.0.weight"].numpy()
        write_filters(cfg.history_path, filters_before, after)
    if weights_path is not None or history["stopped"] != "interrupted":
        write_history(cfg.history_path, history)
    return FineTuneResult(history, cfg.history_path, weights_path, skipped, data.unlabelled, cache_seconds)


@torch.no_grad()
def _evaluate(net: Classifier, samples: Samples, cfg: FineTuneConfig, prep: Preprocessing, device: torch.device,
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


def _sanity(net: Classifier, train_set: Samples, cfg: FineTuneConfig, prep: Preprocessing, device: torch.device,
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
        _, head_acc = _evaluate(net, val_set, cfg, prep, device)
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
            val_loss, val_acc = _evaluate(net, val_set, cfg, prep, device)
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

