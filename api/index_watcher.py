"""Hot reload: a background thread that swaps in the index on disk when index-images has changed it."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Protocol

from retrieval.vectors.pca import background_linear_algebra

from api import metrics

log = logging.getLogger(__name__)

FAILING_CHECKS = 3   # the watcher reports itself unhealthy after this many failed checks in a row


class Refreshable(Protocol):
    def refresh(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class WatcherState:
    """What /healthz tells of hot reload."""
    alive: bool                  # the thread runs
    reloads: int                 # snapshots swapped in since the start
    checks: int                  # looks at the disk since the start
    failures_in_a_row: int       # checks that raised, since the last one that did not
    last_error: str | None       # the last exception a check raised ("Type: message"), kept after recovery
    last_error_age_s: float | None
    last_check_age_s: float | None

    @property
    def failing(self) -> bool:
        return self.failures_in_a_row >= FAILING_CHECKS


class IndexWatcher:
    """Calls index.refresh() every interval_s seconds; refresh() itself swaps atomically under in-flight queries.

    Whatever a check raises is logged (with its traceback the first time) and the loop goes on: the
    thread only ends with close(). Its state (alive, last error) is what state() returns.
    """

    def __init__(self, index: Refreshable, interval_s: float, on_reload: Callable[[], None] | None = None,
                 on_check: Callable[[], None] | None = None):
        assert interval_s > 0, "interval_s must be positive"
        self.index, self.interval_s = index, interval_s
        self.on_reload = on_reload   # called after each swap (the service updates its index-size gauge)
        self.on_check = on_check     # called after each look, failed or not (the service's availability gauge)
        self.reloads = 0
        self.checks = 0
        self._failures = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_check_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-watcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def state(self) -> WatcherState:
        now = time.monotonic()
        return WatcherState(
            alive=self.alive, reloads=self.reloads, checks=self.checks, failures_in_a_row=self._failures,
            last_error=self._last_error,
            last_error_age_s=None if self._last_error_at is None else round(now - self._last_error_at, 1),
            last_check_age_s=None if self._last_check_at is None else round(now - self._last_check_at, 1))

    def _run(self) -> None:
        with background_linear_algebra():   # a reload that trains a whitening (a replica's) lets searches run meanwhile
            while not self._stop.wait(self.interval_s):
                self.check()

    def check(self) -> None:
        """One look at the index on disk; never raises (the loop must outlive any error)."""
        try:
            if self.index.refresh():
                self.reloads += 1
                metrics.INDEX_RELOADS.inc()
                if self.on_reload is not None:
                    self.on_reload()
        except Exception as exc:  # noqa: BLE001 - a watcher that dies leaves the server on a stale index for good
            error = f"{type(exc).__name__}: {exc}"
            if error != self._last_error or self._failures == 0:
                log.exception("could not reload the index (will retry in %.1f s)", self.interval_s)
            else:
                log.debug("could not reload the index again: %s", error)
            self._failures += 1
            metrics.INDEX_RELOAD_FAILURES.inc()
            self._last_error, self._last_error_at = error, time.monotonic()
        else:
            if self._failures:
                log.warning("index reload works again after %d failed checks", self._failures)
            self._failures = 0
        finally:
            self.checks += 1
            if self.on_check is not None:
                try:
                    self.on_check()
                except Exception:  # noqa: BLE001 - a gauge's update never stops the loop
                    log.exception("could not update the index's availability")
            self._last_check_at = time.monotonic()
