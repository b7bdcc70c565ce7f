"""The `serve-images` command: the JSON API and the gallery under gunicorn (gthread workers), not Flask's dev server."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from retrieval.names import INDEX_DIR_ENV
from retrieval.system import available_cores

from .gunicorn_worker import DEFAULT_READ_TIMEOUT_S, with_read_timeout

MAX_CONNECTIONS = 64   # open connections per worker process (gunicorn's default is 1000)

# Only light modules above (click, gunicorn: about 0.1 s): --help and usage errors answer at once. The
# retrieval modules that bring torch and FAISS are imported inside the command, after the arguments are parsed.

log = logging.getLogger(__name__)



class UserError(click.ClickException):
    """A problem the user can fix; exit status 2, message without a traceback."""
    exit_code = 2


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
        from retrieval.backbones import DeviceUnavailable, WeightsUnavailable
        from retrieval.index import IndexNotFound

        from . import create_app   # imported in the worker: torch and FAISS start after the fork

        try:
            return create_app(self.app_config)
        except (IndexNotFound, WeightsUnavailable, DeviceUnavailable, ValueError) as exc:   # WeightsMismatch too
            print(f"serve-images: {exc}", file=sys.stderr, flush=True)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)   # the master stops instead of restarting the worker forever


def check_index(index_dir: Path) -> tuple[int, str]:
    """-> (image count, "model layer") of the index, or a UserError saying to run index-images first."""
    from retrieval.catalog import Catalog

    try:
        catalog = Catalog(index_dir)
    except FileNotFoundError:
        raise UserError(f"no index at {index_dir}: run index-images first (index-images DATA_DIR --index-dir {index_dir})") from None
    try:
        settings = catalog.settings()
        if settings is None:
            raise UserError(f"the index at {index_dir} is unfinished: run index-images first")
        if not Path(settings.data_dir).is_dir():
            click.echo(f"warning: the indexed data folder {settings.data_dir} is missing; images cannot be shown", err=True)
        return catalog.count(), f"{settings.model} {settings.layer}"
    finally:
        catalog.close()


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--index-dir", type=click.Path(file_okay=False, resolve_path=True, path_type=Path), default="index",
              envvar=INDEX_DIR_ENV, show_default=True, show_envvar=True,
              help="Folder holding the index made by index-images.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes; each loads its own copy of the network and the index.")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="Request threads per worker; concurrent queries share forward passes.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None,
              help="Where query features are computed. [default: cpu, or RETRIEVAL_DEVICE]")
@click.option("--timeout", type=click.IntRange(min=1), default=120, show_default=True,
              help="Seconds a worker may stay silent before gunicorn restarts it.")
@click.option("--read-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_READ_TIMEOUT_S, show_default=True,
              help="Seconds a client may take to send a request's headers, or pause while sending its body; "
                   "slower or idle connections are answered 408 and closed.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, envvar="RETRIEVAL_NPROBE", show_envvar=True,
              help="IVF lists searched per query. [default: as index-images recorded it, tuned for recall]")
@click.option("--ef-search", type=click.IntRange(min=1), default=None, envvar="RETRIEVAL_EF_SEARCH", show_envvar=True,
              help="HNSW search breadth (efSearch). [default: as index-images recorded it]")
@click.option("--access-log/--no-access-log", default=False, help="Log every request on stderr.")
def main(index_dir: Path, host: str, port: int, workers: int, threads: int, device: str | None, timeout: int,
         read_timeout: float, nprobe: int | None, ef_search: int | None, access_log: bool) -> None:
    """Serve the index in INDEX_DIR: the JSON API (POST /search, GET /images/<id>/neighbours, /stats) and the gallery.

    Runs under gunicorn with gthread workers, which read each request in full before a thread takes
    it, so slow or stalled clients cannot hold the request threads. The server notices when
    index-images updates the index and answers from the new one within a few seconds, without a
    restart. Limits come from RETRIEVAL_* environment variables (RETRIEVAL_MAX_UPLOAD_MB,
    RETRIEVAL_MAX_PIXELS, ...). A compressed FAISS index is memory-mapped and searched with the nprobe or
    efSearch index-images tuned, unless --nprobe / --ef-search say otherwise; /stats shows the recall
    measured with them.

    Exit status: 2 when there is no index (run index-images first), 3 when a worker cannot start.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)   # its search for CPU-specific builds is noise
    count, network = check_index(index_dir)
    app_config: dict[str, Any] = {"INDEX_DIR": str(index_dir)}
    if device:
        app_config["DEVICE"] = device
    if nprobe:
        app_config["NPROBE"] = nprobe
    if ef_search:
        app_config["EF_SEARCH"] = ef_search
    if "RETRIEVAL_TORCH_THREADS" not in os.environ:      # share the cores between worker processes
        app_config["TORCH_THREADS"] = max(1, available_cores() // workers)
    if "RETRIEVAL_DECODE_PROCESSES" not in os.environ:   # and the upload decoders (2 by default) too
        app_config["DECODE_PROCESSES"] = max(1, min(2, available_cores()) // workers)
    address = f"http://{bind_address(host, port)}/"

    def post_worker_init(worker) -> None:  # noqa: ANN001 - gunicorn Worker, after it loaded the app
        if worker.age == 1:   # the first worker: the index is loaded, requests are answered from now on
            click.echo(f"serve-images: {count:,} images ({network}) from {index_dir}\n"
                       f"serve-images: gallery and API at {address}  (Ctrl-C to stop)", err=True)

    options = {
        "bind": bind_address(host, port),
        "workers": workers,
        "threads": threads,
        "worker_class": with_read_timeout(read_timeout),   # gthread, reading requests ahead (api.gunicorn_worker)
        "worker_connections": MAX_CONNECTIONS,   # per worker; with the read-ahead cap, bounds the memory slow clients hold
        "timeout": timeout,
        "graceful_timeout": 10,
        "keepalive": 5,
        "preload_app": False,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "serve-images",
        "post_worker_init": post_worker_init,
        "control_socket_disable": True,   # gunicorn >= 25: one shared ~/.gunicorn socket would clash between servers
    }
    if Path("/dev/shm").is_dir():
        options["worker_tmp_dir"] = "/dev/shm"   # heartbeat file off the disk
    GunicornServer(app_config, options).run()
