"""The gallery blueprint: server-rendered pages to upload a photo, see its neighbours and walk the collection."""
from __future__ import annotations

import math
import re
import time
from typing import Any, Iterable

from flask import Blueprint, Response, current_app, jsonify, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from retrieval.search.expansion import QueryExpansion
from retrieval.system import shown_name

from api.errors import ApiError, set_retry_after
from api.query_input import page_number, parse_expansion, parse_k, read_query_image
from api.search_api import image_url, thumbnail_url
from api.recent_queries import RecentQuery
from api.service import current_service

bp = Blueprint("gallery", __name__)   # templates and static files are the app's (api/templates, api/static)

PREVIEW_SIZE = 480          # long side of the uploaded query shown on its results page, px
K_CHOICES = (6, 12, 24, 48)
QE_CHOICES = (0, 1, 3, 10)  # query expansion over the first N results (0: off); alpha-QE's alpha from ?qe_alpha=


def _gallery_k() -> int:
    return parse_k(request, default=current_app.config["GALLERY_K"], maximum=current_app.config["MAX_K"], lenient=True)


def _carried(k: int, expansion: QueryExpansion | None, origin: str | None = None) -> dict[str, int | float | str | None]:
    """The search settings a results page's links to neighbours keep, those not at their defaults: click on from a
    search of 24 with expansion, and the neighbour's page is one too; and the uploaded search they started from
    (`from`: its token), so that every page after it links back to it. (None: left out of the URL.)"""
    return {"k": None if k == current_app.config["GALLERY_K"] else k,
            "qe": expansion.n if expansion else None,
            "qe_alpha": (expansion.alpha or None) if expansion else None,
            "from": origin}


SKIPPED_SHOWN = 50   # skipped files named on the home page (index-images --json names them all)
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")   # what RecentQueries hands out (secrets.token_urlsafe)


def _origin(service, settings: dict[str, int | float | str | None]) -> tuple[str | None, str | None]:  # noqa: ANN001
    """?from= on an image page: (the uploaded search's token, its page's URL with the page's settings, _carried's)
    while that search is kept, else (None, None): an expired or made-up token is dropped quietly (the page itself
    is what was asked for). service: api.service.SearchService."""
    token = request.args.get("from")
    if not token or not TOKEN.fullmatch(token) or service.recent_queries.get(token) is None:
        return None, None
    kept = {name: value for name, value in settings.items() if value is not None and name != "from"}
    return token, url_for("gallery.query_page", token=token, **kept)


def _stored_label(labels: Iterable[str | None], shown: str | None) -> str | None:
    """The label as stored for ?label= as shown on pages (names that are not UTF-8 are shown escaped)."""
    if shown is None:
        return None
    return next((label for label in labels if label is not None and shown_name(label) == shown), shown)


def _home(error: str | None = None, status: int = 200) -> tuple[str, int]:
    service = current_service()
    catalog = service.index.catalog
    unlabelled = request.args.get("unlabelled") == "1"   # the images outside any class folder (?label= is a name)
    label = None if unlabelled else _stored_label(catalog.labels(), request.args.get("label") or None)
    page_size = int(current_app.config["GALLERY_PAGE_SIZE"])
    total = catalog.count_where(label=label, unlabelled=unlabelled)
    pages = max(1, math.ceil(total / page_size))
    page = page_number(request.args.get("page"), pages)
    images = catalog.list_images(label=label, unlabelled=unlabelled, offset=(page - 1) * page_size, limit=page_size)
    stats = service.stats()
    skipped = catalog.skipped(limit=SKIPPED_SHOWN) if stats["skipped"] else []   # which files, and why
    return render_template("home.html", stats=stats, summary=stats, images=images, label=label, unlabelled=unlabelled,
                           page=page, pages=pages, total=total, error=error, skipped=skipped), status


@bp.app_context_processor
def _data_folder() -> dict[str, Any]:
    """Every page says when the index's data folder is not there (it showed a page of broken pictures, silently)."""
    try:
        service = current_service()
        return {"data_folder_missing": service.files.data_folder_missing(service.config.index_dir, whole_path=False)}
    except Exception:  # noqa: BLE001 - an error page about the index itself renders without it
        return {"data_folder_missing": None}


@bp.get("/")
def home() -> tuple[str, int]:
    """Upload form, index overview, and the collection grid (?page=, ?label=, ?unlabelled=1)."""
    return _home()


@bp.get("/favicon.ico")
def favicon() -> Response:
    """Where browsers look for an icon on pages that name none (the JSON answers): the gallery's own."""
    return redirect(url_for("static", filename="favicon.svg"), code=301)


@bp.get("/gallery")
def gallery_root() -> Response:
    return redirect(url_for("gallery.home"))


@bp.get("/gallery/search")
def upload_page() -> Response:
    """The upload's URL opened again (a reload or a bookmark after a refused upload): the form is on the home page."""
    return redirect(url_for("gallery.home"))


@bp.post("/gallery/search")
def upload() -> Response | tuple[str, int]:
    """Search with an uploaded photo, then redirect to its results page (so reload and back just work)."""
    service = current_service()
    filename = None
    try:
        k = _gallery_k()
        data, filename = read_query_image(request)
        answer = service.search_upload(data, k, preview_size=PREVIEW_SIZE)   # the preview: same decode, same limits
    except ApiError as exc:   # the file named, as the page's own check names a file that is no image
        message = f"“{filename}”: {exc.message}" if filename else exc.message
        page = _refused(message, exc.status) if _from_script() else make_response(*_home(error=message, status=exc.status))
        return set_retry_after(page, exc.code) if exc.status == 503 else page
    except RequestEntityTooLarge:
        limit_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        message = f"That photo is larger than the {limit_mb:g} MB upload limit."
        return _refused(message, 413) if _from_script() else _home(error=message, status=413)
    token = service.recent_queries.add(RecentQuery(answer.vector, answer.preview_jpeg, answer.query["width"],
                                                   answer.query["height"], filename, time.time()))
    results = url_for("gallery.query_page", token=token, k=k)
    if _from_script():   # the page's script goes there itself; a refusal it shows where the person is
        return jsonify({"url": results})
    return redirect(results, code=303)


def _from_script() -> bool:
    """An upload sent by the pages' script (fetch), which shows a refusal in place, on the page the person was on
    (a form post answered it with the home page, scrolled to the top, focus lost), rather than by a form post."""
    return request.headers.get("X-Requested-With") == "fetch"


def _refused(message: str, status: int) -> Response:
    response = jsonify({"error": {"message": message}})
    response.status_code = status
    return response


@bp.get("/gallery/query/<token>")
def query_page(token: str) -> Response:
    """Neighbours of an uploaded photo, from its stored features: a visitor's own, kept by no cache."""
    service = current_service()
    query = service.recent_queries.get(token)
    if query is None:
        raise ApiError(404, "query_expired", "This search has expired (searches are kept for an hour). "
                                             "Upload the photo again.")
    k, expansion = _gallery_k(), parse_expansion(request, lenient=True)
    snapshot = service.index.snapshot()   # one index version for the search, the vote and the overview
    hits, _ms = service.search_vector(query.vector, k, snapshot=snapshot, expansion=expansion)
    response = make_response(render_template(
        "results.html", hits=hits, k=k, k_choices=K_CHOICES, record=None, qe=expansion.n if expansion else 0,
        qe_choices=QE_CHOICES, carry=_carried(k, expansion, origin=token), back=None,
        prediction=service.predict(hits, snapshot), query=query,
        query_src=url_for("gallery.query_image", token=token), summary=service.index_summary(snapshot)))
    response.cache_control.private = True
    response.cache_control.no_store = True
    return response


@bp.get("/gallery/query/<token>/image")
def query_image(token: str) -> Response:
    query = current_service().recent_queries.get(token)
    if query is None:
        raise ApiError(404, "query_expired", "This search has expired. Upload the photo again.")
    response = Response(query.preview_jpeg, mimetype="image/jpeg")
    response.cache_control.private = True
    response.cache_control.max_age = 3600
    return response


@bp.get("/gallery/<image_id:image_id>/original")
def original(image_id: int) -> Response:
    """"Open original": the file's own address when it is there, else a page that says why (the API's address
    answers JSON, which a person following the link read raw)."""
    _path, sha256 = current_service().files.image_file(image_id)   # ApiError 404/403: an error page, in this blueprint
    return redirect(image_url(image_id, sha256 or ""))


@bp.get("/gallery/<image_id:image_id>")
def image_page(image_id: int) -> str:
    """An indexed image and its neighbours; each neighbour links to its own page."""
    service = current_service()
    k, expansion = _gallery_k(), parse_expansion(request, lenient=True)
    answer = service.neighbours(image_id, k, expansion)
    origin, back = _origin(service, _carried(k, expansion))   # back to the photo with this page's k and expansion
    record = service.record(image_id, answer.snapshot)
    return render_template("results.html", hits=answer.hits, k=k, k_choices=K_CHOICES,
                           qe=expansion.n if expansion else 0, qe_choices=QE_CHOICES,
                           carry=_carried(k, expansion, origin=origin), back=back,
                           prediction=service.predict(answer.hits, answer.snapshot),
                           record=record, query=None, query_src=thumbnail_url(record.id, record.sha256),
                           summary=service.index_summary(answer.snapshot))
