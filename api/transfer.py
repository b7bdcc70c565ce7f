"""Gallery pages for the transfer-learning lesson: the evaluation numbers (of one index, or two side by side), the
layer table and first-layer filters, and the fine-tuning history of the network."""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from flask.blueprints import BlueprintSetupState
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError

from retrieval.catalog import CATALOG_FILE, CatalogUnavailable, db_error_reason
from retrieval.learning.evaluation import EvaluationError, compare_indexes, evaluate_index
from retrieval.learning.history import (HistoryError, HistoryNotFound, filters_path_for, history_path_for, load_filters,
                                        load_history, split_counts)
from retrieval.features.weights import WeightsChoice
from retrieval.quality import held_out_words, telling_side
from retrieval.search.index import weights_label
from retrieval.features.model_info import LayerTable, filters_png, layer_table
from retrieval.reports.filters import filter_change
from retrieval.reports.precision import precision_at_k_svg
from retrieval.reports.training import training_svgs

from api.service import current_service

log = logging.getLogger(__name__)

bp = Blueprint("transfer", __name__)

EXTENSION_KEY = "transfer"
FILTER_CELL_PX = 40     # each first-layer filter enlarged to this many pixels (nearest-neighbour)
EVALUATION_WAIT_S = 3.0     # a GET waits this long for a fresh evaluation before it shows "computing"
EVALUATION_REFRESH_S = 2    # a "computing" page reloads itself after this many seconds
TRAINING_CHARTS_KEPT = 4    # fine-tuning histories whose charts are kept drawn (by file and version)
INITIAL_LOSS_TOLERANCE = 0.10   # the initial loss is "at chance" within this share of ln(C)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluate-index run: its result, or the reason there is none."""
    key: Any                     # the index version it was computed for
    result: dict | None
    problem: str | None
    retry: bool = False          # the catalog could not be read: compute again on the next request
    include: bool = False        # computed with the training images among the queries (?training_images=include)


class EvaluationCache:
    """evaluate-index results for the index versions the server serves, computed once per version and view, off the
    request threads (one background thread at a time, for the newest version asked for). The KEPT newest results
    are kept by key: switching the page between its views (training images left out or included) computes neither
    again."""

    KEPT = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._finished: collections.OrderedDict[Any, Evaluation] = collections.OrderedDict()   # oldest first
        # (version, index folder, compared index, catalog URL, include training images) next
        self._wanted: tuple[Any, Path, Path | None, str | None, bool] | None = None
        self._running_key: Any = None                    # the version being computed now
        self._running = False
        self.runs = 0                                    # evaluations computed (for tests and logs)

    def get(self, key: Any, index_dir: Path, wait_s: float, compare_dir: Path | None = None,
            db_url: str | None = None, include_training_images: bool = False) -> tuple[Evaluation | None, bool]:
        """-> (the evaluation of key, True), or, while it is computed, (the newest one of the same view, or None,
        False). Starts a run for key unless one is done or under way, and waits up to wait_s for it. With
        compare_dir, a run compares the two indexes (compare_indexes); the key must then name both indexes' versions
        (and include_training_images, when it may change)."""
        with self._lock:
            known = self._finished.get(key)
            if known is None or known.retry:
                if not (self._running and self._running_key == key):
                    self._wanted = (key, Path(index_dir), compare_dir, db_url, include_training_images)
                    if not self._running:
                        self._running = True
                        threading.Thread(target=self._run, name="evaluation", daemon=True).start()
                self._done.wait_for(lambda: self._finished.get(key, known) is not known, wait_s)
            found = self._finished.get(key)
            if found is not None:
                self._finished.move_to_end(key)
                return found, True
            same_view = [e for e in self._finished.values() if e.include == include_training_images]
            return (same_view[-1] if same_view else None), False

    def _run(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None:
                    self._running, self._running_key = False, None
                    return
                self._running_key = wanted[0]
            evaluation = Evaluation(wanted[0], *_evaluate(*wanted[1:]), include=wanted[4])
            with self._lock:
                self._finished.pop(evaluation.key, None)
                self._finished[evaluation.key] = evaluation
                while len(self._finished) > self.KEPT:
                    self._finished.popitem(last=False)
                self.runs += 1
                self._done.notify_all()


def _evaluate(index_dir: Path, compare_dir: Path | None = None, db_url: str | None = None,
              include_training_images: bool = False) -> tuple[dict | None, str | None, bool]:
    """-> (result, None, False) or (None, the reason it cannot be evaluated, whether to try again).

    db_url: the served catalog's URL (None: SQLite in index_dir). With compare_dir the result is compare_indexes'
    {"a", "b", "matched"}. The network's training images are left out unless include_training_images."""
    try:
        if compare_dir is not None:
            return compare_indexes(index_dir, compare_dir, db_url=db_url,
                                   include_training_images=include_training_images), None, False
        return evaluate_index(index_dir, db_url=db_url, include_training_images=include_training_images), None, False
    except EvaluationError as exc:
        return None, str(exc), False
    except (FileNotFoundError, SQLAlchemyError, CatalogUnavailable) as exc:
        log.warning("cannot evaluate %s: %s", compare_dir or index_dir, db_error_reason(exc, db_url))
        return None, "the index catalog cannot be read right now", True
    except Exception:  # noqa: BLE001 - a background thread: its failure is the page's message, not a lost thread
        log.exception("evaluating %s failed", index_dir)
        return None, "the evaluation failed (the server log says why)", True


@dataclasses.dataclass
class TransferPages:
    """This app's state for the pages of this blueprint (in app.extensions)."""
    compare_dir: Path | None = None     # a second index shown side by side on /evaluation (COMPARE_INDEX)
    training_file: Path | None = None   # the fine-tuning history shown on /training (TRAINING); None: the index's
    evaluations: EvaluationCache = dataclasses.field(default_factory=EvaluationCache)
    filters: dict[tuple[str, str], bytes] = dataclasses.field(default_factory=dict)  # (model, weights identity) -> PNG
    filters_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    training_charts: dict[tuple, dict[str, str]] = dataclasses.field(default_factory=dict)  # file versions -> SVGs
    training_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _config_path(value: Any) -> Path | None:
    """A path from the app config (or its environment variable) made absolute where it enters; None when unset."""
    return Path(str(value)).expanduser().resolve() if value not in (None, "") else None


@bp.record_once
def _init_state(state: BlueprintSetupState) -> None:
    config = state.app.config
    state.app.extensions[EXTENSION_KEY] = TransferPages(compare_dir=_config_path(config.get("COMPARE_INDEX")),
                                                        training_file=_config_path(config.get("TRAINING")))


def pages_state() -> TransferPages:
    return current_app.extensions[EXTENSION_KEY]


@functools.lru_cache(maxsize=8)
def _layer_table(model: str, input_size: int) -> LayerTable:
    return layer_table(model, input_size)


def _index_version(index_dir: Path) -> tuple:
    """A cheap version of an index we do not serve: its catalog file and write-ahead log, (inode, mtime, size) each."""
    parts = []
    for name in (CATALOG_FILE, CATALOG_FILE + "-wal"):
        try:
            st = (index_dir / name).stat()
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
    return tuple(parts)


def _network_name(about: dict) -> str:
    """"alexnet fc7, weights tuned.pt (sha256 ...)" or "..., weights random (seed 1)": which network made an index."""
    seed = f" (seed {about['seed']})" if WeightsChoice.parse(about["weights"]).is_random else ""
    views = "" if about.get("views", "single") == "single" else f" with {about['views']} views"
    return f"{about['model']} {about['layer']}{views}, weights {about['weights_label']}{seed}"


def _fine_tuned(about: dict) -> bool:
    """Whether an index's network was trained by fine-tune: its weights are a file with a history beside it."""
    weights = WeightsChoice.parse(about["weights"])
    return weights.is_file and history_path_for(weights.path).is_file()


def _baseline_first(comparison: dict) -> tuple[dict, dict[str, str]]:
    """The comparison with the baseline as A and the fine-tuned index as B, whichever of them is served, so that a
    gain shows as a gain; -> (comparison, side -> which index it is)."""
    roles = {"a": "this index", "b": "the index given with --compare-index"}
    if _fine_tuned(comparison["a"]["index"]) and not _fine_tuned(comparison["b"]["index"]):
        m = comparison["matched"]
        comparison = {**comparison, "a": comparison["b"], "b": comparison["a"],
                      "matched": {**m, "only_a": m["only_b"], "only_b": m["only_a"]}}
        roles = {"a": roles["b"], "b": roles["a"]}
    return comparison, roles


def _held_out(results: dict) -> dict:
    """What /evaluation says of the training images, for one result or a comparison (its most telling side's):
    {status (included, unknown, excluded, none), excluded, in_index, reason}."""
    telling = telling_side(results)
    return {**telling["training_images"], "excluded": telling["excluded_training_images"]}


@bp.get("/evaluation")
def evaluation() -> Response:
    """evaluate-index on the stored vectors: precision@k (with a chart), mAP, kNN, linear probe, per class; with a
    second index (COMPARE_INDEX), both side by side on the images they share. The images the network was fine-tuned
    on are left out of the queries unless ?training_images=include."""
    service = current_service()
    snapshot = service.index.snapshot()
    state = pages_state()
    compare_dir = state.compare_dir
    include = request.args.get("training_images") == "include"
    key = snapshot.version if compare_dir is None else (snapshot.version, _index_version(compare_dir))
    key = (key, include)
    evaluation, fresh = state.evaluations.get(key, service.index.index_dir, EVALUATION_WAIT_S, compare_dir,
                                              service.index.db_url, include)
    result, problem = (evaluation.result, evaluation.problem) if evaluation else (None, None)
    comparison, roles = None, {}
    if result is not None and "matched" in result:   # our own SVGs below, labels escaped inside
        comparison, roles = _baseline_first(result)
        result = comparison["a"]
        charts = [Markup(precision_at_k_svg(comparison[side])) for side in ("a", "b")]
    else:
        charts = [Markup(precision_at_k_svg(result))] if result else []
    names = {side: _network_name(comparison[side]["index"]) for side in ("a", "b")} if comparison else {}
    tuned = {side: _fine_tuned(comparison[side]["index"]) for side in ("a", "b")} if comparison else {}
    html = render_template("evaluation.html", result=result, comparison=comparison, names=names, roles=roles,
                           tuned=tuned, problem=problem, evaluated_on=held_out_words(comparison or result) if result else None,
                           held=_held_out(comparison or result) if result else None,
                           chart=charts[0] if charts else None, charts=charts, computing=not fresh,
                           comparing=compare_dir is not None, refresh_s=EVALUATION_REFRESH_S,
                           summary=service.index_summary(snapshot))
    return Response(html)   # while computing, the page's script asks again (without script: a <noscript> refresh)


def _training_source(settings) -> tuple[Path | None, str]:  # noqa: ANN001 - retrieval.catalog.IndexSettings
    """-> (the history file to show or None, where it comes from: "given", "index" or "none")."""
    given = pages_state().training_file
    if given is not None:
        return given, "given"
    weights = settings.weights_choice
    if weights.is_file:
        return history_path_for(weights.path), "index"
    return None, "none"


def _file_version(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


def _training_charts(path: Path, history: dict, key: tuple) -> tuple[dict[str, str], tuple | None]:
    """The history's charts as inline SVG (drawn once per key, the files' versions taken before they were read) and
    its filters file's (before, after)."""
    state = pages_state()
    filters = load_filters(path)
    with state.training_lock:
        svgs = state.training_charts.get(key)
        if svgs is None:
            svgs = training_svgs(history, filters)
            while len(state.training_charts) >= TRAINING_CHARTS_KEPT:
                state.training_charts.pop(next(iter(state.training_charts)))
            state.training_charts[key] = svgs
    return svgs, filters


@bp.get("/training")
def training() -> str:
    """The fine-tuning history of the network the index was built with (or of TRAINING): settings, split, sanity
    checks, loss and accuracy per epoch, first-layer filters before and after. Without one, how to make one (200)."""
    service = current_service()
    snapshot = service.index.snapshot()
    settings = snapshot.settings
    path, source = _training_source(settings)
    history = problem = None
    charts: dict[str, Markup] = {}
    extra: dict[str, Any] = {}
    if path is not None:
        try:
            version = (_file_version(path), _file_version(filters_path_for(path)))   # before reading: never stale
            history = load_history(path)
            svgs, filters = _training_charts(path, history, version)
            charts = {name: Markup(svg) for name, svg in svgs.items()}   # drawn by matplotlib from numbers; text escaped by it
            best = next((r for r in history["epochs_run"] if r["epoch"] == history["best_epoch"]), None)
            chance = history["chance_loss"]
            extra = {"split": split_counts(history), "best": best,
                     "initial_off": (history["initial_loss"] - chance) / chance if chance else 0.0,
                     "filter_change": filter_change(*filters) if filters is not None else None,
                     "filter_shape": filters[0].shape if filters is not None else None}
        except HistoryNotFound:
            history = None
        except HistoryError as exc:
            problem = str(exc).replace(str(path), path.name)     # the file's name, not the server's folders
    return render_template("training.html", history=history, problem=problem, charts=charts, source=source,
                           file_name=path.name if path else None, settings=settings,
                           weights=weights_label(settings), tolerance=INITIAL_LOSS_TOLERANCE,
                           index_dir=service.index.index_dir.name,
                           summary=service.index_summary(snapshot), **extra)


@bp.get("/model")
def model() -> str:
    """The index's network: its per-layer table and its first convolution's filters."""
    service = current_service()
    snapshot = service.index.snapshot()
    settings = snapshot.settings
    table = _layer_table(settings.model, snapshot.extractor.preprocessing.crop_size)
    return render_template("model.html", table=table, settings=settings, weights=weights_label(settings),
                           summary=service.index_summary(snapshot))


@bp.get("/model/filters.png")
def filters() -> Response:
    """The first convolution layer's filters as a PNG grid, each rescaled to 0..255 and enlarged."""
    snapshot = current_service().index.snapshot()
    key = (snapshot.settings.model, snapshot.settings.weights_identity)
    state = pages_state()
    with state.filters_lock:
        png = state.filters.get(key)
        if png is None:
            png = state.filters[key] = filters_png(snapshot.extractor.net, cell=FILTER_CELL_PX)
    response = Response(png, mimetype="image/png")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
