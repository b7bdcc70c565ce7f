"""The catalog's tables as SQLAlchemy rows: images (with their vectors), index settings, skipped files, the FAISS file's state."""
from __future__ import annotations

import datetime as dt
import os
import zlib

import numpy as np
from sqlalchemy import BigInteger, Boolean, DateTime, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

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
    # CRC32 of vector's bytes, written with it (vector_checksum); NULL in rows written before checksums
    # (filled by index-images --check). Added to older catalogs on open (Catalog._add_missing_columns).
    # deferred: rows loaded whole never name it, so an old catalog opened read-only (no column) still reads
    vector_crc32: Mapped[int | None] = mapped_column(BigInteger, nullable=True, deferred=True)
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class RegionBase(DeclarativeBase):
    """The tables an index has only when it holds regional vectors (index-images --regions): created by the run that
    records them (Catalog.enable_regions), so a catalog without regions stays as it was."""


class RegionRow(RegionBase):
    """One region's vector of an indexed image (index-images --regions), written in the image's own transaction and
    deleted with it. Its FAISS id is its image's id (retrieval.vectors.regions)."""
    __tablename__ = "region_vectors"

    image_id: Mapped[int] = mapped_column(Integer, primary_key=True)   # images.id
    region: Mapped[int] = mapped_column(Integer, primary_key=True)     # 0 .. regions-1 (preprocessing.region_boxes)
    vector: Mapped[bytes] = mapped_column(LargeBinary)                 # float32, shape=(dim,)
    vector_crc32: Mapped[int] = mapped_column(BigInteger)              # vector_checksum(vector)


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
    views: Mapped[str | None] = mapped_column(String, nullable=True)   # "flip", ...; NULL (before views): "single"
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


class FaissDigestRow(Base):
    """What the index folder's FAISS file was when saved (size, digest): a run that finds nothing to do still
    notices a file that was truncated or garbled since, without reading it with FAISS (retrieval.files.sample_digest)."""
    __tablename__ = "faiss_digests"

    index_dir: Mapped[str] = mapped_column(FileName, primary_key=True)   # "." in SQLite; absolute on a server
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))


class VectorIndexRow(Base):
    """How the FAISS file is built (one row): the type asked for and built, its training, search settings and recall.

    Written after each save of the FAISS file; the file itself says what it holds (faiss_parts.structure)."""
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


class WeightsTrainingRow(Base):
    """Which images the index's network was fine-tuned on (one row; only for weights from a file): the content hashes
    of fine-tune's training and validation images, taken from its history when the index was made, so the index
    knows them even once the weights and history files move. evaluate-index leaves the training images out."""
    __tablename__ = "weights_training"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record: Mapped[str] = mapped_column(String)   # JSON, see retrieval.learning.history.training_record


def vector_to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def vector_checksum(blob: bytes | memoryview) -> int:
    """CRC32 of a vector's stored bytes (unsigned, 0 .. 2**32 - 1)."""
    return zlib.crc32(blob) & 0xFFFFFFFF


def blob_to_vector(blob: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def vector_columns(vec: np.ndarray) -> dict:
    """A vector as its row's columns: the blob and its checksum."""
    blob = vector_to_blob(vec)
    return {"vector": blob, "vector_crc32": vector_checksum(blob)}


def stack_vector_rows(part) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - rows of (id, blob)
    """Rows of (id, blob, ...) -> (ids shape=(m,) int64, vectors shape=(m, dim) float32)."""
    ids = np.fromiter((r[0] for r in part), dtype=np.int64, count=len(part))
    vecs = np.stack([blob_to_vector(r[1]) for r in part]).astype(np.float32, copy=False)
    return ids, vecs
