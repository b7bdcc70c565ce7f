"""api.query_batcher: concurrent queries share one forward pass and one search; failures reach every caller."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from api.query_batcher import QueryBatcher
from retrieval.search.snapshot import Hit


class FakeIndex:
    """embed: each image's first pixel value becomes its 2-d vector; search: ids by distance to that value."""

    def __init__(self, fail_once: bool = False, pass_s: float = 0.0):
        self.embed_sizes: list[int] = []
        self.pass_s = pass_s                     # how long a forward pass takes (a real one: 5-50 ms on a CPU)
        self.search_sizes: list[int] = []
        self.fail_once = fail_once
        self.release = threading.Event()
        self.release.set()

    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        self.release.wait(10)
        time.sleep(self.pass_s)
        self.embed_sizes.append(len(pixels))
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("the network fell over")
        values = pixels[:, 0, 0, 0].numpy().astype(np.float32)
        return np.stack([values, np.zeros_like(values)], axis=1)                 # (B, 2)

    def search_vectors(self, queries: np.ndarray, k: int, exclude=None, threads: int = 1) -> list[list[Hit]]:  # noqa: ANN001
        self.search_sizes.append(len(queries))
        return [[Hit(int(q[0]) + j, f"{int(q[0]) + j}.jpg", None, float(j)) for j in range(k)] for q in queries]


def pixels(value: int) -> torch.Tensor:
    return torch.full((3, 4, 4), value, dtype=torch.uint8)


@pytest.fixture
def fake():
    return FakeIndex()


def test_queries_still_being_decoded_join_the_batch(fake):
    batcher = QueryBatcher(fake, max_batch=8, max_wait_s=5.0)
    try:
        arrivals = [batcher.incoming() for _ in range(4)]
        for arrival in arrivals:
            arrival.__enter__()
        futures = []
        for value, arrival in zip((10, 20, 30, 40), arrivals):
            arrival.__exit__(None, None, None)
            futures.append(batcher.submit(pixels(value), k=2))
        answers = [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert fake.embed_sizes == [4] and fake.search_sizes == [4], "one forward pass and one search for the four"
    for value, answer in zip((10, 20, 30, 40), answers):
        assert [h.id for h in answer.hits] == [value, value + 1]      # each caller gets its own neighbours
        assert answer.vector.tolist() == [value, 0.0]
        assert answer.batch_size == 4
    assert batcher.stats.largest == 4


def test_a_lone_query_does_not_wait_for_the_bound(fake):
    batcher = QueryBatcher(fake, max_batch=8, max_wait_s=30.0)
    try:
        answer = batcher.search(pixels(7), k=1, timeout=10)   # would time out if it waited the 30 s bound
    finally:
        batcher.close()
    assert [h.id for h in answer.hits] == [7] and fake.embed_sizes == [1]


def test_queries_queued_behind_a_running_batch_go_together_with_their_own_k(fake):
    fake.release.clear()                         # hold the first forward pass
    batcher = QueryBatcher(fake, max_batch=3, max_wait_s=0.0)
    try:
        first = batcher.submit(pixels(1), k=1)
        queued = [batcher.submit(pixels(v), k=v) for v in (2, 3, 4, 5)]
        fake.release.set()
        answers = [f.result(10) for f in [first, *queued]]
    finally:
        batcher.close()
    assert sum(fake.embed_sizes) == 5 and max(fake.embed_sizes) == 3, fake.embed_sizes   # capped at max_batch
    assert [len(a.hits) for a in answers] == [1, 2, 3, 4, 5]


def test_a_failing_batch_reaches_its_callers_and_the_batcher_lives_on():
    fake = FakeIndex(fail_once=True)
    batcher = QueryBatcher(fake, max_batch=4, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            batcher.search(pixels(1), k=1, timeout=10)
        assert [h.id for h in batcher.search(pixels(9), k=1, timeout=10).hits] == [9]
    finally:
        batcher.close()


def test_a_query_whose_caller_gave_up_is_skipped(fake):
    fake.release.clear()
    batcher = QueryBatcher(fake, max_batch=1, max_wait_s=0.0)
    try:
        running = batcher.submit(pixels(1), k=1)
        abandoned = batcher.submit(pixels(2), k=1)
        assert abandoned.cancel()
        fake.release.set()
        running.result(10)
        assert batcher.search(pixels(3), k=1, timeout=10).hits[0].id == 3
    finally:
        batcher.close()
    assert fake.embed_sizes == [1, 1], "the abandoned query never reached the network"


def test_close_answers_what_was_queued_then_refuses_new_queries(fake):
    fake.release.clear()
    batcher = QueryBatcher(fake, max_batch=2, max_wait_s=0.0)
    futures = [batcher.submit(pixels(v), k=1) for v in (1, 2, 3)]
    fake.release.set()
    batcher.close()
    assert [f.result(0).hits[0].id for f in futures] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(pixels(4), k=1)


def test_clients_that_come_straight_back_are_batched_together():
    # a forward pass that takes time, as a real one does: with an instant one, a loaded machine's scheduler can run the
    # four clients one after another (CI saw 17 passes, none larger than 2), and there is then nothing to batch
    fake = FakeIndex(pass_s=0.03)
    batcher = QueryBatcher(fake, max_batch=8, max_wait_s=0.5)
    start = threading.Barrier(4)

    def client(value: int) -> None:
        start.wait()
        for _ in range(5):                       # answer, then the next query at once: a closed loop
            assert batcher.search(pixels(value), k=1, timeout=30).hits[0].id == value

    threads = [threading.Thread(target=client, args=(v,)) for v in (1, 2, 3, 4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batcher.close()
    assert sum(fake.embed_sizes) == 20
    # without batching: 20 forward passes; in lock step: 5. Measured with 30 ms passes on this 2-core machine, 15 runs
    # each, with 3 and 8 busy loops beside it: 5-6 passes, never a batch below 4 at its largest; a batcher that does not
    # wait for clients on their way back (max_wait_s=0) took 6-10. bench_query measures what it is worth.
    assert len(fake.embed_sizes) <= 8 and max(fake.embed_sizes) >= 3, fake.embed_sizes
