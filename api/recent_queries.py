"""Uploaded gallery queries kept in memory for a while under a random token (never a path), so pages can link to them."""
from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict

import numpy as np


@dataclasses.dataclass(frozen=True)
class RecentQuery:
    vector: np.ndarray    # feature vector, shape=(dim,), float32
    preview_jpeg: bytes   # small JPEG of the upload, shown on the results page
    width: int            # upright size of the uploaded image
    height: int
    filename: str         # as the browser named it (display only)
    created: float        # time.time()


class RecentQueries:
    """A bounded LRU of uploads: token -> RecentQuery. Thread-safe. Per process: a token is unknown to other workers."""

    def __init__(self, capacity: int = 256, ttl_s: float = 3600.0):
        assert capacity >= 1, "capacity must be at least 1"
        self.capacity, self.ttl_s = capacity, ttl_s
        self._items: OrderedDict[str, RecentQuery] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, query: RecentQuery) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._items[token] = query
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> RecentQuery | None:
        with self._lock:
            query = self._items.get(token)
            if query is None:
                return None
            if time.time() - query.created > self.ttl_s:
                del self._items[token]
                return None
            self._items.move_to_end(token)
            return query
