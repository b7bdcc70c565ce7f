"""Tests for the write stage's writer thread (indexer.write.Writer): same index as writing in the loop, order, errors, no hang."""
from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from indexer.extract import BatchExtractor
from indexer.write import Writer
from helpers.indexes import recorded_precision
from retrieval.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.vectors.vector_index import VectorIndex

HANG_S = 120   # a run that takes longer than this is hung (a few seconds each here)


@pytest.fixture(autouse=True)
def no_hang():
    """Fail a test that hangs (a writer thread waiting forever, or a caller waiting on it) instead of blocking the suite."""
    def hung(_signum, _frame):  # noqa: ANN001 - signal handler
        raise TimeoutError(f"the run hung for {HANG_S} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def data(tmp_path):
    """12 pictures (6 batches of 2) and one file that is not an image."""
    folder = tmp_path / "data"
    make_sample_collection(folder, per_class=4, size=(96, 72), classes=["red_circles", "blue_squares", "green_stripes"],
                           seed=5)
    (folder / "red_circles" / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    return folder


def contents(index_dir) -> dict:
    """Everything a run leaves: path -> (id, catalog vector), the skipped files, and FAISS's id -> vector."""
    cat = Catalog(index_dir)
    try:
        by_id = {}
        for ids, vecs in cat.vectors():
            by_id.update(zip(ids.tolist(), vecs))
        rows = {path: (i, by_id[i]) for path, (i, _s, _m) in cat.file_states().items()}
        skipped = cat.skipped()
    finally:
        cat.close()
    stored = VectorIndex.load(index_dir / FAISS_FILE, 4096)
    faiss = {int(i): stored.index.reconstruct(int(i)) for i in stored.ids()}
    return {"rows": rows, "skipped": skipped, "faiss": faiss, "precision": recorded_precision(index_dir)}


def assert_same_index(got: dict, want: dict) -> None:
    assert got["skipped"] == want["skipped"] and got["precision"] == want["precision"]
    assert {p: i for p, (i, _v) in got["rows"].items()} == {p: i for p, (i, _v) in want["rows"].items()}, "same ids"
    for path, (_i, vec) in want["rows"].items():
        assert np.allclose(got["rows"][path][1], vec, atol=1e-6), path
    assert sorted(got["faiss"]) == sorted(want["faiss"]), "same FAISS ids"
    for i, vec in want["faiss"].items():
        assert np.allclose(got["faiss"][i], vec, atol=1e-6), i
    for _path, (i, vec) in got["rows"].items():
        assert np.array_equal(got["faiss"][i], vec), "FAISS holds the catalog's vector"


@pytest.fixture
def reference(data, tmp_path, index_images, monkeypatch):
    """The index as a run that commits each batch in its loop makes it (no writer thread): contents()."""
    with monkeypatch.context() as patch:
        patch.setattr(Writer, "write", Writer.commit)
        index_images(data, tmp_path / "reference", batch_size=2)
    return contents(tmp_path / "reference")


def test_the_writer_thread_builds_the_index_a_run_writing_in_its_loop_builds(data, tmp_path, index_images, reference,
                                                                              monkeypatch):
    committed_on = []
    real_commit = Writer.commit

    def recording_commit(self, rows, feats, bad, regions=None):  # noqa: ANN001
        committed_on.append(threading.current_thread().name)
        real_commit(self, rows, feats, bad, regions)
    monkeypatch.setattr(Writer, "commit", recording_commit)

    report = index_images(data, tmp_path / "index", batch_size=2, workers=None,   # the default decoding workers
                          precision=reference["precision"])

    assert (report.indexed, report.total, len(report.skipped)) == (12, 12, 1)
    assert committed_on == ["index-writer"] * 7, "every batch (the broken file's too) committed on the writer thread"
    assert_same_index(contents(tmp_path / "index"), reference)


def test_write_returns_while_the_previous_batch_is_being_committed(data, tmp_path, index_images, monkeypatch):
    """The network goes on with the next batch while one is written (the no_hang alarm fails it otherwise)."""
    second_queued = threading.Event()
    real_commit, real_write = Writer.commit, Writer.write
    writes = []

    def slow_first_commit(self, rows, feats, bad, regions=None):  # noqa: ANN001
        if not second_queued.is_set():
            assert second_queued.wait(HANG_S / 2), "write() waited for the commit of the batch before"
        real_commit(self, rows, feats, bad, regions)

    def counting_write(self, rows, feats, bad, regions=None):  # noqa: ANN001
        real_write(self, rows, feats, bad, regions)
        writes.append(len(rows))
        if len(writes) == 2:
            second_queued.set()
    monkeypatch.setattr(Writer, "commit", slow_first_commit)
    monkeypatch.setattr(Writer, "write", counting_write)

    report = index_images(data, tmp_path / "index", batch_size=2, workers=0)

    assert report.indexed == report.total == 12


class DiskOnFire(RuntimeError):
    """What the test's catalog raises in a write."""


@pytest.mark.parametrize("failing_batch", [2, 7], ids=["a-middle-batch", "the-last-batch"])
def test_a_failed_write_is_the_runs_error_and_a_rerun_completes_the_index(data, tmp_path, index_images, reference,
                                                                           monkeypatch, failing_batch):
    """Raised in the caller at its next write() (or at the end of the loop), nothing after the failed batch committed
    though more were queued, the FAISS file saved in step with the catalog; the re-run redoes only the rest."""
    real_write_batch, real_write = Catalog.write_batch, Writer.write
    batches, writes = [], []
    next_one_queued = threading.Event()

    def failing_write_batch(self, rows, vectors, skipped, regions=None):  # noqa: ANN001
        batches.append(len(rows) + len(skipped))
        if len(batches) == failing_batch:
            if failing_batch < 7:   # let the caller queue the next batch first: it must never be committed
                assert next_one_queued.wait(HANG_S / 2)
            raise DiskOnFire("no space left on the catalog's disk")
        return real_write_batch(self, rows, vectors, skipped, regions)

    def counting_write(self, rows, feats, bad, regions=None):  # noqa: ANN001
        real_write(self, rows, feats, bad, regions)
        writes.append(len(rows) + len(bad))
        if len(writes) == failing_batch + 1:
            next_one_queued.set()
    monkeypatch.setattr(Catalog, "write_batch", failing_write_batch)
    monkeypatch.setattr(Writer, "write", counting_write)

    with pytest.raises(DiskOnFire, match="no space left"):
        index_images(data, tmp_path / "index", batch_size=2, precision=reference["precision"], workers=None)

    assert len(batches) == failing_batch, "no write after the failed one"
    committed = contents(tmp_path / "index")
    assert len(committed["rows"]) + len(committed["skipped"]) == sum(batches[:-1])
    assert sorted(committed["faiss"]) == sorted(i for i, _v in committed["rows"].values()), "FAISS saved in step"

    monkeypatch.undo()
    again = index_images(data, tmp_path / "index", batch_size=2, workers=None)

    assert again.unchanged == len(committed["rows"]) and again.total == 12
    assert_same_index(contents(tmp_path / "index"), reference)


def test_an_interrupt_commits_the_queued_batches_and_saves_faiss_in_step(data, tmp_path, index_images, reference,
                                                                        monkeypatch):
    """Ctrl-C during a forward pass: the batches already handed to the writer are committed (as a run writing in its
    loop would have), none later; the FAISS file matches the catalog and the re-run finishes the index."""
    real_call, real_commit = BatchExtractor.__call__, Writer.commit
    forwards = []
    interrupted = threading.Event()

    def interrupted_forward(self, pixels):  # noqa: ANN001
        forwards.append(len(pixels))
        if len(forwards) == 3:   # batch 1 being committed, batch 2 queued: the queue is full
            interrupted.set()
            raise KeyboardInterrupt
        return real_call(self, pixels)

    def commit_after_the_interrupt(self, rows, feats, bad, regions=None):  # noqa: ANN001
        assert interrupted.wait(HANG_S / 2)   # the batches wait in the queue until the interrupt
        real_commit(self, rows, feats, bad, regions)
    monkeypatch.setattr(BatchExtractor, "__call__", interrupted_forward)
    monkeypatch.setattr(Writer, "commit", commit_after_the_interrupt)

    with pytest.raises(KeyboardInterrupt):
        index_images(data, tmp_path / "index", batch_size=2, precision=reference["precision"], workers=0)

    committed = contents(tmp_path / "index")
    assert len(committed["rows"]) == 4, "the two batches before the interrupted one"
    assert sorted(committed["faiss"]) == sorted(i for i, _v in committed["rows"].values())
    monkeypatch.undo()
    again = index_images(data, tmp_path / "index", batch_size=2, workers=0)
    assert again.unchanged == 4
    assert_same_index(contents(tmp_path / "index"), reference)
