"""Polling instead of sleeping: wait_for(condition, timeout) checks a state until it holds or the time runs out."""
from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll condition() every interval seconds until it is truthy (-> True) or timeout seconds pass (-> False).

    The condition is checked once more at the deadline, so a slow last poll still counts."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
