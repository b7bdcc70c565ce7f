"""Uploaded gallery queries kept for a while under a random token (never a path), in an SQLite file that every
worker process of the server shares, so a results page works whichever worker answers it. A store whose file or
folder is deleted under the server is made again; a query made with another network than the one served now is gone."""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, delete, event, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateIndex, CreateTable

from retrieval.catalog import blob_to_vector, make_engine, vector_to_blob
from retrieval.files import is_read_only

log = logging.getLogger(__name__)

RECENT_QUERIES_FILE = "recent-queries.db"
SWEEP_EVERY_S = 60.0   # expired queries (visitors' photos, previews and names) are deleted within this of their hour

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
    Column("network", String, nullable=False, server_default=""),   # retrieval.search.snapshot.network_key of the vector
)


@dataclasses.dataclass(frozen=True)
class RecentQuery:
    vector: np.ndarray    # feature vector, shape=(dim,), float32
    preview_jpeg: bytes   # small JPEG of the upload, shown on the results page
    width: int            # upright size of the uploaded image
    height: int
    filename: str         # as the browser named it (display only)
    created: float        # time.time()
    network: str = ""     # the network that made vector (retrieval.search.snapshot.network_key); "": the one served at add()


class RecentQueries:
    """token -> RecentQuery for ttl_s seconds; the newest `capacity` are kept. Safe from many threads and processes.

    network: returns the key of the network served now; a query stored with another one is not returned
    (its vector would be compared with vectors of another network). None: no such check.
    """

    def __init__(self, path: Path, capacity: int = 500, ttl_s: float = 3600.0,
                 network: Callable[[], str] | None = None):
        assert capacity >= 1, "capacity must be at least 1"
        self.path, self.capacity, self.ttl_s, self.network = Path(path), capacity, ttl_s, network
        self._lock = threading.Lock()   # guards reopening
        self._swept = time.monotonic()   # (the store is swept as it is opened)
        self._file: tuple[int, int] | None = None
        self.memory: dict[str, RecentQuery] | None = None   # set when the store cannot be written: kept in memory
        self.engine: Engine | None = None
        try:
            self.engine = self._open()
        except (OSError, OperationalError) as exc:   # a read-only or full folder, a file where the folder should be
            self._to_memory(exc)

    def close(self) -> None:
        self.sweep()
        if self.engine is not None:
            self.engine.dispose()

    def sweep(self, *, throttled: bool = False) -> None:
        """Delete the expired queries: past their hour they are not shown, and their previews and file names (a
        visitor's photos) are not kept either; they stayed in the file until the next upload, or for good once the
        server stopped. throttled: at most once every SWEEP_EVERY_S in this process."""
        if throttled and time.monotonic() - self._swept < SWEEP_EVERY_S:
            return
        self._swept = time.monotonic()
        if self.memory is not None:
            with self._lock:
                for old in [t for t, q in self.memory.items() if q.created < time.time() - self.ttl_s]:
                    del self.memory[old]
            return

        def work(engine: Engine) -> None:
            with engine.begin() as conn:
                gone = conn.execute(delete(_queries).where(_queries.c.created < time.time() - self.ttl_s)).rowcount
            if gone:   # the write-ahead log held the deleted rows' pages too: folded into the file, the log emptied
                with engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self._run(work)
        except (_NoStore, OperationalError, OSError) as exc:   # swept again later; said, not raised
            log.warning("could not delete the expired uploads from %s: %s", self.path, exc)

    def _to_memory(self, exc: BaseException) -> None:
        """Keep the queries in this process's memory from now on (a results page then works only on the worker
        that took the upload); said in one line."""
        reason = str(getattr(exc, "orig", None) or getattr(exc, "strerror", None) or exc).splitlines()[0]
        log.warning("the recent-queries store %s cannot be written (%s): uploaded queries are kept in memory, per "
                    "worker process", self.path, reason)
        self.memory = {}

    def _open(self) -> Engine:
        """Make the folder, the file and the table as needed (again, if they were deleted) and open the store, its
        expired queries deleted. The file is the server's user's alone (0600; SQLite gives its -wal and -shm files the
        same): it holds visitors' photos."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))   # an empty file is an empty database
        try:
            os.chmod(self.path, 0o600)   # one made before (0644)
        except PermissionError:           # another user's: left as it is
            pass
        engine = make_engine(self.path)               # WAL: workers read while another writes
        # a deleted row's bytes (a visitor's photo) overwritten, not left in free pages: SQLite's own default keeps them
        # (Debian's build turns it on, macOS's and most others do not)
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA secure_delete = ON"))
        with engine.begin() as conn:   # IF NOT EXISTS: gunicorn starts its workers together on a fresh folder
            conn.execute(CreateTable(_queries, if_not_exists=True))
            for index in _queries.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
            columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(recent_queries)")}
            if "network" not in columns:   # a store from before the column existed
                conn.exec_driver_sql("ALTER TABLE recent_queries ADD COLUMN network VARCHAR NOT NULL DEFAULT ''")
            conn.execute(delete(_queries).where(_queries.c.created < time.time() - self.ttl_s))
        self._file = _file_id(self.path)
        return engine

    def _current_engine(self) -> Engine:
        """The engine on the file at path now: reopened when the file (or its folder) was deleted or replaced."""
        if _file_id(self.path) != self._file:
            with self._lock:
                if _file_id(self.path) != self._file:
                    log.warning("the recent-queries store %s was deleted or replaced; making it again", self.path)
                    old, self.engine = self.engine, self._open()
                    old.dispose()
        return self.engine

    def _run(self, work: Callable[[Engine], object]) -> object:
        """work(engine), made again once when the store vanished under it (its table gone with the file)."""
        try:
            try:
                return work(self._current_engine())
            except OperationalError as exc:
                if _cannot_write(exc, self.path.parent):
                    raise
                if "no such table" not in str(exc) and "unable to open" not in str(exc) and "readonly" not in str(exc):
                    raise
                with self._lock:
                    log.warning("the recent-queries store %s lost its table or file (%s); making it again", self.path,
                                str(exc.orig).splitlines()[0])
                    old, self.engine = self.engine, self._open()
                    old.dispose()
                return work(self.engine)
        except (OSError, OperationalError) as exc:
            if _cannot_write(exc, self.path.parent):
                raise _NoStore(exc) from exc
            raise

    def add(self, query: RecentQuery) -> str:
        token = secrets.token_urlsafe(12)
        network = query.network or (self.network() if self.network else "")
        if self.memory is None:
            try:
                self._add_to_file(token, query, network)
                return token
            except _NoStore as exc:
                with self._lock:
                    if self.memory is None:
                        self._to_memory(exc.__cause__)
        with self._lock:
            self.memory[token] = dataclasses.replace(query, network=network)
            now = time.time()
            for old in [t for t, q in self.memory.items() if q.created < now - self.ttl_s]:
                del self.memory[old]
            while len(self.memory) > self.capacity:   # insertion order: the oldest first
                del self.memory[next(iter(self.memory))]
        return token

    def _add_to_file(self, token: str, query: RecentQuery, network: str) -> None:
        newest = select(_queries.c.token).order_by(_queries.c.created.desc()).limit(self.capacity)

        def work(engine: Engine) -> None:
            with engine.begin() as conn:
                conn.execute(insert(_queries).values(
                    token=token, vector=vector_to_blob(query.vector), preview_jpeg=query.preview_jpeg,
                    width=query.width, height=query.height, filename=query.filename, created=query.created,
                    network=network))
                conn.execute(delete(_queries).where(_queries.c.created < time.time() - self.ttl_s))
                conn.execute(delete(_queries).where(_queries.c.token.not_in(newest)))
        self._run(work)

    def get(self, token: str) -> RecentQuery | None:
        """The query, or None when the token is unknown, expired, pushed out, or made with another network."""
        self.sweep(throttled=True)
        def work(engine: Engine):  # noqa: ANN202 - a row or None
            with engine.connect() as conn:
                return conn.execute(select(_queries).where(_queries.c.token == token,
                                                           _queries.c.created >= time.time() - self.ttl_s)).first()
        if self.memory is not None:
            row = self.memory.get(token)
            if row is not None and row.created < time.time() - self.ttl_s:
                row = None
        else:
            try:
                row = self._run(work)
            except _NoStore:
                row = None
        if row is None:
            return None
        if self.network is not None and row.network != self.network():
            return None
        if isinstance(row, RecentQuery):
            return row
        return RecentQuery(blob_to_vector(row.vector), row.preview_jpeg, row.width, row.height, row.filename,
                           row.created, row.network)


class _NoStore(Exception):
    """The store's file cannot be written (read-only, full): the queries go to memory."""


def _cannot_write(exc: BaseException, folder: Path) -> bool:
    """exc says the store cannot be written where it is (a full disk, a read-only folder, a file in its place);
    not a store deleted or replaced under the server, which is made again."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EACCES)
    text = str(getattr(exc, "orig", None) or exc).lower()
    if "database or disk is full" in text:
        return True
    if "readonly" in text or "unable to open" in text:   # deleted under the server, or a folder that refuses writes
        return is_read_only(folder) or not folder.is_dir() or not os.access(folder, os.W_OK)
    return False


def _file_id(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at path now, None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
