"""The reader stage of index-images: files decoded to uint8 crops in worker processes, in order, in batches.

The workers are forked right after the plan, before torch is imported, so they decode while the
main process loads torch, torchvision and the network (the start-up is most of a short run). They
start with the preprocessing the run expects (the index's own, or the ImageNet standard for a new
index); run_index checks it against the network's weights before the first batch is used, and a
mismatch restarts decoding with the right one.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from retrieval.images.decode import (DEVICE_JPEG_EXTENSIONS, DeviceJpeg, ImageDecodeError, Preprocessing,
                             decode_for_model, inspect_jpeg)
from retrieval.images.scan import ImageFile
from retrieval.system import die_with_parent, ignore_interrupts, interrupts_held, time_limit

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DECODE_CHUNK = 8            # files per task sent to a worker
TASKS_AHEAD_PER_WORKER = 4  # tasks decoded ahead of the network (bounds the memory held in decoded crops) ...
AHEAD_BYTES = 128 << 20     # ... or this many bytes of crops, if more: the workers decode while the network loads
WORKER_NICENESS = 10        # decoding workers run at a lower priority than the process feeding the network
DECODE_TIME_LIMIT_S = 60.0  # one file's read and decode, in a worker or in this process; then it is skipped
STUCK_GRACE_S = 30.0        # a worker past its task's limits by this much is stopped (a decoder stuck in C code)


def start_worker(parent_pid: int) -> None:
    """In a decoding worker, first: leave Ctrl-C to the parent (which stops the workers), die with the parent,
    and yield the CPU to it.

    The parent's work (loading torch and the network, then the forward passes) is what the run
    waits for; decoding fills the cycles it leaves, and when the network waits for decoded
    images the workers get the cores anyway.
    """
    ignore_interrupts()   # forked with SIGINT held (Reader._submit): no Ctrl-C lands before this
    die_with_parent(parent_pid)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def read_file(data_dir: Path, f: ImageFile, prep: Preprocessing, max_pixels: int | None,
              device_share: float | None = None) -> dict:
    """One file -> {"file", "decoded"}, {"file", "jpeg"} (hashed and checked, left for the device to decode) or
    {"file", "error"}: a bad file is an item, never an exception.

    device_share: the share of JPEGs left for the device (1: all; None or 0: none), picked by a hash of the path."""
    path = data_dir / f.path
    too_slow = lambda: ImageDecodeError(f"reading and decoding it took longer than {DECODE_TIME_LIMIT_S:g} s")  # noqa: E731
    try:   # the decoder opens the file and reads what it needs; a file is never read whole just to be sniffed
        with time_limit(DECODE_TIME_LIMIT_S, too_slow):
            return _read_file(path, f, prep, max_pixels, device_share)
    except ImageDecodeError as exc:
        return {"file": f, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - whatever one file raises is that file's reason, not the run's end
        return {"file": f, "error": f"cannot read or decode file: {type(exc).__name__}: {exc}"}


def _read_file(path: Path, f: ImageFile, prep: Preprocessing, max_pixels: int | None,
               device_share: float | None) -> dict:
    if device_share and f.path.lower().endswith(DEVICE_JPEG_EXTENSIONS) \
            and (device_share >= 1 or share_key(f.path) < device_share):
        facts = inspect_jpeg(path, max_pixels=max_pixels)
        if facts is not None:
            return {"file": f, "jpeg": facts}
    return {"file": f, "decoded": decode_for_model(path, prep, max_pixels=max_pixels)}


def read_files(data_dir: Path, files: list[ImageFile], prep: Preprocessing, max_pixels: int | None,
               device_share: float | None = None) -> list[dict]:
    return [read_file(data_dir, f, prep, max_pixels, device_share) for f in files]


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down without waiting for the decodes in flight: its processes are killed.

    The pool's thread may be reading a reply that a killed worker had begun: this process's end of the reply pipe
    is closed too, so the thread gets end-of-file once the workers are gone instead of waiting for the rest for good
    (and the process's exit with it)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    replies = getattr(pool, "_result_queue", None)   # shutdown() lets go of it
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.kill()
    if replies is not None:
        replies._writer.close()   # noqa: SLF001 - the only writers left are the killed workers


def _submit(pool: ProcessPoolExecutor, fn, *args) -> Future:  # noqa: ANN001
    """pool.submit, with SIGINT held: a pool forks its workers at its first submit, and they start with it held."""
    with interrupts_held():
        return pool.submit(fn, *args)


def share_key(path: str) -> float:
    """A file's place in [0, 1), the same in every process: files with share_key < s are a share s of them."""
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) / 2**32


@dataclasses.dataclass
class Batch:
    pixels: torch.Tensor | None     # uint8, shape=(n, 3, H, W): the rows decoded on the CPU (all rows without jpegs)
    rows: list[dict]                # catalog fields for each image
    bad: list[dict]                 # skipped files: path, size, mtime_ns, reason
    jpegs: list[DeviceJpeg] = dataclasses.field(default_factory=list)   # rows left for the device to decode
    cpu_rows: list[int] = dataclasses.field(default_factory=list)       # the rows of pixels, in order
    region_pixels: torch.Tensor | None = None   # uint8, shape=(n * R, 3, H, W): each row's R regions in turn
                                                # (Preprocessing.regions; all rows are then decoded on the CPU)


def collate(items: list[dict], pin_memory: bool = False, data_dir: Path | None = None) -> Batch:
    import torch

    good = [it for it in items if "decoded" in it or "jpeg" in it]
    rows = [{"path": it["file"].path, "label": it["file"].label, "size": it["file"].size,
             "mtime_ns": it["file"].mtime_ns, **_facts(it.get("decoded") or it["jpeg"])} for it in good]
    bad = [{"path": it["file"].path, "size": it["file"].size, "mtime_ns": it["file"].mtime_ns, "reason": it["error"]}
           for it in items if "error" in it]
    cpu_rows = [i for i, it in enumerate(good) if "decoded" in it]
    jpegs = [DeviceJpeg(i, data_dir / it["file"].path, it["jpeg"]) for i, it in enumerate(good) if "jpeg" in it]
    pixels = torch.from_numpy(np.stack([good[i]["decoded"].pixels for i in cpu_rows])) if cpu_rows else None
    if pixels is not None and pin_memory:
        pixels = pixels.pin_memory()   # page-locked: the copy to the GPU can overlap with compute
    region_pixels = None
    if cpu_rows and good[cpu_rows[0]]["decoded"].regions is not None:
        assert not jpegs, "regions are cropped by the workers: no JPEG is left for the device"
        region_pixels = torch.from_numpy(np.concatenate([it["decoded"].regions for it in good]))   # (n * R, 3, H, W)
        if pin_memory:
            region_pixels = region_pixels.pin_memory()
    return Batch(pixels, rows, bad, jpegs, cpu_rows, region_pixels)


def _facts(decoded) -> dict:  # noqa: ANN001 - DecodedImage or JpegFacts
    return {"width": decoded.width, "height": decoded.height, "sha256": decoded.sha256}


class Reader:
    """Decodes files in order, in `workers` forked processes (0: in this process), and hands out batches.

    Use as a context manager. The workers take tasks of DECODE_CHUNK files, and keep at most AHEAD_BYTES
    of crops (or a few tasks per worker, or two batches, if more) decoded ahead of the consumer, which
    bounds memory.
    A worker that dies in a task (killed for memory, a crash in a decoder) costs no run: its files are
    tried again one at a time in fresh processes, and the one that kills its process is skipped.
    """

    def __init__(self, data_dir: Path, files: list[ImageFile], *, workers: int, prep: Preprocessing,
                 max_pixels: int | None, device_share: float | None = None):
        assert workers >= 0, "workers must not be negative"
        self.data_dir, self.files, self.max_pixels, self.prep = Path(data_dir), files, max_pixels, prep
        # the share of JPEGs the workers only hash and check, for the network's device to decode (None: none);
        # it applies to the tasks submitted from then on, so the main loop can move it while the run goes
        self.device_share = device_share
        self.workers = workers
        self.tasks = [files[i:i + DECODE_CHUNK] for i in range(0, len(files), DECODE_CHUNK)]
        crop_bytes = 3 * prep.crop_size ** 2 * (1 + prep.regions)   # the image's crop and its regions'
        # tasks submitted and not yet collected: a few per worker, or all that AHEAD_BYTES of crops hold (during the
        # network's start-up, seconds on a small machine, the workers can decode hundreds of images)
        self.ahead = max(TASKS_AHEAD_PER_WORKER * workers, AHEAD_BYTES // (DECODE_CHUNK * crop_bytes)) if workers else 0
        self._pending: collections.deque[Future] = collections.deque()   # in file order
        self._next = 0
        self._pool: ProcessPoolExecutor | None = None
        if workers and self.tasks:
            self._pool = self._new_pool(min(workers, len(self.tasks)))
            self._fill()

    @staticmethod
    def _new_pool(workers: int) -> ProcessPoolExecutor:
        # fork: the workers share what the planner loaded (no torch yet at the start) and begin at once
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=start_worker, initargs=(os.getpid(),))

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            _stop(self._pool)
            self._pool = None

    def _fill(self) -> None:
        while self._next < len(self.tasks) and len(self._pending) < self.ahead:
            self._pending.append(_submit(self._pool, read_files, self.data_dir, self.tasks[self._next], self.prep,
                                         self.max_pixels, self.device_share))
            self._next += 1

    def _restart_from(self, task: int) -> None:
        """After a worker died: a new pool, and every task from `task` on submitted again."""
        self.close()
        self._pool = self._new_pool(min(self.workers, len(self.tasks)))
        self._pending.clear()
        self._next = task

    def _one_by_one(self, task: int) -> list[dict]:
        """The files of a task whose worker died or got stuck, each in a process of its own; a file that kills its
        process, or keeps it past the time limit, is skipped."""
        items = []
        for f in self.tasks[task]:
            alone = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=start_worker,
                                        initargs=(os.getpid(),))
            try:
                items += _submit(alone, read_files, self.data_dir, [f], self.prep, self.max_pixels,
                                 self.device_share).result(timeout=DECODE_TIME_LIMIT_S + STUCK_GRACE_S)
            except BrokenProcessPool:
                log.warning("decoding %s killed its worker process; skipped", f.path)
                items.append({"file": f, "error": "decoding it killed the worker process (out of memory, "
                                                  "or a crash in the image decoder)"})
            except FutureTimeout:
                log.warning("decoding %s did not end in time; its worker process was stopped and the file skipped",
                            f.path)
                items.append({"file": f, "error": f"reading and decoding it took longer than "
                                                  f"{DECODE_TIME_LIMIT_S + STUCK_GRACE_S:g} s (the decoder was stopped)"})
            finally:
                _stop(alone)
        return items

    def _items(self) -> Iterator[dict]:
        if self._pool is None:
            for files in self.tasks:
                yield from read_files(self.data_dir, files, self.prep, self.max_pixels, self.device_share)
            return
        self._fill()
        task = self._next - len(self._pending)
        while self._pending:
            try:   # each file has DECODE_TIME_LIMIT_S in its worker; past that and a grace, the worker is stuck
                items = self._pending.popleft().result(
                    timeout=len(self.tasks[task]) * DECODE_TIME_LIMIT_S + STUCK_GRACE_S)
            except BrokenProcessPool:
                log.warning("a decoding worker died; trying the files of its batch one at a time")
                items = self._one_by_one(task)
                self._restart_from(task + 1)
            except FutureTimeout:
                log.warning("a decoding worker is stuck; stopping it and trying the files of its batch one at a time")
                self.close()
                items = self._one_by_one(task)
                self._restart_from(task + 1)
            task += 1
            self._fill()
            yield from items

    def read(self, prep: Preprocessing, batch_size: int, pin_memory: bool = False) -> Iterator[Batch]:
        """Every file, in order, decoded with prep (the network's own preprocessing), in batches of batch_size."""
        assert batch_size >= 1, "batch_size must be at least 1"
        if (prep.resize_size, prep.crop_size, prep.regions) != (self.prep.resize_size, self.prep.crop_size,
                                                                 self.prep.regions):
            log.info("the network's preprocessing differs from the expected one: decoding again")
            for future in self._pending:
                future.cancel()
            self._pending.clear()            # the early decodes are dropped
            self._next = 0
        self.prep = prep
        self.ahead = max(self.ahead, 2 * -(-batch_size // DECODE_CHUNK))   # two batches ahead, at least
        items: list[dict] = []
        for item in self._items():
            items.append(item)
            if len(items) == batch_size:
                yield collate(items, pin_memory, self.data_dir)
                items = []
        if items:
            yield collate(items, pin_memory, self.data_dir)
