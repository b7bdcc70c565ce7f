"""Hot reload: a background thread that swaps in the index on disk when index-images has changed it."""
from __future__ import annotations

import logging
import threading
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)


class Refreshable(Protocol):
    def refresh(self) -> bool: ...


class IndexWatcher:
    """Calls index.refresh() every interval_s seconds; refresh() itself swaps atomically under in-flight searches."""

    def __init__(self, index: Refreshable, interval_s: float):
        assert interval_s > 0, "interval_s must be positive"
        self.index, self.interval_s = index, interval_s
        self.reloads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-watcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self.index.refresh():
                    self.reloads += 1
            except (OSError, RuntimeError, SQLAlchemyError) as exc:   # index mid-rewrite or briefly locked: try again
                log.warning("could not reload the index (will retry in %.1f s): %s", self.interval_s, exc)
