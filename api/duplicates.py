"""The /duplicates page: groups of near-duplicate images (find-duplicates) with thumbnails, computed once per index
version on a background thread."""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from sqlalchemy.exc import SQLAlchemyError

from retrieval.search.duplicate_groups import byte_twin
from retrieval.search.duplicates import DuplicateGroups, DuplicatesError, check_threshold, find_duplicates
from retrieval.vectors.pca import background_linear_algebra

from api.errors import ApiError
from api.query_input import page_number
from api.service import current_service

log = logging.getLogger(__name__)

bp = Blueprint("duplicates", __name__)

WAIT_S = 3.0          # a GET waits this long for the groups before it shows "computing"
REFRESH_S = 3         # a "computing" page reloads itself after this many seconds
GROUPS_PER_PAGE = 20   # a page of 107 groups was 32,750 px tall
MEMBERS_SHOWN = 100    # images shown of one group (?threshold=1.99 made one group of the whole collection)


@dataclasses.dataclass(frozen=True)
class Grouping:
    key: Any                            # (the index version the groups are of, the threshold asked for or None)
    result: DuplicateGroups | None
    problem: str | None


class GroupingCache:
    """find-duplicates on the served index, once per index version, off the request threads."""

    KEPT = 4   # groupings kept, newest first: two thresholds looked at in turn (two tabs) no longer undo each other

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._kept: dict[Any, Grouping] = {}   # by key, oldest first
        self._running: Any = None       # the key being grouped now (None: no thread)

    def get(self, key: tuple[Any, float | None], index: Any, wait_s: float) -> tuple[Grouping | None, bool]:
        """key: (index version, threshold or None for the calibrated one) -> (its grouping or None, whether it is
        there); starts one for key unless done or under way (one at a time: another key's waits for its turn)."""
        with self._lock:
            if key not in self._kept:
                if self._running is None:
                    self._running = key
                    threading.Thread(target=self._run, args=(key, index), name="duplicates", daemon=True).start()
                self._done.wait_for(lambda: key in self._kept, wait_s)
            grouping = self._kept.get(key)
            return grouping, grouping is not None

    def _run(self, key: tuple[Any, float | None], index: Any) -> None:
        try:
            with background_linear_algebra():   # the whitening it learns lets this worker's searches run meanwhile
                grouping = Grouping(key, find_duplicates(index, threshold=key[1]), None)
        except DuplicatesError as exc:
            grouping = Grouping(key, None, str(exc))
        except (SQLAlchemyError, OSError, RuntimeError) as exc:   # the catalog or the network failed
            log.warning("cannot group duplicates: %s", exc)
            grouping = Grouping(key, None, "the groups cannot be computed right now (the server log says why)")
        with self._lock:
            self._kept.pop(key, None)
            self._kept[key] = grouping
            while len(self._kept) > self.KEPT:
                self._kept.pop(next(iter(self._kept)))
            self._running = None
            self._done.notify_all()


def _cache() -> GroupingCache:
    return current_app.extensions.setdefault("duplicates", GroupingCache())


@bp.get("/duplicates")
def duplicates() -> Response:
    """Groups of near-duplicates with thumbnails, the suggested keeper first; nothing is changed. ?threshold=D groups
    at D (0 < D < 2) instead of the calibrated threshold, as find-duplicates --threshold D does."""
    threshold = _threshold(request.args.get("threshold"))
    service = current_service()
    snapshot = service.index.snapshot()
    grouping, fresh = _cache().get((snapshot.version, threshold), service.index, WAIT_S)
    if not fresh:   # the groups of an earlier version, or of another threshold: never shown as these (images gone
        grouping = None   # since were offered as keepers, and one may delete "the others" on their word)
    result = grouping.result if grouping else None
    pages = max(1, math.ceil(len(result.groups) / GROUPS_PER_PAGE)) if result else 1
    page = page_number(request.args.get("page"), pages)
    first = (page - 1) * GROUPS_PER_PAGE
    html = render_template("duplicates.html", result=result, problem=grouping.problem if grouping else None,
                           groups=result.groups[first:first + GROUPS_PER_PAGE] if result else [], first=first,
                           page=page, pages=pages, computing=not fresh,
                           refresh_s=REFRESH_S, summary=service.index_summary(snapshot), threshold=threshold,
                           byte_twin=byte_twin, members_shown=MEMBERS_SHOWN, notes=result.notes() if result else [])
    return Response(html)   # while computing, the page's script asks again (without script: a <noscript> refresh)


def _threshold(raw: str | None) -> float | None:
    """?threshold= -> a distance between whitened vectors, 0 < D < 2, or None (absent or empty: calibrated). Raises
    ApiError 400."""
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw.strip()[:32])
    except ValueError:
        raise ApiError(400, "bad_threshold", f"the threshold is a distance between whitened vectors, above 0 and "
                                             f"below 2, not {raw.strip()[:32]!r}") from None
    try:
        return check_threshold(value)   # what find-duplicates --threshold accepts
    except DuplicatesError as exc:
        raise ApiError(400, "bad_threshold", str(exc)) from None
