"""The Flask app factory: configuration, the index loaded once per process, the JSON API and the gallery blueprints."""
from __future__ import annotations

from typing import Any, Mapping

from flask import Flask, Response

from retrieval.images import DEFAULT_MAX_PIXELS

from . import gallery, search_api, transfer
from .errors import register_error_handlers
from .service import init_service

DEFAULTS: dict[str, Any] = {
    "INDEX_DIR": "index",          # folder made by index-images (RETRIEVAL_INDEX_DIR)
    "DEVICE": "cpu",               # where query features are computed: cpu, cuda or auto
    "MAX_UPLOAD_MB": 20,           # larger uploads answer 413
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,  # larger images answer 415 (decompression-bomb protection)
    "DEFAULT_K": 10,               # neighbours when k is not given
    "MAX_K": 100,                  # largest k accepted
    "RELOAD_INTERVAL_S": 1.0,      # seconds between looks at the index on disk; 0 turns hot reload off
    "BATCH_MAX_SIZE": 8,           # most concurrent queries in one forward pass
    "BATCH_WAIT_MS": 30.0,         # most a batch waits for concurrent queries on their way (never for a lone one)
    "TORCH_THREADS": 0,            # threads of a lone query's forward pass (one fewer under load); 0: one per core
    "SEARCH_THREADS": 0,           # threads that scan the vectors for a query or a batch; 0: one per core
    "QUERY_TIMEOUT_S": 30.0,       # a query waiting longer answers 503
    "THUMBNAIL_DIR": None,         # None: INDEX_DIR/thumbnails (also keeps uploaded gallery searches for an hour)
    "THUMBNAIL_SIZE": 256,         # long side of thumbnails, px
    "GALLERY_PAGE_SIZE": 48,       # images per page of the gallery grid
    "GALLERY_K": 12,               # neighbours shown on gallery pages
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: DEFAULTS, then RETRIEVAL_* environment variables, then config.

    Opens the index in INDEX_DIR (network, FAISS vectors, catalog) once; raises
    retrieval.index.IndexNotFound when there is none ("run index-images first").
    """
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RETRIEVAL")          # RETRIEVAL_INDEX_DIR -> INDEX_DIR, values parsed as JSON
    if config:
        app.config.from_mapping(config)
    app.config["MAX_CONTENT_LENGTH"] = int(float(app.config["MAX_UPLOAD_MB"]) * 1024 * 1024)
    app.json.sort_keys = False

    init_service(app)
    register_error_handlers(app)
    app.register_blueprint(search_api.bp)
    app.register_blueprint(gallery.bp)
    app.register_blueprint(transfer.bp)
    app.after_request(_security_headers)
    return app


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response
