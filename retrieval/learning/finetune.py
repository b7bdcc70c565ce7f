"""Fine-tuning a backbone on the labelled folders: split, cached convolutional features, training, checks, checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrieval.features.backbones import MODELS, load_backbone, load_state_dict, preprocessing_for, random_state_dict, resolve_device
from retrieval.images.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessing, decode_for_model, open_rgb
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES, ImageFile, scan_folder

log = logging.getLogger(__name__)

TRAIN_MODES = ("head", "fc", "all")        # what is trained: the new head; fc6, fc7 and the head; everything
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step")
DEFAULT_LR = {"sgd": 0.01, "adamw": 3e-4}
CROP_SCALE = (0.35, 1.0)                   # random resized crop: share of the image's area kept
CROP_RATIO = (3 / 4, 4 / 3)                # and its aspect ratio range (torchvision's default)
SANITY_PER_CLASS = 2                       # --sanity: images per class in the subset to overfit
SANITY_MAX_IMAGES = 20
SANITY_MAX_STEPS = 300
SANITY_TARGET_LOSS = 0.05
HISTORY_VERSION = 1


class FineTuneError(ValueError):
    """A data folder or setting fine-tuning cannot use; the message says why, in the library's terms."""


@dataclasses.dataclass
class FineTuneConfig:
    data_dir: Path                 # labelled folders: data_dir/<class>/<image>
    out: Path                      # the weights file; <stem>.history.json is written next to it
    model: str = "alexnet"         # "alexnet" | "vgg16"
    weights: str = "imagenet"      # "imagenet" | "random" | a state dict file: where training starts
    seed: int = 0                  # split, head initialisation, augmentation, batch order, and --weights random
    train: str = "fc"              # "head" | "fc" | "all" (see TRAIN_MODES)
    val_fraction: float = 0.2      # share of each class held out for validation
    epochs: int = 10               # at most this many passes over the training images
    lr: float | None = None        # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"         # "sgd" (with momentum) | "adamw"
    momentum: float = 0.9          # SGD only
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"    # "cosine" (to 0 over `epochs`) | "step" (x0.1 every third of the epochs)
    patience: int = 3              # stop after this many epochs without a better validation accuracy
    batch_size: int = 32           # training images per step
    cache_batch_size: int = 32     # images per forward pass when caching the convolutional output
    cache_views: int = 4           # augmented views cached per training image (head, fc)
    dropout: float | None = None   # dropout before fc6 and fc7 while training; None: the network's own (0.5)
    sanity: bool = False           # also overfit a tiny subset with regularisation off
    keep_head: bool = False        # save the new classification head as the last layer too
    device: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    progress: bool = False         # tqdm bars (caching, and one per epoch)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.out = Path(self.out).expanduser().resolve()
        if self.weights not in ("imagenet", "random"):
            self.weights = str(Path(self.weights).expanduser().resolve())
        if self.model not in MODELS:
            raise FineTuneError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        for name, value, allowed in (("train", self.train, TRAIN_MODES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value not in allowed:
                raise FineTuneError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise FineTuneError(f"dropout must be in [0, 1), not {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FineTuneError(f"the validation share must be between 0 and 1, not {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.cache_batch_size < 1 or self.cache_views < 1 or self.patience < 1:
            raise FineTuneError("epochs, batch sizes, cache views and patience must each be at least 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]

    @property
    def history_path(self) -> Path:
        return history_path_for(self.out)


def history_path_for(weights_file: Path) -> Path:
    """tuned.pt -> tuned.history.json (next to it)."""
    weights_file = Path(weights_file)
    return weights_file.with_name(weights_file.stem + ".history.json")


def filters_path_for(weights_file: Path) -> Path:
    weights_file = Path(weights_file)
    return weights_file.with_name(weights_file.stem + ".filters.npz")


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


# --- the data --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelledFiles:
    files: list[ImageFile]         # labelled images, sorted by path
    codes: np.ndarray              # shape=(n,), int64: class index of each file
    classes: list[str]             # class names, sorted; code c is classes[c]
    refused: dict[str, str]        # files the scan refused (path -> reason)
    unlabelled: int


def labelled_files(data_dir: Path, *, max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> LabelledFiles:
    """The images of data_dir labelled by their first folder level (as index-images labels them).

    Raises FineTuneError with fewer than two classes.
    """
    scan = scan_folder(data_dir, max_file_bytes=max_file_bytes)
    files = [f for f in scan.images if f.label is not None]
    classes = sorted({f.label for f in files})
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no labelled images"
        raise FineTuneError(f"fine-tuning needs labelled images of at least two classes in {data_dir} "
                            f"(one subfolder per class: {data_dir}/<class>/<image>); found {found}")
    position = {name: c for c, name in enumerate(classes)}
    refused = {path: reason for path, reason in scan.skipped.items() if "/" in path}
    return LabelledFiles(files, np.array([position[f.label] for f in files], dtype=np.int64), classes, refused,
                         len(scan.images) - len(files))


def stratified_split(codes: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val), class by class (seeded).

    codes: shape=(n,) int class index. Each class with n_c >= 2 images puts round(val_fraction x n_c),
    clamped to 1..n_c - 1, in val; a class with a single image is training only. Both sorted.
    """
    assert 0.0 < val_fraction < 1.0, f"val_fraction must be in (0, 1), not {val_fraction}"
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        rng.shuffle(members)
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def load_for_training(path: Path, prep: Preprocessing, max_pixels: int | None) -> Image.Image:
    """A file -> upright RGB with its shorter side at prep.resize_size (JPEG draft decode). Raises ImageDecodeError."""
    img = open_rgb(path, min_side=prep.resize_size, max_pixels=max_pixels)
    size = prep.resized_size(*img.size)
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def random_view(img: Image.Image, crop_size: int, gen: torch.Generator) -> np.ndarray:
    """Random resized crop (CROP_SCALE of the area, CROP_RATIO aspect) and a coin-flip horizontal flip.

    -> uint8, shape=(3, crop_size, crop_size)."""
    w, h = img.size
    area = w * h
    for _ in range(10):        # torchvision's RandomResizedCrop sampling, on our generator
        target = area * float(torch.empty(1).uniform_(*CROP_SCALE, generator=gen))
        log_ratio = torch.log(torch.tensor(CROP_RATIO))
        ratio = math.exp(float(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=gen)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            break
    else:                      # fall back to the centre square
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    view = img.resize((crop_size, crop_size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if bool(torch.rand(1, generator=gen) < 0.5):
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(view, dtype=np.uint8).transpose(2, 0, 1))   # (3, c, c)


# --- the network -----------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A torchvision backbone with a new last layer for the collection's classes, in two parts.

    conv: features -> avgpool -> flatten, (B, 3, 224, 224) float -> (B, 9216) AlexNet or (B, 25088) VGG16.
    fc: the rest of the classifier (fc6, fc7 and their ReLUs and dropouts) and the new head, -> (B, C) logits.
    `net` is the torchvision module itself (its state dict has torchvision's key names).
    """

    def __init__(self, model: str, state_dict: dict[str, torch.Tensor], num_classes: int, seed: int,
                 dropout: float | None = None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MODELS[model].build(weights=None)
            load_backbone(net, model, state_dict)
            old = net.classifier[-1]
            head = nn.Linear(old.in_features, num_classes)
            nn.init.normal_(head.weight, 0.0, 0.01)   # small logits: the initial loss starts at chance, ln(C)
            nn.init.zeros_(head.bias)
        net.classifier[-1] = head
        for layer in net.classifier:
            if isinstance(layer, nn.Dropout) and dropout is not None:
                layer.p = dropout
        self.net, self.model = net, model
        self.conv = nn.Sequential(net.features, net.avgpool, nn.Flatten(1))
        self.fc = net.classifier

    @property
    def head(self) -> nn.Linear:
        return self.net.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))                       # (B, 3, 224, 224) -> (B, D) -> (B, C)

    def set_trainable(self, mode: str) -> list[nn.Parameter]:
        """requires_grad for the layers `mode` trains, off for the others; -> the trained parameters."""
        self.requires_grad_(mode == "all")
        if mode == "head":
            self.head.requires_grad_(True)
        elif mode == "fc":
            self.fc.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def train_mode(self, mode: str) -> None:
        """Dropout on where layers train (the frozen fc layers of `head` run as at inference)."""
        self.train(mode in ("fc", "all"))
        if mode == "head":
            self.head.train()

    def backbone_state(self, keep_head: bool) -> dict[str, torch.Tensor]:
        """The torchvision state dict on the CPU, without the head ("classifier.6.*") unless keep_head."""
        head = f"classifier.{len(self.net.classifier) - 1}."
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()
                if keep_head or not k.startswith(head)}


# --- training --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Samples:
    """What an epoch draws from: cached convolutional output (head, fc) or decoded images (all)."""
    codes: torch.Tensor                         # shape=(n,) int64
    features: torch.Tensor | None = None        # shape=(n, views, D) float16 (cached modes)
    images: list[Image.Image] | None = None     # shorter side resize_size (all); None for a cached set

    def __len__(self) -> int:
        return len(self.codes)


Report = Callable[[str, dict], None]          # (event, facts): "skipped", "initial", "sanity", "epoch", "saved"


def fine_tune(cfg: FineTuneConfig, report: Report | None = None) -> FineTuneResult:
    """Train cfg.model on cfg.data_dir's classes; write cfg.out (best checkpoint) and its history; -> the result.

    A KeyboardInterrupt during training stops it: the best checkpoint so far stays, the history says
    "interrupted", and the result is returned (an interrupt before the first epoch ends propagates).
    Raises FineTuneError (data or settings), WeightsUnavailable (weights), DeviceUnavailable.
    """
    report = report or (lambda _event, _facts: None)
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
    train_idx, val_idx = stratified_split(data.codes, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise FineTuneError("no class has two images, so nothing is left to validate on; add images")
    gen = torch.Generator().manual_seed(cfg.seed)
    skipped = dict(data.refused)
    for path, reason in data.refused.items():
        report("skipped", {"path": path, "reason": reason})
    cached = cfg.train != "all"
    t0 = time.perf_counter()
    train_set, bad = _prepare(net, data, train_idx, prep, cfg, gen, device, train=True, report=report)
    skipped.update(bad)
    val_set, bad = _prepare(net, data, val_idx, prep, cfg, gen, device, train=False, report=report)
    skipped.update(bad)
    cache_seconds = time.perf_counter() - t0
    if len(train_set) == 0 or len(val_set) == 0:
        raise FineTuneError(f"no readable {'training' if len(train_set) == 0 else 'validation'} images left "
                            f"({len(skipped)} file(s) skipped)")
    rel = lambda idx, ok: [data.files[i].path for i in idx if data.files[i].path not in ok]  # noqa: E731

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
        "head": "kept" if cfg.keep_head else "dropped", "optimizer": cfg.optimizer, "lr": float(cfg.lr),
        "lr_schedule": cfg.lr_schedule, "weight_decay": float(cfg.weight_decay),
        "momentum": float(cfg.momentum) if cfg.optimizer == "sgd" else None, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "patience": cfg.patience, "val_fraction": float(cfg.val_fraction),
        "seed": cfg.seed, "classes": data.classes,
        "split": {"train": rel(train_idx, skipped), "val": rel(val_idx, skipped)},
        "initial_loss": float(initial), "chance_loss": chance, "sanity": sanity,
        "epochs_run": [], "best_epoch": 0, "best_val_accuracy": 0.0, "stopped": "completed", "seconds": 0.0,
    }
    filters_before = net.net.features[0].weight.detach().cpu().numpy().copy() if cfg.train == "all" else None
    weights_path = _train(net, train_set, val_set, cfg, prep, device, gen, history, report)
    history["seconds"] = time.perf_counter() - started
    if filters_before is not None and weights_path is not None:   # "after": the saved (best) epoch's filters
        after = torch.load(weights_path, map_location="cpu", weights_only=True)["features.0.weight"].numpy()
        _atomic(filters_path_for(cfg.out), lambda tmp: np.savez(tmp, before=filters_before.astype(np.float32),
                                                                  after=after.astype(np.float32)))
    if weights_path is not None or history["stopped"] != "interrupted":
        write_history(cfg.history_path, history)
    return FineTuneResult(history, cfg.history_path, weights_path, skipped, data.unlabelled, cache_seconds)


def _prepare(net: Classifier, data: LabelledFiles, idx: np.ndarray, prep: Preprocessing, cfg: FineTuneConfig,
             gen: torch.Generator, device: torch.device, *, train: bool, report: Report) -> tuple[Samples, dict[str, str]]:
    """Decode the files at idx (bad ones skipped with their reason); for cached modes, run the convolutions once
    per view (cfg.cache_views random views of a training image, the centre crop of a validation image)."""
    from tqdm import tqdm

    cached = cfg.train != "all"
    views = cfg.cache_views if train else 1
    skipped: dict[str, str] = {}
    codes, feats, images = [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            feats.append(_conv(net, np.stack(pending), prep, device))     # (b, D) float16
            pending.clear()

    bar = tqdm(total=len(idx), unit="img", desc=f"{'caching' if cached else 'decoding'} {'train' if train else 'val'}",
               dynamic_ncols=True, disable=not cfg.progress, leave=False)
    for i in idx:
        f = data.files[i]
        bar.update(1)
        try:
            if train or not cached:
                img = load_for_training(cfg.data_dir / f.path, prep, cfg.max_pixels)
            else:    # exactly index-images' decode and centre crop
                pixels = decode_for_model(cfg.data_dir / f.path, prep, max_pixels=cfg.max_pixels).pixels
        except ImageDecodeError as exc:
            skipped[f.path] = str(exc)
            report("skipped", {"path": f.path, "reason": str(exc)})
            continue
        codes.append(int(data.codes[i]))
        if not cached:
            images.append(img)
            continue
        pending.extend([random_view(img, prep.crop_size, gen) for _ in range(views)] if train else [pixels])
        if len(pending) >= cfg.cache_batch_size:
            flush()
    flush()
    bar.close()
    codes_t = torch.tensor(codes, dtype=torch.int64)
    if not cached:
        return Samples(codes_t, images=images), skipped
    dim = net.fc[1 if cfg.model == "alexnet" else 0].in_features
    features = torch.cat(feats) if feats else torch.zeros(0, dim, dtype=torch.float16)
    return Samples(codes_t, features=features.view(len(codes), views, -1)), skipped


@torch.no_grad()
def _conv(net: Classifier, pixels: np.ndarray, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """uint8 shape=(B, 3, 224, 224) -> the convolutional output, float16 on the CPU, shape=(B, D)."""
    net.conv.eval()
    x = prep.normalise(torch.from_numpy(pixels).to(device))
    return net.conv(x).to("cpu", torch.float16)                               # (B, 3, 224, 224) -> (B, 9216)


def _batch(samples: Samples, rows: torch.Tensor, prep: Preprocessing, device: torch.device,
           gen: torch.Generator | None, view: torch.Tensor | None = None) -> torch.Tensor:
    """Network input for samples[rows]: cached output (one view each: `view`, or drawn) or augmented images."""
    if samples.features is not None:
        if view is None:
            view = torch.randint(0, samples.features.shape[1], (len(rows),), generator=gen)
        return samples.features[rows, view].to(device, torch.float32)         # (b, D)
    crop = prep.crop_size
    pixels = np.stack([random_view(samples.images[r], crop, gen) if gen is not None else prep.crop(samples.images[r])
                       for r in rows.tolist()])
    return prep.normalise(torch.from_numpy(pixels).to(device))                # (b, 3, 224, 224)


def _logits(net: Classifier, x: torch.Tensor) -> torch.Tensor:
    return net.fc(x) if x.ndim == 2 else net(x)


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
            x = _batch(samples, rows, prep, device, None, view=torch.full((len(rows),), v))
            out = _logits(net, x)
            y = samples.codes[rows].to(device)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(rows)
    net.train(was_training)
    return loss / count, correct / count


def _optimizer(params: list[nn.Parameter], cfg: FineTuneConfig, weight_decay: float) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters (CPU and CUDA); the step over AlexNet's 58M fc parameters on 2 cores
    # takes a fraction of the per-tensor loop's time
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in params) else {}
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
    x = _batch(train_set, rows, prep, device, None, view=torch.zeros(len(rows), dtype=torch.int64))
    y = codes[rows].to(device)
    loss = float("inf")
    steps = 0
    while steps < SANITY_MAX_STEPS and loss >= SANITY_TARGET_LOSS:
        opt.zero_grad(set_to_none=True)
        out = nn.functional.cross_entropy(_logits(probe, x), y)
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


def _train(net: Classifier, train_set: Samples, val_set: Samples, cfg: FineTuneConfig, prep: Preprocessing,
           device: torch.device, gen: torch.Generator, history: dict, report: Report) -> Path | None:
    """The epochs: train, validate, checkpoint the best, stop early. Fills history; -> the weights file or None."""
    from tqdm import tqdm

    params = net.set_trainable(cfg.train)
    opt = _optimizer(params, cfg, cfg.weight_decay)
    schedule = _schedule(opt, cfg)
    best = (-1.0, math.inf)                  # (val accuracy, val loss): a tie in accuracy goes to the lower loss
    saved: Path | None = None
    since_best = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            net.train_mode(cfg.train)
            order = torch.randperm(len(train_set), generator=gen)
            loss_sum = correct = 0.0
            bar = tqdm(total=len(order), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True,
                       disable=not cfg.progress, leave=False)
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start:start + cfg.batch_size]
                x = _batch(train_set, rows, prep, device, gen)
                y = train_set.codes[rows].to(device)
                out = _logits(net, x)
                loss = nn.functional.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(rows)
                correct += float((out.argmax(1) == y).sum())
                bar.update(len(rows))
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            bar.close()
            schedule.step()
            val_loss, val_acc = _evaluate(net, val_set, cfg, prep, device)
            row = {"epoch": epoch, "train_loss": loss_sum / len(order), "train_accuracy": correct / len(order),
                   "val_loss": val_loss, "val_accuracy": val_acc, "lr": float(lr),
                   "seconds": time.perf_counter() - t0}
            history["epochs_run"].append(row)
            report("epoch", row)
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best = (val_acc, val_loss)
                saved = save_weights(net.backbone_state(cfg.keep_head), cfg.out)
                history["best_epoch"], history["best_val_accuracy"] = epoch, val_acc   # once the file holds it
                report("saved", {"epoch": epoch, "path": str(saved), "val_accuracy": val_acc})
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


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    """torch.save a plain dict of tensors atomically (a temporary file, then os.replace)."""
    _atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def write_history(path: Path, history: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(history, indent=1)))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if not tmp.exists() and tmp.with_name(tmp.name + ".npz").exists():   # np.savez appends .npz
            tmp.with_name(tmp.name + ".npz").rename(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
