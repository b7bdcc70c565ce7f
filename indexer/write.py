"""The write stage: the one writer of an index, a catalog transaction per batch (the commit point), then FAISS."""
from __future__ import annotations

import logging
import sys
import time

import numpy as np

from retrieval.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.system import display_name, duration_words, progress_bar, transient_status
from retrieval.vectors.index_types import IndexTypeError

from indexer.config import ConfigError, JobConfig, RunReport
from indexer.plan import Plan, record_refused, removals
from indexer.stage_thread import StageThread

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0   # without a terminal, a progress line this often (the bar shows only on a terminal)


class Writer:
    """The write stage, the one writer of an index: one catalog transaction per batch (the commit point),
    then the same change to the FAISS index, saved every cfg.save_every_s and at the end.

    Opening it reconciles the FAISS file with the catalog and applies the plan's removals. Use as a
    context manager: inside, batches are committed in order on a writer thread, so the network works on
    the next batch meanwhile (on a GPU, the write is off the critical path); the progress bar counts the
    files committed. On the way out the queued batches are committed (none after a failed one), and the
    FAISS file is saved whenever it differs from the saved one, also after an error, so a re-run only
    redoes the batches that were never committed. The catalog and the FAISS index belong to the writer
    thread while it runs: the caller must not use them between __enter__ and __exit__.
    """

    def __init__(self, cfg: JobConfig, catalog: Catalog, plan: Plan, dim: int):
        from retrieval.vectors.builder import IndexBuilder

        self.catalog, self.save_every_s, self.show_status = catalog, cfg.save_every_s, cfg.progress
        try:   # the FAISS type: exact Flat, or trained from a catalog sample (retrieval.vectors.builder)
            self.builder = IndexBuilder(catalog, cfg.index_dir / FAISS_FILE, dim, cfg.vector_index)
            self.vectors, self.dirty = self.builder.open()
        except IndexTypeError as exc:
            raise ConfigError(f"{exc} (--index-type)") from exc
        self.report = RunReport(unchanged=plan.unchanged)
        self.was_indexed = plan.was_indexed
        to_remove = removals(plan, catalog)
        if to_remove:
            removed_ids = catalog.remove_paths(to_remove)
            self.builder.remove(self.vectors, removed_ids)
            self.report.removed = len(removed_ids)
            self.dirty = True
        record_refused(plan, catalog)
        self.last_save = time.monotonic()
        # counts committed files; stays on screen at the end of the run
        self.bar = progress_bar(cfg.progress and bool(plan.todo), "indexing", len(plan.todo), leave=True)
        self.on_progress, self.done, self.todo = cfg.on_progress, 0, len(plan.todo)
        # no terminal (a log file, docker logs, nohup, a Ray job): a plain line now and then instead of the bar, which
        # is silent there (hours of nothing between the start and the summary at a million images)
        self.heartbeat = cfg.progress and bool(plan.todo) and not sys.stderr.isatty()
        self.started = self.last_beat = time.monotonic()
        self.paced_from: tuple[float, int] | None = None   # (time, files done) at the first commit: the pace excludes
                                                           # the start-up (network, cluster) before it
        self.stage: StageThread | None = None   # the writer thread, while in the with block

    def write(self, rows: list[dict], feats: np.ndarray, bad: list[dict], regions: np.ndarray | None = None) -> None:
        """Queue one batch for the writer thread: rows (catalog fields) with feats shape=(len(rows), dim) float32,
        regions shape=(len(rows), R, dim) float32 (index-images --regions; else None), and skipped files. Returns at
        once when the queue has room. Raises what an earlier batch's commit raised."""
        assert self.stage is not None, "write() inside the with block"
        self.stage.put((rows, feats, bad, regions))

    def commit(self, rows: list[dict], feats: np.ndarray, bad: list[dict], regions: np.ndarray | None = None) -> None:
        """Commit one batch (on the writer thread): the catalog transaction, then FAISS, then a save when due."""
        assert not rows or (regions is not None) == bool(self.builder.region_count), \
            "an index with regions gets each image's regional vectors, an index without gets none"
        new_ids, replaced = self.catalog.write_batch(rows, feats, bad, regions)   # the commit point
        self.builder.remove(self.vectors, replaced)
        self.builder.add(self.vectors, np.asarray(new_ids, dtype=np.int64), feats, regions)
        self.vectors = self.builder.grown(self.vectors)   # exact Flat -> a trained type once the collection calls for one
        self.dirty = True
        self.report.indexed += len(rows)
        self.report.removed += sum(1 for b in bad if b["path"] in self.was_indexed)   # indexed, unreadable now: gone
        for b in bad:
            log.info("skipped %s: %s", display_name(b["path"]), b["reason"])
        if time.monotonic() - self.last_save > self.save_every_s:
            self.save()
            self.last_save = time.monotonic()
        self.bar.update(len(rows) + len(bad))
        self.done += len(rows) + len(bad)
        if self.paced_from is None:
            self.paced_from = (time.monotonic(), self.done)
        elif self.heartbeat and time.monotonic() - self.last_beat >= HEARTBEAT_S and self.done < self.todo:
            self.last_beat = time.monotonic()
            rate = (self.done - self.paced_from[1]) / max(self.last_beat - self.paced_from[0], 1e-9)
            left = (self.todo - self.done) / rate if rate > 0 else 0
            sys.stderr.write(f"indexed {self.done:,} of {self.todo:,} ({rate:,.1f} images/s, about "
                             f"{duration_words(left)} left)\n")
            sys.stderr.flush()
        if self.on_progress is not None:
            self.on_progress(self.done, self.todo)

    def save(self) -> None:
        self.builder.save(self.vectors)   # the file, then the catalog state and the FAISS type it holds

    def __enter__(self) -> "Writer":
        # one batch waits while one is written: the network never runs more than two batches ahead. A transaction
        # cut off when the process exits is lost as in a kill -9 (the catalog rolls it back)
        self.stage = StageThread(lambda batch: self.commit(*batch), name="index-writer")
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:  # noqa: ANN001 - context manager protocol
        # The queued batches were made before the caller's error (an interrupt, a failed forward pass) and
        # are committed, as a run without the thread would have; a failed commit dropped the ones after it.
        self.stage.close()
        self.bar.close()
        failure = self.stage.failure
        failed = exc_type is not None or failure is not None
        if not failed:   # another type at this size; the recall of an approximate index
            with transient_status(self.show_status) as self.builder.status:   # seconds after the bar, said on a terminal
                self.vectors = self.builder.finish(self.vectors, self.dirty)
        if self.dirty or self.builder.built or not self.catalog.vectors_in_step() \
                or self.builder.record != self.catalog.vector_index_record():
            self.save()
        if exc is not failure:
            self.stage.raise_failure()   # the writer thread's error is the run's, as if the write had run in the caller
        if not failed:
            # rows whose vector failed its checksum are left out of FAISS (indexer.run marks them for extraction)
            assert len(self.vectors) + len(self.catalog.bad_vectors) >= self.catalog.count(), \
                "FAISS and the catalog disagree after a run"
            self.report.vector_index = self.builder.record



def maintain_vectors(cfg: JobConfig, catalog: Catalog, dim: int) -> tuple[dict, int]:
    """FAISS work alone (a rebuild, another type, new search settings): from the catalog, without the network."""
    from retrieval.vectors.builder import maintain_vectors as maintain

    try:
        with transient_status(cfg.progress) as status:   # what the seconds of a rebuild go to, on a terminal
            return maintain(catalog, cfg.index_dir / FAISS_FILE, dim, cfg.vector_index, status=status)
    except IndexTypeError as exc:
        raise ConfigError(f"{exc} (--index-type)") from exc
