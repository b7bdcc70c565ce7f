"""A catalog carried from SQLite to a database server (index-images --db-url URL --import-sqlite): every row, vectors
included, copied as stored, ids kept, without the network.

A collection outgrows a laptop's SQLite catalog; extracting every image again into PostgreSQL took what the first run
took (days of CPU at a million images). The copy is one transaction on the server: interrupted, it leaves the database
empty. Per-folder state (which FAISS file was saved when, its digest) is not copied: the folder's FAISS file is
checked against the copied catalog at the next open, as any replica's is.
"""
from __future__ import annotations

from typing import Callable

from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from retrieval.catalog.catalog import Catalog
from retrieval.catalog.db import db_error_reason
from retrieval.catalog.schema import Base, ImageRow, RegionBase, RegionRow

# tables of one index folder's FAISS file, not of the catalog (a server keeps them per folder, by absolute path)
PER_FOLDER = frozenset({"vectors_saved", "faiss_files", "faiss_digests"})
CHUNK_ROWS = 1000   # rows read and written at a time (a row holds a 16 kB vector)


class SourceUnreadable(RuntimeError):
    """The SQLite catalog to copy cannot be read (damaged, or a table missing); the database is left empty."""


def copy_catalog(source: Catalog, target: Catalog, progress: Callable[[int], None] | None = None) -> int:
    """Copy every row of source (an SQLite catalog) into target (an empty catalog on a database server) in one
    transaction, ids kept and the id sequence set past the largest ever handed out, so none is reused.
    progress(rows) is told each chunk written. -> the images copied."""
    tables = [t for t in Base.metadata.sorted_tables if t.name not in PER_FOLDER]
    if source.has_regions():
        target.enable_regions()
        tables.append(RegionBase.metadata.tables[RegionRow.__tablename__])
    with source.engine.connect() as src, target.engine.begin() as dst:
        for table in tables:
            try:
                result = src.execution_options(yield_per=CHUNK_ROWS).execute(select(table))
                chunks = iter(result.partitions(CHUNK_ROWS))
            except SQLAlchemyError as exc:
                raise SourceUnreadable(f"{source.location} cannot be read ({table.name}: "
                                       f"{db_error_reason(exc)})") from exc
            for chunk in chunks:
                dst.execute(insert(table), [dict(row._mapping) for row in chunk])
                if progress is not None and table.name == ImageRow.__tablename__:
                    progress(len(chunk))
        handed_out = max(src.scalar(select(func.max(ImageRow.id))) or 0, _sqlite_sequence(src))
        if handed_out and dst.dialect.name == "postgresql":
            dst.execute(text("SELECT setval(pg_get_serial_sequence('images', 'id'), :n)"), {"n": handed_out})
        return dst.scalar(select(func.count()).select_from(ImageRow)) or 0


def _sqlite_sequence(conn) -> int:  # noqa: ANN001 - a SQLAlchemy connection to the SQLite catalog
    """The largest images.id SQLite's AUTOINCREMENT has handed out (removed images' included)."""
    try:
        return int(conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'images'")).scalar() or 0)
    except Exception:  # noqa: BLE001 - no such table: nothing handed out
        return 0
