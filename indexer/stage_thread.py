"""One stage of index-images on a thread of its own: items handled in order, a bounded queue, errors raised in the caller."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class StageThread(Generic[T]):
    """Calls work(item) for each item put, in order, on one thread (a daemon named `name`).

    put() returns at once while fewer than `depth` items wait, so the caller works on the next item meanwhile.
    After a failed item the rest are dropped, never worked on (the caller never blocks on a full queue), and the
    failure is raised in the caller at its next put() or at close(). close() finishes the items already put.
    A daemon: a caller gone without close() (a second Ctrl-C in it) never keeps the process alive.
    """

    def __init__(self, work: Callable[[T], None], name: str, depth: int = 1):
        self.work = work
        self.queue: queue.Queue[tuple[T] | None] = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failure: BaseException | None = None     # what work() raised on the thread
        self.thread.start()

    def put(self, item: T) -> None:
        assert self.thread.is_alive(), "put() before close()"
        self.raise_failure()
        self.queue.put((item,))

    def close(self) -> None:
        """Work through the items already put, then end the thread (a failure stays for raise_failure)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def raise_failure(self) -> None:
        """Raise, in the calling thread, what work() raised on the stage's thread (if it did)."""
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        while (entry := self.queue.get()) is not None:
            if self.failure is not None:
                continue
            try:
                self.work(entry[0])
            except BaseException as exc:  # noqa: BLE001 - whatever it is, it is the run's error, raised in the caller
                self.failure = exc
