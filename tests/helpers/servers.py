"""Servers for the tests: a real `serve-images` (gunicorn) as a subprocess, a Flask app on a werkzeug thread (for the
browser), and free_port (tools.ports, shared with the benchmarks)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from helpers.waiting import wait_for
from tools.ports import free_port

__all__ = ["SERVE", "free_port", "healthy", "serve_images", "serve_in_thread"]

SERVE = [sys.executable, "-c", "from commands.serve_images import main; main()"]
START_S = 120          # serve-images loads the network before it answers /healthz


def healthy(base: str) -> bool:
    """GET base/healthz answers 200 (False while nothing listens or the worker is still loading)."""
    try:
        return requests.get(base + "/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def serve_images(index_dir: Path, log_file: Path, *args: str,
                 run_as: Callable[[list[str]], list[str]] | None = None, **env: str) -> Iterator[str]:
    """A real `serve-images` (gunicorn) on a free 127.0.0.1 port, logging to log_file; yields its base URL.

    run_as: wraps the command (helpers.unprivileged.unprivileged: as a user whom file permissions bind).
    Stops it with SIGTERM and asserts it exited 0.
    """
    port = free_port()
    env = {**os.environ, "RETRIEVAL_RELOAD_INTERVAL_S": "0", **env}
    cmd = [*SERVE, "--index-dir", str(index_dir), "--port", str(port), *args]
    with open(log_file, "w") as log:
        server = subprocess.Popen(run_as(cmd) if run_as else cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  env=env)
    base = f"http://127.0.0.1:{port}" + env.get("SCRIPT_NAME", "").rstrip("/")   # served under a sub-path

    def up() -> bool:
        assert server.poll() is None, log_file.read_text()
        return healthy(base)
    try:
        assert wait_for(up, START_S, interval=0.25), f"serve-images did not come up within {START_S} s"
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, log_file.read_text()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:  # noqa: ANN001 - a Flask app
    """The app on a threaded werkzeug server on a free local port, for the browser; -> its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
