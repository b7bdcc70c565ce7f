"""The per-process retrieval service: the opened index, its query batcher, hot reload, health and recent uploads; the
collection's files and thumbnails are api.collection_files'."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flask import Flask, current_app

from retrieval.catalog import ImageRecord
from retrieval.images.decode import ImageDecodeError
from retrieval.images.decode_pool import DecodePool, DecoderBusy
from retrieval.learning.metrics import vote
from retrieval.search.expansion import QueryExpansion
from retrieval.search.index import ImageIndex, weights_label
from retrieval.search.snapshot import Hit, IndexSnapshot, IndexUnavailable
from retrieval.vectors.faiss_parts import SearchParams
from retrieval.system import available_cores

from api import metrics
from api.errors import ApiError
from api.collection_files import CollectionFiles, indexed_record
from api.database_probe import DatabaseProbe
from api.index_watcher import IndexWatcher
from api.query_batcher import QueryBatcher
from api.recent_queries import RECENT_QUERIES_FILE, RecentQueries
from api.settings import checked_settings
from api.thumbnails import ThumbnailCache

log = logging.getLogger(__name__)

EXTENSION_KEY = "retrieval"
DEFAULT_DECODE_PROCESSES = 2    # upload decoders when DECODE_PROCESSES is 0: bounds upload memory, whatever the cores
CATALOG_FAILURE_SHOWN_S = 60.0  # /healthz answers 503 this long after a request failed to read the catalog



@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """What the service is built from; read from the Flask config (see api.DEFAULTS)."""
    index_dir: Path                  # folder made by index-images
    db_url: str | None               # the catalog's SQLAlchemy URL; None: SQLite in index_dir (never shown: it may hold a password)
    device: str                      # where query features are computed: cpu, cuda or auto
    max_pixels: int | None           # decompression-bomb limit for uploads and thumbnails (None: Pillow's own)
    reload_interval_s: float         # how often to look for a changed index on disk; 0 turns hot reload off
    batch_max_size: int              # most queries in one forward pass
    batch_wait_ms: float             # most a batch waits for concurrent queries on their way
    torch_threads: int               # threads of a lone query's forward pass (one fewer under load); 0: one per core
    search_threads: int              # threads that scan the vectors for a query or a batch; 0: one per core
    thumbnail_dir: Path              # where thumbnails are cached, and uploaded gallery searches kept
    thumbnail_size: int              # long side of thumbnails, px
    query_timeout_s: float           # a query waiting longer than this answers 503
    decode_processes: int            # worker processes decoding uploads, so at most this many at once; 0: 2 (fewer cores: one per core)
    decode_timeout_s: float          # an upload waits at most this long for a decoder (else 503), decodes at most this long (else 415)
    max_decoded_pixels: int | None   # pixels an upload may decode to, after JPEG draft reduction (None: max_pixels only)
    decode_memory_mb: int            # memory a decoder process may add to its own baseline (RLIMIT_AS); 0: no cap
    vote_k: int                      # neighbours that vote for predicted labels: the API's default k, everywhere
    nprobe: int                      # IVF lists searched per query; 0: as recorded with the index
    ef_search: int                   # HNSW efSearch; 0: as recorded with the index
    mmap: bool                       # memory-map the FAISS file where FAISS can

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> "ServiceConfig":
        """Check and convert values (environment variables arrive as JSON or strings: api.settings.checked_settings).
        Raises ValueError naming the variable."""
        config = {**config, **checked_settings(config)}
        # Paths are made absolute here, where they enter: nothing deeper depends on the working directory
        # (Flask's send_file would resolve a relative path against the api package).
        index_dir = Path(str(config["INDEX_DIR"])).expanduser().resolve()
        return cls(
            index_dir=index_dir,
            db_url=str(config["DB_URL"]) if config.get("DB_URL") else None,
            device=str(config["DEVICE"]),
            max_pixels=config.get("MAX_PIXELS") or None,                 # 0: no bound
            reload_interval_s=config["RELOAD_INTERVAL_S"],
            batch_max_size=config["BATCH_MAX_SIZE"],
            batch_wait_ms=config["BATCH_WAIT_MS"],
            torch_threads=config["TORCH_THREADS"],
            search_threads=config["SEARCH_THREADS"],
            thumbnail_dir=Path(str(config.get("THUMBNAIL_DIR") or index_dir / "thumbnails")).expanduser().resolve(),
            thumbnail_size=config["THUMBNAIL_SIZE"],
            query_timeout_s=config["QUERY_TIMEOUT_S"],
            decode_processes=config["DECODE_PROCESSES"],
            decode_timeout_s=config["DECODE_TIMEOUT_S"],
            max_decoded_pixels=config.get("MAX_DECODED_PIXELS") or None,   # 0: only MAX_PIXELS
            decode_memory_mb=config["DECODE_MEMORY_MB"],
            vote_k=config["DEFAULT_K"],
            nprobe=config["NPROBE"],
            ef_search=config["EF_SEARCH"],
            mmap=config.get("MMAP", True),
        )


@dataclasses.dataclass(frozen=True)
class SearchAnswer:
    """Neighbours of one query, with where the time went."""
    hits: list[Hit]
    vector: np.ndarray                  # the query's features, shape=(dim,), float32
    query: dict[str, Any]               # what is known of the query image: width, height (id, path, label if indexed)
    timings_ms: dict[str, float]        # decode, features (queue wait included), search
    preview_jpeg: bytes | None = None   # the upload as an upright JPEG, when search_upload was asked for one
    snapshot: IndexSnapshot | None = None   # the index version that answered (a reload may have swapped in another since)


class RetrievalService:
    """Loaded once per process; every method is safe to call from many request threads at once."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.index = ImageIndex(config.index_dir, db_url=config.db_url, device=config.device,
                                max_pixels=config.max_pixels,
                                search_params=SearchParams(config.nprobe or None, config.ef_search or None),
                                mmap=config.mmap)
        self.batcher = QueryBatcher(self.index, max_batch=config.batch_max_size, max_wait_s=config.batch_wait_ms / 1000.0,
                                    torch_threads=config.torch_threads, search_threads=config.search_threads)
        self._catalog_failure: tuple[float, str] | None = None   # (monotonic time, reason) of the last failed read
        self._labels: tuple[int, dict[str | None, int]] | None = None   # (index version, images per label)
        self.files = CollectionFiles(self.index, ThumbnailCache(config.thumbnail_dir, config.thumbnail_size,
                                                                max_pixels=config.max_pixels))   # (health() reads it too)
        catalog = self.index.catalog   # a database server's silence is looked for by /healthz (not a local file's)
        self._database_probe = DatabaseProbe(catalog.engine) if catalog.engine.dialect.name != "sqlite" else None
        self.recent_queries = RecentQueries(config.thumbnail_dir / RECENT_QUERIES_FILE,   # shared by worker processes
                                            network=lambda: self.index.snapshot().network)
        self.watcher = None   # (health() reads it: set before the watcher's first look calls it)
        self.watcher = IndexWatcher(self.index, config.reload_interval_s, on_reload=self._reloaded,
                                    on_check=self._checked) if config.reload_interval_s > 0 else None
        self._count_images()
        threading.Thread(target=self.files.prune_thumbnails, name="thumbnail-prune", daemon=True).start()
        # uploads are decoded in separate processes: bounded in number, time and memory (never in this one)
        self.decoders = DecodePool(config.decode_processes or min(DEFAULT_DECODE_PROCESSES, available_cores()),
                                   config.decode_timeout_s,
                                   memory_mb=config.decode_memory_mb or None)
        log.info("serving %d images from %s, catalog %s (%s %s; forward threads %d alone, %d under load; "
                 "search threads %d)", len(self.index), config.index_dir, self.index.catalog.location,
                 self.index.settings.model, self.index.settings.layer,
                 self.batcher.idle_threads, self.batcher.busy_threads, self.batcher.search_threads)

    def _reloaded(self) -> None:
        """After each reload (on the watcher's thread): the size gauge, and the thumbnails of images gone or changed
        removed (they piled up until a worker restarted; CollectionFiles.prune_thumbnails says how often)."""
        self._count_images()
        self.files.prune_thumbnails(throttled=True)

    def _checked(self) -> None:
        """After each look at the index on disk (on the watcher's thread): availability, and the uploads past their
        hour deleted (at most once a minute) on a server nobody visits too."""
        self.note_availability()
        self.recent_queries.sweep(throttled=True)

    def _count_images(self) -> None:
        metrics.INDEX_IMAGES.set(len(self.index))
        self.note_availability()

    def note_availability(self) -> None:
        """Set this process's retrieval_index_available gauge from what /healthz says (one rule for both)."""
        metrics.INDEX_AVAILABLE.set(1 if self.health()[1] == 200 else 0)

    def catalog_failed(self, reason: str) -> None:
        """A request could not read the catalog (a corrupt page, the database gone): /healthz says so for a while."""
        self._catalog_failure = (time.monotonic(), reason)

    def catalog_answered(self) -> None:
        """A request read the catalog: an earlier failure is over."""
        self._catalog_failure = None

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self.batcher.close()
        self.decoders.close()
        self.recent_queries.close()
        self.index.close()

    # queries
    def search_upload(self, data: bytes, k: int, preview_size: int | None = None,
                      expansion: QueryExpansion | None = None) -> SearchAnswer:
        """Neighbours of uploaded image bytes (and, with preview_size, the upload as a JPEG that size).

        Raises ApiError 415 (not an image, too large, too slow to decode), 503 (decoders or network overloaded)."""
        started = time.perf_counter()
        prep = self.index.extractor.preprocessing
        with self.batcher.incoming():           # decoded in a worker process (retrieval.images.decode_pool)
            try:
                upload = self.decoders.decode(data, prep, max_pixels=self.config.max_pixels,
                                              max_decoded_pixels=self.config.max_decoded_pixels,
                                              preview_size=preview_size)
            except DecoderBusy as exc:
                raise ApiError(503, "overloaded", "the server is busy decoding other uploads; try again shortly") from exc
            except ImageDecodeError as exc:
                raise ApiError(415, "unsupported_image", str(exc)) from exc   # the reason says it all
        decoded = upload.image
        decoded_at = time.perf_counter()
        metrics.DECODE_SECONDS.observe(decoded_at - started)
        future = self.batcher.submit(torch.from_numpy(decoded.pixels), k)   # after incoming() ends: a lone query never waits
        try:
            answer = future.result(self.config.query_timeout_s)
        except TimeoutError:
            future.cancel()
            raise ApiError(503, "overloaded", "the server is overloaded; try again shortly") from None
        self.catalog_answered()
        hits, search_ms = answer.hits, round(answer.search_ms, 3)
        snapshot = answer.index if isinstance(answer.index, IndexSnapshot) else None   # the query's network's version
        if expansion:   # searched again, the query averaged with its first results, among the same vectors
            hits, expanded_ms = self.search_vector(answer.vector, k, snapshot=snapshot, expansion=expansion)
            search_ms = round(search_ms + expanded_ms, 3)
        return SearchAnswer(hits, answer.vector, {"width": decoded.width, "height": decoded.height},
                            {"decode": _ms(decoded_at - started), "features": round(answer.features_ms, 3),
                             "search": search_ms}, upload.preview_jpeg, snapshot)

    def search_vector(self, vector: np.ndarray, k: int, exclude: set[int] | None = None,
                      snapshot: IndexSnapshot | None = None,
                      expansion: QueryExpansion | None = None) -> tuple[list[Hit], float]:
        """vector shape=(dim,) -> (hits nearest first, search ms); no forward pass, in the calling thread.

        The vector must come from the network of snapshot (default: the current one). expansion: query expansion."""
        started = time.perf_counter()
        snapshot = snapshot or self.index.snapshot()
        hits = snapshot.search_vectors(vector[None, :], k, exclude=[exclude] if exclude else None,
                                       threads=self.batcher.search_threads, expansion=expansion)[0]
        elapsed = time.perf_counter() - started
        metrics.SEARCH_SECONDS.observe(elapsed)
        return hits, _ms(elapsed)

    def neighbours(self, image_id: int, k: int, expansion: QueryExpansion | None = None) -> SearchAnswer:
        """Neighbours of an indexed image from its stored vector, itself left out. Raises ApiError 404."""
        started = time.perf_counter()
        snapshot = self.index.snapshot()        # the stored vector and the vectors it is compared with: one network
        record = snapshot.catalog.get(image_id)
        vector = snapshot.catalog.vector(image_id)
        if record is not None and vector is None and int(image_id) in snapshot.catalog.bad_vectors:
            raise ApiError(404, "not_found", f"the stored vector of image {image_id} is damaged (it fails its "
                                             "checksum); index-images --check marks it to be extracted again")
        if record is None or vector is None:    # unknown, or removed between the two lookups
            raise ApiError(404, "not_found", f"no image with id {image_id} in the index")
        looked_up = time.perf_counter()
        hits, search_ms = self.search_vector(vector, k, exclude={int(image_id)}, snapshot=snapshot, expansion=expansion)
        return SearchAnswer(hits, vector, {"id": record.id, "path": record.path, "label": record.label,
                                           "width": record.width, "height": record.height},
                            {"decode": 0.0, "features": _ms(looked_up - started), "search": search_ms}, snapshot=snapshot)

    def predict(self, hits: list[Hit], snapshot: IndexSnapshot | None = None) -> dict[str, Any] | None:
        """The vote {"label", "votes", "k", "weak"} of the nearest hits, at most vote_k of them (the API's default k: the
        gallery shows more neighbours than vote); None when none of them has a label. weak: the label won half or
        fewer of the votes it could have won (k, or fewer where the collection holds fewer images of it): most
        neighbours say something else, and the picture may be of none of the collection's labels. snapshot: the index
        version the hits came from (default: the current one)."""
        voted = vote(hits, min(len(hits), self.config.vote_k)) if hits else None
        if voted is not None:
            possible = min(voted["k"], self._label_counts(snapshot).get(voted["label"], 0))
            voted["weak"] = voted["votes"] * 2 <= possible
        return voted

    def _label_counts(self, snapshot: IndexSnapshot | None = None) -> dict[str | None, int]:
        """Images per label of the served index (or of snapshot), read once per index version."""
        snapshot = snapshot or self.index.snapshot()
        cached = self._labels
        if cached is None or cached[0] != snapshot.version:
            cached = self._labels = (snapshot.version, snapshot.catalog.labels())
        return cached[1]

    # images
    def record(self, image_id: int, snapshot: IndexSnapshot | None = None) -> ImageRecord:
        return indexed_record(snapshot or self.index.snapshot(), image_id)

    # overview
    def index_summary(self, snapshot: IndexSnapshot | None = None) -> dict[str, Any]:
        snapshot = snapshot or self.index.snapshot()
        s = snapshot.settings
        return {"model": s.model, "layer": s.layer, "views": s.views, "input_norm": s.input_norm, "regions": s.regions,
                "dim": s.dim, "count": len(snapshot.vectors)}

    def stats(self) -> dict[str, Any]:
        snapshot = self.index.snapshot()
        catalog = snapshot.catalog
        updated = catalog.updated_at()
        return {**self.index_summary(snapshot),
                "labels": [{"label": label, "count": n} for label, n in catalog.labels().items()],
                "weights": weights_label(snapshot.settings),   # a file's name and hash, never its path
                "normalized": snapshot.settings.normalize,
                "skipped": catalog.skipped_count(),
                "catalog": catalog.backend,                    # "sqlite" or "postgresql": never its URL
                "vector_index": snapshot.describe_vectors(),   # FAISS type, search settings, recall against exact
                "extraction": catalog.extraction_record(),     # precisions and devices the vectors were computed with
                "updated_at": updated.isoformat(timespec="seconds") + "Z" if updated else None,
                "queries": self.query_stats()}

    def health(self) -> tuple[dict[str, Any], int]:
        """-> (body, HTTP status): 200 while the index is served, 503 with the reason when it cannot be.

        Unservable: the catalog is missing, unreadable or replaced (without hot reload), its database server does not
        answer (api.database_probe), the index's network cannot be loaded, or hot reload is broken (its thread has
        stopped, or its last checks all failed)."""
        problem = None
        if self._database_probe is not None and (silent := self._database_probe.silent_for()) is not None:
            problem = f"the catalog database has not answered for {silent:.0f} s (a query to it is still waiting)"
        elif self.watcher is None:              # no hot reload: look at the disk now (a stat and one small query)
            try:
                self.index.refresh(load=False)
            except Exception as exc:  # noqa: BLE001 - a health check reports, it does not fail
                log.exception("health check could not look at the index")
                problem = f"the index cannot be checked: {type(exc).__name__}: {exc}"
        problem = self.index.problem or problem
        if problem is None:
            try:
                self.index.snapshot()   # a catalog file replaced but not reloaded yet: searches answer 503 meanwhile
            except IndexUnavailable as exc:
                problem = str(exc)
        failure = self._catalog_failure
        if problem is None and failure is not None and time.monotonic() - failure[0] < CATALOG_FAILURE_SHOWN_S:
            problem = f"requests failed to read the catalog {time.monotonic() - failure[0]:.0f} s ago: {failure[1]}"
        body: dict[str, Any] = {"status": "ok", "count": len(self.index)}
        if problem is None and (missing := self.files.data_folder_missing(self.config.index_dir)):
            body["warning"] = missing   # still served: a balancer should not take it out of service for this
        if self.watcher is not None:
            w = self.watcher.state()
            body["reload"] = {"alive": w.alive, "reloads": w.reloads, "last_error": w.last_error,
                              "last_error_age_s": w.last_error_age_s, "last_check_age_s": w.last_check_age_s}
            if not w.alive:
                problem = problem or "the index watcher thread has stopped: the index on disk is no longer followed"
            elif w.failing:
                problem = problem or (f"hot reload failed its last {w.failures_in_a_row} checks: {w.last_error}")
        if problem is not None:
            return {"status": "unavailable", "reason": problem, **{k: v for k, v in body.items() if k != "status"}}, 503
        return body, 200

    def query_stats(self) -> dict[str, Any]:
        """Uploads answered by this process, and how they were batched."""
        s = self.batcher.stats
        return {"answered": s.queries, "batches": s.batches,
                "mean_batch": round(s.queries / s.batches, 2) if s.batches else 0.0, "largest_batch": s.largest,
                "mean_forward_ms": round(s.forward_s * 1000 / s.batches, 2) if s.batches else 0.0,
                "mean_search_ms": round(s.search_s * 1000 / s.batches, 2) if s.batches else 0.0}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def init_service(app: Flask) -> RetrievalService:
    """Open the index once for this app (this process) and keep it in app.extensions. Raises IndexNotFound."""
    service = RetrievalService(ServiceConfig.from_mapping(app.config))
    app.extensions[EXTENSION_KEY] = service
    return service


def current_service() -> RetrievalService:
    return current_app.extensions[EXTENSION_KEY]
