"""The mapper stage of index-images: the network over uint8 batches, halving the chunk on CUDA out-of-memory."""
from __future__ import annotations

import logging

import numpy as np
import torch

from retrieval.backbones import FeatureExtractor
from retrieval.index import embed

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
