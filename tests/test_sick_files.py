"""Files that change under the indexer or the server, or never finish decoding: a named pipe, a slow or stuck
decoder, the FAISS file truncated in place under a running serve-images.

Each run is a real index-images run in its own process (decoding workers on and off), bounded by a timeout:
before the fix a named pipe put in place of an image after the scan hung the run for good."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from helpers.catalogs import private_copy
from helpers.servers import serve_images
from retrieval.catalog import Catalog
from retrieval.files import NotARegularFile, open_regular
from retrieval.names import FAISS_FILE

ROOT = Path(__file__).resolve().parents[1]

RUN_LIMIT_S = 120   # a normal run of these 6 pictures takes about 10 s here

# The driver: index-images' run_index with hooks a test cannot set from the command line. HOOK is Python run
# before the run, with `run` (indexer.run) and `read` (indexer.read) in scope.
DRIVER = textwrap.dedent("""
    import json, os, sys, signal, time
    import indexer.run as run, indexer.read as read
    from indexer.config import JobConfig
    data, index, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    exec(os.environ["HOOK"])
    report = run.run_index(JobConfig(data_dir=data, index_dir=index, weights="random", workers=workers, batch_size=4,
                                     progress=False))
    print(json.dumps(report.to_json()))
""")


def pictures(folder: Path, n: int = 6) -> list[Path]:
    paths = []
    for i in range(n):
        label = "reds" if i % 2 else "blues"
        path = folder / label / f"p{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 30 * i, 40) if i % 2 else (20, 30 * i, 200)).save(path)
        paths.append(path)
    return paths


def run_with(hook: str, data: Path, index: Path, workers: int) -> dict:
    started = subprocess.run([sys.executable, "-c", DRIVER, str(data), str(index), str(workers)],
                             env={**os.environ, "HOOK": textwrap.dedent(hook)}, capture_output=True, text=True,
                             timeout=RUN_LIMIT_S)
    assert started.returncode == 0, started.stderr[-3000:]
    return json.loads(started.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_replaced_by_a_named_pipe_after_the_scan_is_skipped_not_waited_on(tmp_path, workers):
    data = tmp_path / "data"
    victim = pictures(data)[3]
    hook = f"""
        planned = run.plan
        def plan(cfg, catalog):   # the folder changes between the scan and the read
            result = planned(cfg, catalog)
            os.unlink({str(victim)!r}); os.mkfifo({str(victim)!r})
            return result
        run.plan = plan
    """
    report = run_with(hook, data, tmp_path / "index", workers)

    assert (report["indexed"], report["total"]) == (5, 5)
    assert report["skipped"] == [{"path": "reds/p3.png", "reason": "cannot read file: not a regular file (a named pipe)"}]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_decode_past_the_time_limit_costs_only_its_file(tmp_path, workers):
    data = tmp_path / "data"
    pictures(data)
    hook = """
        read.DECODE_TIME_LIMIT_S = 1.0
        real = read.decode_for_model
        def slow(path, *args, **kwargs):   # as a pathological file would, in whichever process decodes it
            if str(path).endswith("p2.png"):
                time.sleep(30)
            return real(path, *args, **kwargs)
        read.decode_for_model = slow
    """
    report = run_with(hook, data, tmp_path / "index", workers)

    assert (report["indexed"], report["total"]) == (5, 5)
    assert report["skipped"] == [{"path": "blues/p2.png", "reason": "reading and decoding it took longer than 1 s"}]


@pytest.mark.slow
def test_a_worker_stuck_where_no_signal_reaches_is_stopped_and_its_other_files_indexed(tmp_path):
    data = tmp_path / "data"
    pictures(data)
    hook = """
        read.DECODE_TIME_LIMIT_S, read.STUCK_GRACE_S = 1.0, 2.0
        real = read.decode_for_model
        def stuck(path, *args, **kwargs):   # a decoder looping in C code: the alarm is never delivered
            if str(path).endswith("p4.png"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(600)
            return real(path, *args, **kwargs)
        read.decode_for_model = stuck
    """
    report = run_with(hook, data, tmp_path / "index", 2)

    assert (report["indexed"], report["total"]) == (5, 5)
    assert report["skipped"] == [{"path": "blues/p4.png",
                                  "reason": "reading and decoding it took longer than 3 s (the decoder was stopped)"}]


def test_a_named_pipe_or_a_device_named_like_a_photo_is_listed_as_skipped_with_what_it_is(tmp_path):
    """Reproduces: a named pipe called p.jpg, or a link named z.jpg to /dev/zero, was neither indexed nor in the
    skipped list, without a word (the docs promise a reason for each)."""
    from retrieval.images.scan import scan_folder

    data = tmp_path / "data"
    pictures(data)
    os.mkfifo(data / "reds" / "pipe.jpg")
    (data / "reds" / "zeros.jpg").symlink_to("/dev/zero")
    (data / "reds" / "inside.jpg").symlink_to(data / "blues" / "p2.png")   # a link to a photo inside: indexed
    (data / "reds" / "inside-pipe.jpg").symlink_to(data / "reds" / "pipe.jpg")
    result = scan_folder(data)
    assert result.skipped == {"reds/pipe.jpg": "not a regular file (a named pipe)",
                              "reds/inside-pipe.jpg": "not a regular file (a named pipe)",
                              "reds/zeros.jpg": "symlink points outside the data folder"}
    assert "reds/inside.jpg" in [image.path for image in result.images]


def test_open_regular_refuses_what_is_not_a_regular_file_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile, match="a named pipe"):
        open_regular(fifo)
    with pytest.raises(NotARegularFile, match="a folder"):
        open_regular(tmp_path)
    with pytest.raises(NotARegularFile, match="a character device"):
        open_regular("/dev/null")
    (tmp_path / "file").write_bytes(b"abc")
    with open_regular(tmp_path / "file") as f:
        assert f.read() == b"abc"


def _brute_force_ids(index_dir: Path, image_id: int, k: int) -> list[int]:
    """The k nearest catalog ids to image_id's stored vector (itself first), by numpy over every catalog vector."""
    catalog = Catalog(index_dir)
    try:
        ids, vecs = map(np.concatenate, zip(*catalog.vectors()))
    finally:
        catalog.close()
    distances = np.linalg.norm(vecs - vecs[ids.tolist().index(image_id)], axis=1)
    return ids[np.argsort(distances, kind="stable")[:k]].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("reload", ["default", "off"])
def test_a_faiss_file_truncated_under_a_running_server_drops_no_connection(tmp_path, sample_index, reload):
    """Reproduces: the FAISS file truncated in place (open r+b, truncate) under a running serve-images killed the
    worker at the next search (SIGBUS: the file was memory-mapped) and dropped the connection in flight. Now every
    search is answered, with the old good vectors or from the catalog, and matches brute force."""
    index = private_copy(sample_index.index_dir, tmp_path / "index")
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if reload == "default":
        env["RETRIEVAL_RELOAD_INTERVAL_S"] = "1"   # the default (the test helper turns hot reload off)
    picture = sorted(sample_index.data_dir.rglob("*.jpg"))[7]
    path = picture.relative_to(sample_index.data_dir).as_posix()
    with serve_images(index, tmp_path / "serve.log", **env) as base:
        def search() -> requests.Response:
            with picture.open("rb") as f:   # a dropped connection raises requests.ConnectionError here
                return requests.post(f"{base}/search?k=8", files={"image": f}, timeout=60)

        before = search()
        assert before.status_code == 200, before.text
        hits = before.json()["results"]
        assert hits[0]["path"] == path
        image_id = hits[0]["id"]
        assert [h["id"] for h in hits] == _brute_force_ids(index, image_id, 8)
        with open(index / FAISS_FILE, "r+b") as f:
            f.truncate(4096)   # in place: same inode, the tail of every mapping of it gone
        for _ in range(6):
            answer = search()
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 200:
                assert [h["id"] for h in answer.json()["results"]] == [h["id"] for h in hits]
            else:
                assert answer.json()["error"]["code"] == "unavailable"
            neighbours = requests.get(f"{base}/images/{image_id}/neighbours?k=7", timeout=60)
            assert neighbours.status_code in (200, 503), neighbours.text
            if neighbours.status_code == 200:
                assert [h["id"] for h in neighbours.json()["results"]] == [h["id"] for h in hits[1:]]
            time.sleep(0.5)   # hot reload (default: every second) sees the truncated file meanwhile
        after = search()
        assert after.status_code == 200, after.text
        assert [h["id"] for h in after.json()["results"]] == [h["id"] for h in hits]
    log = (tmp_path / "serve.log").read_text()
    assert "Worker (pid" not in log and "SIGBUS" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_a_full_temporary_folder_neither_kills_the_server_nor_fails_uploads(sample_index, tmp_path):
    """Reproduces (TMPDIR on a disk that fills while serving): every worker died of SIGBUS as soon as it touched a new
    page of its mapped metric files (341 restarts in 10 minutes, no answers), and a 3 MB form upload answered 500.
    The metric files live in /dev/shm now, and uploads in memory."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with serve_images(sample_index.index_dir, tmp_path / "serve.log", TMPDIR=str(small)) as base:
            subprocess.run(["dd", "if=/dev/zero", f"of={small / 'filler'}", "bs=64k"], capture_output=True)
            assert os.statvfs(small).f_bavail == 0, "the temporary folder is full"
            noise = np.random.default_rng(0).integers(0, 255, (700, 900, 3), dtype=np.uint8)
            png = tmp_path / "big.png"
            Image.fromarray(noise).save(png)
            for path in ("/stats", "/metrics", "/model", "/duplicates", "/?page=1", "/gallery/1"):
                assert requests.get(base + path, timeout=60).status_code in (200, 202), path
            with png.open("rb") as f:
                assert requests.post(f"{base}/search", files={"image": f}, timeout=60).status_code == 200
            assert requests.get(base + "/metrics", timeout=60).status_code == 200
        assert "SIGBUS" not in (tmp_path / "serve.log").read_text()
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
