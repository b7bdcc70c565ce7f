"""The `serve-images` command: the JSON API and the gallery under gunicorn (gthread workers), not Flask's dev server."""
from __future__ import annotations

import logging
import os
import errno
import faulthandler
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from commands.options import Command, FloatRange, PathArg, UserError, catalog_error, command_settings, source_of
from retrieval.names import DB_URL_ENV, INDEX_DIR_ENV, MAX_EF_SEARCH, MAX_NPROBE
from retrieval.system import available_cores, collector_paused, hold_interrupts_while_importing, leave_out_triton

from api.gunicorn_worker import DEFAULT_READ_TIMEOUT_S, MAX_HEAD_BYTES, with_read_timeout
from api.settings import SETTINGS, checked_settings, settings_in_force

MAX_CONNECTIONS = 64   # open connections per worker process (gunicorn's default is 1000)
GRACEFUL_TIMEOUT_S = 10   # after Ctrl-C or SIGTERM, how long a worker has to finish before the server kills it
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"   # api.metrics: where the workers keep their metric values
# Options that set an app setting (api.settings.SETTINGS): option name -> config key. An option added here is
# passed to create_app, shown by --print-config with the app's value, and listed once in the configuration table (docs/configuration.md).
OPTION_SETTINGS = {"index_dir": "INDEX_DIR", "db_url": "DB_URL", "device": "DEVICE", "compare_index": "COMPARE_INDEX", "training": "TRAINING",
                   "nprobe": "NPROBE", "ef_search": "EF_SEARCH"}

# Only light modules above (click, gunicorn: about 0.1 s): --help and usage errors answer at once. The
# retrieval modules that bring torch and FAISS are imported inside the command, after the arguments are parsed.

log = logging.getLogger(__name__)




# Settings only some gunicorn versions know; skipped where absent.
NEWER_GUNICORN_SETTINGS = frozenset({"control_socket_disable"})


class GunicornServer(BaseApplication):
    """gunicorn embedded: each worker process builds its own app (network, FAISS, catalog) after the fork."""

    def __init__(self, app_config: dict[str, Any], options: dict[str, Any]):
        self.app_config, self.options = app_config, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in NEWER_GUNICORN_SETTINGS and key not in self.cfg.settings:
                continue
            self.cfg.set(key, value)

    def load(self):  # noqa: ANN201 - a WSGI app
        # imported in the worker: torch and FAISS start after the fork, with the garbage collector off (sooner),
        # and what they made is frozen out of the collections that serving triggers
        with collector_paused():
            from retrieval.features.backbones import DeviceUnavailable, WeightsUnavailable
            from retrieval.search.index import IndexNotFound
            from retrieval.search.snapshot import IndexUnavailable

            from api import create_app

            try:
                return create_app(self.app_config)
            except (IndexNotFound, IndexUnavailable, WeightsUnavailable, DeviceUnavailable, ValueError) as exc:   # WeightsMismatch too
                print(f"serve-images: {exc}", file=sys.stderr, flush=True)
                sys.exit(Arbiter.WORKER_BOOT_ERROR)   # the master stops instead of restarting the worker forever


def check_index(index_dir: Path, db_url: str | None = None, *, queried: bool = True) -> tuple[int, str]:
    """-> (image count, "model layer") of the index, or a UserError saying to run index-images first. queried: its
    network computes queries, so its weights file must be there as recorded (--compare-index's is only evaluated,
    from its stored vectors)."""
    from sqlalchemy.exc import SQLAlchemyError

    from indexer.check import weights_problem
    from retrieval.system import display_name
    from retrieval.catalog import Catalog, CatalogUnavailable, db_error_reason

    try:
        catalog = Catalog(index_dir, url=db_url)
    except FileNotFoundError as exc:
        if db_url is not None:
            raise UserError(f"{exc} (index-images DATA_DIR --index-dir {index_dir} --db-url URL)") from None
        raise UserError(f"no index at {index_dir}: run index-images first (index-images DATA_DIR --index-dir {index_dir})") from None
    except CatalogUnavailable as exc:
        raise UserError(str(exc)) from None
    except SQLAlchemyError as exc:
        if (user_error := catalog_error(exc, index_dir, db_url)):
            raise user_error from None
        raise UserError(f"the catalog cannot be read: {db_error_reason(exc, db_url)}") from None
    try:
        settings = catalog.settings()
        if settings is None:
            raise UserError(f"the index in {catalog.location} is unfinished: run index-images first")
        if not Path(settings.data_dir).is_dir():
            click.echo(f"warning: the indexed data folder {settings.data_dir} is missing; images cannot be shown", err=True)
        catalog.list_images(limit=1)   # reads the images table itself (a count may read an index only)
        weights = settings.weights_choice.source_file(index_dir, settings.model)   # None: ImageNet's, from the hub cache
        if weights is not None and weights.exists() and not os.access(weights, os.R_OK):
            raise UserError(f"the index's weights file {weights} cannot be read: this user may not read it; change "
                            "its permissions or run as its owner")
        # missing, damaged or replaced: said here once, not by every worker after gunicorn's "Listening", then 503s
        if queried and (problem := weights_problem(index_dir, settings)) is not None:
            action = problem[1].format(data=display_name(settings.data_dir), index=display_name(str(index_dir)))
            raise UserError(f"{problem[0]}; {action}")
        return catalog.count(), f"{settings.model} {settings.layer}"
    except SQLAlchemyError as exc:
        if (user_error := catalog_error(exc, index_dir, db_url)):
            raise user_error from None
        raise UserError(f"the catalog in {catalog.location} cannot be read: {db_error_reason(exc, db_url)}") from None
    finally:
        catalog.close()


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


METRICS_ROOM_BYTES = 4 << 20   # free space the metrics folder's file system needs (a few 64 KB files per worker)


def metrics_parent() -> str | None:
    """Where the workers' metric files go: /dev/shm when it is a writable folder with room, else the temporary folder
    (None)."""
    shm = "/dev/shm"
    try:
        roomy = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize >= METRICS_ROOM_BYTES
    except OSError:
        return None
    return shm if roomy and os.access(shm, os.W_OK | os.X_OK) else None


METRICS_PREFIX = "serve-images-metrics-"   # + the server's pid + "-" + mkdtemp's letters
METRICS_LOCK = ".server.lock"              # in the folder, locked (flock) by its server for as long as it runs


def hold_metrics_folder(folder: str) -> int:
    """Lock folder's METRICS_LOCK for this process's life (and its workers', which inherit it): the descriptor, kept
    open. The lock, not the pid, tells a live server's folder: a pid says nothing across containers sharing /dev/shm."""
    import fcntl

    fd = os.open(os.path.join(folder, METRICS_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_dead_servers_metrics(parent: Path) -> None:
    """Remove the metrics folders of servers that died without cleaning up (SIGKILL, the out-of-memory killer): in
    /dev/shm they hold memory, about 200 kB a worker, and a supervisor that restarts a killed server piles them up.
    A folder whose lock no process holds is a dead server's; one without a lock file is left alone."""
    import fcntl

    for folder in parent.glob(f"{METRICS_PREFIX}*"):
        try:
            fd = os.open(folder / METRICS_LOCK, os.O_RDWR)
        except OSError:   # no lock file (another program's, or older), or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # held: that server runs
            continue
        finally:
            os.close(fd)   # (closing it lets the lock go again)
        shutil.rmtree(folder, ignore_errors=True)


def check_port_free(host: str, port: int) -> None:
    """Raise a UserError naming the way out when another program listens on host:port (gunicorn would print five
    lines of its own retries and exit 1). Bound as gunicorn binds, with SO_REUSEADDR, and released at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host!r}: {exc.strerror} (--host)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is in use on {host}: pass --port (or SERVE_IMAGES_PORT), "
                                "or DEMO_PORT for make demo") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"no permission to listen on port {port}: pass --port with a number above 1023") \
                    from None
            raise UserError(f"cannot listen on {bind_address(host, port)}: {exc.strerror or exc}") from None


def app_overrides(ctx: click.Context) -> dict[str, tuple[Any, str]]:
    """What serve-images passes to create_app on top of the environment: config key -> (value, where it came from).

    The options named in OPTION_SETTINGS (when given a value), and the cores shared between the workers."""
    overrides: dict[str, tuple[Any, str]] = {}
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in OPTION_SETTINGS and value is not None:
            overrides[OPTION_SETTINGS[param.name]] = (str(value) if isinstance(value, Path) else value,
                                                      source_of(ctx, param, "serve-images"))
    workers = ctx.params["workers"]
    if "RETRIEVAL_TORCH_THREADS" not in os.environ:      # share the cores between worker processes
        overrides["TORCH_THREADS"] = (max(1, available_cores() // workers), "serve-images: cores / --workers")
    if "RETRIEVAL_DECODE_PROCESSES" not in os.environ:   # and the upload decoders (2 by default) too
        overrides["DECODE_PROCESSES"] = (max(1, min(2, available_cores()) // workers),
                                         "serve-images: 2 decoders (at most one per core) / --workers")
    return overrides


def show_config(ctx: click.Context, overrides: dict[str, tuple[Any, str]]) -> None:
    """The options and settings a server started with these arguments would run with, and where each came from."""
    settings = {s.name: s for s in settings_in_force(overrides)}
    rows = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in ("print_config", "version") or not p.expose_value:
            continue
        value, source = ctx.params[p.name], source_of(ctx, p, "serve-images")
        if p.name in OPTION_SETTINGS:    # what the app will use (--device: the app's own default when not given)
            setting = settings.pop(f"RETRIEVAL_{OPTION_SETTINGS[p.name]}")
            value, source = setting.value, source if source != "default" else setting.source
            if p.name in ("nprobe", "ef_search") and not value:   # 0: what index-images tuned and recorded
                value, source = None, "default: the index's, as index-images tuned it"
        if p.name == "db_url" and value:   # never print a password
            from retrieval.catalog import mask_url

            value = mask_url(value)
        rows.append((p.opts[-1], value, source))
    rows += [(s.name, s.value, s.source) for s in settings.values()]
    width = max(len(name) for name, _, _ in rows)
    value_width = min(40, max(len(str(value)) for _, value, _ in rows))
    click.echo(f"{'setting':<{width}}  {'value':<{value_width}}  source")
    for name, value, source in rows:
        shown = "-" if value is None else str(value)
        click.echo(f"{name:<{width}}  {shown:<{value_width}}  {source}")


@click.command(cls=Command, context_settings=command_settings("serve-images"))
@click.option("--index-dir", type=PathArg(file_okay=False, resolve_path=True, path_type=Path), default="index",
              envvar=INDEX_DIR_ENV, show_default=True, show_envvar=True,
              help="Folder holding the index made by index-images.")
@click.option("--db-url", default=None, envvar=DB_URL_ENV, show_envvar=True, metavar="URL",
              help="SQLAlchemy URL of the catalog, as given to index-images (postgresql://USER:PASSWORD@HOST:5432/DB); "
                   "several servers, each with its own index folder, may share it. [default: SQLite catalog.db in "
                   "the index folder]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes; each loads its own copy of the network and the index.")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="Request threads per worker; concurrent queries share forward passes.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, envvar="RETRIEVAL_DEVICE",
              show_envvar=True, help="Where query features are computed. [default: cpu]")
@click.option("--timeout", type=click.IntRange(min=1), default=120, show_default=True,
              help="Seconds a worker may stay silent before gunicorn restarts it.")
@click.option("--read-timeout", type=FloatRange(min=0.1), default=DEFAULT_READ_TIMEOUT_S, show_default=True,
              help="Seconds a client may take to send a request's headers, or pause while sending its body; "
                   "slower or idle connections are answered 408 and closed.")
@click.option("--nprobe", type=click.IntRange(1, MAX_NPROBE), default=None, envvar="RETRIEVAL_NPROBE", show_envvar=True,
              help="IVF lists searched per query. [default: as index-images recorded it, tuned for recall]")
@click.option("--ef-search", type=click.IntRange(1, MAX_EF_SEARCH), default=None, envvar="RETRIEVAL_EF_SEARCH", show_envvar=True,
              help="HNSW search breadth (efSearch). [default: as index-images recorded it]")
@click.option("--access-log/--no-access-log", default=False, help="Log every request on stderr.")
@click.option("--compare-index", type=PathArg(file_okay=False, resolve_path=True, path_type=Path), default=None,
              envvar="RETRIEVAL_COMPARE_INDEX", show_envvar=True, metavar="DIR",
              help="A second index of the same labelled images (e.g. with fine-tuned weights): /evaluation shows both "
                   "side by side.")
@click.option("--training", type=PathArg(exists=True, dir_okay=False, resolve_path=True, path_type=Path), default=None,
              envvar="RETRIEVAL_TRAINING", show_envvar=True, metavar="FILE",
              help="A fine-tune history (NAME.history.json) for /training. [default: the one next to the index's "
                   "weights file, when it was fine-tuned]")
@click.option("--print-config", is_flag=True, allow_from_autoenv=False,
              help="Print every setting the server would run with, and where its value came from (default, "
                   "environment variable, command line); then exit without starting it.")
@click.pass_context
def main(ctx: click.Context, index_dir: Path, db_url: str | None, host: str, port: int, workers: int, threads: int, device: str | None,
         timeout: int, read_timeout: float, nprobe: int | None, ef_search: int | None, access_log: bool, compare_index: Path | None, training: Path | None,
         print_config: bool) -> None:
    """Serve the index in --index-dir: the JSON API (POST /search, GET /images/<id>/neighbours, /stats) and the gallery.

    Runs under gunicorn with gthread workers, which read each request in full before a thread takes
    it, so slow or stalled clients cannot hold the request threads. The server notices when
    index-images updates the index and answers from the new one within about a second of that run's end,
    without a restart. Limits come from RETRIEVAL_* environment variables (RETRIEVAL_MAX_UPLOAD_MB,
    RETRIEVAL_MAX_PIXELS, ...). /evaluation shows a second index side by side with --compare-index;
    /training shows the fine-tuning history of the index's network (or of --training FILE).

    Every option can also be set by an environment variable (SERVE_IMAGES_PORT, ...; see
    --print-config and docs/configuration.md). GET /metrics serves Prometheus metrics
    summed over the worker processes. A compressed FAISS index is memory-mapped and
    searched with the nprobe or efSearch index-images tuned, unless --nprobe / --ef-search say otherwise;
    /stats shows the recall measured with them.

    Exit status: 0 when stopped (Ctrl-C or SIGTERM), 2 when the index cannot be served (none there: run
    index-images first; a damaged or unreadable catalog; the port in use), 1 when its disk is too full to open the
    catalog (one line: what to free), 3 when a worker cannot start.
    """
    overrides = app_overrides(ctx)
    try:   # before any worker starts: a wrong RETRIEVAL_* value is one line naming it, exit 2
        checked_settings({s.name: row.value for s, row in zip(SETTINGS, settings_in_force(overrides))})
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if print_config:
        show_config(ctx, overrides)
        return
    # as gunicorn's own lines: when and which worker (every worker logs its reloads, and they interleave)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%Y-%m-%d %H:%M:%S %z",
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)   # its search for CPU-specific builds is noise
    count, network = check_index(index_dir, db_url)   # what to index comes before where to listen
    if compare_index is not None:
        check_index(compare_index, queried=False)
    check_port_free(host, port)
    from retrieval.catalog import mask_url   # light by now: check_index imported it

    where = f"{index_dir} (catalog {mask_url(db_url)})" if db_url else str(index_dir)
    app_config = {key: value for key, (value, _source) in overrides.items()}
    # behind a proxy under a sub-path, gunicorn's SCRIPT_NAME=/pics: every address the app makes starts with it
    prefix = os.environ.get("SCRIPT_NAME", "").rstrip("/")
    address = f"http://{bind_address(host, port)}{prefix}/"

    def post_worker_init(worker) -> None:  # noqa: ANN001 - gunicorn Worker, after it loaded the app
        if worker.age == 1:   # the first worker: the index is loaded, requests are answered from now on
            click.echo(f"serve-images: {count:,} images ({network}) from {where}\n"
                       f"serve-images: gallery and API at {address}  (Ctrl-C to stop)", err=True)

    options = {
        "bind": bind_address(host, port),
        "workers": workers,
        "threads": threads,
        "worker_class": with_read_timeout(read_timeout),   # gthread, reading requests ahead (api.gunicorn_worker)
        "worker_connections": MAX_CONNECTIONS,   # per worker; with the read-ahead cap, bounds the memory slow clients hold
        "timeout": timeout,
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        "keepalive": 5,
        # gunicorn's own head limits (4 KB request line, 8 KB per header, 100 headers) answer in HTML; the read-ahead
        # worker answers JSON 431 past MAX_HEAD_BYTES (64 KB) for the whole head, so a long query string reaches the
        # app (400 bad_k, not an HTML 414)
        "limit_request_line": 0,                           # unlimited (gunicorn's documented 0)
        "limit_request_field_size": MAX_HEAD_BYTES,        # here 0 means its 8 KB default
        "limit_request_fields": 32768,                     # its most
        "preload_app": False,
        "accesslog": "-" if access_log else None,
        # gunicorn's default line, but the size from Content-Length: its own count (%(b)s) is 0 for every file it
        # sends with sendfile (originals and thumbnails), as if nothing were sent
        "access_log_format": '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %({content-length}o)s "%(f)s" "%(a)s"',
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "serve-images",
        "post_worker_init": post_worker_init,
        "control_socket_disable": True,   # gunicorn >= 25: one shared ~/.gunicorn socket would clash between servers
    }
    if Path("/dev/shm").is_dir():
        options["worker_tmp_dir"] = "/dev/shm"   # heartbeat file off the disk
    # Prometheus metrics of every worker (api.metrics): a fresh private folder per server, named before any
    # worker imports prometheus-client (it reads the variable once), removed when the server stops. A folder
    # someone else named is not used: values left there by an earlier server would be summed in.
    # In memory (/dev/shm) where there is one: prometheus-client maps its files, and a page of them first touched on
    # a full disk kills the worker (SIGBUS), every new one too; a full /tmp is a commoner sickness than a full /dev/shm
    parent = metrics_parent()
    remove_dead_servers_metrics(Path(parent or tempfile.gettempdir()))
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=parent)
    lock_fd = hold_metrics_folder(metrics_dir)

    def post_fork(_server, _worker) -> None:  # noqa: ANN001 - gunicorn Arbiter, Worker
        os.close(lock_fd)   # the server alone holds the lock: a killed server's workers, gone soon after, do not

    options["post_fork"] = post_fork
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    options["child_exit"] = worker_exited
    options["worker_int"] = worker_interrupted
    leave_out_triton()   # inherited by the workers, which import torch when they load the app
    hold_interrupts_while_importing("torch", "torchvision")   # so is this: a Ctrl-C in their import aborted them
    server_pid = os.getpid()
    try:
        GunicornServer(app_config, options).run()
    finally:
        # gunicorn forks the workers inside run(), and each one leaves it by SystemExit through here: only the
        # server itself cleans up, or the first worker to exit takes the folder away from the others
        if os.getpid() == server_pid:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous


def worker_interrupted(_worker) -> None:  # noqa: ANN001 - gunicorn's worker_int hook, in the worker, on Ctrl-C
    """A worker told to quit at once exits within a second; should it still be running a second before the server
    kills it (graceful_timeout), its threads' stacks go to the error log first, so a hang on the way out says where."""
    faulthandler.dump_traceback_later(max(1, GRACEFUL_TIMEOUT_S - 1), exit=False, file=sys.stderr)


def worker_exited(_server, worker) -> None:  # noqa: ANN001 - gunicorn's child_exit hook, in the master
    """Drop a finished worker's live gauges (the index size it reported); its counts stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, os.environ[MULTIPROC_ENV])


if __name__ == "__main__":   # python -m commands.serve_images ...: as the console script
    main()
