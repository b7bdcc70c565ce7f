"""Error answers: JSON `{"error": {"code", "message"}}` for programs, an HTML page for the gallery, never a trace."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

log = logging.getLogger(__name__)

# HTTP status -> the stable machine-readable code used when a handler did not choose a more specific one.
STATUS_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
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


JSON_BLUEPRINTS = (None, "api")   # the JSON API, and URLs no route matched; other blueprints serve pages


def error_response(status: int, code: str, message: str) -> Response:
    """JSON error for programs; an HTML page when a page (gallery and other HTML blueprints) was asked for."""
    if request.blueprint not in JSON_BLUEPRINTS:
        return Response(render_template("error.html", status=status, message=message), status,
                        mimetype="text/html")
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def _http_message(exc: HTTPException) -> str:
    if exc.code == 413:
        limit = request.max_content_length or 0
        return f"the upload is larger than the {limit / (1024 * 1024):g} MB limit"
    if exc.code == 404:
        return "no such resource: see GET /stats, POST /search, GET /images/<id>"
    if exc.code == 405:
        allowed = ", ".join(sorted(exc.valid_methods or [])) if hasattr(exc, "valid_methods") else ""
        return f"{request.method} is not allowed here" + (f"; use {allowed}" if allowed else "")
    return exc.description or exc.name


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

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
