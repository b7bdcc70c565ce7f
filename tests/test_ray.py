"""Tests for index-images --ray (indexer.ray_job) on a local Ray cluster on the CPU: same result as a single-process
run, a killed driver or network worker costs nothing, and without Ray the command says how to get it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.samples import make_sample_collection

from helpers.indexes import build_index, committed_rows, snapshot
from helpers.precision import same_features
from helpers.waiting import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]   # a Ray cluster per module, killed runs

N_IMAGES = 20
BAD_FILE = "red_circles/corrupt.jpg"


def index_command(data: Path, index_dir: Path, *ray_args: str, batch_size: int = 2) -> list[str]:
    return [sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir", str(index_dir),
            "--weights", "random", "--batch-size", str(batch_size), "--json", "--ray", *ray_args]


def assert_same_index(index_dir: Path, reference: dict[str, np.ndarray], reference_ids: np.ndarray) -> None:
    """Same files, the same set of ids, the same vectors (helpers.precision.same_features); the bad file skipped with its reason."""
    from retrieval.catalog import Catalog

    resumed = snapshot(index_dir)          # also checks that FAISS and the catalog hold the same ids, once each
    assert sorted(resumed) == sorted(reference)
    for path, vec in reference.items():
        assert same_features(resumed[path], vec), path
    cat = Catalog(index_dir)
    try:
        assert np.array_equal(cat.ids(), reference_ids)
        assert [p for p, _ in cat.skipped()] == [BAD_FILE]
    finally:
        cat.close()


def ray_processes(temp: str) -> set[int]:
    """Live processes of the Ray cluster whose temporary folder is temp: the daemons name it on their command
    line, the workers (titled "ray::...") inherit RAY_TMPDIR=temp. Exited, unreaped processes do not count."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not cmdline:
                continue
            if any(temp in part for part in cmdline) or (
                    cmdline[0].startswith("ray::") and proc.environ().get("RAY_TMPDIR") == temp):
                found.add(proc.pid)
        except psutil.Error:
            pass
    return found


def described_processes(pids: set[int]) -> list[str]:
    """pid and command line of each live process of pids (for a failure message)."""
    import psutil

    out = []
    for pid in sorted(pids):
        try:
            out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:200]}")
        except psutil.Error:
            out.append(f"{pid} (gone)")
    return out


def wait_gone(temp: str, timeout: float = 30.0) -> set[int]:
    """Wait until the processes of the cluster in temp have exited; -> those still alive."""
    deadline = time.monotonic() + timeout
    while (left := ray_processes(temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """(data folder, reference snapshot, reference ids) from a single-process run."""
    root = tmp_path_factory.mktemp("ray")
    data = root / "data"
    make_sample_collection(data, per_class=N_IMAGES // 5, size=(64, 48), seed=5)
    (data / BAD_FILE).write_bytes(b"\xff\xd8 broken")
    report = build_index(data, root / "reference")
    assert report.indexed == N_IMAGES
    from retrieval.catalog import Catalog

    cat = Catalog(root / "reference")
    ids = cat.ids()
    cat.close()
    return data, snapshot(root / "reference"), ids


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (2 CPUs) that this process has joined; -> its address, for other drivers.

    Its temporary folder is short (Ray's socket paths must fit in 107 bytes) and removed afterwards,
    after checking that no process of the cluster outlives it."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]'); .ci/run installs it")
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp        # inherited by the cluster's workers: how ray_processes finds them
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             _temp_dir=temp, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        left = wait_gone(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes outlived the cluster: {sorted(left)}"


def test_ray_run_equals_a_single_process_run(cluster, collection, tmp_path):
    from indexer.run import JobConfig, run_index

    data, reference, reference_ids = collection
    lines = []
    report = run_index(JobConfig(data_dir=data, index_dir=tmp_path / "index", weights="random", batch_size=4,
                                 progress=False, ray=cluster), on_cluster=lines.append)

    assert report.indexed == N_IMAGES and report.total == N_IMAGES
    assert [s["path"] for s in report.skipped] == [BAD_FILE]
    assert report.skipped[0]["reason"] == "not an image, or in a format this program cannot read (JPEG, PNG, WebP, BMP, GIF, TIFF)"
    assert lines and "CPU actor" in lines[0], lines
    assert_same_index(tmp_path / "index", reference, reference_ids)

    # a re-run through Ray is a no-op that never starts the network
    again = run_index(JobConfig(data_dir=data, index_dir=tmp_path / "index", progress=False, ray=cluster))
    assert (again.indexed, again.unchanged) == (0, N_IMAGES)


def killed_after_first_commit(data: Path, index_dir: Path, cluster: str) -> int:
    """Start index-images --ray, SIGKILL it as soon as its first batch is committed; -> the rows it left."""
    proc = subprocess.Popen(index_command(data, index_dir, cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: committed_rows(index_dir) >= 1 or proc.poll() is not None, 240, interval=0.005)
    assert proc.poll() is None, f"the run ended before it could be killed; the test proves nothing: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return committed_rows(index_dir)


def test_driver_killed_mid_run_then_rerun_equals_a_single_process_run(cluster, collection, tmp_path):
    data, reference, reference_ids = collection
    # The actors may have finished every batch by the first commit, leaving the driver only commits to do, each
    # a few milliseconds; on a loaded machine the kill can then land after the last one. Such a try proves
    # nothing about a kill mid-run, so it is made again in a fresh folder, up to three tries.
    for attempt in range(3):
        index_dir = tmp_path / f"index{attempt}"
        partial = killed_after_first_commit(data, index_dir, cluster)
        if partial < N_IMAGES:
            break
    assert 1 <= partial < N_IMAGES, "three runs finished before the kill landed"

    rerun = subprocess.run(index_command(data, index_dir, cluster), capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["unchanged"] == partial and summary["indexed"] == N_IMAGES - partial, summary
    assert_same_index(index_dir, reference, reference_ids)


def test_network_worker_killed_mid_run_is_retried(cluster, collection, tmp_path):
    """SIGKILL the actor that runs the network: Ray starts another and redoes its batches; nothing lost or doubled."""
    import psutil

    data, reference, reference_ids = collection
    index_dir = tmp_path / "index"
    proc = subprocess.Popen(index_command(data, index_dir, cluster, batch_size=1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: committed_rows(index_dir) >= 2 or proc.poll() is not None, 240, interval=0.01)
    actors = [p for p in psutil.process_iter(["cmdline"])
              if any("NetworkActor" in part for part in (p.info["cmdline"] or []))]
    assert proc.poll() is None and actors, "no network actor to kill while the run was going; the test proves nothing"
    for actor in actors:
        actor.kill()

    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["indexed"] == N_IMAGES and summary["total"] == N_IMAGES, summary
    assert_same_index(index_dir, reference, reference_ids)


def test_ray_without_address_starts_a_local_cluster_that_ends_with_the_command(collection, tmp_path):
    """No address: the command starts its own cluster; killed with SIGKILL, its cluster dies with it; run again,
    it finishes the index, stops its cluster, and leaves nothing running."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]'); .ci/run installs it")
    data, reference, reference_ids = collection
    index_dir = tmp_path / "index"
    temp = tempfile.mkdtemp(prefix="rayl-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.Popen(index_command(data, index_dir, batch_size=1), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: committed_rows(index_dir) >= 2 or proc.poll() is not None, 240, interval=0.01)
        assert proc.poll() is None and ray_processes(temp), "no running local cluster to kill; the test proves nothing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # GCS, raylet and workers notice the driver's death at once on a quiet machine; on a loaded one (the suite on
        # two workers, CI building images beside it) a daemon took over 30 s once: give them two minutes
        left = wait_gone(temp, timeout=120)
        assert not left, f"the killed command's local cluster outlived it: {described_processes(left)}"

        done = subprocess.run(index_command(data, index_dir, batch_size=8), env=env, capture_output=True, text=True,
                              timeout=400)

        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["indexed"] + summary["unchanged"] == N_IMAGES and summary["unchanged"] >= 2, summary
        assert_same_index(index_dir, reference, reference_ids)
        assert not wait_gone(temp), "the local cluster's processes outlived the command"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_option_without_ray_installed_says_how_to_get_it(collection, tmp_path):
    data, _reference, _ids = collection
    blocked = "import sys; sys.modules['ray'] = None; from commands.index_images import main; main()"   # import ray fails
    cmd = index_command(data, tmp_path / "index")
    done = subprocess.run([cmd[0], "-c", blocked, *cmd[3:]], capture_output=True, text=True, timeout=120)

    assert done.returncode == 2, done.stderr
    assert "pip install 'cnn-image-retrieval[ray]'" in done.stderr and "leave out --ray" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "index").exists(), "nothing is written before Ray is there"


@pytest.mark.parametrize("address, said", [
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port}: Connection refused; start one with `ray start --head`"),
    ("data/", "--ray 'data/' is no Ray address: give the head's host:port"),
])
def test_a_ray_address_that_answers_nothing_fails_at_once_and_writes_nothing(collection, tmp_path, address, said):
    """Reproduces: --ray 127.0.0.1:6390 (nothing there) was still retrying after 581 s; `--ray data/ data/` (the data
    folder given twice) ended in a traceback, 'Invalid address format', after writing catalog.db and the weights."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]'); .ci/run installs it")
    from helpers.servers import free_port

    data, _reference, _ids = collection
    port = free_port()
    cmd = index_command(data, tmp_path / "index", address.format(port=port))
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr
    assert said.format(port=port) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "index").exists(), "nothing is written for a cluster that is not there"


POISON_SITE = '''
import os
import PIL.Image as _image

_real_open = _image.open


def _open(fp, *args, **kwargs):   # a decoder that dies on one file, every time (as a segfault or an OOM kill would)
    if hasattr(fp, "read") and hasattr(fp, "seek"):
        at = fp.tell()
        head = fp.read(4096)
        fp.seek(at)
        if b"POISON-PILL" in head:
            os._exit(1)
    return _real_open(fp, *args, **kwargs)


_image.open = _open
'''


def test_a_file_that_kills_its_decoder_every_time_fails_the_run_naming_where(collection, tmp_path):
    """Reproduces (scale-out review): a decoding task that crashed every time was retried forever (Ray Data's
    default): the run never ended, printing raylet lines only. Its retries are bounded; the run fails with exit 1,
    saying which files are not indexed, and keeps what was committed."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]'); .ci/run installs it")
    data = tmp_path / "data"
    shutil.copytree(collection[0], data)
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 20, 200)).save(data / "zz_poison.jpg", comment=b"POISON-PILL")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(POISON_SITE)
    temp = tempfile.mkdtemp(prefix="rayp-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)   # a local cluster of the command's own: its workers inherit PYTHONPATH
    try:
        started = time.monotonic()
        done = subprocess.run(index_command(data, tmp_path / "index", batch_size=4), env=env, capture_output=True,
                              text=True, timeout=400)
        assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
        assert "lost its worker process 4 times in a row" in done.stderr, done.stderr[-3000:]
        assert re.search(r"the \d+ files from \S+ on are not indexed yet", done.stderr), done.stderr[-3000:]
        assert "every committed batch is kept" in done.stderr
        assert time.monotonic() - started < 300
        assert not wait_gone(temp), "the local cluster's processes outlived the command"
    finally:
        shutil.rmtree(temp, ignore_errors=True)
