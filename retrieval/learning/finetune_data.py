"""The data of a fine-tune: labelled files, the stratified split, random views, cached convolutional output, batches."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from retrieval.catalog.db import CATALOG_FILE
from retrieval.images.decode import ImageDecodeError, Preprocessing, decode_for_model, open_rgb
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES, ImageFile, scan_folder
from retrieval.learning.classifier import Classifier
from retrieval.system import display_name

if TYPE_CHECKING:
    from retrieval.learning.finetune import FineTuneConfig

CROP_SCALE = (0.35, 1.0)                   # random resized crop: share of the image's area kept
CROP_RATIO = (3 / 4, 4 / 3)                # and its aspect ratio range (torchvision's default)

Report = Callable[[str, dict], None]          # (event, facts): "skipped", "initial", "sanity", "epoch", "saved"


class FineTuneError(ValueError):
    """A data folder or setting fine-tuning cannot use; the message says why, in the library's terms."""


@dataclasses.dataclass(frozen=True)
class LabelledFiles:
    files: list[ImageFile]         # labelled images, sorted by path
    codes: np.ndarray              # shape=(n,), int64: class index of each file
    classes: list[str]             # class names, sorted; code c is classes[c]
    refused: dict[str, str]        # files the scan refused (path -> reason)
    unlabelled: int


def labelled_files(data_dir: Path, *, max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> LabelledFiles:
    """The images of data_dir labelled by their first folder level (as index-images labels them; an index folder kept
    inside data_dir, its thumbnails, is no class, as it is no images to index-images).

    Raises FineTuneError with fewer than two classes.
    """
    scan = scan_folder(data_dir, max_file_bytes=max_file_bytes, skip_folders_holding=CATALOG_FILE)
    files = [f for f in scan.images if f.label is not None]
    classes = sorted({f.label for f in files})
    if len(classes) < 2:
        found = f"only the class '{display_name(classes[0])}'" if classes else "no labelled images"
        if (data_dir / CATALOG_FILE).exists():
            found += " (it is an index folder: give the folder of pictures it indexed)"
        elif not classes and (loose := len(scan.images) - len(files)):
            found += f" ({loose} image(s) directly in it, outside any class folder)"
        raise FineTuneError(f"fine-tuning needs labelled images of at least two classes in {data_dir} "
                            f"(one subfolder per class: {data_dir}/<class>/<image>); found {found}")
    position = {name: c for c, name in enumerate(classes)}
    refused = {path: reason for path, reason in scan.skipped.items() if "/" in path}
    refused |= {f"{path}/": reason for path, reason in scan.folders.items()}   # folders not looked into, named too
    return LabelledFiles(files, np.array([position[f.label] for f in files], dtype=np.int64), classes, refused,
                         len(scan.images) - len(files))


def stratified_split(codes: np.ndarray, val_fraction: float, seed: int,
                     groups: Sequence[Hashable | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val), class by class (seeded), never splitting a group.

    codes: shape=(n,) int class index. groups: n keys (a file's content hash: byte-identical files share it; None: a
    group of its own), so copies of one image all train or all validate: a validation image whose copy was trained on
    is no test. Each class with two groups or more puts about round(val_fraction x n_c) images, at least one group and
    never all, in val; a class of one group is training only (unless its group went to val with another class). Without
    groups (or all distinct) exactly round(val_fraction x n_c), clamped to 1..n_c - 1. Both sorted.
    """
    assert 0.0 < val_fraction < 1.0, f"val_fraction must be in (0, 1), not {val_fraction}"
    assert groups is None or len(groups) == len(codes), "one group key per image"
    rng = np.random.default_rng(seed)
    key = (lambda i: i) if groups is None else (lambda i: ("file", i) if groups[i] is None else groups[i])
    side: dict[Hashable, bool] = {}               # group -> validates; a group spanning classes goes where it went first
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        rng.shuffle(members)
        units: dict[Hashable, int] = {}           # this class's groups in shuffled order -> their sizes here
        for i in members:
            units[key(i)] = units.get(key(i), 0) + 1
        n_val = 0 if len(units) < 2 else min(len(members) - 1, max(1, round(val_fraction * len(members))))
        in_val = sum(size for k, size in units.items() if side.get(k) is True)
        training = any(side.get(k) is False for k in units)
        free = [k for k in units if k not in side]
        for j, k in enumerate(free):
            last_chance = j == len(free) - 1 and not training       # some group of the class must train
            side[k] = in_val < n_val and not last_chance
            in_val += units[k] if side[k] else 0
            training = training or not side[k]
    val = sorted(i for i in range(len(codes)) if side[key(i)])
    train = sorted(i for i in range(len(codes)) if not side[key(i)])
    return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)


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


@dataclasses.dataclass
class Samples:
    """What an epoch draws from: cached convolutional output (head, fc) or decoded images (all)."""
    codes: torch.Tensor                         # shape=(n,) int64
    features: torch.Tensor | None = None        # shape=(n, views, D) float16 (cached modes)
    images: list[Image.Image] | None = None     # shorter side resize_size (all); None for a cached set
    centre: torch.Tensor | None = None          # shape=(n, D) float16: the centre crop's output, as index-images
                                                # crops (cached training sets; validation's view 0 is its centre crop)

    def __len__(self) -> int:
        return len(self.codes)


def prepare_samples(net: Classifier, data: LabelledFiles, idx: np.ndarray, prep: Preprocessing, cfg: FineTuneConfig,
                    gen: torch.Generator, device: torch.device, *, train: bool,
                    report: Report) -> tuple[Samples, dict[str, str]]:
    """Decode the files at idx (bad ones skipped with their reason); for cached modes, run the convolutions once
    per view (cfg.cache_views random views of a training image, and its centre crop apart; the centre crop of a
    validation image)."""
    from tqdm import tqdm

    cached = cfg.train != "all"
    views = cfg.cache_views if train else 1
    skipped: dict[str, str] = {}
    codes, feats, images = [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            feats.append(conv_output(net, np.stack(pending), prep, device))     # (b, D) float16
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
        pending.extend([*(random_view(img, prep.crop_size, gen) for _ in range(views)), prep.crop(img)] if train
                       else [pixels])
        if len(pending) >= cfg.cache_batch_size:
            flush()
    flush()
    bar.close()
    codes_t = torch.tensor(codes, dtype=torch.int64)
    if not cached:
        return Samples(codes_t, images=images), skipped
    dim = net.fc[1 if cfg.model == "alexnet" else 0].in_features
    features = torch.cat(feats) if feats else torch.zeros(0, dim, dtype=torch.float16)
    if not train:
        return Samples(codes_t, features=features.view(len(codes), 1, -1)), skipped
    features = features.view(len(codes), views + 1, -1)                       # the random views, then the centre
    return Samples(codes_t, features=features[:, :views], centre=features[:, views]), skipped


@torch.no_grad()
def conv_output(net: Classifier, pixels: np.ndarray, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """uint8 shape=(B, 3, 224, 224) -> the convolutional output, float16 on the CPU, shape=(B, D)."""
    net.conv.eval()
    x = prep.normalise(torch.from_numpy(pixels).to(device))
    return net.conv(x).to("cpu", torch.float16)                               # (B, 3, 224, 224) -> (B, 9216)


def batch_input(samples: Samples, rows: torch.Tensor, prep: Preprocessing, device: torch.device,
                gen: torch.Generator | None, view: torch.Tensor | None = None) -> torch.Tensor:
    """Network input for samples[rows]: cached output (one view each: `view`, or drawn) or augmented images
    (gen None: centre crops)."""
    if samples.features is not None:
        if view is None:
            view = torch.randint(0, samples.features.shape[1], (len(rows),), generator=gen)
        return samples.features[rows, view].to(device, torch.float32)         # (b, D)
    crop = prep.crop_size
    pixels = np.stack([random_view(samples.images[r], crop, gen) if gen is not None else prep.crop(samples.images[r])
                       for r in rows.tolist()])
    return prep.normalise(torch.from_numpy(pixels).to(device))                # (b, 3, 224, 224)


def centre_input(samples: Samples, rows: torch.Tensor, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    """Network input for samples[rows] as index-images sees them: the centre crop (cached, or cropped from the image)."""
    if samples.features is not None:
        cached = samples.centre if samples.centre is not None else samples.features[:, 0]
        return cached[rows].to(device, torch.float32)                          # (b, D)
    return batch_input(samples, rows, prep, device, None)                      # (b, 3, 224, 224)
