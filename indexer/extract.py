"""The extract stage of index-images: batches onto the network's device (JPEGs decoded there when the workers left
them), the network over them (halving the chunk on CUDA out-of-memory), and a clock for each stage."""
from __future__ import annotations

import collections
import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from retrieval.backbones import FeatureExtractor
from retrieval.index import embed

if TYPE_CHECKING:
    from .reader import Batch, Reader

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
    decoded on the device (retrieval.device_decode), the rows the workers decoded are copied there, and a file
    that could not be decoded moves from rows to bad. Use as a context manager."""

    def __init__(self, extractor: FeatureExtractor, reader: Reader, max_pixels: int | None):
        self.device, self.min_pixels = extractor.device, reader.device_min_pixels
        self.decoded = 0                  # files decoded on the device
        self.decoder = None
        if self.min_pixels is not None:
            from retrieval.device_decode import DeviceJpegDecoder

            self.decoder = DeviceJpegDecoder(extractor.preprocessing, extractor.device, max_pixels=max_pixels)

    @property
    def decode(self) -> str:
        """Where JPEGs are decoded, in words (the run's summary and the catalog record it)."""
        if self.min_pixels is None:
            return "workers"
        if self.min_pixels == 0:
            return f"{self.device.type} (JPEG), workers (other formats)"
        return f"{self.device.type} (JPEGs of {self.min_pixels / 1e6:g}+ megapixels), workers (the rest)"

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


class StageClock:
    """Wall seconds spent in each stage of the main loop (the run's summary says where the time went).

    On CUDA the network's time includes waiting for the GPU (its features are copied back to the host)."""

    def __init__(self):
        self._seconds: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
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

    def seconds(self) -> dict[str, float]:
        return {stage: round(t, 3) for stage, t in self._seconds.items()}
