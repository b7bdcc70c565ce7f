"""The extract stage of index-images: batches onto the network's device (JPEGs decoded there when the workers left
them), the network over them (halving the chunk on CUDA out-of-memory), and a clock for each stage."""
from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from retrieval.features.backbones import FeatureExtractor
from retrieval.search.snapshot import embed

if TYPE_CHECKING:
    from indexer.read import Batch, Reader

log = logging.getLogger(__name__)


class BatchExtractor:
    """Runs the network over a batch in chunks; on CUDA out-of-memory it halves the chunk and retries."""

    def __init__(self, extractor: FeatureExtractor, normalize: bool, chunk: int):
        self.extractor, self.normalize, self.chunk = extractor, normalize, max(1, chunk)

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 shape=(n, 3, H, W) -> float32 shape=(n, dim)."""
        out, start = [], 0
        while start < len(pixels):
            part = pixels[start:start + self.chunk]
            try:
                out.append(embed(self.extractor, part, self.normalize))
            except torch.cuda.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                torch.cuda.empty_cache()
                self.chunk = max(1, self.chunk // 2)
                log.warning("CUDA out of memory: retrying with batches of %d", self.chunk)
                continue
            start += len(part)
        return np.concatenate(out) if out else np.zeros((0, self.extractor.dim), np.float32)


class DeviceBatches:
    """A Batch -> (uint8 pixels on the network's device in row order, rows, bad): the JPEGs the workers left are
    decoded on the device (retrieval.images.device_decode), the rows the workers decoded are copied there, and a file
    that could not be decoded moves from rows to bad. Use as a context manager.

    adaptive (--decode auto): the share of JPEGs left for the device is moved batch by batch (balance), since
    the two decoders run side by side: the workers on their cores, the device's decoder in this process (one at
    a time: torchvision serialises nvJPEG within a process)."""

    def __init__(self, extractor: FeatureExtractor, reader: Reader, max_pixels: int | None, *, adaptive: bool = False):
        self.device, self.reader = extractor.device, reader
        self.adaptive = adaptive and reader.device_share is not None and 0 < reader.device_share < 1
        self.decoded = 0                  # files decoded on the device
        self.decoder = None
        self._history: list[float] = []   # the share at each batch
        self._last = (0.0, 0.0)           # the clock's (wait for decoding, device decoding) at the last balance
        if reader.device_share is not None:
            from retrieval.images.device_decode import DeviceJpegDecoder

            self.decoder = DeviceJpegDecoder(extractor.preprocessing, extractor.device, max_pixels=max_pixels)

    @property
    def decode(self) -> str:
        """Where JPEGs are decoded, in words (the run's summary and the catalog record it)."""
        share = self.reader.device_share
        if share is None:
            return "workers"
        if self.adaptive:
            return f"{self.device.type} and workers, shared as each keeps up"
        return f"{self.device.type} (JPEG), workers (other formats)"

    def balance(self, clock: StageClock) -> None:
        """Move the device's share of the JPEGs still to be submitted by BALANCE_STEP: up when this process waited
        for the workers since the last batch (more than a tenth of its device decoding), down when it did not wait
        at all (the workers are ahead: the device's decoder, or the network, is the slower)."""
        if not self.adaptive:
            return
        seconds = clock.seconds(rounded=False)
        waited = seconds.get("wait for decoding", 0.0) - self._last[0]
        decoding = seconds.get("device decoding", 0.0) - self._last[1]
        self._last = (seconds.get("wait for decoding", 0.0), seconds.get("device decoding", 0.0))
        share = self.reader.device_share
        if waited > 0.1 * decoding + 0.002:
            share = min(MAX_DEVICE_SHARE, share + BALANCE_STEP)
        elif waited < 0.001:
            share = max(MIN_DEVICE_SHARE, share - BALANCE_STEP)
        self.reader.device_share = share
        self._history.append(round(share, 3))

    def shares(self) -> dict | None:
        """The device's share of the JPEGs: at the start, the median and at the end (None when not adaptive)."""
        if not self._history:
            return None
        return {"first": self._history[0], "median": sorted(self._history)[len(self._history) // 2],
                "last": self._history[-1]}

    def __enter__(self) -> "DeviceBatches":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.decoder is not None:
            self.decoder.close()

    def __call__(self, batch: Batch) -> tuple[torch.Tensor | None, list[dict], list[dict]]:
        if not batch.jpegs:
            return batch.pixels, batch.rows, batch.bad
        assert self.decoder is not None, "JPEGs left for the device, but no device decoder"
        result = self.decoder.crops(batch.jpegs)
        self.decoded += len(result.decoded) - result.on_cpu
        c = self.decoder.prep.crop_size
        pixels = torch.empty((len(batch.rows), 3, c, c), dtype=torch.uint8, device=self.device)   # (n, 3, c, c)
        if batch.cpu_rows:
            pixels[batch.cpu_rows] = batch.pixels.to(self.device, non_blocking=True)
        if result.decoded:
            pixels[result.decoded] = result.crops
        if not result.failed:
            return pixels, batch.rows, batch.bad
        keep = [i for i in range(len(batch.rows)) if i not in result.failed]
        bad = batch.bad + [{"path": batch.rows[i]["path"], "size": batch.rows[i]["size"],
                            "mtime_ns": batch.rows[i]["mtime_ns"], "reason": reason}
                           for i, reason in result.failed.items()]
        return (pixels[keep] if keep else None), [batch.rows[i] for i in keep], bad


BALANCE_STEP = 0.05                       # --decode auto: the device's share moves this much per batch
MIN_DEVICE_SHARE, MAX_DEVICE_SHARE = 0.05, 0.95   # each decoder keeps some work: the balance can always see both


class StageClock:
    """Wall seconds spent in each stage of the main loop (the run's summary says where the time went).

    On CUDA the network's time includes waiting for the GPU (its features are copied back to the host)."""

    def __init__(self):
        self._seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()    # stages run on several threads

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._seconds[stage] += time.perf_counter() - t0

    def timed(self, stage: str, items: Iterable) -> Iterator:
        """Yield from items, counting the time spent waiting for each one as stage."""
        it = iter(items)
        while True:
            with self(stage):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def seconds(self, rounded: bool = True) -> dict[str, float]:
        with self._lock:
            return {stage: round(t, 3) if rounded else t for stage, t in self._seconds.items()}
