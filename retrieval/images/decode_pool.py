"""Decoding untrusted images in a few separate worker processes: bounded in number, time and memory; a late one is killed.

The server process holds torch, FAISS and OpenMP threads, so it is never forked: each worker is a fresh
interpreter (`python -m retrieval.images.decode_worker`, fork+exec) that imports only Pillow, numpy and
retrieval.images.decode. Requests and answers go over the worker's stdin/stdout as length-prefixed frames: a JSON
header, then raw bytes (no pickle: a worker that a crafted file took over cannot hand the server code).
A worker dies with the server: PR_SET_PDEATHSIG on Linux, and EOF on its stdin everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.images import decode_worker
from retrieval.images.decode import DecodedImage, ImageDecodeError, Preprocessing
from retrieval.images.decode_worker import FRAME_LENGTH, frame

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0      # a new worker imports Pillow and numpy (well under a second on an idle machine)
MAX_HEADER_BYTES = 1 << 16
MAX_REPLY_BYTES = 64 << 20    # a crop and a preview are far smaller; a worker that says more is broken
# Worker environment: one thread for any numeric library, and large blocks always given back to the system
# (glibc would otherwise raise its mmap threshold after the first big image and keep the memory).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "1"}


class DecodeTimedOut(ImageDecodeError):
    """The file took longer to decode than the pool allows; its worker was killed (and replaced)."""


class DecoderBusy(RuntimeError):
    """Every worker stayed busy for as long as a request may wait for one."""


@dataclasses.dataclass(frozen=True)
class DecodedUpload:
    """An image decoded by a worker."""
    image: DecodedImage            # pixels uint8 shape=(3, crop, crop), upright width and height, sha256
    preview_jpeg: bytes | None     # upright JPEG, long side <= preview_size, when asked for
    wait_s: float                  # waiting for a free worker
    decode_s: float                # in the worker, pipe transfers included


@dataclasses.dataclass
class PoolStats:
    """Counters for /stats and tests (updated under the pool's lock)."""
    decodes: int = 0      # answers from a worker, good or refused
    timeouts: int = 0     # workers killed for passing the deadline
    crashes: int = 0      # workers that died or broke the protocol while decoding
    busy: int = 0         # requests refused because no worker came free in time
    started: int = 0      # worker processes started, replacements included


class _Late(Exception):
    pass


class _Broken(Exception):
    """The worker died or wrote something that is not a frame."""


class _Worker:
    """One worker process, as seen from the server."""

    def __init__(self, memory_mb: int | None):
        root = str(Path(__file__).resolve().parent.parent)   # so `-m retrieval.images.decode_worker` finds this checkout
        env = {**os.environ, **WORKER_ENV,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        command = [sys.executable, "-m", decode_worker.__name__, "--parent", str(os.getpid())]
        if memory_mb:
            command += ["--memory-mb", str(memory_mb)]
        # its own process group: a kill takes anything it started too (no image library it reaches starts a program
        # today, but Pillow's EPS reader ran Ghostscript, which outlived the worker killed at the deadline)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
                                     process_group=0)
        os.set_blocking(self.proc.stdin.fileno(), False)   # writes wait in select(), under the deadline
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, deadline: float | None = None) -> None:
        """The first frame a worker writes says it has imported what it needs. Raises _Broken, _Late."""
        if not self.ready:
            header, _ = self._read(deadline if deadline is not None else time.monotonic() + STARTUP_TIMEOUT_S)
            if not header.get("ready"):
                raise _Broken("no ready frame")
            self.ready = True

    def call(self, header: dict[str, Any], payload: bytes, deadline: float) -> tuple[dict[str, Any], bytearray]:
        """Send one request, read its answer. Raises _Late (deadline passed), _Broken (died, garbage)."""
        self._write(frame(header, len(payload)), deadline)
        self._write(payload, deadline)
        return self._read(deadline)

    def _write(self, data: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            _wait_for(fd, deadline, write=True)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise _Broken(self._exit_reason()) from None

    def _read(self, deadline: float) -> tuple[dict[str, Any], bytearray]:
        (length,) = FRAME_LENGTH.unpack(self._read_exactly(FRAME_LENGTH.size, deadline))
        if length > MAX_HEADER_BYTES:
            raise _Broken(f"a {length:,}-byte header")
        try:
            header = json.loads(self._read_exactly(length, deadline))
            size = int(header["size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _Broken(f"an unreadable header ({exc})") from None
        if not 0 <= size <= MAX_REPLY_BYTES:
            raise _Broken(f"a {size:,}-byte answer")
        return header, self._read_exactly(size, deadline)

    def _read_exactly(self, n: int, deadline: float) -> bytearray:
        fd, out = self.proc.stdout.fileno(), bytearray()
        while len(out) < n:
            _wait_for(fd, deadline, write=False)
            chunk = os.read(fd, min(n - len(out), 1 << 20))
            if not chunk:
                raise _Broken(self._exit_reason())
            out += chunk
        return out

    def _exit_reason(self) -> str:
        try:
            code = self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return "it closed its pipe"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def kill(self) -> None:
        self._kill_group()
        self._reap(5.0)

    def _kill_group(self) -> None:
        try:   # (not reaped yet, so the pid and group are still this worker's)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.proc.kill()

    def stop(self, timeout: float = 2.0) -> None:
        """EOF on stdin: the worker exits by itself; killed if it does not within timeout."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
        self._reap(timeout)

    def _reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("decoder process %d did not exit", self.proc.pid)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _wait_for(fd: int, deadline: float, *, write: bool) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Late()
    ready = select.select([], [fd], [], remaining)[1] if write else select.select([fd], [], [], remaining)[0]
    if not ready:
        raise _Late()


class DecodePool:
    """At most `processes` decodes at once, each in its own worker process, each stopped after timeout_s.

    decode() waits at most timeout_s for a free worker (else DecoderBusy), then gives the worker timeout_s
    to answer (else the worker is killed and replaced, and the upload is refused with DecodeTimedOut). Safe
    to call from many threads. memory_mb caps each worker's address space above its own baseline
    (RLIMIT_AS, Linux): a decode that needs more fails there with "too large to decode within the memory
    allowed" instead of growing the server.
    """

    def __init__(self, processes: int, timeout_s: float, *, memory_mb: int | None = None):
        assert processes >= 1, "a decode pool needs at least one process"
        assert timeout_s > 0, "the decode timeout must be positive"
        self.processes, self.timeout_s, self.memory_mb = processes, timeout_s, memory_mb
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._closed = False
        self._missing = 0                      # workers that died and could not be replaced yet
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()   # the most recently used worker is warmest
        # Workers are started from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that started
        # a process ends, and request threads come and go.
        self._spawn_requests: queue.Queue[Future | None] = queue.Queue()
        self._spawner = threading.Thread(target=self._spawn_loop, name="decode-pool-spawner", daemon=True)
        self._spawner.start()
        workers = [self._spawn() for _ in range(processes)]
        try:
            for w in workers:
                w.wait_ready()
        except (_Broken, _Late) as exc:
            for w in workers:
                w.kill()
            self._close_spawner()
            raise RuntimeError(f"the image decoder processes did not start: {exc}") from None
        for w in workers:
            self._idle.put(w)
        log.info("decoding uploads in %d worker process%s (pids %s; %g s each%s)", processes, "" if processes == 1 else "es",
                 ", ".join(str(w.pid) for w in workers), timeout_s,
                 f", {memory_mb} MB above baseline" if memory_mb else "")

    def decode(self, data: bytes, prep: Preprocessing, *, max_pixels: int | None, max_decoded_pixels: int | None,
               preview_size: int | None = None) -> DecodedUpload:
        """Image bytes -> crop (and preview) made in a worker. Raises ImageDecodeError (DecodeTimedOut), DecoderBusy."""
        header = {"prep": dataclasses.asdict(prep), "max_pixels": max_pixels,
                  "max_decoded_pixels": max_decoded_pixels, "preview_size": preview_size}
        started = time.monotonic()
        reply, body, handed = self._call(header, data)
        finished = time.monotonic()
        if not reply.get("ok"):
            raise ImageDecodeError(str(reply.get("reason") or "cannot decode image"))
        try:
            shape = tuple(int(n) for n in reply["pixels"])
            n = int(np.prod(shape))
            assert len(shape) == 3 and shape[0] == 3 and 0 <= n <= len(body), f"pixels {shape} in {len(body)} bytes"
            pixels = np.frombuffer(body, dtype=np.uint8, count=n).reshape(shape)   # writable: body is a bytearray
            preview = bytes(body[n:]) if preview_size is not None else None
            image = DecodedImage(pixels, int(reply["width"]), int(reply["height"]), str(reply["sha256"]))
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise ImageDecodeError(f"the decoder answered nonsense ({exc})") from None
        return DecodedUpload(image, preview, handed - started, finished - handed)

    def _call(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytearray, float]:
        """-> (reply header, reply bytes, when a worker took the request)."""
        if self._closed:
            raise DecoderBusy("the decoder pool is closed")
        self._top_up()
        try:
            worker = self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            with self._lock:
                self.stats.busy += 1
            raise DecoderBusy(f"every image decoder stayed busy for {self.timeout_s:g} s") from None
        try:   # a replacement may still be importing: it gets the request's deadline, not the start-up one
            worker.wait_ready(time.monotonic() + self.timeout_s)
        except _Late:                          # still starting: it stays in the pool for the next upload
            self._release(worker)
            raise DecoderBusy("the image decoders are starting; try again shortly") from None
        except _Broken:
            self._replace(worker, "crashes")
            raise DecoderBusy("the image decoders are restarting; try again shortly") from None
        except BaseException:
            self._replace(worker, "crashes")
            raise
        try:
            handed = time.monotonic()
            reply, body = worker.call(header, payload, handed + self.timeout_s)
        except _Late:
            log.warning("decoder process %d passed the %g s deadline: killed and replaced", worker.pid, self.timeout_s)
            self._replace(worker, "timeouts")
            raise DecodeTimedOut(f"took too long to decode (over {self.timeout_s:g} s)") from None
        except _Broken as exc:
            log.warning("decoder process %d failed (%s): replaced", worker.pid, exc)
            self._replace(worker, "crashes")
            raise ImageDecodeError(f"the decoder failed on this file ({exc})") from None
        except BaseException:
            self._replace(worker, "crashes")
            raise
        with self._lock:
            self.stats.decodes += 1
        self._release(worker)
        return reply, body, handed

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            worker.stop()
        else:
            self._idle.put(worker)

    def _replace(self, worker: _Worker, counter: str) -> None:
        worker.kill()
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if self._closed:
            return
        try:
            self._idle.put(self._spawn())      # it imports while the next request is on its way
        except (OSError, RuntimeError):
            log.exception("could not start a replacement decoder process; trying again on the next upload")
            with self._lock:
                self._missing += 1

    def _top_up(self) -> None:
        """Start the workers that could not be replaced earlier (the pool never stays short for good)."""
        with self._lock:
            missing, self._missing = self._missing, 0
        for _ in range(missing):
            try:
                self._idle.put(self._spawn())
            except (OSError, RuntimeError):
                with self._lock:
                    self._missing += 1

    def _spawn(self) -> _Worker:
        """A new worker process, started by the spawner thread. Raises OSError (cannot start), RuntimeError (closed)."""
        if not self._spawner.is_alive():
            raise RuntimeError("the decoder pool is closed")
        future: Future = Future()
        self._spawn_requests.put(future)
        try:
            worker = future.result(STARTUP_TIMEOUT_S)   # Popen itself: milliseconds
        except TimeoutError:
            raise RuntimeError("the decoder pool is closed") from None
        with self._lock:
            self.stats.started += 1
        return worker

    def _spawn_loop(self) -> None:
        while (future := self._spawn_requests.get()) is not None:
            try:
                future.set_result(_Worker(self.memory_mb))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on the future
                future.set_exception(exc)
        while True:                            # closed: refuse what came after the sentinel
            try:
                late = self._spawn_requests.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.set_exception(RuntimeError("the decoder pool is closed"))

    def worker_pids(self) -> list[int]:
        """Pids of the idle workers (tests, benchmarks)."""
        with self._idle.mutex:
            return [w.pid for w in self._idle.queue]

    def close(self) -> None:
        """Stop every worker (busy ones when they finish their request)."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                break
        self._close_spawner()

    def _close_spawner(self) -> None:
        self._spawn_requests.put(None)
        self._spawner.join(5.0)
