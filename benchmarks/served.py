"""serve-images as a subprocess for the benchmarks: the server started from this checkout on a port (tools.ports.free_port)
and waited for on /healthz, its process tree's memory, and its stop."""
from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.index_probes import child_env

START_TIMEOUT_S = 300


def healthz(port: int, timeout: float = 5) -> int:
    """GET /healthz on 127.0.0.1:port -> the status, or 0 when nothing answers."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return 0


class Server:
    """serve-images on 127.0.0.1:port with `threads` request threads (and --device, when given), its output in
    log_path and the index never reloaded; the constructor returns once /healthz answers 200, plus settle_s."""

    def __init__(self, index: Path, port: int, log_path: Path, *, threads: int = 8, env: dict[str, str] | None = None,
                 device: str | None = None, settle_s: float = 0.0, prelude: str = "",
                 command: list[str] | None = None):
        """prelude: Python run in the server's main process before serve-images starts (its workers fork from it).
        command: another server's command line to run instead (it must answer /healthz on port)."""
        self.port = port
        self.log = open(log_path, "w")   # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command or [sys.executable, "-c", f"{prelude}\nfrom commands.serve_images import main; main()",
                        "--index-dir", str(index), "--port", str(port), "--threads", str(threads),
                        *(["--device", device] if device else [])],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**child_env(), "RETRIEVAL_RELOAD_INTERVAL_S": "0", **(env or {})})
        deadline = time.monotonic() + START_TIMEOUT_S
        while healthz(port) != 200:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve-images exited with {self.proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()   # not left running behind the benchmark
                raise SystemExit(f"serve-images did not come up within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        time.sleep(settle_s)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        """The summed resident memory of the server's processes, in bytes."""
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def pss(self) -> int:
        """The summed proportional memory of the server's processes (shared pages split among them), in bytes."""
        total = 0
        for p in self.tree():
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                pass
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
