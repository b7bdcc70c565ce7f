"""The backbones' weights as state dicts: which networks there are (MODELS), and their weights loaded from what a
WeightsChoice names (features/weights.py): torchvision's ImageNet checkpoint (cached or downloaded), an index's seeded
random weights (made on its first run), or a state dict file; then fitted to the network up to fc7. The network that
computes features from them is features/backbones.py's."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from retrieval.features.architectures import ALEXNET_IMAGENET, VGG16_IMAGENET, ImageNetWeights, alexnet, vgg16
from retrieval.features.digests import file_sha256
from retrieval.features.weights import WeightsChoice, WeightsUnavailable, file_weights_identity
from retrieval.files import atomic_write
from retrieval.names import DEFAULT_RANDOM_SEED, MODEL_NAMES, random_weights_file

log = logging.getLogger(__name__)

DOWNLOAD_PROBE_TIMEOUT_S = 10.0   # the ImageNet weights' address must answer this soon, or they count as offline

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]             # the network, seeded initialisation as torchvision's
    imagenet: ImageNetWeights                  # its ImageNet weights (address, transforms)
    layers: dict[str, str]                     # our fc layer name -> graph node (the ReLU after it)


MODELS: dict[str, ModelSpec] = {
    # AlexNet classifier: Dropout, Linear(fc6), ReLU, Dropout, Linear(fc7), ReLU, Linear(fc8)
    "alexnet": ModelSpec(alexnet, ALEXNET_IMAGENET,
                         {"fc6": "classifier.2", "fc7": "classifier.5"}),
    # VGG16 classifier: Linear(fc6), ReLU, Dropout, Linear(fc7), ReLU, Dropout, Linear(fc8)
    "vgg16": ModelSpec(vgg16, VGG16_IMAGENET,
                       {"fc6": "classifier.1", "fc7": "classifier.4"}),
}
assert tuple(MODELS) == MODEL_NAMES, "retrieval.names.MODEL_NAMES lists the backbones"


def imagenet_cache_path(model: str) -> Path:
    """Where torch hub keeps (or would keep) the ImageNet checkpoint for this model."""
    url = MODELS[model].imagenet.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_state_dict(model: str, weights: WeightsChoice | str, index_dir: Path | None, *, seed: int = DEFAULT_RANDOM_SEED,
                    create: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve a weights choice to (state_dict, identity).

    weights: a WeightsChoice, or its text: "imagenet", "random", or a path to a state dict file.
    For random weights, the tensors live in index_dir; create=True generates them (seeded) when absent,
    so every later query goes through the identical network.
    identity: what the index records, e.g. "imagenet:AlexNet_Weights.IMAGENET1K_V1",
    "random:sha256=..." (the seed is recorded in the index settings), "file:PATH:sha256=...".
    """
    choice = WeightsChoice.parse(weights)
    spec = MODELS[model]
    if choice.is_imagenet:
        cached, identity = imagenet_cache_path(model), f"imagenet:{spec.imagenet.name}"
        if cached.is_file():   # torch hub moves a download into place whole: the file can be mapped
            try:
                return _load_file(cached, mmap=True), identity
            except WeightsUnavailable:
                pass           # a format that cannot be mapped (before torch 1.6's zip files): torch hub reads it
        try:
            # Asked first, so that an offline machine is told so at once: torch hub announces "Downloading: URL"
            # before it tries, which reads as if a download had started.
            if not cached.is_file():
                torch.hub.urlopen(urllib.request.Request(spec.imagenet.url, method="HEAD"),
                                  timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
            state = spec.imagenet.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise WeightsUnavailable(
                f"ImageNet weights for {model} are not cached and cannot be downloaded ({exc}); the file "
                f"{os.path.basename(spec.imagenet.url)} (from {spec.imagenet.url}) would be at {cached}",
                offline_imagenet=True, cache_path=cached) from exc
        return state, identity

    if choice.is_random:
        if index_dir is None:
            raise WeightsUnavailable("random weights need an index folder to keep them in")
        path = random_weights_file(index_dir, model)
        if not path.exists():
            if not create:
                where = ("" if path.parent.is_dir() else
                         f" (the folder {path.parent} itself does not exist yet: make it first, mkdir -p)")
                raise WeightsUnavailable(f"the index's random weights file {path} is missing{where}; copy it from the "
                                         "index folder that has it (for a replica, the writer's), or run index-images "
                                         "on the index's data folder to make it again from its recorded seed")
            state = random_state_dict(model, seed)
            atomic_write(path, lambda f: torch.save(state, f))
            log.info("generated random %s weights (seed %d) in %s", model, seed, path)
        try:
            state = _load_file(path, mmap=True)   # written by us, replaced whole (atomic_write), never rewritten in place
        except WeightsUnavailable as exc:   # damaged: the seed makes it again
            raise WeightsUnavailable(f"{exc}; it is the index's random weights file, damaged: run index-images on the "
                                     "index's data folder, which makes it again from the recorded seed") from None
        return state, f"random:sha256={file_sha256(path)}"

    path = choice.path
    if not path.is_file():
        raise WeightsUnavailable(f"weights must be 'imagenet', 'random' or a state dict file; {str(choice)!r} is none of these")
    return _load_file(path), file_weights_identity(path, file_sha256(path))


def random_state_dict(model: str, seed: int = DEFAULT_RANDOM_SEED) -> dict[str, torch.Tensor]:
    """torchvision's own initialisation of the model, seeded (the global RNG is left as it was): the network that
    `--weights random --seed SEED` means everywhere (index-images keeps it in the index folder, fine-tune starts from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MODELS[model].build()
    return net.state_dict()


def last_layer_keys(net: nn.Module) -> set[str]:
    """State dict keys of the network's last classifier layer (fc8, "classifier.6.*"): not used by fc6/fc7 features."""
    index = len(net.classifier) - 1
    return {f"classifier.{index}.{name}" for name, _ in net.classifier[-1].named_parameters()}


def load_backbone(net: nn.Module, model: str, state_dict: dict[str, torch.Tensor], *, assign: bool = False) -> None:
    """Load state_dict into net (torchvision's `model`), strictly up to fc7; its last layer may be absent or of
    another size (a fine-tuned file without its head, or with a head for other classes): then net keeps its own.

    Raises WeightsUnavailable when anything else is missing, extra or of another shape (another architecture).
    """
    last = last_layer_keys(net)
    own = net.state_dict()
    body = {k: v for k, v in state_dict.items() if k not in last}
    head = {k: v for k, v in state_dict.items() if k in last}
    if set(head) != last or any(tuple(v.shape) != tuple(own[k].shape) for k, v in head.items()):
        head = {}          # absent, partial or another number of classes: the network's own last layer stays
    try:
        result = net.load_state_dict({**body, **head}, strict=False, assign=assign)
    except RuntimeError as exc:       # shape mismatches up to fc7
        raise WeightsUnavailable(f"these weights do not fit torchvision's {model}: "
                                 f"{_other_model(model, body) or str(exc).splitlines()[0]}") from exc
    missing = [k for k in result.missing_keys if k not in last]
    if missing or result.unexpected_keys:
        raise WeightsUnavailable(
            f"these weights do not fit torchvision's {model}: "
            + (_other_model(model, body) or "; ".join(
                part for part in (f"missing {', '.join(missing[:5])}" if missing else "",
                                  f"unexpected {', '.join(result.unexpected_keys[:5])}" if result.unexpected_keys else "")
                if part)))


def _other_model(model: str, body: dict[str, torch.Tensor]) -> str | None:
    """"they are vgg16's ...": the other backbone whose layers up to fc7 the state dict fits, in words, or None."""
    for other, spec in MODELS.items():
        if other == model:
            continue
        with torch.device("meta"):   # shapes only: no memory for the weights
            net = spec.build()
        own = {k: v for k, v in net.state_dict().items() if k not in last_layer_keys(net)}
        if own.keys() == body.keys() and all(tuple(v.shape) == tuple(body[k].shape) for k, v in own.items()):
            return (f"they are {other}'s (the same layers and shapes): pass --model {other}, in an index folder of "
                    f"its own (an index keeps its network)")
    return None


def _load_file(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in path. mmap: its tensors are views of the file's pages (loading is instant, and the page
    cache is shared by every process that maps it, gunicorn's workers included), for files only ever replaced
    whole: a file rewritten in place under a mapping can change or vanish under the network. A path that is not
    UTF-8 (torch maps the file by its name as text) is read whole instead."""
    try:
        os.fspath(path).encode()
    except UnicodeEncodeError:
        mmap = False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError as exc:
        raise WeightsUnavailable(f"cannot load weights from {path}: this user may not read it; change its permissions "
                                 "or run as its owner") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsUnavailable(f"cannot load weights from {path}: {exc}") from exc
    except Exception as exc:   # noqa: BLE001 - any other bytes: torch's unpickler raises KeyError, UnpicklingError, ...
        # (not its message: it suggests loading with weights_only=False, which would run code from the file)
        raise WeightsUnavailable(f"cannot load weights from {path}: it is not a PyTorch weights file (a state dict "
                                 f"saved with torch.save; reading it failed with {type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} does not hold a state dict")
    return state

