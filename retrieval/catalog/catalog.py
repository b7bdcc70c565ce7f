"""The catalog: SQLAlchemy models for images (with their vectors), index settings, skipped files and the FAISS type; SQLite or a database server."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np
from sqlalchemy import (BigInteger, Boolean, DateTime, Integer, LargeBinary, String, create_engine, delete, event,
                        func, insert, inspect, select, text)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import QueuePool
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, defer, mapped_column, sessionmaker

CATALOG_FILE = "catalog.db"

# Keys of PostgreSQL advisory locks (64-bit, per database): the one writer, and creating the tables.
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"cnn-image-retrieval: index-images writer").digest()[:8], "big",
                                 signed=True)
SCHEMA_LOCK_KEY = WRITER_LOCK_KEY ^ 1


class CatalogUnavailable(RuntimeError):
    """The catalog database cannot be used: not a database URL, its driver missing, the server unreachable.

    The message never holds the URL's password."""


class CatalogBusy(RuntimeError):
    """Another process holds the catalog's writer lock."""


def mask_url(url: str) -> str:
    """A database URL as it may be shown: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


def server_url(url: str) -> str:
    """The URL SQLAlchemy opens: plain postgresql:// (and postgres://) use psycopg 3, the driver installed."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def catalog_sqlite_file(index_dir: Path, url: str | None) -> Path | None:
    """The SQLite file a catalog lives in: INDEX_DIR/catalog.db without a URL, the file of a sqlite:/// URL,
    None for a database server. Raises CatalogUnavailable for a URL that is not one, or an in-memory SQLite."""
    if url is None:
        return Path(index_dir) / CATALOG_FILE
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CatalogUnavailable("the catalog URL is not a database URL; expected e.g. "
                                 "postgresql://USER:PASSWORD@HOST:5432/DATABASE or sqlite:////path/catalog.db") from None
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:"):
        raise CatalogUnavailable("an in-memory SQLite catalog would be lost at exit; give a file: sqlite:////path/catalog.db")
    return Path(parsed.database).expanduser().absolute()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class FileName(TypeDecorator):
    """A path or folder name from the file system, kept exactly.

    Linux names are bytes; Python shows bytes that are not UTF-8 as surrogate escapes, which no
    UTF-8 text column can hold. In SQLite such a name is stored as its raw bytes (SQLite keeps a BLOB
    in any column) and read back as the same str, so the file can still be opened; every other name is
    plain text. Other databases type their columns strictly: there every name is a binary column
    (bytea in PostgreSQL) holding the name's bytes, so equal names still compare equal and order by
    their bytes. Show names with retrieval.system.display_name.
    """
    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy hook
        return dialect.type_descriptor(String() if dialect.name == "sqlite" else LargeBinary())

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy hook
        if value is None:
            return None
        if dialect.name != "sqlite":
            return os.fsencode(value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
        return value

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy hook
        if isinstance(value, memoryview):
            value = value.tobytes()
        return os.fsdecode(value) if isinstance(value, bytes) else value


class ImageRow(Base):
    """One indexed image. Its id is its FAISS id; ids are never reused (AUTOINCREMENT)."""
    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(FileName, unique=True, index=True)   # relative to the data folder
    label: Mapped[str | None] = mapped_column(FileName, index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)                   # float32, shape=(dim,)
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class IndexSettingsRow(Base):
    """The single row that says which network made the vectors (DESIGN invariant 2)."""
    __tablename__ = "index_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String)
    layer: Mapped[str] = mapped_column(String)
    weights: Mapped[str] = mapped_column(FileName)           # "imagenet", "random" or a file path (what the user chose)
    weights_identity: Mapped[str] = mapped_column(String)  # name or content hash
    seed: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    normalize: Mapped[bool] = mapped_column(Boolean)
    preprocessing: Mapped[str] = mapped_column(String)     # e.g. "resize=256,crop=224,mean=...,std=..."
    data_dir: Mapped[str] = mapped_column(FileName)          # absolute
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class SkippedRow(Base):
    """A file found in the data folder that could not be indexed, and why."""
    __tablename__ = "skipped"

    path: Mapped[str] = mapped_column(FileName, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class VectorsSavedRow(Base):
    """Which catalog state the FAISS file was last saved from: equal to the settings' updated_at when in step."""
    __tablename__ = "vectors_saved"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    catalog_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class FaissFileRow(Base):
    """VectorsSavedRow for a catalog on a database server, which several index folders (each with its own
    FAISS file) may share: one row per index folder."""
    __tablename__ = "faiss_files"

    index_dir: Mapped[str] = mapped_column(FileName, primary_key=True)   # absolute
    catalog_updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class VectorIndexRow(Base):
    """How the FAISS file is built (one row): the type asked for and built, its training, search settings and recall.

    Written after each save of the FAISS file; the file itself says what it holds (index_types.structure)."""
    __tablename__ = "vector_index"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record: Mapped[str] = mapped_column(String)   # JSON, see retrieval.vectors.builder.IndexBuilder.record


class ExtractionRow(Base):
    """How the vectors were computed (one row): each precision used with the devices that used it, and the last run's.

    fp32 and bf16 features of one network agree to a cosine of about 0.999, so one index may hold both; this
    says which it holds."""
    __tablename__ = "extraction"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record: Mapped[str] = mapped_column(String)   # JSON, see Catalog.note_extraction


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    model: str
    layer: str
    weights: str
    weights_identity: str
    seed: int
    dim: int
    normalize: bool
    preprocessing: str
    data_dir: str

    @classmethod
    def from_row(cls, row: IndexSettingsRow) -> "IndexSettings":
        return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})


def weights_label(settings: IndexSettings) -> str:
    """The weights as shown to anyone: "imagenet", "random", or a file's name and short hash, never its path."""
    if settings.weights in ("imagenet", "random"):
        return settings.weights
    digest = settings.weights_identity.rpartition("sha256=")[2][:12]
    return f"{Path(settings.weights).name} (sha256 {digest})" if digest else Path(settings.weights).name


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """What callers see of an image row (no vector)."""
    id: int
    path: str
    label: str | None
    size: int
    mtime_ns: int
    width: int
    height: int
    sha256: str


def _record(row: ImageRow) -> ImageRecord:
    return ImageRecord(row.id, row.path, row.label, row.size, row.mtime_ns, row.width, row.height, row.sha256)


def vector_to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def blob_to_vector(blob: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def make_engine(path: Path, *, create: bool = True) -> Engine:
    """SQLite engine in WAL mode, so a server can read while the indexer writes.

    create=False opens an existing file only: a reader never leaves an empty database behind when the
    file has been deleted under it (it gets an error instead)."""
    # SQLite's own URI, percent-encoded from the path's bytes: any folder name works (not only UTF-8 ones)
    uri = f"file:{quote(os.fsencode(Path(path).absolute()))}?mode={'rwc' if create else 'rw'}"
    engine = create_engine("sqlite://", poolclass=QueuePool,
                           creator=lambda: sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False))

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def db_error_reason(exc: BaseException, url: str | None = None) -> str:
    """A database error in one line, without the SQL statement SQLAlchemy appends or url's password."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    line = message.splitlines()[0] if message else type(exc).__name__
    try:
        password = make_url(url).password if url else None
    except ArgumentError:
        password = None
    return line.replace(str(password), "***") if password else line


def make_server_engine(url: str) -> Engine:
    """Engine for a catalog on a database server (PostgreSQL tested). Raises CatalogUnavailable."""
    try:
        return create_engine(server_url(url), pool_pre_ping=True)   # pre-ping: a restarted server is reconnected
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise CatalogUnavailable(f"no database driver for {mask_url(url)} ({exc}); for PostgreSQL install "
                                 "psycopg: pip install 'psycopg[binary]'") from None
    except ArgumentError:
        raise CatalogUnavailable(f"the catalog URL {mask_url(url)} cannot be opened") from None


class Catalog:
    """The source of truth for an index: SQLite at INDEX_DIR/catalog.db, or any SQLAlchemy database URL.

    Raises FileNotFoundError when there is no catalog yet (create=False), CatalogUnavailable when the
    database cannot be reached."""

    def __init__(self, index_dir: Path, *, create: bool = False, url: str | None = None):
        self.index_dir = Path(index_dir)
        self.url = url
        self.path = catalog_sqlite_file(self.index_dir, url)   # None: on a database server
        if self.path is not None:
            if not create and not self.path.exists():
                where = self.index_dir if url is None else self.path
                raise FileNotFoundError(f"no index at {where} (missing {self.path.name}); run index-images first")
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = make_engine(self.path, create=create)
            if create:
                Base.metadata.create_all(self.engine)
        else:
            self.engine = make_server_engine(url)
            try:
                if create:
                    with self.engine.begin() as conn:   # two first writers at once: one creates, the other waits
                        if self.engine.dialect.name == "postgresql":
                            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                        Base.metadata.create_all(conn)
                else:
                    with self.engine.connect() as conn:
                        missing = not inspect(conn).has_table(IndexSettingsRow.__tablename__)
                    if missing:
                        raise FileNotFoundError(f"no index in the database {self.location}; run index-images "
                                                "first (with the same --db-url)")
            except SQLAlchemyError as exc:
                self.engine.dispose()
                raise CatalogUnavailable(f"cannot use the catalog database {self.location}: {self.reason(exc)}") from None
            except FileNotFoundError:
                self.engine.dispose()
                raise
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

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
        with self.Session() as s:
            row = s.get(IndexSettingsRow, 1)
            return IndexSettings.from_row(row) if row else None

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

    def file_states(self) -> dict[str, tuple[int, int, int]]:
        """path -> (id, size, mtime_ns) for every indexed image."""
        with self.Session() as s:
            return {p: (i, sz, mt) for i, p, sz, mt in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns))}

    def skipped_states(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, reason) for every skipped file."""
        with self.Session() as s:
            return {r.path: (r.size, r.mtime_ns, r.reason) for r in s.scalars(select(SkippedRow))}

    def get(self, image_id: int) -> ImageRecord | None:
        with self.Session() as s:
            row = s.get(ImageRow, int(image_id))
            return _record(row) if row else None

    def get_by_path(self, path: str) -> ImageRecord | None:
        """The image at path (relative to the data folder, '/' separators, as stored), or None."""
        with self.Session() as s:
            row = s.scalar(select(ImageRow).options(defer(ImageRow.vector)).where(ImageRow.path == path))
            return _record(row) if row else None

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        with self.Session() as s:
            # rows without their vectors: a query's results never read 16 KB of vector per hit
            return {r.id: _record(r) for r in s.scalars(select(ImageRow).options(defer(ImageRow.vector))
                                                        .where(ImageRow.id.in_(ids)))}

    def vectors(self, ids: Iterable[int] | None = None, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids shape=(n,) int64, vectors shape=(n, dim) float32) in chunks; all rows when ids is None."""
        with self.Session() as s:
            if ids is None:
                q = select(ImageRow.id, ImageRow.vector).order_by(ImageRow.id)
                result = s.execute(q.execution_options(yield_per=chunk))
                for part in result.partitions(chunk):
                    yield _stack(part)
                return
            ids = sorted(int(i) for i in ids)
            for start in range(0, len(ids), chunk):
                part = s.execute(select(ImageRow.id, ImageRow.vector).where(ImageRow.id.in_(ids[start:start + chunk]))
                                 .order_by(ImageRow.id)).all()
                if part:
                    yield _stack(part)

    def vectors_by_path(self) -> dict[str, np.ndarray]:
        """Every image's vector by its path (comparing two indexes of the same folder: tests, benchmarks)."""
        paths = {image_id: path for path, (image_id, *_state) in self.file_states().items()}
        return {paths[i]: v for ids, vecs in self.vectors() for i, v in zip(ids.tolist(), vecs)}

    def vector(self, image_id: int) -> np.ndarray | None:
        with self.Session() as s:
            blob = s.scalar(select(ImageRow.vector).where(ImageRow.id == int(image_id)))
            return None if blob is None else blob_to_vector(blob).copy()

    def has_labels(self) -> bool:
        """Whether any indexed image has a label (uses the label index: cheap)."""
        with self.Session() as s:
            return s.scalar(select(ImageRow.id).where(ImageRow.label.is_not(None)).limit(1)) is not None

    def labels(self) -> dict[str | None, int]:
        with self.Session() as s:
            return dict(s.execute(select(ImageRow.label, func.count()).group_by(ImageRow.label).order_by(ImageRow.label)).all())

    def list_images(self, *, label: str | None = None, offset: int = 0, limit: int = 50) -> list[ImageRecord]:
        with self.Session() as s:
            q = select(ImageRow).order_by(ImageRow.path)
            if label is not None:
                q = q.where(ImageRow.label == label)
            return [_record(r) for r in s.scalars(q.offset(offset).limit(limit))]

    def count_where(self, *, label: str | None = None) -> int:
        with self.Session() as s:
            q = select(func.count(ImageRow.id))
            if label is not None:
                q = q.where(ImageRow.label == label)
            return s.scalar(q) or 0

    def skipped(self) -> list[tuple[str, str]]:
        with self.Session() as s:
            return [(r.path, r.reason) for r in s.scalars(select(SkippedRow).order_by(SkippedRow.path))]

    def skipped_count(self) -> int:
        with self.Session() as s:
            return s.scalar(select(func.count()).select_from(SkippedRow)) or 0

    # writes: one transaction each
    def remove_paths(self, paths: Iterable[str]) -> list[int]:
        """Delete the images and skipped entries at these paths; -> the removed image ids."""
        paths = list(paths)
        removed: list[int] = []
        with self.Session.begin() as s:
            for start in range(0, len(paths), 500):
                part = paths[start:start + 500]
                removed += s.scalars(delete(ImageRow).where(ImageRow.path.in_(part)).returning(ImageRow.id)).all()
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(part)))
            settings = s.get(IndexSettingsRow, 1)
            if removed and settings is not None:
                settings.updated_at = utcnow()
        return removed

    def write_batch(self, rows: list[dict], vectors: np.ndarray, skipped: list[dict]) -> tuple[list[int], list[int]]:
        """Commit one batch atomically: replace rows at these paths, record skips.

        rows: dicts with path, label, size, mtime_ns, width, height, sha256; vectors: shape=(len(rows), dim) float32.
        -> (new ids in rows' order, ids of the rows they replaced or that are now skipped).
        """
        assert len(rows) == len(vectors), "one vector per row"
        paths = [r["path"] for r in rows] + [k["path"] for k in skipped]
        with self.Session.begin() as s:
            replaced: list[int] = []
            if paths:
                replaced = s.scalars(delete(ImageRow).where(ImageRow.path.in_(paths)).returning(ImageRow.id)).all()
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(paths)))
            new_ids: list[int] = []
            if rows:   # one multi-row INSERT (Core, not ORM objects: 1.5x the images/s, which a GPU run needs)
                now = utcnow()
                new_ids = list(s.scalars(insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True),
                                         [{**r, "vector": vector_to_blob(v), "indexed_at": now}
                                          for r, v in zip(rows, vectors)]))
            s.add_all(SkippedRow(**k) for k in skipped)
            settings = s.get(IndexSettingsRow, 1)
            if settings is not None and (new_ids or replaced):   # the images changed (a new skip alone is no change)
                settings.updated_at = utcnow()
        return new_ids, list(replaced)


    # the FAISS index type
    def vector_index_record(self) -> dict | None:
        """What retrieval.vectors.builder recorded of the FAISS file, or None (none yet, or a catalog made before)."""
        try:
            with self.Session() as s:
                text = s.scalar(select(VectorIndexRow.record).where(VectorIndexRow.id == 1))
        except OperationalError:   # no such table: made before index types, and opened read-only
            return None
        return json.loads(text) if text else None

    def save_vector_index_record(self, record: dict) -> None:
        with self.Session.begin() as s:
            s.merge(VectorIndexRow(id=1, record=json.dumps(record, sort_keys=True)))


    # how the vectors were computed
    def extraction_record(self) -> dict | None:
        """{"precisions": {precision: [devices]}, "last": {"precision", "device", "decode"}}, or None (none yet,
        or a catalog made before precisions were recorded)."""
        try:
            with self.Session() as s:
                text = s.scalar(select(ExtractionRow.record).where(ExtractionRow.id == 1))
        except OperationalError:   # no such table: an older catalog opened read-only
            return None
        return json.loads(text) if text else None

    def note_extraction(self, precision: str, device: str, decode: str) -> None:
        """Record that vectors are being added with this precision on this device (before the run's first batch)."""
        with self.Session.begin() as s:
            row = s.get(ExtractionRow, 1)
            record = json.loads(row.record) if row is not None else {"precisions": {}}
            devices = record["precisions"].setdefault(precision, [])
            if device not in devices:
                devices.append(device)
            record["last"] = {"precision": precision, "device": device, "decode": decode}
            s.merge(ExtractionRow(id=1, record=json.dumps(record, sort_keys=True)))


def _stack(part) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - rows of (id, blob)
    ids = np.fromiter((r[0] for r in part), dtype=np.int64, count=len(part))
    vecs = np.stack([blob_to_vector(r[1]) for r in part]).astype(np.float32, copy=False)
    return ids, vecs
