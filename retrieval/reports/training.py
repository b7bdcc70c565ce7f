"""A fine-tuning run's history file (`<stem>.history.json`): loaded and checked, drawn as PNG files and inline SVG."""
from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HISTORY_VERSION = 1
HISTORY_SUFFIX = ".history.json"
FILTERS_SUFFIX = ".filters.npz"
STOPPED = ("completed", "early_stopping", "interrupted")

# Matplotlib is imported inside the drawing functions: loading a history (the page, the CLI) needs only json.

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
_SANITY_FIELDS = {"subset_size": (int,), "steps": (int,), "final_train_loss": _NUMBER, "passed": (bool,)}


class HistoryError(ValueError):
    """A history file that cannot be read or does not follow the format; the message names the file and the field."""


class HistoryNotFound(FileNotFoundError):
    """No history file where one was looked for; the message says how to make one."""


def history_path_for(weights_file: Path | str) -> Path:
    """The history file written next to a fine-tuned weights file: tuned.pt -> tuned.history.json."""
    path = Path(weights_file)
    return path.with_name(path.stem + HISTORY_SUFFIX) if path.suffix else path.with_name(path.name + HISTORY_SUFFIX)


def history_stem(history_path: Path | str) -> Path:
    """tuned.history.json -> tuned (with its folder): the prefix of the PNG and filters files next to it."""
    path = Path(history_path)
    name = path.name[:-len(HISTORY_SUFFIX)] if path.name.endswith(HISTORY_SUFFIX) else path.stem
    return path.with_name(name)


def filters_path_for(history_path: Path | str) -> Path:
    stem = history_stem(history_path)
    return stem.with_name(stem.name + FILTERS_SUFFIX)


def _kind(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:   # JSON true is not a number here
        return False
    return isinstance(value, types) and not (isinstance(value, float) and not math.isfinite(value))


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
    for i, row in enumerate(history["epochs_run"]):
        if not isinstance(row, dict) or not _kind(row.get("epoch"), (int,)):
            raise fail(f"'epochs_run[{i}]' should be an object with an 'epoch' number")
        for name in _EPOCH_FIELDS:
            if not _kind(row.get(name), _NUMBER):
                raise fail(f"'epochs_run[{i}].{name}' should be a finite number, not {json.dumps(row.get(name))}")
    epochs = [row["epoch"] for row in history["epochs_run"]]
    if epochs != sorted(set(epochs)):
        raise fail("'epochs_run' should list each epoch once, in order")
    if epochs and history["best_epoch"] not in epochs:
        raise fail(f"'best_epoch' {history['best_epoch']} is not one of the epochs run ({epochs[0]}..{epochs[-1]})")
    if history["stopped"] not in STOPPED:
        raise fail(f"'stopped' should be one of {', '.join(STOPPED)}, not {history['stopped']!r}")
    return history


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


def filter_change(before: np.ndarray, after: np.ndarray) -> float:
    """How far training moved the filters: ||after - before|| / ||before|| over all of them."""
    return float(np.linalg.norm(after - before) / max(float(np.linalg.norm(before)), 1e-12))


# --- drawing -----------------------------------------------------------------------------------------

TRAIN_COLOUR, VAL_COLOUR, CHANCE_COLOUR, BEST_COLOUR = "#4a7bd0", "#e07b22", "#c33333", "#2e8b57"


def _figure(width_in: float = 6.4, height_in: float = 3.6):  # noqa: ANN202 - matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)   # no pyplot: no global state, safe from request threads
    return fig


def _epochs(history: dict, key: str) -> tuple[list[int], list[float]]:
    rows = history["epochs_run"]
    return [r["epoch"] for r in rows], [float(r[key]) for r in rows]


def _style(ax, ylabel: str, epochs: list[int]) -> None:  # noqa: ANN001 - matplotlib Axes
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.3, max(epochs, default=1) + 0.3)
    ax.grid(True, color="#e4e7ec", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def loss_figure(history: dict):  # noqa: ANN201 - matplotlib Figure
    """Train and validation loss per epoch, the chance loss ln(C) dashed, the initial loss (epoch 0) marked."""
    fig = _figure()
    ax = fig.add_subplot()
    epochs, train = _epochs(history, "train_loss")
    _, val = _epochs(history, "val_loss")
    chance, initial = history["chance_loss"], history["initial_loss"]
    ax.axhline(chance, color=CHANCE_COLOUR, linestyle="--", linewidth=1.2, gid="chance",
               label=f"chance ln({len(history['classes'])}) = {chance:.3f}")
    ax.plot(epochs, train, "o-", color=TRAIN_COLOUR, markersize=4, gid="train", label="train")
    ax.plot(epochs, val, "s-", color=VAL_COLOUR, markersize=4, gid="val", label="validation")
    ax.plot([0], [initial], marker="*", markersize=12, color="#333333", linestyle="none", gid="initial",
            label=f"initial loss {initial:.3f}")
    if epochs:
        ax.axvline(history["best_epoch"], color=BEST_COLOUR, linestyle=":", linewidth=1.2, gid="best",
                   label=f"best epoch {history['best_epoch']}")
    ax.set_ylim(bottom=0)
    _style(ax, "cross-entropy loss", epochs)
    ax.set_title("Loss", loc="left", fontsize=11, fontweight="bold")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return fig


def accuracy_figure(history: dict):  # noqa: ANN201 - matplotlib Figure
    """Train and validation accuracy per epoch, chance 1/C dashed, the best epoch (by validation accuracy) marked."""
    fig = _figure()
    ax = fig.add_subplot()
    epochs, train = _epochs(history, "train_accuracy")
    _, val = _epochs(history, "val_accuracy")
    classes = len(history["classes"])
    ax.axhline(1.0 / classes, color=CHANCE_COLOUR, linestyle="--", linewidth=1.2, gid="chance",
               label=f"chance 1/{classes} = {1.0 / classes:.3f}")
    ax.plot(epochs, train, "o-", color=TRAIN_COLOUR, markersize=4, gid="train", label="train")
    ax.plot(epochs, val, "s-", color=VAL_COLOUR, markersize=4, gid="val", label="validation")
    if epochs:
        best = history["best_epoch"]
        ax.axvline(best, color=BEST_COLOUR, linestyle=":", linewidth=1.2)
        ax.plot([best], [history["best_val_accuracy"]], "o", markersize=11, markerfacecolor="none",
                markeredgecolor=BEST_COLOUR, markeredgewidth=2, gid="best",
                label=f"best: epoch {best}, {history['best_val_accuracy']:.3f}")
    ax.set_ylim(0, 1.02)
    _style(ax, "accuracy", epochs)
    ax.set_title("Accuracy", loc="left", fontsize=11, fontweight="bold")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig


def filter_grid(filters: np.ndarray, gap: int = 1) -> np.ndarray:
    """filters shape=(n, 3, kh, kw) -> one RGB image shape=(H, W, 3) float in 0..1: a grid of tiles, each filter
    min-max scaled on its own, on a white background."""
    n, _, kh, kw = filters.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (kh + gap) + gap, cols * (kw + gap) + gap, 3), np.float32)
    for i, f in enumerate(filters):
        lo, hi = float(f.min()), float(f.max())
        tile = (f - lo) / (hi - lo) if hi > lo else np.full_like(f, 0.5)
        r, c = divmod(i, cols)
        y, x = gap + r * (kh + gap), gap + c * (kw + gap)
        grid[y:y + kh, x:x + kw] = tile.transpose(1, 2, 0)                  # (3, kh, kw) -> (kh, kw, 3)
    return grid


def filters_figure(before: np.ndarray, after: np.ndarray):  # noqa: ANN201 - matplotlib Figure
    """The first layer's filters before and after training, side by side, each filter min-max scaled."""
    fig = _figure(8.0, 4.2)
    change = filter_change(before, after)
    for i, (name, filters) in enumerate((("before", before), ("after", after))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(filter_grid(filters), interpolation="nearest", gid=f"filters-{name}")
        ax.set_title(f"{name} training", fontsize=11, fontweight="bold")
        ax.set_axis_off()
    fig.suptitle(f"First-layer filters ({before.shape[0]} of {before.shape[2]}×{before.shape[3]}); "
                 f"moved {100 * change:.1f}% (relative L2)", fontsize=9, color="#555555")
    return fig


def write_training_plots(history_path: Path | str) -> list[Path]:
    """Draw <stem>.loss.png, <stem>.accuracy.png and, when <stem>.filters.npz exists, <stem>.filters.png next to
    the history file. -> the files written. Raises HistoryNotFound or HistoryError."""
    history_path = Path(history_path)
    history = load_history(history_path)
    stem = history_stem(history_path)
    figures = [("loss", loss_figure(history)), ("accuracy", accuracy_figure(history))]
    filters = load_filters(history_path)
    if filters is not None:
        figures.append(("filters", filters_figure(*filters)))
    written = []
    for name, fig in figures:
        out = stem.with_name(f"{stem.name}.{name}.png")
        fig.savefig(out, format="png", dpi=100, facecolor="white")
        written.append(out)
    return written


def figure_svg(fig, prefix: str) -> str:  # noqa: ANN001 - matplotlib Figure
    """A figure as an inline <svg> element (no XML prolog); text kept as text, every id given `prefix` so several
    charts can share one page."""
    from matplotlib import rc_context

    out = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix, "font.family": "sans-serif"}):
        fig.savefig(out, format="svg", facecolor="white")
    svg = out.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', rf'url(#{prefix}-\1)', svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}-\1"', svg)
    return svg


def training_svgs(history: dict, filters: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, str]:
    """The charts of write_training_plots as inline SVG strings: {"loss", "accuracy"[, "filters"]}."""
    svgs = {}
    for name, fig in (("loss", loss_figure(history)), ("accuracy", accuracy_figure(history))):
        fig.axes[0].set_title("", loc="left")      # the page's caption names the chart
        svgs[name] = figure_svg(fig, name)
    if filters is not None:
        svgs["filters"] = figure_svg(filters_figure(*filters), "filters")
    return svgs
