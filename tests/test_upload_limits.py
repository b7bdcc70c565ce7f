"""Hostile uploads (retrieval.images.decode_pool and POST /search, /gallery/search): bounded shape, pixels, scans, time and memory."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.waiting import wait_for
from retrieval.samples import encoded, many_scans_jpeg
from retrieval.images.decode_pool import DecodePool, DecodeTimedOut, DecoderBusy
from retrieval.images.decode import MAX_JPEG_SCANS, ImageDecodeError, Preprocessing

TIMEOUT_S = 0.5   # the slow file below takes over a second on a 2-core CI machine


@pytest.fixture(scope="module")
def app_config() -> dict:
    return {"DECODE_PROCESSES": 2, "DECODE_TIMEOUT_S": TIMEOUT_S, "MAX_DECODED_PIXELS": 4_000_000,
            "DECODE_MEMORY_MB": 256}


def slow_jpeg() -> bytes:
    """Within every limit (81 Mpx before draft, 1.3 Mpx after, MAX_JPEG_SCANS scans) and still about a second to decode."""
    return many_scans_jpeg(9000, 9000, MAX_JPEG_SCANS)


def upload(client, data: bytes, url: str = "/search?k=3"):
    decoders = client.application.extensions["retrieval"].decoders
    tiny = encoded(Image.new("RGB", (8, 8)), "PNG")

    def decoded() -> bool:
        try:
            decoders.decode(tiny, Preprocessing(), max_pixels=None, max_decoded_pixels=None)
            return True
        except DecoderBusy:
            return False
    # a worker killed by an earlier test is replaced at once, but the new process imports Pillow and numpy (seconds
    # on a loaded machine), and an upload meanwhile is told the decoders are starting (503): wait until one answers
    assert wait_for(decoded, 60), "the decoders did not come back"
    return post_upload(client, data, url)


def post_upload(client, data: bytes, url: str = "/search?k=3"):
    """The upload alone, without waiting for idle decoders (for tests that keep them busy on purpose)."""
    return client.post(url, data={"image": (io.BytesIO(data), "upload.bin")}, content_type="multipart/form-data")


def refused(response, status: int = 415) -> str:
    assert response.status_code == status, response.data
    body = response.get_json()
    assert body["error"]["code"] == ("unsupported_image" if status == 415 else "overloaded"), body   # decoders busy
    return body["error"]["message"]


def pids_alive(pids) -> set[int]:
    """The pids that are running processes (a zombie waiting for a parent to reap it is not running)."""
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path("/proc").is_dir() else "R"
        except (ProcessLookupError, FileNotFoundError):
            continue
        if state not in ("Z", "X"):
            alive.add(pid)
    return alive


# --- shape, pixels, scans: refused before decoding -----------------------------------------------------

def test_a_long_thin_strip_is_refused_before_any_resize(client):
    strip = encoded(Image.new("1", (64, 64 * 250)), "TIFF", compression="group4")    # 1:250, a few kB
    assert "long and thin" in refused(upload(client, strip))
    line = encoded(Image.new("L", (40_000_000, 2)), "PNG")                           # used to be an OverflowError
    assert "long and thin" in refused(upload(client, line))


def test_more_decoded_pixels_than_the_limit_is_415_but_a_large_jpeg_decodes_reduced(client):
    message = refused(upload(client, encoded(Image.new("L", (2100, 2000)), "PNG")))   # 4.2 Mpx > 4 Mpx
    assert "too large to decode" in message and "downscale it, or send it as a JPEG" in message
    assert "other than JPEGs, up to 4 megapixels" in client.get("/").get_data(as_text=True), "the page says so first"
    photo = encoded(Image.new("RGB", (4000, 3000), (20, 120, 200)), "JPEG")           # 12 Mpx, drafted to 500x375
    r = upload(client, photo)
    assert r.status_code == 200, r.data
    assert r.get_json()["query"] == {"width": 4000, "height": 3000}


def test_a_jpeg_with_too_many_scans_is_refused_at_once(client):
    message = refused(upload(client, many_scans_jpeg(512, 512, MAX_JPEG_SCANS + 50)))
    assert "scans" in message
    assert upload(client, many_scans_jpeg(512, 512, 20)).status_code == 200          # a few repeated scans decode


@pytest.mark.parametrize("img, fmt", [
    (Image.new("I;16", (1500, 1200), 40000), "PNG"),
    (Image.new("I", (1500, 1200), 70000), "TIFF"),
    (Image.new("RGBA", (1500, 1200), (10, 200, 30, 128)), "PNG"),
])
def test_high_bit_depth_and_alpha_uploads_are_answered(client, img, fmt):
    assert upload(client, encoded(img, fmt)).status_code == 200


# --- formats: only the six read reach a reader ----------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(hello from the upload) print\nshowpage\n"


def test_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Reproduces: an EPS upload was handed to Pillow's EPS reader, which ran Ghostscript (`gs`, where installed) on
    the uploader's PostScript, left it running past the decoder's deadline, and spooled the upload to /tmp."""
    from retrieval.images.decode import decode_for_model

    ran = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ImageDecodeError, match=r"a format this program cannot read \(JPEG, PNG, WebP, BMP, GIF, TIFF\)"):
        decode_for_model(EPS, Preprocessing())
    assert not ran.exists(), "Ghostscript was run on the upload"


@pytest.mark.parametrize("fmt", ["PCX", "SGI", "TGA", "PPM", "QOI"])
def test_formats_pillow_reads_but_the_docs_do_not_name_are_refused(client, fmt):
    data = encoded(Image.new("RGB", (64, 48), (200, 40, 40)), fmt)
    assert "(JPEG, PNG, WebP, BMP, GIF, TIFF)" in refused(upload(client, data))


# --- time: the deadline, and the worker that passed it -------------------------------------------------

def test_a_decode_past_the_deadline_is_415_its_worker_is_replaced_and_the_next_query_works(app, client, sample_index):
    pool = app.extensions["retrieval"].decoders
    before, timeouts = set(pool.worker_pids()), pool.stats.timeouts

    message = refused(upload(client, slow_jpeg()))

    assert "took too long to decode" in message
    assert pool.stats.timeouts == timeouts + 1
    after = set(pool.worker_pids())
    assert len(after) == 2 and after != before            # one worker killed, a fresh one in its place
    assert pids_alive(before - after) == set()
    good = (sample_index.data_dir / "red_circles/red_circles_002.jpg").read_bytes()
    for _ in range(3):                                     # both workers, the new one included, answer
        r = upload(client, good)
        assert r.status_code == 200 and r.get_json()["results"][0]["path"] == "red_circles/red_circles_002.jpg"


def test_healthz_answers_while_eight_slow_decodes_run_and_every_upload_is_415_or_503(app):
    statuses: list[int] = []
    data = slow_jpeg()

    def attack() -> None:
        r = post_upload(app.test_client(), data)
        if r.status_code == 503:
            refused(r, 503)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=attack) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    health = [app.test_client().get("/healthz") for _ in range(3)]
    still_running = sum(t.is_alive() for t in threads)
    for t in threads:
        t.join(60)

    assert all(h.status_code == 200 for h in health)
    assert still_running > 0, "healthz should have been answered while the slow uploads were still decoding"
    assert len(statuses) == 8 and set(statuses) <= {415, 503}, statuses
    assert 415 in statuses                                 # two decoders: at least two uploads got one, and timed out
    assert len(app.extensions["retrieval"].decoders.worker_pids()) == 2


def test_the_gallery_preview_comes_from_the_same_bounded_decode(client):
    r = upload(client, slow_jpeg(), "/gallery/search")
    assert r.status_code == 415 and "took too long to decode" in r.get_data(as_text=True), r.get_data(as_text=True)
    big = encoded(Image.new("RGB", (1800, 1200), (200, 40, 40)), "PNG")
    r = upload(client, big, "/gallery/search")
    assert r.status_code == 303, r.data
    html = client.get(r.headers["Location"]).get_data(as_text=True)
    src = html.split('id="query-image" src="', 1)[1].split('"', 1)[0]
    preview = Image.open(io.BytesIO(client.get(src).data))
    assert preview.format == "JPEG" and preview.size == (480, 320)


# --- the pool itself -----------------------------------------------------------------------------------

def started(pool: DecodePool) -> DecodePool:
    """pool once its workers answer: a fresh worker imports Pillow and numpy first (seconds on a loaded machine),
    and a decode handed to it meanwhile is told the decoders are starting, not timed out."""
    tiny = encoded(Image.new("RGB", (8, 8)), "PNG")
    for _ in pool.worker_pids():
        assert wait_for(lambda: _decodes(pool, tiny), 60), "the decoders did not start"
    return pool


def _decodes(pool: DecodePool, data: bytes) -> bool:
    try:
        pool.decode(data, Preprocessing(), max_pixels=None, max_decoded_pixels=None)
        return True
    except DecoderBusy:
        return False


def test_a_busy_pool_answers_decoder_busy_instead_of_queueing_forever():
    pool = started(DecodePool(1, 0.3))
    try:
        results: list[BaseException] = []

        def slow() -> None:
            try:
                pool.decode(slow_jpeg(), Preprocessing(), max_pixels=None, max_decoded_pixels=None)
            except Exception as exc:  # noqa: BLE001 - collected for the asserts
                results.append(exc)

        threads = [threading.Thread(target=slow) for _ in range(3)]   # one decodes, two wait for the one worker
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

        kinds = [type(exc) for exc in results]
        assert len(kinds) == 3 and set(kinds) <= {DecodeTimedOut, DecoderBusy}, results
        assert DecodeTimedOut in kinds and DecoderBusy in kinds
        assert pool.stats.busy == kinds.count(DecoderBusy) and pool.stats.timeouts == kinds.count(DecodeTimedOut)
        assert len(pool.worker_pids()) == 1
    finally:
        pool.close()


def test_a_decoder_killed_at_its_deadline_takes_what_it_started_with_it():
    pool = started(DecodePool(1, 0.3))
    child = None
    try:
        pid = pool.worker_pids()[0]
        child = subprocess.Popen(["sleep", "60"], process_group=pid)   # as a program the decoder had started
        with pytest.raises(DecodeTimedOut):
            pool.decode(slow_jpeg(), Preprocessing(), max_pixels=None, max_decoded_pixels=None)
        assert child.wait(10) == -signal.SIGKILL, "what the decoder started outlived it"
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        pool.close()


def test_a_decode_over_the_memory_cap_is_a_decode_error_and_the_worker_lives_on():
    pool = DecodePool(1, 30.0, memory_mb=32)
    try:
        pid = pool.worker_pids()[0]
        with pytest.raises(ImageDecodeError, match="memory"):
            pool.decode(encoded(Image.new("RGBA", (3000, 3000)), "PNG"), Preprocessing(), max_pixels=None,
                        max_decoded_pixels=None)                                   # 36 MB as RGBA, twice that resized
        small = pool.decode(encoded(Image.new("RGB", (300, 200), (1, 2, 3)), "PNG"), Preprocessing(), max_pixels=None,
                            max_decoded_pixels=None)
        assert small.image.pixels.shape == (3, 224, 224) and small.image.pixels.dtype == np.uint8
        assert tuple(small.image.pixels[:, 0, 0]) == (1, 2, 3)
        assert pool.worker_pids() == [pid] and pool.stats.crashes == 0
    finally:
        pool.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
def test_workers_load_neither_torch_nor_openmp(app):
    for pid in app.extensions["retrieval"].decoders.worker_pids():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "faiss" not in maps and "libgomp" not in maps


def test_workers_exit_when_the_server_process_is_killed(tmp_path):
    script = ("import sys, time; from retrieval.images.decode_pool import DecodePool; "
              "pool = DecodePool(2, 5.0); print(*pool.worker_pids(), flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        pids = [int(p) for p in server.stdout.readline().split()]
        assert len(pids) == 2 and pids_alive(pids) == set(pids)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        wait_for(lambda: not pids_alive(pids), 10, interval=0.05)
        assert pids_alive(pids) == set(), "decoder processes outlived the server"
    finally:
        server.kill()
        server.wait(10)


@pytest.mark.parametrize("form, limit", [
    ({f"field{i}": "x" for i in range(1001)}, "more than 1,000 parts"),   # werkzeug's MAX_FORM_PARTS
    ({"note": "x" * 600_000}, "a text field over 500 KB"),               # and MAX_FORM_MEMORY_SIZE
])
def test_a_form_over_its_own_limits_is_told_which_limit_not_the_upload_size(client, form, limit):
    picture = encoded(Image.new("RGB", (64, 48), "red"), "PNG")
    response = client.post("/search", data={**form, "image": (io.BytesIO(picture), "q.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 413, response.data
    error = response.get_json()["error"]
    assert error["code"] == "upload_too_large" and limit in error["message"] and "MB limit" not in error["message"]
