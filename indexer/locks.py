"""The one writer of an index: a POSIX record lock per index folder, and the catalog's own writer lock."""
from __future__ import annotations

import fcntl
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from retrieval.catalog import Catalog, CatalogBusy, CatalogUnavailable, catalog_sqlite_file

from indexer.config import ConfigError

LOCK_FILE = ".lock"

_held_locks: set[Path] = set()          # index folders this process holds (POSIX locks do not exclude their owner)
_held_locks_guard = threading.Lock()


@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index folder at a time.

    A POSIX record lock (fcntl.lockf) belongs to the process that took it: forked decoding workers do
    not inherit it, and it goes away the moment that process dies, kill -9 included, so a re-run can
    start at once. (flock's lock belongs to the open file, which forked children share.)
    """
    index_dir = Path(index_dir).resolve()
    index_dir.mkdir(parents=True, exist_ok=True)
    busy = IndexBusy(f"another index-images run is updating {index_dir}; wait for it to finish")
    with _held_locks_guard:
        if index_dir in _held_locks:
            raise busy
        _held_locks.add(index_dir)
    try:
        try:
            opened = open(index_dir / LOCK_FILE, "a+")
        except IsADirectoryError:
            raise ConfigError(f"{index_dir / LOCK_FILE} is a folder, not index-images' lock file: remove it and run "
                              "again") from None
        except PermissionError:
            if not (index_dir / LOCK_FILE).exists():
                raise ConfigError(f"the index folder {index_dir} is read-only for this user: change its permissions "
                                  "or pass another --index-dir") from None
            raise ConfigError(f"{index_dir / LOCK_FILE}, index-images' lock file, cannot be opened for writing by "
                              "this user: change its permissions, or remove it, and run again") from None
        with opened as fh:
            try:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:   # EACCES or EAGAIN: held by another process
                raise busy from None
            yield
    finally:
        with _held_locks_guard:
            _held_locks.discard(index_dir)



class IndexBusy(ConfigError):
    """Another index-images run holds the index's writer lock: nothing is wrong, try again later (index-images and
    --check exit with status 75, EX_TEMPFAIL, so a cron job can tell it from a mistake)."""


class LockUnreadable(ConfigError):
    """The index folder's lock file cannot be read by this user: whether a writer holds it cannot be told."""


def writer_running(index_dir: Path) -> bool:
    """Whether an index-images run holds the index folder's lock now: probed with a shared lock, taken and let go at
    once (never waits, writes nothing: works on a read-only folder too). Raises LockUnreadable (a ConfigError) when
    this user cannot open the lock file."""
    index_dir = Path(index_dir).resolve()
    with _held_locks_guard:
        if index_dir in _held_locks:
            return True
    try:
        fh = open(index_dir / LOCK_FILE, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):   # no run yet, or no lock a writer could hold
        return False
    except PermissionError:   # another user's (umask 077), whose run may be going: this user cannot tell
        raise LockUnreadable(f"cannot tell whether an index-images run is updating {index_dir}: its lock file "
                             f"{LOCK_FILE} is not readable by this user; check as the index's owner, or when no run "
                             "is going") from None
    with fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.lockf(fh, fcntl.LOCK_UN)
        except OSError:   # EACCES or EAGAIN: held by a writer
            return True
    return False


@contextmanager
def writer_locks(index_dir: Path, db_url: str | None) -> Iterator[Catalog]:
    """The one writer's locks, then its catalog (created if new). Raises ConfigError when another run holds one.

    The index folder's lock file always (its FAISS file); for an SQLite catalog elsewhere, the lock file of
    the folder holding it too; on a database server (PostgreSQL), the database's own writer lock, which
    guards the catalog whichever index folders its writers use (Catalog.writer_lock)."""
    try:
        sqlite_file = catalog_sqlite_file(index_dir, db_url)
    except CatalogUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    with ExitStack() as stack:
        folders = {Path(index_dir).resolve()} | ({sqlite_file.parent.resolve()} if sqlite_file is not None else set())
        for folder in sorted(folders):
            stack.enter_context(index_lock(folder))
        try:
            catalog = Catalog(index_dir, create=True, url=db_url)
        except CatalogUnavailable as exc:
            raise ConfigError(str(exc)) from exc
        stack.callback(catalog.close)
        try:
            stack.enter_context(catalog.writer_lock())
        except CatalogBusy as exc:
            raise IndexBusy(str(exc)) from None
        yield catalog
