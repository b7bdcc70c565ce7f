"""Fine-tuning a backbone on the labelled folders: the settings, the data and its split, the history; the training
loop itself is retrieval.learning.epochs.

The checkpoint kept is the epoch whose fc7 features retrieve best (epochs.RETRIEVAL_K, SELECTION). The starting
weights are epoch 0 and are written first, so a run that does not improve on them keeps them.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from pathlib import Path

import torch

from retrieval.features.backbones import MODELS, load_state_dict, preprocessing_for, random_state_dict, resolve_device
from retrieval.features.weights import WeightsUnavailable, weights_error_message
from retrieval.features.digests import file_sha256, files_sha256
from retrieval.images.decode import DEFAULT_MAX_PIXELS
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES
from retrieval.learning.classifier import Classifier
from retrieval.learning.epochs import RETRIEVAL_K, evaluate_head, sanity_check, train_epochs
from retrieval.learning.finetune_data import FineTuneError, Report, labelled_files, prepare_samples, stratified_split
from retrieval.learning.history import HISTORY_VERSION, history_path_for, out_taken, write_filters, write_history
from retrieval.learning.objectives import OBJECTIVES
from retrieval.system import display_name
from retrieval.names import AUTO_TRAIN_BATCH_CAP, DEFAULT_FINE_TUNE_OBJECTIVE, MODEL_PARAMETERS

log = logging.getLogger(__name__)

TRAIN_MODES = ("head", "fc", "all")        # what is trained: the new head; fc6, fc7 and the head; everything
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}       # chosen by measurement (benchmarks/sweep_finetune.py)
DEFAULT_OBJECTIVE = DEFAULT_FINE_TUNE_OBJECTIVE
SELECTION = f"val kNN@{RETRIEVAL_K} accuracy, then val mAP (validation images searched among the training images)"


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
    batch_size: int | str = "auto"         # training images per step; auto: see batch_sizes
    cache_batch_size: int | str = "auto"   # images per forward pass when caching the convolutional output
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
        for name in ("epochs", "batch_size", "cache_batch_size", "cache_views", "patience", "seed"):
            value = getattr(self, name)
            if name in ("batch_size", "cache_batch_size") and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and name != "seed"):
                least = "a whole number" if name == "seed" else "a whole number of at least 1"
                auto = ' or "auto"' if "batch" in name else ""
                raise FineTuneError(f"{name} must be {least}{auto}, not {value!r}")
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


def batch_sizes(requested: int | str, model: str, train: str, device: torch.device) -> tuple[int, int]:
    """-> (training batch, convolution-cache batch): requested for both, or for "auto" the inference batch
    retrieval.features.batch_size chooses (32 on the CPU) for the cache, and for training the same, a third of it with
    train "all" (gradients and saved activations), at most AUTO_TRAIN_BATCH_CAP."""
    from retrieval.features.batch_size import choose_batch_size, cuda_free_bytes

    if requested != "auto":
        return int(requested), int(requested)
    if device.type == "cuda":
        weight_bytes = MODEL_PARAMETERS[model] * 4 * 4   # weights, grads, 2 moments
        inference = choose_batch_size(model, device, cuda_free_bytes(device), weight_bytes).batch_size
    else:
        inference = choose_batch_size(model, device, None, 0).batch_size
    train_batch = max(1, inference // 3) if train == "all" else inference
    return min(AUTO_TRAIN_BATCH_CAP, train_batch), inference


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
    if not cfg.data_dir.is_dir():   # (it said "found no labelled images" of a folder that is not there)
        raise FineTuneError(f"{display_name(str(cfg.data_dir))} "
                            f"{'is not a folder' if cfg.data_dir.exists() else 'does not exist'}: data_dir is the "
                            "folder of class folders to train on (data_dir/<class>/<image>)")
    data = labelled_files(cfg.data_dir, max_file_bytes=cfg.max_file_bytes)
    device = resolve_device(cfg.device)
    if "auto" in (cfg.batch_size, cfg.cache_batch_size):   # as fine-tune's --batch-size auto chooses them
        train_batch, cache_batch = batch_sizes("auto", cfg.model, cfg.train, device)
        cfg = dataclasses.replace(cfg, batch_size=train_batch if cfg.batch_size == "auto" else cfg.batch_size,
                                  cache_batch_size=cache_batch if cfg.cache_batch_size == "auto" else cfg.cache_batch_size)
    if cfg.weights == "random":
        state = random_state_dict(cfg.model, cfg.seed)
    else:
        try:
            state, _identity = load_state_dict(cfg.model, cfg.weights, None)
        except WeightsUnavailable as exc:
            if not exc.offline_imagenet:
                raise
            # with the ways forward, as index_folder says it (the command said them; Python did not)
            raise WeightsUnavailable(weights_error_message(exc), cache_path=exc.cache_path) from exc
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
    initial = evaluate_head(net, train_set, cfg, prep, device, all_views=True)[0]
    report("initial", {"initial_loss": initial, "chance_loss": chance, "cache_seconds": cache_seconds})
    sanity = sanity_check(net, train_set, cfg, prep, device, gen, report) if cfg.sanity else None

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
