"""The extract stage's network, loaded as the index records it (torch is imported only when it is called)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.catalog import Catalog, IndexSettings
from retrieval.features.weights import WeightsChoice
from retrieval.learning.history import TRAINING_RECORDED, training_record
from retrieval.system import display_name

from indexer.config import ConfigError, JobConfig

if TYPE_CHECKING:
    from retrieval.features.backbones import FeatureExtractor

WEIGHTS_FILE_CHECKED = "weights-file.checked"   # in the index folder: not beside a user's own weights file


def load_network(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict,
                 device: str) -> FeatureExtractor:
    """The extract stage's network: the index's recorded one (a new index records its settings here).

    Raises ConfigError when the weights cannot be had, differ from the recorded ones, or the device is missing."""
    from retrieval.features.backbones import (DeviceUnavailable, PrecisionUnavailable, WeightsUnavailable,
                                              build_extractor, precision_for_index, resolve_device)
    from retrieval.features.weights import weights_error_message

    try:
        precision = cfg.precision
        if precision == "auto" and stored is not None:   # an index's new vectors are computed as its others were
            recorded = ((catalog.extraction_record() or {}).get("last") or {}).get("precision")
            precision = precision_for_index(recorded, resolve_device(device))
        extractor, identity = build_extractor(chosen["model"], chosen["layer"], chosen["weights"], cfg.index_dir,
                                              device, seed=chosen["seed"], create=stored is None,
                                              precision=precision, views=chosen["views"],
                                              input_norm=chosen["input_norm"])
    except WeightsUnavailable as exc:
        raise ConfigError(weights_error_message(exc)) from exc
    except PrecisionUnavailable as exc:
        raise ConfigError(f"{exc} (--precision)") from exc
    except DeviceUnavailable as exc:
        raise ConfigError(f"{exc} (--device)") from exc
    if stored is not None and identity != stored.weights_identity:
        raise ConfigError(f"the weights now at {str(chosen['weights'])!r} differ from the ones this index was built "
                          f"with ({stored.weights_identity}); use another index folder")
    if stored is None:
        if chosen["regions"]:
            catalog.enable_regions()   # the table first: the settings then never name regions a catalog cannot hold
        catalog.save_settings(IndexSettings(
            model=chosen["model"], layer=chosen["layer"], weights=str(chosen["weights"]), weights_identity=identity,
            seed=chosen["seed"], dim=extractor.dim, normalize=chosen["normalize"], data_dir=chosen["data_dir"],
            preprocessing=dataclasses.replace(extractor.preprocessing, regions=chosen["regions"]).to_record(),
            views=chosen["views"]))
        record_training_images(catalog, chosen["weights"], identity)   # a known index's: indexer.run, every run
    return extractor


def restore_random_weights(index_dir: Path, stored: IndexSettings) -> str | None:
    """An index with seeded random weights whose file is gone or damaged (its SHA-256 not the recorded one): made
    again from the recorded seed and kept when it is the very file recorded (torch.save writes the same bytes for
    the same tensors). -> the repair, in words, or None when there was nothing to do. Raises ConfigError when the
    seed gives other weights here (another torch or torchvision version initialises differently); a damaged file
    is then left as it is."""
    choice = stored.weights_choice
    if not choice.is_random:
        return None
    path = choice.source_file(index_dir, stored.model)
    try:
        if _is_recorded(path, stored):
            return None
        state = "damaged (not the recorded bytes)"
    except FileNotFoundError:
        state = "missing"
    except OSError:
        return None   # unreadable: the run that loads it says so, with what to do
    import hashlib
    import io

    import torch

    from retrieval.features.backbones import random_state_dict
    from retrieval.files import atomic_write

    made = io.BytesIO()
    torch.save(random_state_dict(stored.model, stored.seed), made)
    if f"random:sha256={hashlib.sha256(made.getbuffer()).hexdigest()}" != stored.weights_identity:
        raise ConfigError(f"the index's random weights file {path} is {state}, and seed {stored.seed} makes other "
                          f"weights with this torch {torch.__version__} than the recorded ones: restore the file from "
                          "a backup, or index into a new folder (--index-dir NEW)")
    atomic_write(path, made.getvalue())
    _note_checked(path, stored.weights_identity)
    return f"the random weights file {path.name} was {state}: made again from seed {stored.seed} (the same file, by its SHA-256)"


def check_weights_file(index_dir: Path, stored: IndexSettings) -> None:
    """An index built from a state dict file (fine-tune's output): that file is there and is the one recorded, on
    every run, one with nothing to index included (which said "indexed 0, unchanged 60" over an index that could no
    longer be searched after `fine-tune --overwrite` replaced the file). Raises ConfigError naming what to do."""
    choice = stored.weights_choice
    if not choice.is_file:
        return
    path = choice.source_file(index_dir, stored.model)
    try:
        if _is_recorded(path, stored, index_dir / WEIGHTS_FILE_CHECKED):
            return
    except FileNotFoundError:
        raise ConfigError(f"the weights file this index was built with, {display_name(str(path))}, is missing "
                          "(moved or deleted?): put it back there, or if it moved, run again with --weights NEW_PATH "
                          "(the index follows it)") from None
    except OSError:
        return   # unreadable: loading it says so, with what to do
    raise ConfigError(
        f"the weights file {display_name(str(path))} is not the one this index was built with (not its recorded "
        "SHA-256: replaced, by fine-tune --overwrite say), and the index's vectors cannot be searched with other "
        "weights: put the file it was built with back, or index into another folder with these weights "
        "(--index-dir NEW)")


def _is_recorded(path: Path, stored: IndexSettings, note: Path | None = None) -> bool:
    """Whether the weights file at path holds the bytes the index recorded (its SHA-256): read only when its stamp
    changed since it was last found so (noted in note, else beside it). Raises OSError (FileNotFoundError: gone)."""
    from retrieval.features.digests import file_sha256

    if _checked_before(path, stored.weights_identity, note):
        return True
    if file_sha256(path) != stored.weights_sha256:
        return False
    _note_checked(path, stored.weights_identity, note)
    return True


def _checked_file(path: Path) -> Path:
    """Beside the random weights: the file's stamp when its bytes were last found to be the recorded ones."""
    return path.with_name(path.name + ".checked")


def _checked_before(path: Path, identity: str, note: Path | None = None) -> bool:
    """Whether the weights file is as it was when last found sound (its stamp, noted in note, else beside it), so it
    need not be read again: 244 MB (AlexNet) to 553 MB (VGG16) on every run, one with nothing to index included."""
    from retrieval.files import file_stamp

    try:
        noted = json.loads((note or _checked_file(path)).read_text())
        return noted == {"stamp": list(file_stamp(path)), "identity": identity}
    except (OSError, ValueError):
        return False


def _note_checked(path: Path, identity: str, note: Path | None = None) -> None:
    from retrieval.files import atomic_write, file_stamp

    try:
        atomic_write(note or _checked_file(path), json.dumps({"stamp": list(file_stamp(path)), "identity": identity}).encode(),
                     durable=False)
    except OSError:
        pass   # a read-only index folder: checked again next time


def record_training_images(catalog: Catalog, weights: WeightsChoice, identity: str) -> None:
    """For weights from a file: record in the catalog which images fine-tune trained them on (from the history next
    to the file), once; looked for again on later runs while unknown (a history put back, an index made before this
    was recorded)."""
    if not weights.is_file:
        return
    known = catalog.training_record()
    if known is not None and known["weights_identity"] == identity and known["status"] == TRAINING_RECORDED:
        return
    record = {**training_record(weights.path, identity.rpartition("sha256=")[2]), "weights_identity": identity}
    if record != known:
        catalog.save_training_record(record)



def weights_file(chosen: dict, index_dir: Path) -> Path | None:
    """The file the run's weights are loaded and hashed from: the index's random weights or a state dict file
    (None for ImageNet weights, whose identity is their name)."""
    return chosen["weights"].source_file(index_dir, chosen["model"])



def device_label(extractor: FeatureExtractor) -> str:
    """"cpu", or "cuda (NVIDIA H200)": what the catalog records of where vectors were computed."""
    if extractor.device.type != "cuda":
        return extractor.device.type
    import torch

    return f"cuda ({torch.cuda.get_device_name(extractor.device)})"
