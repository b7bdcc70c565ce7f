"""The reader stage of index-images: files decoded to uint8 crops in worker processes, in order, in batches.

The workers are forked right after the plan, before torch is imported, so they decode while the
main process loads torch, torchvision and the network (the start-up is most of a short run). They
start with the preprocessing the run expects (the index's own, or the ImageNet standard for a new
index); run_index checks it against the network's weights before the first batch is used, and a
mismatch restarts decoding with the right one.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from retrieval.images import ImageDecodeError, Preprocessing, decode_for_model
from retrieval.scan import ImageFile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
DECODE_CHUNK = 8            # files per task sent to a worker
TASKS_AHEAD_PER_WORKER = 4  # tasks decoded ahead of the network (bounds the memory held in decoded crops)
WORKER_NICENESS = 10        # decoding workers run at a lower priority than the process feeding the network


def start_worker() -> None:
    """In a decoding worker, first: die with the parent, and yield the CPU to it.

    The parent's work (loading torch and the network, then the forward passes) is what the run
    waits for; decoding fills the cycles it leaves, and when the network waits for decoded
    images the workers get the cores anyway.
    """
    die_with_parent()
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def die_with_parent() -> None:
    """In a decoding worker: ask the kernel to kill this process when its parent dies (Linux).

    Without it, workers of a run killed with SIGKILL would go on reading files until they noticed.
    Elsewhere, a worker ends when the pool's pipe to its parent closes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
        return
    if os.getppid() == 1:   # the parent died before prctl took effect
        os._exit(1)


def read_file(data_dir: Path, f: ImageFile, prep: Preprocessing, max_pixels: int | None) -> dict:
    """One file -> {"file", "decoded"} or {"file", "error"}: a bad file is an item, never an exception."""
    try:   # the decoder opens the file and reads what it needs; a file is never read whole just to be sniffed
        return {"file": f, "decoded": decode_for_model(data_dir / f.path, prep, max_pixels=max_pixels)}
    except ImageDecodeError as exc:
        return {"file": f, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - whatever one file raises is that file's reason, not the run's end
        return {"file": f, "error": f"cannot read or decode file: {type(exc).__name__}: {exc}"}


def read_files(data_dir: Path, files: list[ImageFile], prep: Preprocessing, max_pixels: int | None) -> list[dict]:
    return [read_file(data_dir, f, prep, max_pixels) for f in files]


@dataclasses.dataclass
class Batch:
    pixels: torch.Tensor | None     # uint8, shape=(n, 3, H, W)
    rows: list[dict]                # catalog fields for each of the n images
    bad: list[dict]                 # skipped files: path, size, mtime_ns, reason


def collate(items: list[dict], pin_memory: bool = False) -> Batch:
    import torch

    good = [it for it in items if "decoded" in it]
    rows = [{"path": it["file"].path, "label": it["file"].label, "size": it["file"].size,
             "mtime_ns": it["file"].mtime_ns, "width": it["decoded"].width, "height": it["decoded"].height,
             "sha256": it["decoded"].sha256} for it in good]
    bad = [{"path": it["file"].path, "size": it["file"].size, "mtime_ns": it["file"].mtime_ns, "reason": it["error"]}
           for it in items if "error" in it]
    pixels = torch.from_numpy(np.stack([it["decoded"].pixels for it in good])) if good else None   # (n, 3, H, W)
    if pixels is not None and pin_memory:
        pixels = pixels.pin_memory()   # page-locked: the copy to the GPU can overlap with compute
    return Batch(pixels, rows, bad)


class Reader:
    """Decodes files in order, in `workers` forked processes (0: in this process), and hands out batches.

    Use as a context manager. The workers take tasks of DECODE_CHUNK files, and keep at most a few
    tasks per worker (or two batches, if more) decoded ahead of the consumer, which bounds memory.
    """

    def __init__(self, data_dir: Path, files: list[ImageFile], *, workers: int, prep: Preprocessing,
                 max_pixels: int | None):
        assert workers >= 0, "workers must not be negative"
        self.data_dir, self.files, self.max_pixels, self.prep = Path(data_dir), files, max_pixels, prep
        self.tasks = [files[i:i + DECODE_CHUNK] for i in range(0, len(files), DECODE_CHUNK)]
        self.ahead = TASKS_AHEAD_PER_WORKER * workers   # tasks submitted and not yet collected
        self._pending: collections.deque = collections.deque()   # AsyncResults, in file order
        self._next = 0
        self._pool = None
        if workers and self.tasks:
            # fork: the workers share what the planner loaded (no torch yet) and start decoding at once
            self._pool = multiprocessing.get_context("fork").Pool(min(workers, len(self.tasks)),
                                                                  initializer=start_worker)
            self._fill()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _fill(self) -> None:
        while self._next < len(self.tasks) and len(self._pending) < self.ahead:
            args = (self.data_dir, self.tasks[self._next], self.prep, self.max_pixels)
            self._pending.append(self._pool.apply_async(read_files, args))
            self._next += 1

    def _items(self) -> Iterator[dict]:
        if self._pool is None:
            for files in self.tasks:
                yield from read_files(self.data_dir, files, self.prep, self.max_pixels)
            return
        self._fill()
        while self._pending:
            items = self._pending.popleft().get()
            self._fill()
            yield from items

    def read(self, prep: Preprocessing, batch_size: int, pin_memory: bool = False) -> Iterator[Batch]:
        """Every file, in order, decoded with prep (the network's own preprocessing), in batches of batch_size."""
        assert batch_size >= 1, "batch_size must be at least 1"
        if (prep.resize_size, prep.crop_size) != (self.prep.resize_size, self.prep.crop_size):
            log.info("the network's preprocessing differs from the expected one: decoding again")
            self._pending.clear()            # the early decodes are dropped
            self._next = 0
        self.prep = prep
        self.ahead = max(self.ahead, 2 * -(-batch_size // DECODE_CHUNK))   # two batches ahead, at least
        items: list[dict] = []
        for item in self._items():
            items.append(item)
            if len(items) == batch_size:
                yield collate(items, pin_memory)
                items = []
        if items:
            yield collate(items, pin_memory)
