"""The one format of a fine-tune's history (`<stem>.history.json`) and filters file: paths, writing, loading, checking."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.files import atomic_write

HISTORY_VERSION = 1
HISTORY_SUFFIX = ".history.json"
FILTERS_SUFFIX = ".filters.npz"
STOPPED = ("completed", "early_stopping", "interrupted", "unfinished")   # unfinished: killed mid-run

_NUMBER = (int, float)
# field -> (types, may be null)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "version": ((int,), False), "created_at": ((str,), False), "data_dir": ((str,), False),
    "model": ((str,), False), "weights": ((str,), False), "weights_seed": ((int,), True),
    "train": ((str,), False), "head": ((str,), False), "optimizer": ((str,), False), "lr": (_NUMBER, False),
    "lr_schedule": ((str,), False), "weight_decay": (_NUMBER, False), "momentum": (_NUMBER, True),
    "epochs": ((int,), False), "batch_size": ((int,), False), "patience": ((int,), False),
    "val_fraction": (_NUMBER, False), "seed": ((int,), False), "classes": ((list,), False),
    "split": ((dict,), False), "initial_loss": (_NUMBER, False), "chance_loss": (_NUMBER, False),
    "sanity": ((dict,), True), "epochs_run": ((list,), False), "best_epoch": ((int,), False),
    "best_val_accuracy": (_NUMBER, False), "stopped": ((str,), False), "seconds": (_NUMBER, False),
}
_EPOCH_FIELDS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
# written since fine-tune keeps the epoch that retrieves best (older histories lack them): checked when present
_RETRIEVAL_FIELDS = ("initial_retrieval", "best_retrieval")    # {"knn_accuracy", "map"}: epoch 0, the kept epoch
_EPOCH_RETRIEVAL_FIELDS = ("train_objective_loss", "val_knn_accuracy", "val_map")
_SANITY_FIELDS = {"subset_size": (int,), "steps": (int,), "final_train_loss": _NUMBER, "passed": (bool,)}


class HistoryError(ValueError):
    """A history file that cannot be read or does not follow the format; the message names the file and the field."""


class HistoryNotFound(FileNotFoundError):
    """No history file where one was looked for; the message says how to make one."""


def history_path_for(weights_file: Path | str) -> Path:
    """The history file written next to a fine-tuned weights file: tuned.pt -> tuned.history.json."""
    path = Path(weights_file)
    return path.with_name(path.stem + HISTORY_SUFFIX) if path.suffix else path.with_name(path.name + HISTORY_SUFFIX)


def out_taken(out: Path) -> str | None:
    """Why a fine-tune writing to out would replace another run's work, or None. out itself: a rerun wrote its
    starting weights over the file at once, and every index made with it stopped answering. The history file next
    to it (tuned.pth writes tuned.history.json, tuned.pt's): an index of tuned.pt would then read another run's
    training images, and score its own as held out."""
    if out.exists():
        return f"{out} exists: an index made with those weights would no longer match them"
    history = history_path_for(out)
    if history.exists():
        return (f"{out} would write its history to {history}, which holds another run's (an index of that run's "
                "weights reads there which images they were trained on)")
    return None


def history_stem(history_path: Path | str) -> Path:
    """tuned.history.json -> tuned (with its folder): the prefix of the PNG and filters files next to it."""
    path = Path(history_path)
    name = path.name[:-len(HISTORY_SUFFIX)] if path.name.endswith(HISTORY_SUFFIX) else path.stem
    return path.with_name(name)


def filters_path_for(history_path: Path | str) -> Path:
    """The first layer's filters before and after training, next to the history: tuned.history.json -> tuned.filters.npz."""
    stem = history_stem(history_path)
    return stem.with_name(stem.name + FILTERS_SUFFIX)


def _kind(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:   # JSON true is not a number here
        return False
    return isinstance(value, types) and not (isinstance(value, float) and not math.isfinite(value))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def validate_history(history: Any, where: str = "history") -> dict:
    """Check a parsed history against the format (extra fields are allowed). -> history; raises HistoryError."""
    def fail(what: str) -> HistoryError:
        return HistoryError(f"{where}: {what}; is it a history file written by fine-tune?")

    if not isinstance(history, dict):
        raise fail(f"expected a JSON object, found {type(history).__name__}")
    missing = [name for name in _FIELDS if name not in history]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    for name, (types, nullable) in _FIELDS.items():
        value = history[name]
        if not (value is None and nullable) and not _kind(value, types):
            raise fail(f"field {name!r} should be {' or '.join(t.__name__ for t in types)}"
                       f"{' or null' if nullable else ''}, not {json.dumps(value)[:60]}")
    if history["version"] != HISTORY_VERSION:
        raise HistoryError(f"{where}: format version {history['version']}; this version reads version {HISTORY_VERSION}")
    classes = history["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        raise fail("'classes' should be a non-empty list of class names")
    split = history["split"]
    for part in ("train", "val"):
        if not isinstance(split.get(part), list) or not all(isinstance(p, str) for p in split[part]):
            raise fail(f"'split.{part}' should be a list of paths")
    if history["sanity"] is not None:
        for name, types in _SANITY_FIELDS.items():
            if not _kind(history["sanity"].get(name), types):
                raise fail(f"'sanity.{name}' should be {types[0].__name__}")
    if history.get("split_sha256") is not None:     # written since fine-tune records the split's content hashes
        hashes = history["split_sha256"]
        for part in ("train", "val"):
            got = hashes.get(part) if isinstance(hashes, dict) else None
            if (not isinstance(got, list) or len(got) != len(split[part])
                    or not all(h is None or _is_sha256(h) for h in got)):
                raise fail(f"'split_sha256.{part}' should list a sha256 (or null) for each path of 'split.{part}'")
    if history.get("weights_sha256") is not None and not _is_sha256(history["weights_sha256"]):
        raise fail("'weights_sha256' should be a sha256 in hex")
    for name in _RETRIEVAL_FIELDS:
        value = history.get(name)
        if value is not None and not (isinstance(value, dict) and all(_kind(value.get(m), _NUMBER) for m in ("knn_accuracy", "map"))):
            raise fail(f"'{name}' should be an object with 'knn_accuracy' and 'map' numbers, or null")
    if "improved" in history and not isinstance(history["improved"], bool):
        raise fail("'improved' should be true or false")
    for i, row in enumerate(history["epochs_run"]):
        if not isinstance(row, dict) or not _kind(row.get("epoch"), (int,)):
            raise fail(f"'epochs_run[{i}]' should be an object with an 'epoch' number")
        for name in _EPOCH_FIELDS + tuple(f for f in _EPOCH_RETRIEVAL_FIELDS if f in row):
            if not _kind(row.get(name), _NUMBER):
                raise fail(f"'epochs_run[{i}].{name}' should be a finite number, not {json.dumps(row.get(name))}")
    epochs = [row["epoch"] for row in history["epochs_run"]]
    if epochs != sorted(set(epochs)):
        raise fail("'epochs_run' should list each epoch once, in order")
    if epochs and history["best_epoch"] != 0 and history["best_epoch"] not in epochs:   # 0: the starting weights
        raise fail(f"'best_epoch' {history['best_epoch']} is neither 0 (the starting weights) nor one of the epochs "
                   f"run ({epochs[0]}..{epochs[-1]})")
    if history["stopped"] not in STOPPED:
        raise fail(f"'stopped' should be one of {', '.join(STOPPED)}, not {history['stopped']!r}")
    return history


# What an index made with a fine-tune's weights file knows of the images they were trained on (training_record)
TRAINING_RECORDED = "recorded"          # the history's content hashes of the split, for these very weights
TRAINING_UNKNOWN = ("no_history", "no_hashes", "other_weights", "unreadable")
TRAINING_NONE_LEARNED = "starting_weights"   # fine-tune kept its starting weights: no image was learned into them


def training_record(weights_file: Path | str, weights_sha256: str) -> dict:
    """Which images a fine-tuned weights file was trained on, from the history next to it (history_path_for):
    what index-images keeps in the catalog, so the index knows them even once the files move.

    weights_sha256: the hash of the weights file as the index records it. -> {"status", "history" (the file looked
    at), "train_sha256" and "val_sha256" (sorted, unique content hashes; empty unless "recorded"), "reason" (why
    the training images cannot be told apart; None when recorded)}. status: TRAINING_RECORDED,
    TRAINING_NONE_LEARNED (fine-tune wrote its starting weights: nothing to hold out), or one of TRAINING_UNKNOWN: no history there, a history written before fine-tune recorded content hashes, a history of
    other weights (fine-tune ran again since), or one that cannot be read."""
    path = history_path_for(weights_file)
    record = {"status": TRAINING_RECORDED, "history": str(path), "train_sha256": [], "val_sha256": [], "reason": None}
    try:
        history = load_history(path)
    except HistoryNotFound:
        return {**record, "status": "no_history", "reason": f"no fine-tune history ({path.name}) next to the weights"}
    except HistoryError as exc:
        return {**record, "status": "unreadable", "reason": f"the fine-tune history cannot be read ({exc})"}
    hashes = history.get("split_sha256")
    if hashes is None:
        return {**record, "status": "no_hashes",
                "reason": f"{path.name} was written by an older fine-tune, which kept the split's paths but not "
                          "the images' content hashes (fine-tune again with this version to record them)"}
    checkpoints = history.get("checkpoints_sha256") or []   # every checkpoint the run wrote, epoch 0's first
    if history.get("weights_sha256") not in (None, weights_sha256) and weights_sha256 not in checkpoints:
        return {**record, "status": "other_weights",
                "reason": f"{path.name} describes another weights file (fine-tune ran again since these weights)"}
    if history.get("improved") is False or (checkpoints and weights_sha256 == checkpoints[0]):
        return {**record, "status": TRAINING_NONE_LEARNED,
                "reason": "these weights are fine-tune's starting weights (no epoch retrieved better, or the run "
                          "stopped before one did): no image was learned into them"}
    return {**record, **{f"{part}_sha256": sorted({h for h in hashes[part] if h is not None}) for part in ("train", "val")}}


def write_history(path: Path | str, history: dict) -> Path:
    """Replace path whole with the history as indented JSON (creating its folder). -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(history, indent=1).encode("utf-8"))


def write_filters(history_path: Path | str, before: np.ndarray, after: np.ndarray) -> Path:
    """Replace the filters file next to the history (filters_path_for) whole: "before" and "after", float32 each,
    shape=(out, 3, kh, kw). -> its path."""
    path = filters_path_for(history_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the open file, not the name: np.savez appends .npz to a name without it
    return atomic_write(path, lambda f: np.savez(f, before=before.astype(np.float32), after=after.astype(np.float32)))


def load_history(path: Path | str) -> dict:
    """Read and check a history file. Raises HistoryNotFound (no file) or HistoryError (unreadable, malformed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HistoryNotFound(f"no training history at {path}: fine-tune writes one next to its weights "
                              f"(fine-tune DATA_DIR --out tuned.pt writes tuned{HISTORY_SUFFIX})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"{path}: cannot be read ({exc})") from exc
    try:
        history = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HistoryError(f"{path}: not valid JSON ({exc}); is it a history file written by fine-tune?") from exc
    return validate_history(history, str(path))


def load_filters(history_path: Path | str) -> tuple[np.ndarray, np.ndarray] | None:
    """The first layer's filters before and after training, shape=(out, 3, kh, kw) float32 each, or None without a file.

    Raises HistoryError for a file that is not an npz with "before" and "after" of the same 4-d shape."""
    path = filters_path_for(history_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            before, after = np.asarray(npz["before"], np.float32), np.asarray(npz["after"], np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise HistoryError(f"{path}: not a filters file with 'before' and 'after' arrays ({exc})") from exc
    if before.ndim != 4 or before.shape != after.shape or before.shape[1] != 3:
        raise HistoryError(f"{path}: 'before' and 'after' should both have shape (out, 3, kh, kw); "
                           f"found {before.shape} and {after.shape}")
    return before, after


def split_counts(history: dict) -> dict[str, dict[str, int]]:
    """Images per class in each part of the split: {class: {"train": n, "val": n}}, in class-index order.

    A path's class is its first folder level (DATA_DIR/<class>/...); classes not in `classes` are listed after."""
    counts = {part: Counter(p.replace("\\", "/").split("/", 1)[0] for p in history["split"][part]) for part in ("train", "val")}
    names = list(history["classes"]) + sorted((set(counts["train"]) | set(counts["val"])) - set(history["classes"]))
    return {name: {"train": counts["train"][name], "val": counts["val"][name]} for name in names}
