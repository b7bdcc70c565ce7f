"""Whether the catalog's database server answers: /healthz's look at a PostgreSQL catalog.

A server that stops answering without closing its connections (frozen, a half-open balancer, packets dropped) leaves
every query waiting: searches failed as "overloaded" after the query timeout while /healthz said ok, so a balancer kept
sending traffic to the replica. The probe runs SELECT 1 on a thread of its own and waits a short time for it; a probe
still waiting is not started again (at most one thread waits on a silent server), and its age is the silence's.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

PROBE_WAIT_S = 2.0   # how long a health check waits for the database to answer SELECT 1


class DatabaseProbe:
    def __init__(self, engine: Engine, wait_s: float = PROBE_WAIT_S):
        self.engine, self.wait_s = engine, wait_s
        self._lock = threading.Lock()
        self._probe: tuple[float, Future] | None = None   # (monotonic start, its outcome)
        self._warned: Future | None = None                 # the probe whose silence was logged

    def silent_for(self) -> float | None:
        """Seconds the database has left SELECT 1 unanswered, past wait_s; None when it answered (or failed: an
        error is an answer, reported where a query meets it)."""
        with self._lock:
            if self._probe is None or self._probe[1].done():
                future: Future = Future()
                threading.Thread(target=self._ping, args=(future,), name="database-probe", daemon=True).start()
                self._probe = (time.monotonic(), future)
            started, future = self._probe
        try:
            future.result(max(0.0, self.wait_s - (time.monotonic() - started)))
        except FutureTimeout:
            with self._lock:
                first, self._warned = self._warned is not future, future
            if first:   # once per silence, in the operator's log
                log.warning("the catalog database has not answered SELECT 1 in %.1f s: /healthz says unavailable "
                            "until it does", self.wait_s)
            return time.monotonic() - started
        except Exception:  # noqa: BLE001 - see the docstring
            return None
        return None

    def _ping(self, future: Future) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            future.set_result(True)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting health check
            future.set_exception(exc)
