"""The Flask app factory: configuration, the index loaded once per process, the JSON API and the gallery blueprints."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from PIL import Image

if TYPE_CHECKING:
    from flask import Flask, Response

# Only light imports here: `serve-images --help` imports this package (api.cli is in it) and must answer at
# once. Flask, the blueprints and the service (torch, FAISS) are imported by create_app.

DEFAULTS: dict[str, Any] = {
    "INDEX_DIR": "index",          # folder made by index-images (RETRIEVAL_INDEX_DIR)
    "DEVICE": "cpu",               # where query features are computed: cpu, cuda or auto
    "MAX_UPLOAD_MB": 20,           # larger uploads answer 413
    "MAX_PIXELS": Image.MAX_IMAGE_PIXELS,  # larger images answer 415 (decompression bomb); retrieval.images.DEFAULT_MAX_PIXELS
    "DEFAULT_K": 10,               # neighbours when k is not given
    "MAX_K": 100,                  # largest k accepted
    "RELOAD_INTERVAL_S": 1.0,      # seconds between looks at the index on disk; 0 turns hot reload off
    "BATCH_MAX_SIZE": 8,           # most concurrent queries in one forward pass
    "BATCH_WAIT_MS": 30.0,         # most a batch waits for concurrent queries on their way (never for a lone one)
    "TORCH_THREADS": 0,            # threads of a lone query's forward pass (one fewer under load); 0: one per core
    "SEARCH_THREADS": 0,           # threads that scan the vectors for a query or a batch; 0: one per core
    "QUERY_TIMEOUT_S": 30.0,       # a query waiting longer answers 503
    "DECODE_PROCESSES": 0,         # worker processes that decode uploads (at most this many at once); 0: 2, or 1 core
    "DECODE_TIMEOUT_S": 4.0,       # an upload waits at most this long for a decoder (else 503) and decodes at most this long (else 415)
    "MAX_DECODED_PIXELS": 24_000_000,  # pixels an upload may decode to after JPEG draft reduction (larger: 415); 0: MAX_PIXELS only
    "DECODE_MEMORY_MB": 224,       # memory a decoder process may use above its baseline (RLIMIT_AS, Linux); 0: no cap
    "THUMBNAIL_DIR": None,         # None: INDEX_DIR/thumbnails (also keeps uploaded gallery searches for an hour)
    "THUMBNAIL_SIZE": 256,         # long side of thumbnails, px
    "GALLERY_PAGE_SIZE": 48,       # images per page of the gallery grid
    "GALLERY_K": 12,               # neighbours shown on gallery pages
    "NPROBE": 0,                   # IVF lists searched per query; 0: as index-images recorded (tuned for recall)
    "EF_SEARCH": 0,                # HNSW efSearch; 0: as index-images recorded
    "MMAP": True,                  # memory-map the FAISS file where FAISS can (IVF lists, flat codes)
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: DEFAULTS, then RETRIEVAL_* environment variables, then config.

    Opens the index in INDEX_DIR (network, FAISS vectors, catalog) once; raises
    retrieval.index.IndexNotFound when there is none ("run index-images first").
    """
    from flask import Flask
    from markupsafe import Markup

    from . import gallery, search_api, transfer
    from .errors import register_error_handlers
    from .query_input import ImageIdConverter
    from .service import init_service
    from retrieval.system import display_name

    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RETRIEVAL")          # RETRIEVAL_INDEX_DIR -> INDEX_DIR, values parsed as JSON
    if config:
        app.config.from_mapping(config)
    app.config["MAX_CONTENT_LENGTH"] = int(float(app.config["MAX_UPLOAD_MB"]) * 1024 * 1024)
    app.json.sort_keys = False

    app.url_map.converters["image_id"] = ImageIdConverter   # ids in URLs: ASCII digits, signed 64-bit
    # File and folder names that are not UTF-8 are shown escaped on every page (and so in label links too)
    app.jinja_env.finalize = lambda value: value if isinstance(value, Markup) or not isinstance(value, str) \
        else display_name(value)                               # (Markup was built from finalized parts)
    app.jinja_env.filters["shown"] = display_name
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
