"""Indexes for the tests: built in-process with test defaults (seeded random weights, no worker processes), and read
back (the rows a run has committed so far, a snapshot checked for catalog and FAISS agreeing)."""
from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import numpy as np

from indexer.run import JobConfig, RunReport, run_index
from retrieval.catalog.catalog import Catalog
from retrieval.names import FAISS_FILE
from retrieval.vectors.vector_index import VectorIndex


@dataclasses.dataclass(frozen=True)
class BuiltIndex:
    data_dir: Path
    index_dir: Path
    report: RunReport


def build_index(data_dir: Path, index_dir: Path, **options) -> RunReport:
    """Run the indexer in-process with test-friendly defaults (random weights, no worker processes)."""
    options = {"weights": "random", "workers": 0, "batch_size": 8, "progress": False, **options}
    return run_index(JobConfig(data_dir=data_dir, index_dir=index_dir, **options))


def recorded_precision(index_dir: Path) -> str:
    """The precision an index's vectors were computed in. `auto` decides by a start-up probe, so two fresh indexes of
    one folder can differ; a test that wants a second run to equal a first passes it this."""
    cat = Catalog(index_dir)
    try:
        return cat.extraction_record()["last"]["precision"]
    finally:
        cat.close()


def committed_rows(index_dir: Path) -> int:
    """The image rows committed so far in the index folder's SQLite catalog (0 before it or its table exists);
    read-only, so it can watch a running index-images."""
    try:
        with sqlite3.connect(f"file:{index_dir / 'catalog.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.OperationalError:   # not created yet, or the table is not there yet
        return 0


def snapshot(index_dir: Path, url: str | None = None) -> dict[str, np.ndarray]:
    """path -> stored vector, after checking the catalog and FAISS agree."""
    cat = Catalog(index_dir, url=url)
    try:
        states = cat.file_states()
        ids = cat.ids()
        assert len(states) == len(ids), "one row per path"
        faiss_ids = VectorIndex.load(index_dir / FAISS_FILE, 4096).ids()
        assert len(faiss_ids) == len(set(faiss_ids.tolist())), "no duplicate FAISS ids"
        assert np.array_equal(np.sort(faiss_ids), ids), "every FAISS id has a row and every row its FAISS entry"
        by_id = {}
        for chunk_ids, vecs in cat.vectors():
            by_id.update(zip(chunk_ids.tolist(), vecs))
        return {path: by_id[i] for path, (i, _s, _m) in states.items()}
    finally:
        cat.close()
