"""The catalog's database: URLs (passwords masked), SQLite and server engines, lock keys, errors in one line."""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import QueuePool

from retrieval.files import is_read_only

CATALOG_FILE = "catalog.db"

# Keys of PostgreSQL advisory locks (64-bit, per database): the one writer, and creating the tables.
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"cnn-image-retrieval: index-images writer").digest()[:8], "big",
                                 signed=True)
SCHEMA_LOCK_KEY = WRITER_LOCK_KEY ^ 1


class CatalogUnavailable(RuntimeError):
    """The catalog database cannot be used: not a database URL, its driver missing, the server unreachable.

    The message never holds the URL's password."""


class IndexNotFound(FileNotFoundError):
    """No usable index in the folder (or database); the message says what to run."""


class CatalogBusy(RuntimeError):
    """Another process holds the catalog's writer lock."""


SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword"})   # libpq reads passwords from these too


NOT_A_URL = ("the catalog URL is not a database URL; expected e.g. postgresql://USER:PASSWORD@HOST:5432/DATABASE or "
             "sqlite:////path/catalog.db (a password holding @ : / or % is written percent-encoded: p%40ss for p@ss)")


def parse_url(url: str) -> "URL":
    """SQLAlchemy's URL of url. Raises CatalogUnavailable saying what a URL looks like (a password with an '@' or a
    ':' not percent-encoded made SQLAlchemy raise 'invalid literal for int()' on the port)."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise CatalogUnavailable(NOT_A_URL) from None


def _secrets(url: str) -> list[str]:
    """The passwords a database URL holds: the user:password@ part's, and those given as query parameters."""
    parsed = parse_url(url)
    found = [parsed.password] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in SECRET_QUERY_KEYS:
            found += [value] if isinstance(value, str) else list(value)
    return [str(s) for s in found if s]


def unencoded_credentials(url: str) -> bool:
    """The user:password@ part of url holds an @ or a / that is not percent-encoded: the URL is then read wrong
    (part of the password taken for the host), and showing its parts would show pieces of the password."""
    authority = url.partition("://")[2]
    credentials = authority.rpartition("@")[0]
    return "@" in credentials or "/" in credentials


PERCENT_ENCODE_HINT = ("the URL's password holds an @, : or / that is not percent-encoded (write @ as %40, : as %3A, "
                       "/ as %2F)")


def mask_url(url: str) -> str:
    """A database URL as it may be shown: every password (user:password@, ?password=...) replaced by ***."""
    if unencoded_credentials(url):   # everything before the last @ may be password
        scheme, _, authority = url.partition("://")
        return f"{scheme}://***@{authority.rpartition('@')[2]}"
    try:
        parsed = parse_url(url)
    except CatalogUnavailable:
        return "(not a database URL)"
    masked = {key: "***" for key in parsed.query if key.lower() in SECRET_QUERY_KEYS}
    shown = parsed.update_query_dict(masked).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", "***")   # the query's *** as the user:***@ part shows it


def server_url(url: str) -> str:
    """The URL SQLAlchemy opens: plain postgresql:// (and postgres://) use psycopg 3, the driver installed."""
    parsed = parse_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def catalog_sqlite_file(index_dir: Path, url: str | None) -> Path | None:
    """The SQLite file a catalog lives in: INDEX_DIR/catalog.db without a URL, the file of a sqlite:/// URL,
    None for a database server. Raises CatalogUnavailable for a URL that is not one, or an in-memory SQLite."""
    if url is None:
        return Path(index_dir) / CATALOG_FILE
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database in (None, "", ":memory:"):
        raise CatalogUnavailable("an in-memory SQLite catalog would be lost at exit; give a file: sqlite:////path/catalog.db")
    return Path(parsed.database).expanduser().absolute()


def make_engine(path: Path, *, create: bool = True) -> Engine:
    """SQLite engine in WAL mode, so a server can read while the indexer writes.

    create=False opens an existing file only: a reader never leaves an empty database behind when the
    file has been deleted under it (it gets an error instead). On a read-only file system (create=False) the file
    is opened read-only and immutable: SQLite could not make the WAL's shared-memory file there, and nothing
    can write it while the file system stays read-only. A file or folder this user may not write (an index another
    user keeps up to date) is opened read-only, taking the writer's locks where SQLite can (its WAL's files are
    there), else immutable (no writer has it open now)."""
    folder = Path(path).absolute().parent
    mounted_read_only = not create and is_read_only(folder)
    read_only = mounted_read_only or (not create and not _writable(Path(path).absolute()))
    # SQLite's own URI, percent-encoded from the path's bytes: any folder name works (not only UTF-8 ones)
    base = f"file:{quote(os.fsencode(Path(path).absolute()))}?mode="
    modes = (["ro&immutable=1"] if mounted_read_only else ["ro", "ro&immutable=1"] if read_only
             else ["rwc" if create else "rw"])
    # commits still in the WAL (a run killed before SQLite merged them into the file): immutable would not read
    # them, showing an older index or none, so it is no way out then
    if read_only and _wal_pending(Path(path).absolute()):
        modes = ["ro"]   # never immutable, which would not read them; and "ro" only where it reads (looked at now)
        probe = sqlite3.connect(base + "ro", uri=True, timeout=30)
        try:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            name = Path(path).name
            raise CatalogUnavailable(
                f"the catalog {path} cannot be read here: {name}-wal holds commits not yet merged into {name}, which "
                f"SQLite reads in a read-only folder only with {name}-shm beside it: open the index once where it "
                "can be written (any command merges them), or copy its folder to a writable place") from None
        finally:
            probe.close()

    def connect() -> sqlite3.Connection:
        for mode in modes[:-1]:   # a read-only WAL database opens only where its -shm file exists or can be made
            conn = sqlite3.connect(base + mode, uri=True, timeout=30, check_same_thread=False)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                conn.close()
        return sqlite3.connect(base + modes[-1], uri=True, timeout=30, check_same_thread=False)

    engine = create_engine("sqlite://", poolclass=QueuePool, creator=connect)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
        cur = dbapi_conn.cursor()
        if not read_only:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def _wal_pending(file: Path) -> bool:
    """Whether SQLite's write-ahead log next to file holds anything (commits not yet merged into file)."""
    try:
        return os.stat(f"{file}-wal").st_size > 0
    except OSError:
        return False


def _writable(file: Path) -> bool:
    """This user may write file (where it exists) and make files next to it (SQLite's WAL and its index)."""
    folder = file.parent
    return os.access(folder, os.W_OK | os.X_OK) and (not file.exists() or os.access(file, os.W_OK))


def db_error_reason(exc: BaseException, url: str | None = None) -> str:
    """A database error in one line, without the SQL statement SQLAlchemy appends or url's password."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    line = message.splitlines()[0] if message else type(exc).__name__
    try:
        secrets = _secrets(url) if url else []
    except CatalogUnavailable:
        secrets = []
    for secret in sorted(secrets, key=len, reverse=True):
        line = line.replace(secret, "***")
    return line


# libpq's connection settings unless the URL gives its own (?connect_timeout=30): a server that accepts TCP and never
# answers (hung, a half-open balancer) held every command about 130 s, deaf to Ctrl-C, before "connection timeout
# expired"; keepalives notice a peer gone without a word on an open connection
POSTGRES_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                         "keepalives_count": 3}


def make_server_engine(url: str) -> Engine:
    """Engine for a catalog on a database server (PostgreSQL tested). Raises CatalogUnavailable."""
    try:
        parsed = parse_url(url)
        connect_args = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in parsed.query} \
            if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(server_url(url), pool_pre_ping=True,   # pre-ping: a restarted server is reconnected
                             connect_args=connect_args)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise CatalogUnavailable(f"no database driver for {mask_url(url)} ({exc}); for PostgreSQL install "
                                 "psycopg: pip install 'psycopg[binary]'") from None
    except ArgumentError:
        raise CatalogUnavailable(f"the catalog URL {mask_url(url)} cannot be opened") from None


def database_full_message(url: str, exc: BaseException) -> str:
    """What to say when the catalog's database server ran out of disk mid-run (PostgreSQL: 'could not extend file
    ...: No space left on device'): the database, not the index folder's disk, is what needs room."""
    return (f"no space left for the catalog database {mask_url(url)} ({db_error_reason(exc, url)}): free space on "
            "the database server's disk and run again; nothing was lost")


# What SQLite says of a file whose pages are damaged (or that is not a database at all)
DAMAGED_MARKERS = ("database disk image is malformed", "file is not a database", "database corruption")


def damaged_reason(exc: BaseException) -> str | None:
    """SQLite's words when exc says the catalog file is damaged, else None (busy, full disk, server gone...)."""
    message = str(getattr(exc, "orig", None) or exc).lower()
    return next((m for m in DAMAGED_MARKERS if m in message), None)


def damaged_message(location: str, reason: str, data_dir: str | None = None) -> str:
    """What to say of a damaged catalog: what happened and the two ways out."""
    return (f"the catalog {location} is damaged ({reason}): restore it from a backup, or re-index into a new folder: "
            f"index-images {data_dir or 'DATA'} --index-dir NEW")
