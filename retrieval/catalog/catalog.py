"""The catalog: the repository of an index's images (with their vectors), settings, skipped files and FAISS records;
its integrity checks (integrity.py), one-row JSON records (records.py), the files' states (file_states.py) and the
vectors read back under their checksums (vector_rows.py) are mixed in, its values in values.py."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from sqlalchemy import delete, func, insert, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import defer, sessionmaker

from retrieval.catalog.db import (PERCENT_ENCODE_HINT, SCHEMA_LOCK_KEY, WRITER_LOCK_KEY, CatalogBusy, CatalogUnavailable,
                                  IndexNotFound, catalog_sqlite_file, damaged_reason, db_error_reason, make_engine,
                                  make_server_engine, mask_url, unencoded_credentials)
from retrieval.catalog.schema import (Base, FaissFileRow, ImageRow, IndexSettingsRow, RegionRow, SkippedRow,
                                      VectorIndexRow, VectorsSavedRow, utcnow, vector_columns)
from retrieval.catalog.file_states import FileStates
from retrieval.catalog.integrity import IntegrityChecks
from retrieval.catalog.records import RunRecords
from retrieval.catalog.regions import RegionVectors
from retrieval.catalog.vector_rows import VectorRows
from retrieval.catalog.values import ImageRecord, IndexSettings, image_record
from retrieval.files import FULL, disk_trouble

log = logging.getLogger(__name__)

# Columns added to a table after its first release: added on open to catalogs made before (ALTER TABLE ... ADD
# COLUMN, nullable, in SQLite and PostgreSQL alike). (table, column, SQL type)
ADDED_COLUMNS = (("images", "vector_crc32", "BIGINT"), ("index_settings", "views", "VARCHAR"))


def _sqlite_without_index(path: Path) -> bool:
    """Whether path is an SQLite database (read-only, without touching it) that holds no index_settings table: made by
    something else, or by a first run stopped before its tables. False when it cannot be told (damaged, locked,
    unreadable): the catalog's own open says why."""
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (IndexSettingsRow.__tablename__,)).fetchone()[0] == 0
    except sqlite3.Error:
        return False


class Catalog(IntegrityChecks, RunRecords, RegionVectors, FileStates, VectorRows):
    """The source of truth for an index: SQLite at INDEX_DIR/catalog.db, or any SQLAlchemy database URL.

    Raises IndexNotFound (a FileNotFoundError) when there is no catalog yet (create=False), CatalogUnavailable when the
    database cannot be reached."""

    def __init__(self, index_dir: Path, *, create: bool = False, url: str | None = None):
        self.index_dir = Path(index_dir)
        self.url = url
        self.path = catalog_sqlite_file(self.index_dir, url)   # None: on a database server
        if self.path is not None:
            if not create and not self.path.exists():
                where = self.index_dir if url is None else self.path
                raise IndexNotFound(f"no index at {where} (missing {self.path.name}); run index-images first")
            if self.path.exists() and not os.access(self.path, os.R_OK | (os.W_OK if create else 0)):
                unreadable = not os.access(self.path, os.R_OK)   # mode 000 was said "cannot be written" to a writer
                raise CatalogUnavailable(f"the catalog {self.path} cannot be {'read' if unreadable else 'written'}: "
                                         f"this user may not {'read' if unreadable else 'write'} it; change its "
                                         "permissions or run as its owner")
            if not create and self.path.stat().st_size == 0:   # opening it would write a database header into it
                raise IndexNotFound(f"no index at {self.index_dir}: its {self.path.name} is an empty file (no "
                                    "index-images run has written it); run index-images first")
            if not create and _sqlite_without_index(self.path):   # before the engine, which makes it a WAL database
                raise IndexNotFound(f"no index at {self.index_dir}: its {self.path.name} holds no index (a database "
                                    "without its tables); run index-images first")
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = make_engine(self.path, create=create)
            if create:
                with self.engine.begin() as conn:
                    _create_tables(conn)
        else:
            self.engine = make_server_engine(url)
            try:
                if create:
                    with self.engine.begin() as conn:   # two first writers at once: one creates, the other waits
                        if self.engine.dialect.name == "postgresql":
                            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                        _create_tables(conn)
                else:
                    self._refuse_without_tables(f"no index in the database {self.location}; run index-images "
                                                "first (with the same --db-url)")
            except SQLAlchemyError as exc:
                self.engine.dispose()
                # a password with a bare @ or /: the driver's error is about the wrong host, and may quote a piece of it
                why = PERCENT_ENCODE_HINT if unencoded_credentials(url) else self.reason(exc)
                raise CatalogUnavailable(f"cannot use the catalog database {self.location}: {why}") from None
            except FileNotFoundError:
                self.engine.dispose()
                raise
        self.absent_columns: set[tuple[str, str]] = set()   # ADDED_COLUMNS this catalog lacks (read-only, made before)
        self._add_missing_columns()
        self.checksums = ("images", "vector_crc32") not in self.absent_columns   # else vectors go unchecked
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self.bad_vectors: set[int] = set()   # ids whose vector failed its checksum here (logged once each)
        self._has_regions = False            # the region_vectors table exists (seen once: it is never dropped)

    def _add_missing_columns(self) -> None:
        """Give a catalog made before a column was added that column (NULL in its rows). A catalog that cannot be
        written (read-only) keeps working without it (absent_columns): vectors then go unchecked, settings made
        before views read as "single"."""
        try:
            with self.engine.connect() as conn:
                inspector = inspect(conn)
                if not inspector.has_table(ImageRow.__tablename__):
                    return
                have = {(table, c["name"]) for table in {t for t, _, _ in ADDED_COLUMNS}
                        for c in inspector.get_columns(table)}
        except SQLAlchemyError as exc:
            if damaged_reason(exc) or disk_trouble(exc) == FULL:   # nothing can be read: the caller says why
                self.engine.dispose()
                raise
            self.absent_columns.add(("images", "vector_crc32"))
            log.warning("catalog %s: cannot look for new columns (%s); vectors go unchecked", self.location,
                        db_error_reason(exc, self.url))
            return
        for table, column, kind in ADDED_COLUMNS:
            if (table, column) in have:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                log.info("catalog %s: added the column %s.%s", self.location, table, column)
            except SQLAlchemyError as exc:
                if "duplicate column" in str(exc).lower() or "already exists" in str(exc).lower():
                    continue   # another process added it first
                if damaged_reason(exc):
                    self.engine.dispose()
                    raise
                self.absent_columns.add((table, column))
                log.warning("catalog %s: cannot add the new column %s.%s (%s)%s", self.location, table, column,
                            db_error_reason(exc, self.url), "; vectors go unchecked" if column == "vector_crc32" else "")

    @property
    def location(self) -> str:
        """Where the catalog is, as it may be shown: the SQLite file, or the URL without its password."""
        return str(self.path) if self.path is not None else mask_url(self.url)

    @property
    def backend(self) -> str:
        """The database's kind: "sqlite", "postgresql", ..."""
        return self.engine.dialect.name

    def reason(self, exc: BaseException) -> str:
        """A database error in one line, without the SQL statement SQLAlchemy appends or the URL's password."""
        return db_error_reason(exc, self.url)

    def _refuse_without_tables(self, message: str) -> None:
        """Raise IndexNotFound(message) when the database has no index_settings table (no index-images run made it)."""
        with self.engine.connect() as conn:
            missing = not inspect(conn).has_table(IndexSettingsRow.__tablename__)
        if missing:
            self.engine.dispose()
            raise IndexNotFound(message)

    def identity(self) -> tuple:
        """Which catalog this is now: (st_dev, st_ino) of the SQLite file (raises FileNotFoundError), or
        ("database", created_at) on a server, where a re-created index has another created_at (ids restart)."""
        if self.path is not None:
            st = os.stat(self.path)
            return st.st_dev, st.st_ino
        with self.Session() as s:
            return "database", s.scalar(select(IndexSettingsRow.created_at).where(IndexSettingsRow.id == 1))

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the database's writer lock for the block (PostgreSQL: an advisory lock on a connection of its own,
        which the server releases when the connection ends, the process killed included). Raises CatalogBusy.

        SQLite files are locked by their folder's lock file instead (indexer.run.index_lock): nothing here."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")   # no transaction held open
        try:
            if not conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": WRITER_LOCK_KEY}):
                raise CatalogBusy(f"another index-images run is updating the catalog in {self.location}; "
                                  "wait for it to finish")
            try:
                yield
            finally:
                conn.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": WRITER_LOCK_KEY})
        finally:
            conn.close()

    def close(self) -> None:
        self.engine.dispose()

    # settings
    def settings(self) -> IndexSettings | None:
        names = [f.name for f in dataclasses.fields(IndexSettings) if ("index_settings", f.name) not in self.absent_columns]
        with self.Session() as s:
            row = s.execute(select(*(getattr(IndexSettingsRow, n) for n in names))
                            .where(IndexSettingsRow.id == 1)).first()
            return IndexSettings.from_row(row._mapping) if row else None

    def save_settings(self, settings: IndexSettings) -> None:
        with self.Session.begin() as s:
            row = s.get(IndexSettingsRow, 1)
            if row is None:
                s.add(IndexSettingsRow(id=1, **dataclasses.asdict(settings)))
            else:
                for k, v in dataclasses.asdict(settings).items():
                    setattr(row, k, v)

    def touch(self) -> None:
        """Record that the index content changed now."""
        with self.Session.begin() as s:
            row = s.get(IndexSettingsRow, 1)
            if row is not None:
                row.updated_at = utcnow()

    def mark_vectors_saved(self, updated_at: dt.datetime | None) -> None:
        """Record that the index folder's FAISS file now holds the catalog as it was at updated_at (read before the save)."""
        with self.Session.begin() as s:
            if self.path is not None:
                s.merge(VectorsSavedRow(id=1, catalog_updated_at=updated_at))
            else:
                s.merge(FaissFileRow(index_dir=str(self.index_dir.absolute()), catalog_updated_at=updated_at))

    def vectors_in_step(self) -> bool:
        """Whether the index folder's FAISS file was saved from the catalog as it is now (no change since)."""
        with self.Session() as s:
            if self.path is not None:
                saved = s.scalar(select(VectorsSavedRow.catalog_updated_at).where(VectorsSavedRow.id == 1))
            else:
                saved = s.scalar(select(FaissFileRow.catalog_updated_at)
                                 .where(FaissFileRow.index_dir == str(self.index_dir.absolute())))
            return saved is not None and saved == s.scalar(select(IndexSettingsRow.updated_at))

    def updated_at(self) -> dt.datetime | None:
        with self.Session() as s:
            return s.scalar(select(IndexSettingsRow.updated_at).where(IndexSettingsRow.id == 1))

    # images
    def count(self) -> int:
        with self.Session() as s:
            return s.scalar(select(func.count(ImageRow.id))) or 0

    def ids(self) -> np.ndarray:
        """All image ids, shape=(N,), dtype=int64, ascending."""
        with self.Session() as s:
            return np.array(s.scalars(select(ImageRow.id).order_by(ImageRow.id)).all(), dtype=np.int64)

    def get(self, image_id: int) -> ImageRecord | None:
        with self.Session() as s:
            row = s.get(ImageRow, int(image_id))
            return image_record(row) if row else None

    def get_by_path(self, path: str) -> ImageRecord | None:
        """The image at path (relative to the data folder, '/' separators, as stored), or None."""
        with self.Session() as s:
            row = s.scalar(select(ImageRow).options(defer(ImageRow.vector)).where(ImageRow.path == path))
            return image_record(row) if row else None

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        with self.Session() as s:
            # rows without their vectors: a query's results never read 16 KB of vector per hit
            return {r.id: image_record(r) for r in s.scalars(select(ImageRow).options(defer(ImageRow.vector))
                                                        .where(ImageRow.id.in_(ids)))}

    def has_labels(self) -> bool:
        """Whether any indexed image has a label (uses the label index: cheap)."""
        with self.Session() as s:
            return s.scalar(select(ImageRow.id).where(ImageRow.label.is_not(None)).limit(1)) is not None

    def labels(self) -> dict[str | None, int]:
        """label -> images, labels in the order a person looks for them (case aside: 'blue' before 'Green'; the
        database's own collation differs between SQLite and PostgreSQL), None (unlabelled) last."""
        with self.Session() as s:
            counts = s.execute(select(ImageRow.label, func.count()).group_by(ImageRow.label)).all()
        return dict(sorted(counts, key=lambda lc: (lc[0] is None, (lc[0] or "").casefold(), lc[0] or "")))

    def list_images(self, *, label: str | None = None, unlabelled: bool = False, offset: int = 0,
                    limit: int = 50) -> list[ImageRecord]:
        """The images by path: all, those of label, or (unlabelled) those outside any class folder."""
        with self.Session() as s:
            q = select(ImageRow).order_by(ImageRow.path)
            return [image_record(r) for r in s.scalars(_labelled(q, label, unlabelled).offset(offset).limit(limit))]

    def count_where(self, *, label: str | None = None, unlabelled: bool = False) -> int:
        with self.Session() as s:
            return s.scalar(_labelled(select(func.count(ImageRow.id)), label, unlabelled)) or 0

    def skipped(self, limit: int | None = None) -> list[tuple[str, str]]:
        """(path, reason) of the files index-images skipped, by path; the first limit of them (None: all)."""
        with self.Session() as s:
            return [(r.path, r.reason) for r in s.scalars(select(SkippedRow).order_by(SkippedRow.path).limit(limit))]

    def skipped_count(self) -> int:
        with self.Session() as s:
            return s.scalar(select(func.count()).select_from(SkippedRow)) or 0

    # writes: one transaction each
    def remove_paths(self, paths: Iterable[str]) -> list[int]:
        """Delete the images (with their regional vectors) and skipped entries at these paths; -> the removed image ids."""
        paths = list(paths)
        removed: list[int] = []
        has_regions = self.has_regions()
        with self.Session.begin() as s:
            for start in range(0, len(paths), 500):
                part = paths[start:start + 500]
                removed += s.scalars(delete(ImageRow).where(ImageRow.path.in_(part)).returning(ImageRow.id)).all()
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(part)))
            self._delete_regions(s, list(removed), has_regions)
            settings = s.get(IndexSettingsRow, 1)
            if removed and settings is not None:
                settings.updated_at = utcnow()
        return removed

    def write_batch(self, rows: list[dict], vectors: np.ndarray, skipped: list[dict],
                    regions: np.ndarray | None = None) -> tuple[list[int], list[int]]:
        """Commit one batch atomically: replace rows at these paths (their regional vectors with them), record skips.

        rows: dicts with path, label, size, mtime_ns, width, height, sha256; vectors: shape=(len(rows), dim) float32;
        regions: the rows' regional vectors, shape=(len(rows), R, dim) float32, or None (an index without them).
        -> (new ids in rows' order, ids of the rows they replaced or that are now skipped).
        """
        assert len(rows) == len(vectors), "one vector per row"
        assert regions is None or len(regions) == len(rows), "R regional vectors per row"
        paths = [r["path"] for r in rows] + [k["path"] for k in skipped]
        has_regions = self.has_regions()
        with self.Session.begin() as s:
            replaced: list[int] = []
            if paths:
                replaced = s.scalars(delete(ImageRow).where(ImageRow.path.in_(paths)).returning(ImageRow.id)).all()
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(paths)))
                self._delete_regions(s, list(replaced), has_regions)
            new_ids: list[int] = []
            if rows:   # one multi-row INSERT (Core, not ORM objects: 1.5x the images/s, which a GPU run needs)
                now = utcnow()
                new_ids = list(s.scalars(insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True),
                                         [{**r, **vector_columns(v), "indexed_at": now}
                                          for r, v in zip(rows, vectors)]))
                if regions is not None and regions.shape[1]:
                    s.execute(insert(RegionRow), [{"image_id": i, "region": j, **vector_columns(v)}
                                                  for i, per_image in zip(new_ids, regions)
                                                  for j, v in enumerate(per_image)])
            s.add_all(SkippedRow(**k) for k in skipped)
            settings = s.get(IndexSettingsRow, 1)
            if settings is not None and (new_ids or replaced):   # the images changed (a new skip alone is no change)
                settings.updated_at = utcnow()
        return new_ids, list(replaced)


# The vector-index record of an index made before that record existed (its catalog has no vector_index table): exact
# Flat search of raw vectors, what every index was then. Written as the table is added, so that the first run of this
# version keeps it; taken for a new index, it got a new index's defaults (whitening, auto's compressed type past 50,000
# images), which changed its neighbours and distances (8 times larger) without a word.
LEGACY_VECTOR_INDEX = {"requested": "Flat", "factory": "Flat", "exact": True, "whiten": {"on": False, "dim": None},
                       "dba": 0}


def _create_tables(conn) -> None:  # noqa: ANN001 - a SQLAlchemy connection in a transaction
    """The catalog's tables, made where missing; an index older than the vector_index table gets LEGACY_VECTOR_INDEX."""
    inspector = inspect(conn)
    older = inspector.has_table(ImageRow.__tablename__) and not inspector.has_table(VectorIndexRow.__tablename__)
    Base.metadata.create_all(conn)
    if older and conn.scalar(select(func.count()).select_from(ImageRow)):
        conn.execute(insert(VectorIndexRow).values(id=1, record=json.dumps(LEGACY_VECTOR_INDEX, sort_keys=True)))
        log.info("catalog made before the FAISS side was recorded: kept as it was, exact search of raw vectors")


def _labelled(query, label: str | None, unlabelled: bool):  # noqa: ANN001, ANN202 - a SQLAlchemy select
    """query of images narrowed to label, or to the images without one."""
    if unlabelled:
        return query.where(ImageRow.label.is_(None))
    return query if label is None else query.where(ImageRow.label == label)
