"""Gallery pages for the transfer-learning lesson: the evaluation numbers, the layer table and first-layer filters."""
from __future__ import annotations

import functools
import threading
from typing import Any

from flask import Blueprint, Response, render_template
from markupsafe import Markup

from retrieval.evaluation import EvaluationError, evaluate_index, precision_at_k_svg
from retrieval.model_info import LayerTable, filters_png, layer_table

from .service import current_service

bp = Blueprint("transfer", __name__)

FILTER_CELL_PX = 40     # each first-layer filter enlarged to this many pixels (nearest-neighbour)


class EvaluationCache:
    """evaluate-index results for the current index content, recomputed only when the index changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._value: tuple[dict | None, str | None] = (None, None)

    def get(self, index_dir, updated_at) -> tuple[dict | None, str | None]:  # noqa: ANN001
        """-> (result, None) or (None, the reason it cannot be evaluated)."""
        with self._lock:
            if self._key != (str(index_dir), updated_at):
                try:
                    self._value = (evaluate_index(index_dir), None)
                except EvaluationError as exc:
                    self._value = (None, str(exc))
                self._key = (str(index_dir), updated_at)
            return self._value


_evaluations = EvaluationCache()
_filters: dict[str, bytes] = {}   # weights identity -> PNG
_filters_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _layer_table(model: str, input_size: int) -> LayerTable:
    return layer_table(model, input_size)


@bp.get("/evaluation")
def evaluation() -> str:
    """evaluate-index on the stored vectors: precision@k (with a chart), mAP, kNN, linear probe, per class."""
    service = current_service()
    index = service.index
    result, problem = _evaluations.get(index.index_dir, index.catalog.updated_at())
    chart = Markup(precision_at_k_svg(result)) if result else None   # our own SVG, labels escaped inside
    return render_template("evaluation.html", result=result, problem=problem, chart=chart,
                           summary=service.index_summary())


@bp.get("/model")
def model() -> str:
    """The index's network: its per-layer table and its first convolution's filters."""
    service = current_service()
    settings = service.index.settings
    table = _layer_table(settings.model, service.index.extractor.preprocessing.crop_size)
    return render_template("model.html", table=table, settings=settings, summary=service.index_summary())


@bp.get("/model/filters.png")
def filters() -> Response:
    """The first convolution layer's filters as a PNG grid, each rescaled to 0..255 and enlarged."""
    index = current_service().index
    key = index.settings.weights_identity
    with _filters_lock:
        png = _filters.get(key)
        if png is None:
            png = _filters[key] = filters_png(index.extractor.net, cell=FILTER_CELL_PX)
    response = Response(png, mimetype="image/png")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
