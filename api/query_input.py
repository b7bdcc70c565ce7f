"""Reading a query from a request: the image (multipart field or raw body), k, and image ids in URLs."""
from __future__ import annotations

import re

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter, ValidationError

from retrieval.search.expansion import MAX_EXPANSION, ExpansionError, QueryExpansion

from api.errors import ApiError

IMAGE_FIELD = "image"
NUMBER = re.compile(r"[0-9]{1,10}(\.[0-9]{0,10})?([eE][+-]?[0-9]{1,3})?|\.[0-9]{1,10}([eE][+-]?[0-9]{1,3})?")
MAX_IMAGE_ID = 2**63 - 1     # catalog ids are SQLite INTEGERs: signed 64-bit


class ImageIdConverter(BaseConverter):
    """`<image_id:name>`: an image id in a URL, ASCII digits only and at most MAX_IMAGE_ID; anything else is a 404.

    werkzeug's `int` converter matches `\\d`, so Arabic-Indic or full-width digits reach the view, and
    an id past 64 bits reaches the database (OverflowError, a 500).
    """
    regex = rf"[0-9]{{1,{len(str(MAX_IMAGE_ID))}}}"

    def to_python(self, value: str) -> int:
        image_id = int(value)
        if image_id > MAX_IMAGE_ID:
            raise ValidationError()
        return image_id

    def to_url(self, value: int) -> str:
        return str(int(value))


FILENAME_MAX = 255   # characters of an upload's file name kept (a 100,000-character name was stored and shown whole)


def shortened(name: str, limit: int = FILENAME_MAX) -> str:
    """name, or its start and end around "…" where it is longer than limit characters (the extension kept)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head):]


def read_query_image(request: Request) -> tuple[bytes, str]:
    """-> (image bytes, file name for display). Multipart field `image`, or the body with an image/* content type.

    Raises ApiError 400 when there is no image; werkzeug's RequestEntityTooLarge (413) past MAX_CONTENT_LENGTH.
    """
    if request.mimetype.startswith("image/"):
        data = request.get_data(cache=False)
        _refuse_cut_body(request, len(data))
        if data:
            return data, "upload"
    else:
        upload = request.files.get(IMAGE_FIELD)
        if upload is not None:
            data = upload.read()
            if data or upload.filename:
                return data, shortened(upload.filename or "upload")
    raise ApiError(400, "missing_image", f"send the image as the multipart form field {IMAGE_FIELD!r}, "
                                         "or as the request body with an image/* content type")


def _refuse_cut_body(request: Request, size: int) -> None:
    """Raise RequestEntityTooLarge when a body without Content-Length (chunked) went on past MAX_CONTENT_LENGTH.

    werkzeug stops reading such a body at the limit and returns what it read, without an error: the
    upload would be decoded cut short (a 415, or worse, a search with half an image).
    """
    limit = request.max_content_length
    if limit is None or size < limit or request.content_length is not None:
        return
    if request.environ.get("wsgi.input_terminated") and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def page_number(raw: str | None, pages: int) -> int:
    """?page= as a page in 1..pages; anything unreadable is page 1 (people type URLs)."""
    try:
        page = int(raw or 1)
    except ValueError:
        page = 1
    return min(max(page, 1), max(pages, 1))


def parse_k(request: Request, *, default: int, maximum: int, lenient: bool = False) -> int:
    """k from the query string, else from a multipart/urlencoded form; 1..maximum. Raises ApiError 400.

    lenient (the gallery's pages, whose URLs people type): a k past maximum is maximum, an unreadable one the
    default, as ?page= is clamped, and of a repeated k (`?k=5` typed after a link's `?k=10`) the last."""
    raw = _param(request, "k", last=lenient)
    if raw is None:
        return default
    raw = raw.strip()
    # Length first: int() refuses strings of over 4,300 digits (ValueError), and they are out of range anyway.
    digits = raw.lstrip("0") or "0"
    readable = raw.isascii() and raw.isdigit()
    if readable and len(digits) <= len(str(maximum)) and 1 <= int(digits) <= maximum:
        return int(digits)
    if lenient:
        return maximum if readable and digits != "0" else default
    shown = raw if len(raw) <= 20 else raw[:20] + "..."
    raise ApiError(400, "bad_k", f"k must be a whole number from 1 to {maximum}, not {shown!r}")


def _param(request: Request, name: str, *, last: bool = False) -> str | None:
    """A parameter from the query string, else from a multipart/urlencoded form. Raises ApiError 400 when it is
    given more than once there (k=1&k=abc: which one was meant?), unless last: then the last one given."""
    source = request.args
    if name not in source and request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        source = request.form
    given = source.getlist(name)
    if last and given:
        return given[-1]
    if len(given) > 1:
        raise ApiError(400, f"repeated_{name}", f"{name} is given {len(given)} times; send it once")
    return given[0] if given else None


def parse_expansion(request: Request, *, lenient: bool = False) -> QueryExpansion | None:
    """Query expansion from `qe` (top results averaged with the query, 0..50; 0 or absent: none) and `qe_alpha`
    (weights similarity^alpha, a number 0..100, 1e2 and 2.5 alike; 0: plain average). Raises ApiError 400.

    lenient (the gallery's pages, whose URLs people type, as parse_k's): a number past its range is its end, an
    unreadable one none (no expansion, alpha 0), a repeated one the last."""
    raw_n, raw_alpha = _param(request, "qe", last=lenient), _param(request, "qe_alpha", last=lenient)
    if raw_n is None and raw_alpha is None:
        return None
    n_text = (raw_n or "").strip()
    alpha_text = (raw_alpha or "").strip()
    n: int | None = 0
    if n_text:
        n = int(n_text) if n_text.isascii() and n_text.isdigit() and len(n_text) <= 4 else None
    alpha: float | None = 0.0
    if alpha_text:
        try:
            # float() also reads "1_0" and "infinity": only the ways people write a number
            alpha = float(alpha_text) if NUMBER.fullmatch(alpha_text) else None
        except ValueError:
            alpha = None
    if lenient:
        n = 0 if n is None else min(n, MAX_EXPANSION)
        alpha = 0.0 if alpha is None or alpha != alpha else min(max(alpha, 0.0), 100.0)
    try:
        if n is None or alpha is None or alpha != alpha:   # unreadable, or NaN
            raise ValueError
        return QueryExpansion(n, alpha) or None
    except (ValueError, ExpansionError):
        given = ", ".join(f"{name}={raw.strip()[:32]!r}" for name, raw in (("qe", raw_n), ("qe_alpha", raw_alpha))
                          if raw is not None)
        raise ApiError(400, "bad_query_expansion", "qe must be a whole number from 0 to 50 and qe_alpha a number "
                                                   f"from 0 to 100, not {given}") from None
