"""A fine-tune's charts: loss, accuracy and first-layer filters as matplotlib figures, PNG files next to the history and inline SVG."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from retrieval.learning.history import history_stem, load_filters, load_history
from retrieval.reports.filters import filter_change, filter_grid

# Matplotlib is imported inside the drawing functions: loading a history (the page, the CLI) needs only json.

TRAIN_COLOUR, VAL_COLOUR, CHANCE_COLOUR, BEST_COLOUR = "#4a7bd0", "#e07b22", "#c33333", "#2e8b57"


def _figure(width_in: float = 8.0, height_in: float = 3.6):  # noqa: ANN202 - matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)   # no pyplot: no global state, safe from request threads
    return fig


def _legend(fig, ax) -> None:  # noqa: ANN001 - matplotlib Figure, Axes
    """The legend beside the plot, not on it (inside, some corner always hides a line: chance, train, kNN)."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)


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
    _legend(fig, ax)
    return fig


def accuracy_figure(history: dict):  # noqa: ANN201 - matplotlib Figure
    """Train and validation accuracy per epoch, chance 1/C dashed; the validation kNN accuracy from epoch 0 and the
    epoch kept (by it) marked, or for an older history the best epoch by validation accuracy."""
    fig = _figure()
    ax = fig.add_subplot()
    epochs, train = _epochs(history, "train_accuracy")
    _, val = _epochs(history, "val_accuracy")
    classes = len(history["classes"])
    ax.axhline(1.0 / classes, color=CHANCE_COLOUR, linestyle="--", linewidth=1.2, gid="chance",
               label=f"chance 1/{classes} = {1.0 / classes:.3f}")
    ax.plot(epochs, train, "o-", color=TRAIN_COLOUR, markersize=4, gid="train", label="train")
    ax.plot(epochs, val, "s-", color=VAL_COLOUR, markersize=4, gid="val", label="validation")
    retrieval = history.get("initial_retrieval")
    if retrieval is not None:          # the epoch kept is the best by retrieval, from epoch 0 (the starting weights)
        k, best = history["retrieval_k"], history["best_epoch"]
        knn = [retrieval["knn_accuracy"]] + [float(r["val_knn_accuracy"]) for r in history["epochs_run"]]
        ax.plot([0, *epochs], knn, "D-", color=BEST_COLOUR, markersize=4, gid="val-knn",
                label=f"validation kNN@{k} (retrieval)")
        ax.axvline(best, color=BEST_COLOUR, linestyle=":", linewidth=1.2)
        ax.plot([best], [history["best_retrieval"]["knn_accuracy"]], "o", markersize=11, markerfacecolor="none",
                markeredgecolor=BEST_COLOUR, markeredgewidth=2, gid="best",
                label=f"kept: epoch {best}, kNN@{k} {history['best_retrieval']['knn_accuracy']:.3f}")
    elif epochs:
        best = history["best_epoch"]
        ax.axvline(best, color=BEST_COLOUR, linestyle=":", linewidth=1.2)
        ax.plot([best], [history["best_val_accuracy"]], "o", markersize=11, markerfacecolor="none",
                markeredgecolor=BEST_COLOUR, markeredgewidth=2, gid="best",
                label=f"best: epoch {best}, {history['best_val_accuracy']:.3f}")
    ax.set_ylim(0, 1.02)
    _style(ax, "accuracy", epochs)
    ax.set_title("Accuracy", loc="left", fontsize=11, fontweight="bold")
    _legend(fig, ax)
    return fig


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
