"""The Flask app factory: configuration, the index loaded once per process, the JSON API and the gallery blueprints."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from flask import Flask, Response

from api.settings import DEFAULTS   # every setting, its default and meaning: one row each in api.settings.SETTINGS

# Only light imports here: `serve-images --help` imports this package (commands.serve_images is in it) and must answer at
# once. Flask, the blueprints and the service (torch, FAISS) are imported by create_app.


def _in_memory_uploads() -> type:
    """Flask's Request keeping uploaded files in memory (they are at most MAX_UPLOAD_MB, and read whole anyway):
    Werkzeug spools parts over 500 KB to a temporary file, and with the temporary folder full a photo's upload
    answered 500 (No space left on device) though the same bytes sent raw were searched."""
    import io

    from flask import Request

    class InMemory(Request):
        def _get_file_stream(self, total_content_length, content_type, filename=None,  # noqa: ANN001, ANN202
                             content_length=None):
            return io.BytesIO()

    return InMemory


def _printable_json() -> type:
    """Flask's JSON provider, every string in an answer passed through display_name: a file or folder name that is not
    UTF-8 (kept by Python as surrogate escapes) went out as a lone surrogate (\\udcff), which a strict client cannot
    encode and a browser turns into U+FFFD; it is \\xff, as search-images --json and the pages show it."""
    from flask.json.provider import DefaultJSONProvider

    from retrieval.system import display_name

    def printable(value: Any) -> Any:
        if isinstance(value, str):
            return display_name(value)
        if isinstance(value, dict):
            return {printable(k): printable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [printable(v) for v in value]
        return value

    class PrintableJSON(DefaultJSONProvider):
        def dumps(self, obj: Any, **kwargs: Any) -> str:
            return super().dumps(printable(obj), **kwargs)

    return PrintableJSON


def breakable(name: str) -> Any:
    """A file name or path, escaped, that may wrap after '/', '_' and '-' (<wbr>; markupsafe.Markup): it
    broke anywhere, "blue_squares_004." then "jpg" on a phone, "blue_squares/blue_squares_00" then "4.jpg"."""
    import re

    from markupsafe import Markup, escape

    from retrieval.system import shown_name

    return Markup(re.sub(r"([/_\-])", r"\1<wbr>", str(escape(shown_name(name)))))   # not before the extension


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: DEFAULTS, then RETRIEVAL_* environment variables, then config.

    Opens the index in INDEX_DIR (network, FAISS vectors, catalog) once; raises
    retrieval.search.index.IndexNotFound when there is none ("run index-images first").
    """
    from flask import Flask
    from markupsafe import Markup

    from api import duplicates, gallery, search_api, transfer
    from api.errors import register_error_handlers
    from api.metrics import init_metrics
    from api.settings import checked_settings
    from api.query_input import ImageIdConverter
    from api.service import init_service
    from retrieval.system import shown_name

    app = Flask(__name__)
    app.json = _printable_json()(app)
    app.request_class = _in_memory_uploads()
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RETRIEVAL")          # RETRIEVAL_INDEX_DIR -> INDEX_DIR, values parsed as JSON
    if config:
        app.config.from_mapping(config)
    app.config.update(checked_settings(app.config))    # 'abc' refused here, naming its variable, not a 500 per request
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    app.json.sort_keys = False

    app.url_map.converters["image_id"] = ImageIdConverter   # ids in URLs: ASCII digits, signed 64-bit
    # File and folder names that are not UTF-8 are shown escaped on every page (and so in label links too)
    app.jinja_env.finalize = lambda value: value if isinstance(value, Markup) or not isinstance(value, str) \
        else shown_name(value)                               # (Markup was built from finalized parts)
    app.jinja_env.filters["shown"] = shown_name
    app.jinja_env.filters["breakable"] = breakable
    init_metrics(app)
    init_service(app)
    register_error_handlers(app)
    app.register_blueprint(search_api.bp)
    app.register_blueprint(gallery.bp)
    app.register_blueprint(transfer.bp)
    app.register_blueprint(duplicates.bp)
    app.after_request(_security_headers)
    app.after_request(_options_answer)
    return app


def _options_answer(response: Response) -> Response:
    """OPTIONS (Flask's automatic answer: the Allow header) as 204 No Content, not an empty 200 said to be HTML."""
    from flask import request

    if request.method == "OPTIONS" and response.status_code == 200 and not response.get_data():
        response.status_code = 204
        del response.headers["Content-Type"]
    return response


# The pages load their one script, styles and images from this server only, and are framed by its own pages only
# (clickjacking around the upload); style attributes and the charts' inline SVG styles are allowed. A second line
# behind the templates' escaping: a name that ever got through would still run nothing.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'self'")


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")   # (browsers before frame-ancestors)
    return response
