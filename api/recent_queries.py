"""Uploaded gallery queries kept for a while under a random token (never a path), in an SQLite file that every
worker process of the server shares, so a results page works whichever worker answers it."""
from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path

import numpy as np
from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, delete, insert, select
from sqlalchemy.schema import CreateIndex, CreateTable

from retrieval.catalog import blob_to_vector, make_engine, vector_to_blob

RECENT_QUERIES_FILE = "recent-queries.db"

_metadata = MetaData()
_queries = Table(
    "recent_queries", _metadata,
    Column("token", String, primary_key=True),
    Column("vector", LargeBinary, nullable=False),     # float32, shape=(dim,)
    Column("preview_jpeg", LargeBinary, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("filename", String, nullable=False),
    Column("created", Float, nullable=False, index=True),
)


@dataclasses.dataclass(frozen=True)
class RecentQuery:
    vector: np.ndarray    # feature vector, shape=(dim,), float32
    preview_jpeg: bytes   # small JPEG of the upload, shown on the results page
    width: int            # upright size of the uploaded image
    height: int
    filename: str         # as the browser named it (display only)
    created: float        # time.time()


class RecentQueries:
    """token -> RecentQuery for ttl_s seconds; the newest `capacity` are kept. Safe from many threads and processes."""

    def __init__(self, path: Path, capacity: int = 500, ttl_s: float = 3600.0):
        assert capacity >= 1, "capacity must be at least 1"
        self.capacity, self.ttl_s = capacity, ttl_s
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(Path(path))               # WAL: workers read while another writes
        with self.engine.begin() as conn:   # IF NOT EXISTS: gunicorn starts its workers together on a fresh folder
            conn.execute(CreateTable(_queries, if_not_exists=True))
            for index in _queries.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))

    def close(self) -> None:
        self.engine.dispose()

    def add(self, query: RecentQuery) -> str:
        token = secrets.token_urlsafe(12)
        newest = select(_queries.c.token).order_by(_queries.c.created.desc()).limit(self.capacity)
        with self.engine.begin() as conn:
            conn.execute(insert(_queries).values(
                token=token, vector=vector_to_blob(query.vector), preview_jpeg=query.preview_jpeg, width=query.width,
                height=query.height, filename=query.filename, created=query.created))
            conn.execute(delete(_queries).where(_queries.c.created < time.time() - self.ttl_s))
            conn.execute(delete(_queries).where(_queries.c.token.not_in(newest)))
        return token

    def get(self, token: str) -> RecentQuery | None:
        """The query, or None when the token is unknown, expired or pushed out."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_queries).where(_queries.c.token == token,
                                                      _queries.c.created >= time.time() - self.ttl_s)).first()
        if row is None:
            return None
        return RecentQuery(blob_to_vector(row.vector), row.preview_jpeg, row.width, row.height, row.filename,
                           row.created)
