"""An opened index for querying: settings, catalog, FAISS vectors and the exact network that made them, reloaded
when index-images changes them; each loaded version is an IndexSnapshot (search/snapshot.py), which searches."""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from retrieval.features.backbones import (MODELS, FeatureExtractor, WeightsUnavailable, build_extractor, imagenet_cache_path,
                                          precision_for_index, resolve_device)
from retrieval.catalog.db import IndexNotFound  # noqa: F401 - raised here too, and imported from here by callers
from retrieval.catalog import (CATALOG_FILE, Catalog, CatalogUnavailable, IndexSettings, db_error_reason,  # noqa: F401
                      weights_label)  # weights_label: re-exported
from retrieval.files import file_stamp
from retrieval.images.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_for_model
from retrieval.search.expansion import QueryExpansion
from retrieval.search.served_vectors import served_vectors
from retrieval.search.snapshot import Hit, IndexSnapshot, IndexUnavailable, network_key
from retrieval.vectors.faiss_parts import SearchParams, apply_search_params
from retrieval.names import FAISS_FILE, random_weights_file
from retrieval.system import display_name
from retrieval.vectors.vector_index import VectorIndex

log = logging.getLogger(__name__)


# After a reload failed because the index's network could not be built, try again this often (or at once
# when the weights file changes).
NETWORK_RETRY_S = 60.0



class WeightsMismatch(WeightsUnavailable):
    """The weights available now are not the ones the index was built with (another file, other random tensors)."""


class ImageIndex:
    """Query side of an index folder. Searches are safe from several threads; refresh() swaps in new snapshots.

    Raises IndexNotFound (no index), WeightsUnavailable or WeightsMismatch (its network cannot be rebuilt).
    """

    def __init__(self, index_dir: Path | str, *, db_url: str | None = None, device: str = "cpu",
                 load_network: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 search_params: SearchParams | None = None, mmap: bool = True):
        self.index_dir = Path(index_dir)
        self.db_url = db_url                 # the catalog's URL; None: SQLite in the index folder
        self.device, self.load_network, self.max_pixels = device, load_network, max_pixels
        self.search_params = search_params or SearchParams()   # over the recorded ones (nprobe, efSearch)
        self.mmap = mmap                     # map FAISS files of types FAISS can map (read-only, page cache)
        self._lock = threading.Lock()        # one refresh at a time
        self._problem: str | None = None     # why the index cannot be served now; None when it can
        self._failed: tuple[tuple, float] | None = None   # (what failed to load, when) for NETWORK_RETRY_S
        try:
            catalog = Catalog(self.index_dir, url=db_url)
        except FileNotFoundError as exc:
            raise IndexNotFound(str(exc)) from exc
        except CatalogUnavailable as exc:
            raise IndexUnavailable(str(exc)) from exc
        try:
            catalog_file = catalog.identity()
            settings = catalog.settings()
            if settings is None:
                raise IndexNotFound(f"the index at {self.index_dir} has no settings yet; run index-images first")
            self._snapshot = self._load(catalog, catalog_file, settings, previous=None)
        except BaseException:
            catalog.close()
            raise

    @property
    def faiss_path(self) -> Path:
        return self.index_dir / FAISS_FILE

    def close(self) -> None:
        self._snapshot.catalog.close()

    def snapshot(self) -> IndexSnapshot:
        """The loaded version to answer one query or batch with. Raises IndexUnavailable (with the reason).

        A snapshot whose catalog file is no longer the one at the path (deleted, or replaced by another
        index that refresh() has not loaded yet) is not handed out: new catalog connections would read
        the other file's rows for this snapshot's vector ids. Checking costs one stat. (A catalog on a database
        server is checked by refresh() only: an index re-created there is noticed within the reload interval.)"""
        problem = self._problem
        if problem is None:
            snapshot = self._snapshot
            if snapshot.catalog.path is None:
                return snapshot
            try:
                if _file_id(snapshot.catalog.path) == snapshot.catalog_file:
                    return snapshot
                problem = "the index on disk was replaced since it was loaded; it is answered once reloaded"
            except FileNotFoundError:
                problem = f"the catalog {CATALOG_FILE} is missing from the index folder; restore it or run index-images"
        raise IndexUnavailable(problem)

    @property
    def version(self) -> int:
        """The loaded snapshot's version (1, then +1 for each reload that loaded something), served or not."""
        return self._snapshot.version

    @property
    def problem(self) -> str | None:
        """Why the index cannot be served now (catalog missing, unreadable, replaced, network not loadable), or None."""
        return self._problem

    # The current snapshot's parts; each access takes the snapshot anew: a caller that uses two of them
    # together takes snapshot() once instead.
    @property
    def settings(self) -> IndexSettings:
        return self.snapshot().settings

    @property
    def catalog(self) -> Catalog:
        return self.snapshot().catalog

    @property
    def vectors(self) -> VectorIndex:
        return self.snapshot().vectors

    @property
    def extractor(self) -> FeatureExtractor | None:
        return self.snapshot().extractor

    @property
    def data_dir(self) -> Path:
        return self.snapshot().data_dir

    def __len__(self) -> int:
        return len(self._snapshot.vectors)

    # querying
    def decode(self, data: bytes) -> DecodedImage:
        """Query bytes -> crop, same path as indexing. Raises images.ImageDecodeError."""
        assert self.extractor is not None, "opened with load_network=False"
        return decode_for_model(data, self.extractor.preprocessing, max_pixels=self.max_pixels)

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, dim) float32, as the current snapshot's vectors were made."""
        return self.snapshot().embed(pixels)

    def search_vectors(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None,
                       threads: int = 1) -> list[list[Hit]]:
        """Search the current snapshot (see IndexSnapshot.search_vectors); queries must come from its network."""
        return self.snapshot().search_vectors(queries, k, exclude, threads)

    def search_image(self, data: bytes, k: int, expansion: QueryExpansion | None = None) -> tuple[list[Hit], DecodedImage]:
        decoded = self.decode(data)
        snapshot = self.snapshot()   # one network for the query and the vectors it meets
        query = snapshot.embed(torch.from_numpy(decoded.pixels).unsqueeze(0))   # (1, 3, H, W) uint8
        return snapshot.search_vectors(query, k, expansion=expansion)[0], decoded

    # freshness
    def _current_signature(self) -> tuple | None:
        """Identity of the FAISS file on disk; index-images replaces it (atomically) at the end of each run
        that changed anything, and every JobConfig.save_every_s during long runs."""
        try:
            st = os.stat(self.faiss_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self, catalog: Catalog, catalog_file: tuple, settings: IndexSettings,
              previous: IndexSnapshot | None) -> IndexSnapshot:
        """A snapshot of the index as on disk now; the previous snapshot's network is kept when the settings
        name the same one. Raises WeightsUnavailable, WeightsMismatch."""
        signature = self._current_signature()   # before reading: a save in between is seen at the next refresh
        on_server = catalog.path is None
        updated_at = catalog.updated_at() if on_server else None   # likewise for a commit in between
        # queries are computed in the precision of the index's last run, so an indexed image finds itself at ~0
        precision = precision_for_index(((catalog.extraction_record() or {}).get("last") or {}).get("precision"),
                                        resolve_device(self.device)) if self.load_network else None
        stamp = self._weights_stamp(settings)
        if previous is not None and network_key(previous.settings) == network_key(settings) \
                and (previous.extractor is None or (previous.extractor.precision == precision
                                                    and previous.weights_stamp == stamp)):
            extractor = previous.extractor   # (not when its weights file was written to since: read from it now)
        elif self.load_network:
            choice = settings.weights_choice
            if choice.is_file and not choice.path.exists():   # the index records where its weights file was
                raise WeightsUnavailable(
                    f"the weights file this index was built with, {display_name(str(choice.path))}, is missing (moved "
                    "or deleted?): put it back there, or tell the index where it is now: index-images DATA_DIR "
                    "--index-dir INDEX --weights NEW_PATH (the same file: checked by its SHA-256)")
            extractor, identity = build_extractor(settings.model, settings.layer, settings.weights_choice, self.index_dir,
                                                  self.device, seed=settings.seed, precision=precision,
                                                  views=settings.views, input_norm=settings.input_norm)
            if identity != settings.weights_identity and settings.weights_choice.is_random:
                raise WeightsMismatch(
                    f"the index's random weights file {random_weights_file(self.index_dir, settings.model).name} is not "
                    "the one recorded (damaged or replaced): run index-images on the index's data folder, which makes "
                    "it again from the recorded seed in seconds")
            if identity != settings.weights_identity:
                raise WeightsMismatch(
                    f"the weights available now ({_public_identity(identity)}) are not the ones this index was "
                    f"built with ({_public_identity(settings.weights_identity)}); put back the weights it was "
                    "built with, or index into another folder with these (index-images DATA --index-dir NEW)")
        else:
            extractor = None
        record = catalog.vector_index_record()
        vectors, regions = served_vectors(self.index_dir, catalog, settings, record, previous, signature, catalog_file,
                                          mmap=self.mmap)
        recorded = SearchParams.from_json((record or {}).get("search_params"))
        if previous is None or self.search_params.used_by(previous.vectors.index) != self.search_params.used_by(
                vectors.index):   # once, and again when the index's type changes: not at every reload
            _say_unused(self.search_params, vectors.index)
        apply_search_params(vectors.index, self.search_params.over(recorded))   # before any search sees it
        return IndexSnapshot(previous.version + 1 if previous else 1, settings, catalog, vectors, extractor,
                             signature, catalog_file, updated_at, record, regions,
                             stamp if extractor is not None else None)

    def refresh(self, *, load: bool = True) -> bool:
        """Look at the index on disk and serve it as it is now. -> True when a new snapshot was loaded.

        The settings are compared with the served ones (model, layer, views, weights identity, dimension,
        normalisation, preprocessing, data folder): another network is built and swapped in with its
        vectors and catalog as one snapshot; a replaced catalog file is reopened. When the index on disk
        cannot be served (catalog missing, unreadable, unfinished; its network cannot be built), the
        reason is kept in `problem` (and queries answer IndexUnavailable) until a later refresh finds it
        servable again. load=False only checks (for a server without hot reload): any change that needs a
        new snapshot becomes the problem.

        Between two saves of the FAISS file, rows the indexer deletes are already left out of results
        (search_vectors drops ids without a catalog row); rows it adds appear with the next save.
        """
        with self._lock:
            current = self._snapshot
            on_server = current.catalog.path is None
            replaced = False
            if not on_server:
                try:
                    catalog_file = _file_id(current.catalog.path)
                except FileNotFoundError:
                    return self._unavailable(f"the catalog {CATALOG_FILE} is missing from the index folder; "
                                             "restore it or run index-images")
                replaced = catalog_file != current.catalog_file
                if replaced and not load:
                    return self._unavailable("the index on disk was replaced and hot reload is off; restart the server")
            catalog = current.catalog
            updated_at = None
            try:
                if replaced:
                    catalog = Catalog(self.index_dir, url=self.db_url)   # a new file (new inode): a new engine, never the old pool
                settings = catalog.settings()
                if on_server:                    # one catalog, changed by writers elsewhere: its rows tell
                    catalog_file = catalog.identity()
                    replaced = catalog_file != current.catalog_file
                    updated_at = catalog.updated_at()
            except (FileNotFoundError, SQLAlchemyError) as exc:
                if catalog is not current.catalog:
                    catalog.close()
                return self._catalog_unreadable(exc, on_server)
            if settings is None:
                if catalog is not current.catalog:
                    catalog.close()
                return self._unavailable("the index is unfinished (no settings yet); wait for index-images to finish")
            if on_server and replaced and not load:
                return self._unavailable("the index in the catalog database was re-created and hot reload is off; "
                                         "restart the server")
            signature = self._current_signature()
            if current.extractor is not None and current.weights_stamp is not None \
                    and self._weights_stamp(settings) != current.weights_stamp and settings.weights_choice.is_random:
                # the weights file was written to since it was loaded (memory-mapped: the network reads the file as
                # it is now): queries are refused until a network is loaded from sound weights again
                if not load:
                    if catalog is not current.catalog:
                        catalog.close()
                    return self._unavailable("the index's weights file changed since it was loaded; run "
                                             "index-images on the index's data folder (it makes random weights "
                                             "again), then restart the server")
            elif not replaced and settings == current.settings and (not load or (
                    signature == current.faiss_signature and updated_at == current.catalog_updated_at)):
                self._available()
                return False
            if not load:
                return self._unavailable("the index on disk was rebuilt and hot reload is off; restart the server")
            attempt = (catalog_file, settings, self._weights_stamp(settings))
            if self._failed is not None and self._failed[0] == attempt \
                    and time.monotonic() - self._failed[1] < NETWORK_RETRY_S:
                if catalog is not current.catalog:
                    catalog.close()
                return False                     # same failure as last time: retried later, problem kept
            try:
                snapshot = self._load(catalog, catalog_file, settings, current)
            except SQLAlchemyError as exc:   # the catalog broke while its vectors were read
                if catalog is not current.catalog:
                    catalog.close()
                return self._catalog_unreadable(exc, on_server)
            except (RuntimeError, ValueError, OSError) as exc:   # WeightsUnavailable, WeightsMismatch, no device
                if catalog is not current.catalog:
                    catalog.close()
                self._failed = (attempt, time.monotonic())
                why = (f"the index on disk is now {settings.model} {settings.layer} "
                       f"(weights {weights_label(settings)}), whose network cannot be loaded: {exc}")
                # the served network's random weights are memory-mapped: written to since, it reads them damaged
                weights_written = current.weights_stamp is not None and attempt[2] != current.weights_stamp \
                    and network_key(settings) == network_key(current.settings) and settings.weights_choice.is_random
                if not replaced and not weights_written:   # the served catalog is still the one on disk: keep answering
                    log.warning("%s; still serving the loaded %s %s", why, current.settings.model,
                                current.settings.layer)
                    return False
                return self._unavailable(why)
            self._failed = None
            self._snapshot = snapshot   # atomic reference swap: in-flight queries keep the snapshot they took
            if snapshot.catalog is not current.catalog:
                # the replaced catalog's connections (to a file maybe deleted since) close with the last query that
                # holds its snapshot: left to the garbage collector, a server kept every replaced file open
                weakref.finalize(current, current.catalog.close)
            if network_key(settings) != network_key(current.settings):
                log.warning("index reloaded with another network: %s %s (weights %s) instead of %s %s (weights %s)",
                            settings.model, settings.layer, _public_identity(settings.weights_identity),
                            current.settings.model, current.settings.layer,
                            _public_identity(current.settings.weights_identity))
            log.info("index refreshed: %d vectors (version %d)", len(snapshot.vectors), snapshot.version)
            self._available()
            return True

    def _catalog_unreadable(self, exc: Exception, on_server: bool) -> bool:
        """_unavailable for a catalog that failed to be read. A database server's failure (down, unreachable, its
        password changed) is for its operator: the log has why, with the server's address; a client is told only
        that it is out of reach, and running index-images would not help."""
        why = db_error_reason(exc, self.db_url)
        if not on_server:
            return self._unavailable(f"the catalog cannot be read ({why}); restore it or run index-images")
        return self._unavailable("the catalog database cannot be read now; searches are answered again once it is "
                                 "back (the server log says why)", detail=why)

    def _unavailable(self, reason: str, detail: str | None = None) -> bool:
        """Record why the index cannot be served (logged when it changes, with detail). The reason is shown to
        clients: the index folder's path is left out of it."""
        reason = reason.replace(str(self.index_dir), "INDEX_DIR")
        if reason != self._problem:
            log.error("the index at %s cannot be served: %s%s", self.index_dir, reason, f" ({detail})" if detail else "")
        self._problem = reason
        return False

    def _available(self) -> None:
        if self._problem is not None:
            log.warning("the index can be served again (%d vectors)", len(self._snapshot.vectors))
        self._problem = None

    def _weights_stamp(self, settings: IndexSettings) -> tuple | None:
        """Identity of the weights file a failed load needed: a new file there is tried at once."""
        choice = settings.weights_choice
        if choice.is_imagenet:
            path = imagenet_cache_path(settings.model) if settings.model in MODELS else None
        else:
            path = choice.source_file(self.index_dir, settings.model)
        if path is None:
            return None
        try:
            return file_stamp(path)
        except OSError:
            return None


def _say_unused(asked: SearchParams, index) -> None:
    """Warn of search settings asked for (--nprobe, --ef-search, their variables) that this index's type has no use
    for: a Flat index given --nprobe searched exactly as without it, and nothing said so."""
    used = asked.used_by(index).to_json()
    for name, value in asked.to_json().items():
        if name not in used:
            option, kind = {"nprobe": ("--nprobe", "an inverted file (IVF)"),
                            "ef_search": ("--ef-search", "an HNSW graph")}[name]
            log.warning("%s %d (or RETRIEVAL_%s) is not used: this index is not %s, and searches as it would "
                        "without it", option, value, name.upper(), kind)


def _file_id(path: Path) -> tuple[int, int]:
    """(st_dev, st_ino): which file is at path now. Raises FileNotFoundError."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _public_identity(identity: str) -> str:
    """A weights identity without the file path it may hold: "file:PATH:sha256=..." -> "file:NAME:sha256=..."."""
    if identity.startswith("file:"):
        path, _, digest = identity[len("file:"):].rpartition(":")
        return f"file:{Path(path).name}:{digest}"
    return identity
