"""The catalog: SQLAlchemy models in SQLite for images (with their vectors), index settings, skipped files, the FAISS type."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np
from sqlalchemy import (BigInteger, Boolean, DateTime, Integer, LargeBinary, String, create_engine, delete, event,
                        func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, defer, mapped_column, sessionmaker

CATALOG_FILE = "catalog.db"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class FileName(TypeDecorator):
    """A path or folder name from the file system, kept exactly.

    Linux names are bytes; Python shows bytes that are not UTF-8 as surrogate escapes, which no
    UTF-8 text column can hold. Such a name is stored as its raw bytes (SQLite keeps a BLOB in any
    column) and read back as the same str, so the file can still be opened; every other name is
    plain text. Show names with retrieval.system.display_name.
    """
    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy hook
        if value is None:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
        return value

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201 - SQLAlchemy hook
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


class VectorIndexRow(Base):
    """How the FAISS file is built (one row): the type asked for and built, its training, search settings and recall.

    Written after each save of the FAISS file; the file itself says what it holds (index_types.structure)."""
    __tablename__ = "vector_index"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record: Mapped[str] = mapped_column(String)   # JSON, see retrieval.index_builder.IndexBuilder.record


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


def blob_to_vector(blob: bytes) -> np.ndarray:
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


class Catalog:
    """SQLite catalog at INDEX_DIR/catalog.db: the source of truth for the index."""

    def __init__(self, index_dir: Path, *, create: bool = False):
        self.index_dir = Path(index_dir)
        self.path = self.index_dir / CATALOG_FILE
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no index at {self.index_dir} (missing {CATALOG_FILE}); run index-images first")
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.path, create=create)
        if create:
            Base.metadata.create_all(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

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
        """Record that the FAISS file now holds the catalog as it was at updated_at (read before the save)."""
        with self.Session.begin() as s:
            s.merge(VectorsSavedRow(id=1, catalog_updated_at=updated_at))

    def vectors_in_step(self) -> bool:
        """Whether the FAISS file was saved from the catalog as it is now (no change since)."""
        with self.Session() as s:
            saved = s.scalar(select(VectorsSavedRow.catalog_updated_at).where(VectorsSavedRow.id == 1))
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
            new_rows = [ImageRow(**r, vector=vector_to_blob(v)) for r, v in zip(rows, vectors)]
            s.add_all(new_rows)
            s.add_all(SkippedRow(**k) for k in skipped)
            s.flush()
            new_ids = [r.id for r in new_rows]
            settings = s.get(IndexSettingsRow, 1)
            if settings is not None and (new_rows or replaced):   # the images changed (a new skip alone is no change)
                settings.updated_at = utcnow()
        return new_ids, list(replaced)


    # the FAISS index type
    def vector_index_record(self) -> dict | None:
        """What retrieval.index_builder recorded of the FAISS file, or None (none yet, or a catalog made before)."""
        try:
            with self.Session() as s:
                text = s.scalar(select(VectorIndexRow.record).where(VectorIndexRow.id == 1))
        except OperationalError:   # no such table: made before index types, and opened read-only
            return None
        return json.loads(text) if text else None

    def save_vector_index_record(self, record: dict) -> None:
        with self.Session.begin() as s:
            s.merge(VectorIndexRow(id=1, record=json.dumps(record, sort_keys=True)))


def _stack(part) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - rows of (id, blob)
    ids = np.fromiter((r[0] for r in part), dtype=np.int64, count=len(part))
    vecs = np.stack([blob_to_vector(r[1]) for r in part]).astype(np.float32, copy=False)
    return ids, vecs
