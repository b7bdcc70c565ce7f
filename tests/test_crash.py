"""Crash safety: SIGKILL a real index-images mid-run, run it again, and get exactly the uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.indexes import committed_rows, snapshot
from helpers.precision import same_features
from helpers.waiting import wait_for
from retrieval.samples import make_sample_collection
from retrieval.search.index import ImageIndex

pytestmark = pytest.mark.slow   # index-images runs as subprocesses, killed with SIGKILL and run again

N_IMAGES = 60


def index_command(data: Path, index_dir: Path) -> list[str]:
    return [sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir", str(index_dir),
            "--weights", "random", "--batch-size", "1", "--workers", "0", "--json"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = root / "data"
    make_sample_collection(data, per_class=N_IMAGES // 5, size=(96, 72), seed=4)
    (data / "red_circles" / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    reference = root / "reference"
    done = subprocess.run(index_command(data, reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return data, snapshot(reference)


@pytest.mark.parametrize("kill_after_rows", [1, N_IMAGES // 2, N_IMAGES - 5])
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(collection, tmp_path, kill_after_rows):
    data, reference = collection
    index_dir = tmp_path / "index"
    proc = subprocess.Popen(index_command(data, index_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: committed_rows(index_dir) >= kill_after_rows or proc.poll() is not None, 120, interval=0.005)
    assert proc.poll() is None, "the run ended before it could be killed; the test proves nothing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = committed_rows(index_dir)
    assert kill_after_rows <= partial < N_IMAGES

    rerun = subprocess.run(index_command(data, index_dir), capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["total"] == N_IMAGES and summary["unchanged"] == partial
    assert summary["indexed"] == N_IMAGES - partial, "only the uncommitted work is redone"
    assert [s["path"] for s in summary["skipped"]] == ["red_circles/corrupt.jpg"]
    resumed = snapshot(index_dir)
    assert sorted(resumed) == sorted(reference)
    for path, vec in reference.items():
        assert same_features(resumed[path], vec), path
    index = ImageIndex(index_dir, load_network=False)
    try:
        ids, vecs = next(index.catalog.vectors())
        assert [index.search_vectors(vecs[i:i + 1], 1)[0][0].id for i in range(len(ids))] == ids.tolist()
    finally:
        index.close()


def default_command(data: Path, index_dir: Path) -> list[str]:
    """index-images as the README runs it: decoding workers on (one per core); small batches for many commits."""
    return [sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir", str(index_dir),
            "--weights", "random", "--batch-size", "4", "--json"]


def test_sigkill_of_a_default_run_then_an_immediate_rerun_several_times(collection, tmp_path):
    """Workers on: the lock dies with the killed process, and its decoding workers die with it."""
    import psutil

    data, reference = collection
    for round_, kill_after_rows in enumerate([4, 20, 40]):
        index_dir = tmp_path / f"index-{round_}"
        proc = subprocess.Popen(default_command(data, index_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: committed_rows(index_dir) >= kill_after_rows or proc.poll() is not None, 120, interval=0.005)
        assert proc.poll() is None, "the run ended before it could be killed; the test proves nothing"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the default run decodes in worker processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        rerun = subprocess.run(default_command(data, index_dir), capture_output=True, text=True, timeout=300)

        assert rerun.returncode == 0, f"round {round_}: {rerun.stderr}"
        summary = json.loads(rerun.stdout)
        assert summary["total"] == N_IMAGES
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"decoding workers outlived their killed parent: {[p.pid for p in alive]}"
        resumed = snapshot(index_dir)
        assert sorted(resumed) == sorted(reference)
        for path, vec in reference.items():
            assert same_features(resumed[path], vec), path


def committed_rows_in(url: str) -> int:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as db:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
    except psycopg.errors.UndefinedTable:   # not created yet
        return 0


@pytest.mark.postgres
def test_sigkill_of_a_run_on_postgresql_then_an_immediate_rerun(collection, tmp_path, postgres_url):
    """The catalog in PostgreSQL: the killed run's advisory lock goes with its connection, the rerun redoes only
    the uncommitted batch, and the result equals an uninterrupted run (with SQLite) exactly."""
    import psutil

    data, reference = collection
    index_dir = tmp_path / "index"
    command = default_command(data, index_dir) + ["--db-url", postgres_url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: committed_rows_in(postgres_url) >= N_IMAGES // 2 or proc.poll() is not None, 120, interval=0.01)
    assert proc.poll() is None, "the run ended before it could be killed; the test proves nothing"
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = committed_rows_in(postgres_url)
    assert N_IMAGES // 2 <= partial < N_IMAGES

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)   # at once: no wait for the lock

    assert rerun.returncode == 0, rerun.stderr
    assert not psutil.wait_procs(workers, timeout=5)[1], "decoding workers outlived their killed parent"
    summary = json.loads(rerun.stdout)
    assert (summary["total"], summary["unchanged"], summary["indexed"]) == (N_IMAGES, partial, N_IMAGES - partial)
    assert [s["path"] for s in summary["skipped"]] == ["red_circles/corrupt.jpg"]
    assert not (index_dir / "catalog.db").exists(), "the catalog is in PostgreSQL, not in the index folder"
    resumed = snapshot(index_dir, postgres_url)
    assert sorted(resumed) == sorted(reference)
    for path, vec in reference.items():
        assert same_features(resumed[path], vec), path
