"""Gallery pages for the transfer-learning lesson: the evaluation numbers, the layer table and first-layer filters."""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, render_template
from flask.blueprints import BlueprintSetupState
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError

from retrieval.catalog import CatalogUnavailable, db_error_reason
from retrieval.evaluation import EvaluationError, evaluate_index, precision_at_k_svg
from retrieval.index import weights_label
from retrieval.model_info import LayerTable, filters_png, layer_table

from .service import current_service

log = logging.getLogger(__name__)

bp = Blueprint("transfer", __name__)

EXTENSION_KEY = "transfer"
FILTER_CELL_PX = 40     # each first-layer filter enlarged to this many pixels (nearest-neighbour)
EVALUATION_WAIT_S = 3.0     # a GET waits this long for a fresh evaluation before it shows "computing"
EVALUATION_REFRESH_S = 2    # a "computing" page reloads itself after this many seconds


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluate-index run: its result, or the reason there is none."""
    key: Any                     # the index version it was computed for
    result: dict | None
    problem: str | None
    retry: bool = False          # the catalog could not be read: compute again on the next request


class EvaluationCache:
    """evaluate-index results for the index version the server serves, computed once per version, off the
    request threads (one background thread at a time, for the newest version asked for)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._latest: Evaluation | None = None           # the newest finished run
        self._wanted: tuple[Any, Path, str | None] | None = None   # (version, index folder, catalog URL) the next run is for
        self._running_key: Any = None                    # the version being computed now
        self._running = False
        self.runs = 0                                    # evaluations computed (for tests and logs)

    def get(self, key: Any, index_dir: Path, wait_s: float, db_url: str | None = None) -> tuple[Evaluation | None, bool]:
        """-> (the newest evaluation, whether it is of this key). Starts a run for key unless one is done or
        under way, and waits up to wait_s for it."""
        with self._lock:
            latest = self._latest
            if latest is None or latest.key != key or latest.retry:
                if not (self._running and self._running_key == key):
                    self._wanted = (key, Path(index_dir), db_url)
                    if not self._running:
                        self._running = True
                        threading.Thread(target=self._run, name="evaluation", daemon=True).start()
                self._done.wait_for(lambda: self._latest is not latest and self._latest.key == key, wait_s)
            latest = self._latest
            return latest, latest is not None and latest.key == key

    def _run(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None:
                    self._running, self._running_key = False, None
                    return
                self._running_key = wanted[0]
            evaluation = Evaluation(wanted[0], *_evaluate(wanted[1], wanted[2]))
            with self._lock:
                self._latest = evaluation
                self.runs += 1
                self._done.notify_all()


def _evaluate(index_dir: Path, db_url: str | None = None) -> tuple[dict | None, str | None, bool]:
    """-> (result, None, False) or (None, the reason it cannot be evaluated, whether to try again)."""
    try:
        return evaluate_index(index_dir, db_url=db_url), None, False
    except EvaluationError as exc:
        return None, str(exc), False
    except (FileNotFoundError, SQLAlchemyError, CatalogUnavailable) as exc:
        log.warning("cannot evaluate %s: %s", index_dir, db_error_reason(exc, db_url))
        return None, "the index catalog cannot be read right now", True
    except Exception:  # noqa: BLE001 - a background thread: its failure is the page's message, not a lost thread
        log.exception("evaluating %s failed", index_dir)
        return None, "the evaluation failed (the server log says why)", True


@dataclasses.dataclass
class TransferPages:
    """This app's state for the pages of this blueprint (in app.extensions)."""
    evaluations: EvaluationCache = dataclasses.field(default_factory=EvaluationCache)
    filters: dict[tuple[str, str], bytes] = dataclasses.field(default_factory=dict)  # (model, weights identity) -> PNG
    filters_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@bp.record_once
def _init_state(state: BlueprintSetupState) -> None:
    state.app.extensions[EXTENSION_KEY] = TransferPages()


def pages_state() -> TransferPages:
    return current_app.extensions[EXTENSION_KEY]


@functools.lru_cache(maxsize=8)
def _layer_table(model: str, input_size: int) -> LayerTable:
    return layer_table(model, input_size)


@bp.get("/evaluation")
def evaluation() -> Response:
    """evaluate-index on the stored vectors: precision@k (with a chart), mAP, kNN, linear probe, per class."""
    service = current_service()
    snapshot = service.index.snapshot()
    evaluation, fresh = pages_state().evaluations.get(snapshot.version, service.index.index_dir, EVALUATION_WAIT_S,
                                                      service.index.db_url)
    result, problem = (evaluation.result, evaluation.problem) if evaluation else (None, None)
    chart = Markup(precision_at_k_svg(result)) if result else None   # our own SVG, labels escaped inside
    html = render_template("evaluation.html", result=result, problem=problem, chart=chart, computing=not fresh,
                           refresh_s=EVALUATION_REFRESH_S, summary=service.index_summary(snapshot))
    return Response(html, headers={"Refresh": str(EVALUATION_REFRESH_S)} if not fresh else {})


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
