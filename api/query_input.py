"""Reading a query from a request: the image (multipart field or raw body) and k."""
from __future__ import annotations

from flask import Request

from .errors import ApiError

IMAGE_FIELD = "image"


def read_query_image(request: Request) -> tuple[bytes, str]:
    """-> (image bytes, file name for display). Multipart field `image`, or the body with an image/* content type.

    Raises ApiError 400 when there is no image; werkzeug raises 413 past MAX_CONTENT_LENGTH.
    """
    if request.mimetype.startswith("image/"):
        data = request.get_data(cache=False)
        if data:
            return data, "upload"
    else:
        upload = request.files.get(IMAGE_FIELD)
        if upload is not None:
            data = upload.read()
            if data or upload.filename:
                return data, upload.filename or "upload"
    raise ApiError(400, "missing_image", f"send the image as the multipart form field {IMAGE_FIELD!r}, "
                                         "or as the request body with an image/* content type")


def parse_k(request: Request, *, default: int, maximum: int) -> int:
    """k from the query string, else from a multipart/urlencoded form; 1..maximum. Raises ApiError 400."""
    raw = request.args.get("k")
    if raw is None and request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raw = request.form.get("k")
    if raw is None:
        return default
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise ApiError(400, "bad_k", f"k must be a whole number from 1 to {maximum}, not {raw!r}")
    return int(raw)
