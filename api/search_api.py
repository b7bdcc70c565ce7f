"""The JSON API blueprint: POST /search, neighbours of an indexed image, the images themselves, stats and health."""
from __future__ import annotations

import io
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for

from retrieval.search.snapshot import Hit
from retrieval.system import display_name

from api.errors import ApiError, set_retry_after
from api.image_files import NotAnImageNow, image_mimetype
from api.query_input import parse_expansion, parse_k, read_query_image
from api.service import SearchAnswer, current_service

bp = Blueprint("api", __name__)

VERSIONED_MAX_AGE_S = 7 * 24 * 3600   # an image's URL with ?v=<its content hash>: the same URL, the same bytes


@bp.app_template_global()
def thumbnail_url(image_id: int, sha256: str) -> str:
    """An indexed image's thumbnail address, versioned by its content (?v=): ids start again at 1 in a rebuilt
    index, and a file replaced in place keeps its id, so /images/3/thumbnail alone may be another picture
    tomorrow (a browser kept the old one for a week)."""
    return url_for("api.thumbnail", image_id=image_id, v=sha256[:16] or None)


@bp.app_template_global()
def image_url(image_id: int, sha256: str) -> str:
    """An indexed image's original file, versioned by its content as thumbnail_url."""
    return url_for("api.image_file", image_id=image_id, v=sha256[:16] or None)


def hit_json(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "path": hit.path, "label": hit.label, "distance": round(hit.distance, 6),
            "image_url": image_url(hit.id, hit.sha256),
            "thumbnail_url": thumbnail_url(hit.id, hit.sha256),
            "gallery_url": url_for("gallery.image_page", image_id=hit.id)}


def _cache_for(response: Response, sha256: str | None, *, public: bool) -> Response:
    """Cached for a week where the URL names the content (?v= its hash, as the pages and the API link them) and the
    file is as indexed (sha256 None: changed since, not re-indexed yet), else checked with the server each time (its
    ETag answers 304): an unversioned /images/3 may be another picture after a rebuild. public: shared caches may
    keep it (thumbnails); originals are private (a proxy that authenticates must not hand them to others)."""
    if sha256 and (v := request.args.get("v")) and sha256.startswith(v) and len(v) >= 8:
        response.cache_control.max_age = VERSIONED_MAX_AGE_S
        response.cache_control.immutable = True
    else:
        response.cache_control.max_age = 0
        response.cache_control.no_cache = True
    if public:
        response.cache_control.public = True
    else:
        response.cache_control.private = True
    return response


def answer_json(answer: SearchAnswer) -> Response:
    service = current_service()
    snapshot = answer.snapshot or service.index.snapshot()   # the index that answered, not one swapped in since
    body = {"results": [hit_json(h) for h in answer.hits], "query": answer.query,
            "index": service.index_summary(snapshot), "timings_ms": answer.timings_ms}
    if snapshot.catalog.has_labels():
        body["predicted_label"] = service.predict(answer.hits, snapshot)   # the neighbours' majority vote
    return jsonify(body)


def _k() -> int:
    return parse_k(request, default=current_app.config["DEFAULT_K"], maximum=current_app.config["MAX_K"])


@bp.post("/search")
def search() -> Response:
    """Nearest indexed images to an uploaded one (multipart field `image` or raw image/* body), nearest first.

    ?qe=N&qe_alpha=A (or form fields): query expansion over the first N results (docs/searching.md)."""
    k = _k()
    expansion = parse_expansion(request)
    data, _name = read_query_image(request)
    return answer_json(current_service().search_upload(data, k, expansion=expansion))


@bp.get("/images/<image_id:image_id>/neighbours")
def neighbours(image_id: int) -> Response:
    """Nearest images to an indexed one, from its stored vector (no forward pass); itself left out."""
    k = _k()
    return answer_json(current_service().neighbours(image_id, k, parse_expansion(request)))


@bp.get("/images/<image_id:image_id>")
def image_file(image_id: int) -> Response:
    """The original file, found by id only, from inside the data folder."""
    path, sha256 = current_service().files.image_file(image_id)
    try:
        mimetype = image_mimetype(path)
    except NotAnImageNow as exc:
        raise ApiError(404, "file_unreadable", f"the file of image {image_id} can no longer be decoded: {exc}") from None
    # send_file puts the name in a Content-Disposition header (one printable line, whatever the file is called)
    # and would hash the path as UTF-8 for its ETag (names that are not UTF-8 are not): give it both.
    name = "".join(ch if ch.isprintable() else "_" for ch in display_name(path.name))
    st = path.stat()
    return _cache_for(send_file(path, mimetype=mimetype, download_name=name, conditional=True,
                                etag=f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"), sha256, public=False)


@bp.get("/images/<image_id:image_id>/thumbnail")
def thumbnail(image_id: int) -> Response:
    """A JPEG no larger than THUMBNAIL_SIZE px on its long side, cached on disk."""
    thumb, etag, sha256 = current_service().files.thumbnail_file(image_id)
    return _cache_for(send_file(io.BytesIO(thumb), mimetype="image/jpeg", conditional=True, etag=etag), sha256,
                      public=True)


@bp.get("/stats")
def stats() -> Response:
    return jsonify(current_service().stats())


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the index is served; 503 with a reason when it cannot be (catalog gone, hot reload broken)."""
    body, status = current_service().health()
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return set_retry_after(response, "unavailable") if status == 503 else response
