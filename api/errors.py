"""Error answers: JSON `{"error": {"code", "message"}}` for programs, an HTML page for the gallery, never a trace."""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify, render_template, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import ClientDisconnected, HTTPException, InternalServerError

from retrieval.catalog import damaged_message, damaged_reason
from retrieval.search.snapshot import IndexUnavailable

from api.metrics import count_error

log = logging.getLogger(__name__)

# HTTP status -> the stable machine-readable code used when a handler did not choose a more specific one.
STATUS_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "upload_too_large",
    415: "unsupported_image",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """A request the service refuses: HTTP status, stable code, and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


JSON_BLUEPRINTS = (None, "api", "metrics")   # the JSON API, /metrics, URLs no route matched; others serve pages
API_ADDRESSES = ("/search", "/images", "/stats", "/healthz", "/metrics")   # and below: JSON whoever asks
# 503s say when to try again: an overloaded server soon, an index that cannot be served after the next reload's look
RETRY_AFTER_S = {"overloaded": 1}
RETRY_AFTER_DEFAULT_S = 5


def error_response(status: int, code: str, message: str) -> Response:
    """JSON error for programs; an HTML page when a page (gallery and other HTML blueprints) was asked for, or a
    browser asked for a URL no route matched (a mistyped /gallery/abc: a page, not JSON)."""
    count_error(status, code)
    if request.blueprint not in JSON_BLUEPRINTS or (request.blueprint is None and _page_asked()):
        response = Response(render_template("error.html", status=status, code=code, message=message,
                                            summary=_served_summary()),
                            status, mimetype="text/html")
    else:
        response = jsonify({"error": {"code": code, "message": message}})
        response.status_code = status
    if status == 503:
        set_retry_after(response, code)
    return response


def set_retry_after(response: Response, code: str) -> Response:
    """A 503's Retry-After: seconds until it is worth asking again, by the error's code."""
    response.headers["Retry-After"] = str(RETRY_AFTER_S.get(code, RETRY_AFTER_DEFAULT_S))
    return response


def _page_asked() -> bool:
    """A browser asked for an address no route matched, outside the API's (a mistyped /gallery/abc: a page; a
    mistyped /images/abc is the API's: JSON even to a browser). A browser's Accept has text/html first; curl's */*
    does not."""
    path = request.path
    if any(path == prefix or path.startswith(prefix + "/") for prefix in API_ADDRESSES):
        return False
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def _served_summary() -> dict | None:
    """The served index's network and size, for an error page's title and footer; None when it cannot be served."""
    from api.service import EXTENSION_KEY   # api.service raises this module's ApiError

    service = current_app.extensions.get(EXTENSION_KEY)
    try:
        return service.index_summary() if service is not None else None
    except IndexUnavailable:
        return None


def _http_message(exc: HTTPException) -> str:
    if exc.code == 413:
        limit = request.max_content_length or 0
        size = request.content_length
        if size is not None and limit and size <= limit:   # under the size limit: one of the form's own limits
            return (f"the form has more than {request.max_form_parts:,} parts or a text field over "
                    f"{(request.max_form_memory_size or 0) / 1000:g} KB; send the image as one file part "
                    "(multipart field 'image') or as the raw request body")
        return f"the upload is larger than the {limit / (1024 * 1024):g} MB limit"
    if exc.code == 404 and request.blueprint is None and _page_asked():
        return "there is no such page here; the collection is on the home page"
    if exc.code == 404:
        return ("no such resource: the API has POST /search, GET /images/<id>, GET /images/<id>/neighbours, "
                "GET /images/<id>/thumbnail, GET /stats, GET /healthz and GET /metrics; the gallery is at /")
    if exc.code == 405:
        # HEAD and OPTIONS come with GET and with every route: not what a client is looking for
        methods = set(getattr(exc, "valid_methods", None) or []) - {"HEAD", "OPTIONS"}
        allowed = " or ".join(sorted(methods))
        return f"{request.method} is not allowed here" + (f"; use {allowed}" if allowed else "")
    return exc.description or exc.name


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    logged_unavailable: list[str] = []   # the last reason logged (per app): each new one is logged once

    def _log_once(reason: str, exc: BaseException) -> None:
        if logged_unavailable[-1:] != [reason]:
            log.error("answering 503 on %s %s: %s", request.method, request.path, reason, exc_info=exc)
            logged_unavailable[:] = [reason]

    @app.errorhandler(IndexUnavailable)
    def _index_unavailable(exc: IndexUnavailable) -> Response:
        # the reload that found the index unservable logged why; the reason is the user's to see
        return error_response(503, "unavailable", f"the index cannot be served right now: {exc}")

    @app.errorhandler(SQLAlchemyError)
    def _database(exc: SQLAlchemyError) -> Response:
        # the catalog (or the recent-queries store) was deleted, replaced or corrupted under the server
        from api.service import EXTENSION_KEY   # api.service raises this module's ApiError

        service = app.extensions.get(EXTENSION_KEY)
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        damage = damaged_reason(exc)
        if damage is not None and service is not None:   # waiting cannot mend a damaged file: say what can
            try:
                snapshot = service.index.snapshot()
                reason = damaged_message(snapshot.catalog.location, damage, str(snapshot.data_dir))
            except IndexUnavailable:   # replaced or gone meanwhile: SQLite's words stand
                pass
        _log_once(reason, exc)
        if service is not None:   # /healthz tells the load balancer, which would otherwise keep sending searches
            service.catalog_failed(reason)
        if damage is not None:
            return error_response(503, "unavailable", "the index catalog is damaged; the server's operator has been "
                                                      "told what to do (see /healthz)")
        return error_response(503, "unavailable", "the index catalog cannot be read right now; try again shortly "
                                                  "(see /healthz)")

    @app.errorhandler(ClientDisconnected)
    def _body_cut(exc: ClientDisconnected) -> Response:
        # werkzeug raises this when reading the body fails: the client went away, or stalled past the
        # server's read timeout (serve-images --read-timeout), which surfaces as a socket TimeoutError
        if isinstance(exc.__context__, TimeoutError):
            return error_response(408, "request_timeout", "the request body stopped arriving; send it again")
        return error_response(400, "bad_request", "the request body ended before its announced length")

    @app.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError) -> Response:
        # Flask hands unhandled exceptions here; log the trace, show none.
        original = getattr(exc, "original_exception", None) or exc
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=original)
        return error_response(500, "internal_error", "the server failed to answer this request; it has been logged")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = error_response(status, STATUS_CODES.get(status, "http_error"), _http_message(exc))
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response
