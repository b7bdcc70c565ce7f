"""`serve-images` (commands.serve_images): refuses a missing index clearly; serves the API under gunicorn; `flask --app api` works."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from commands.serve_images import bind_address, main
from helpers.servers import SERVE, serve_images
from helpers.training_history import make_history, write_history


def test_help_answers_without_loading_torch_or_faiss():
    # --help and usage errors answer at once: the heavy modules are imported only once the command runs
    started = time.perf_counter()
    result = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60)
    print(f"serve-images --help: {time.perf_counter() - started:.2f} s")   # shown with -s; measured, not asserted
    assert result.returncode == 0, result.stderr
    assert "--read-timeout" in result.stdout and "--index-dir" in result.stdout
    probe = "import sys, commands.serve_images; print(sorted(m for m in ('torch', 'faiss', 'torchvision', 'flask') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_usage_error_exits_2_before_looking_for_the_index(tmp_path):
    result = CliRunner().invoke(main, ["--index-dir", str(tmp_path), "--read-timeout", "0"])
    assert result.exit_code == 2 and "--read-timeout" in result.output, result.output


def test_a_relative_index_dir_is_made_absolute_where_it_enters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--index-dir", "nothing-here"])
    assert result.exit_code == 2, result.output
    assert f"no index at {tmp_path / 'nothing-here'}" in result.output


def test_missing_index_exits_2_saying_run_index_images_first(tmp_path):
    result = CliRunner().invoke(main, ["--index-dir", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2, result.output
    assert "run index-images first" in result.output


def test_a_missing_compare_index_or_training_file_exits_2(sample_index, tmp_path):
    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--compare-index", str(tmp_path / "no")])
    assert result.exit_code == 2 and f"no index at {tmp_path / 'no'}" in result.output, result.output
    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--training", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "--training" in result.output and "does not exist" in result.output, result.output


def test_a_missing_or_damaged_weights_file_is_said_before_the_server_starts(sample_index, tmp_path):
    """It was said by every worker after gunicorn's "Listening at", and the server then answered 503s."""
    import shutil

    from retrieval.names import random_weights_file

    index = tmp_path / "index{v}"   # braces: the message is formatted with the paths in it
    shutil.copytree(sample_index.index_dir, index)
    weights = random_weights_file(index, "alexnet")
    weights.unlink()
    result = CliRunner().invoke(main, ["--index-dir", str(index)])
    assert result.exit_code == 2, result.output
    assert f"the index's random weights file {weights.name} is missing: no query can be computed; run " \
           f"index-images {sample_index.data_dir} --index-dir {index}" in result.output

    weights.write_bytes(b"not the weights the index was made with")   # damaged or replaced: found too
    result = CliRunner().invoke(main, ["--index-dir", str(index)])
    assert result.exit_code == 2 and "is not the one recorded (damaged or replaced)" in result.output, result.output
    assert f"run index-images {sample_index.data_dir} --index-dir {index}: it makes the file again" in result.output

    from commands.serve_images import check_index   # a --compare-index is evaluated from its vectors, never queried
    assert check_index(index, queried=False)[0] == 30


@pytest.mark.slow
def test_served_under_a_sub_path_every_address_carries_it(sample_index, tmp_path):
    """Behind a proxy that passes /pics/... on as it is: SCRIPT_NAME=/pics. The answer's URLs and the gallery's links
    start with /pics; an address outside it is a 404 naming the prefix (gunicorn's own words came as a 500)."""
    with serve_images(sample_index.index_dir, tmp_path / "log.txt", SCRIPT_NAME="/pics") as base:
        assert base.endswith("/pics")
        query = (sample_index.data_dir / "red_circles" / "red_circles_000.jpg").read_bytes()
        answer = requests.post(base + "/search?k=2", files={"image": ("q.jpg", query)}, timeout=60).json()
        first = answer["results"][0]
        assert first["image_url"].startswith("/pics/images/") and first["gallery_url"].startswith("/pics/gallery/")
        root = base.removesuffix("/pics")
        assert requests.get(root + first["thumbnail_url"], timeout=30).headers["Content-Type"] == "image/jpeg"
        assert 'href="/pics/static/gallery.css"' in requests.get(base + "/", timeout=30).text
        outside = requests.get(root + "/healthz", timeout=30)
        assert outside.status_code == 404 and "answers under /pics/" in outside.json()["error"]["message"]
    assert f"gallery and API at {base}/" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_serve_images_shows_a_training_history_and_a_second_index(sample_index, compare_index, tmp_path):
    history = write_history(tmp_path / "tuned.history.json", make_history(sample_index.data_dir, ["red_circles", "blue_squares"]))
    with serve_images(sample_index.index_dir, tmp_path / "server.log", "--training", str(history),
                      RETRIEVAL_COMPARE_INDEX=str(compare_index.index_dir)) as base:
        page = requests.get(base + "/training", timeout=60)
        assert page.status_code == 200 and "How alexnet was fine-tuned on 2 classes" in page.text
        deadline = time.monotonic() + 120
        while 'id="compare-table"' not in (html := requests.get(base + "/evaluation", timeout=60).text):
            assert time.monotonic() < deadline and "cannot be" not in html, html[-3000:]
            time.sleep(0.5)
        assert "weights random (seed 1)" in html


def test_bind_address_brackets_ipv6():
    assert bind_address("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert bind_address("::1", 8000) == "[::1]:8000"


@pytest.mark.slow
def test_serve_images_answers_over_http_and_stops_cleanly(sample_index, tmp_path):
    log = tmp_path / "server.log"
    with serve_images(sample_index.index_dir, log, "--threads", "4") as base:
        query = (sample_index.data_dir / "purple_checks" / "purple_checks_000.jpg").read_bytes()
        r = requests.post(base + "/search?k=3", files={"image": ("q.jpg", query, "image/jpeg")}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["path"] == "purple_checks/purple_checks_000.jpg"
        assert r.headers["Server"].startswith("gunicorn"), "a production server, not Flask's development server"
        assert requests.get(base + "/nope", timeout=5).json()["error"]["code"] == "not_found"
        with requests.Session() as session:          # kept-alive connections: each request read ahead in turn
            assert all(session.get(base + "/healthz", timeout=5).status_code == 200 for _ in range(3))
    assert f"gallery and API at {base}/" in log.read_text()


def test_a_quit_signal_inside_the_thread_pools_lock_still_exits_the_worker():
    """Ctrl-C reaches a worker twice (the terminal's SIGINT, then the server's SIGQUIT), so one handler can run
    while the worker holds its thread pool's lock (in the first handler, or submitting a request). gthread's
    handler took that lock again and waited on itself until the server SIGKILLed the worker 10 s later ("Worker
    was sent SIGKILL! Perhaps out of memory?" on a plain Ctrl-C: twice in ten stops of `make demo` with the CPUs
    busy, and once in the full suite)."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from api.gunicorn_worker import with_read_timeout

    cfg = Config()
    worker = with_read_timeout(5)(1, os.getpid(), [], None, 30, cfg, Logger(cfg))
    worker.tpool = worker.get_thread_pool()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGALRM)}

    def blocked(_signum, _frame):
        raise TimeoutError("the quit handler blocked")
    signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, 3)
    try:
        with pytest.raises(SystemExit) as exited, worker.tpool._shutdown_lock:
            worker.handle_quit(signal.SIGQUIT, None)
        assert exited.value.code == 0
        os.kill(os.getpid(), signal.SIGQUIT)   # a second quit signal, as the server's after the terminal's: nothing
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in saved.items():
            signal.signal(s, handler)
        worker.tpool.shutdown()
        worker.tmp.close()


def test_a_worker_still_running_after_ctrl_c_writes_its_threads_stacks_before_it_is_killed():
    """serve-images' worker_int hook: a worker that has not exited a second before the server's graceful timeout
    says where each thread is (in the server's error log, its stderr), so a hang on the way out can be found."""
    hang = ("import time, commands.serve_images as s; s.GRACEFUL_TIMEOUT_S = 2; s.worker_interrupted(None)\n"
            "def stuck_on_the_way_out():\n    time.sleep(4)\nstuck_on_the_way_out()")
    result = subprocess.run([sys.executable, "-c", hang], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "most recent call first" in result.stderr and "stuck_on_the_way_out" in result.stderr, result.stderr


def _recv_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (at most limit_s seconds)."""
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.slow
def test_stalled_clients_do_not_starve_the_others_and_are_dropped_after_the_read_timeout(sample_index, tmp_path):
    read_timeout = 4
    query = (sample_index.data_dir / "purple_checks" / "purple_checks_000.jpg").read_bytes()
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + query + b"\r\n--b--\r\n")
    head = f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    stalls = {"idle": b"", "half the headers": head[:40], "half the body": head + body[:len(body) // 2]}
    log = tmp_path / "server.log"
    # 8 request threads (the default) and 10 stalled connections
    with serve_images(sample_index.index_dir, log, "--read-timeout", str(read_timeout)) as base:
        port = int(base.rsplit(":", 1)[1])
        stalled = []
        for i in range(10):
            kind = list(stalls)[i % 3]
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(stalls[kind])
            stalled.append((kind, sock))
        try:
            time.sleep(0.5)
            # answered while every stalled connection is still open: the request threads are free
            assert requests.get(base + "/healthz", timeout=read_timeout - 1).status_code == 200
            r = requests.post(base + "/search?k=3", files={"image": ("q.jpg", query, "image/jpeg")},
                              timeout=read_timeout - 1)
            assert r.status_code == 200 and r.json()["results"][0]["path"] == "purple_checks/purple_checks_000.jpg"
            for kind, sock in stalled:
                answer = _recv_until_closed(sock, read_timeout + 5)   # a timeout here fails the test
                if kind == "idle":
                    assert answer == b"", answer
                else:   # a partial request is answered 408, then closed
                    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer, (kind, answer)
        finally:
            for _, sock in stalled:
                sock.close()
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
    output = log.read_text()
    assert "Traceback" not in output and "unhandled error" not in output, output


@pytest.mark.slow
def test_a_body_dripped_slower_than_the_minimum_rate_is_408_and_others_get_in(sample_index, tmp_path):
    """Reproduces: 70 connections each sending a byte of a 28 KB body every 2 s were never timed out (each byte
    restarted the read timeout) and held all 64 connections a worker takes: a new client waited 17.8 s or timed out.
    A body must come at api.gunicorn_worker.MIN_BODY_RATE (500) bytes/s on average now."""
    read_timeout = 2
    head = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 28000\r\n\r\n")
    with serve_images(sample_index.index_dir, tmp_path / "server.log", "--read-timeout", str(read_timeout)) as base:
        port = int(base.rsplit(":", 1)[1])
        drips = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(70)]
        try:
            for sock in drips:
                sock.sendall(head)
            started, answered = time.monotonic(), {}
            while len(answered) < len(drips) and time.monotonic() - started < read_timeout + 20:
                for i, sock in enumerate(drips):      # a byte every 0.25 s each: 4 bytes/s, far under the minimum
                    if i not in answered:
                        try:
                            sock.sendall(b"x")
                        except OSError:
                            answered[i] = time.monotonic() - started
                time.sleep(0.25)
            assert len(answered) == len(drips), f"{len(answered)} of {len(drips)} closed"
            assert max(answered.values()) < read_timeout + 8, answered
            fresh = requests.get(base + "/healthz", timeout=5)    # a new connection gets in at once
            assert fresh.status_code == 200
        finally:
            for sock in drips:
                sock.close()


@pytest.mark.slow
def test_flask_cli_finds_the_app_factory(sample_index):
    env = {**os.environ, "RETRIEVAL_INDEX_DIR": str(sample_index.index_dir), "RETRIEVAL_RELOAD_INTERVAL_S": "0"}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "api", "routes"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for route in ("/search", "/images/<image_id:image_id>/neighbours", "/stats", "/healthz", "/gallery/<image_id:image_id>"):
        assert route in result.stdout


@pytest.mark.slow
def test_a_port_in_use_is_one_clear_line_naming_the_way_out(sample_index):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*SERVE, "--index-dir", str(sample_index.index_dir), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"Error: port {port} is in use on 127.0.0.1: pass --port (or SERVE_IMAGES_PORT), "
                                     "or DEMO_PORT for make demo")


@pytest.mark.parametrize("option, value", [("--ef-search", "2000000000"), ("--nprobe", "0"), ("--ef-search", "-1"),
                                           ("--read-timeout", "nan"), ("--read-timeout", "inf")])
def test_search_settings_out_of_their_bounds_are_refused_before_the_server_starts(tmp_path, option, value):
    result = CliRunner().invoke(main, ["--index-dir", str(tmp_path), option, value])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output
    assert "is not in the range" in result.output or "is not a finite number" in result.output


def test_the_app_refuses_search_settings_out_of_their_bounds(tmp_path):
    from api.service import ServiceConfig
    from api.settings import DEFAULTS

    with pytest.raises(ValueError, match="RETRIEVAL_EF_SEARCH must be a whole number from 0 to 100000, not 2000000000"):
        ServiceConfig.from_mapping({**DEFAULTS, "INDEX_DIR": str(tmp_path), "EF_SEARCH": 2_000_000_000})


@pytest.mark.parametrize("variable, value, said", [
    ("RETRIEVAL_MAX_K", "abc", "RETRIEVAL_MAX_K must be a whole number of at least 1, not 'abc'"),
    ("RETRIEVAL_GALLERY_PAGE_SIZE", "abc", "RETRIEVAL_GALLERY_PAGE_SIZE must be a whole number of at least 1, not 'abc'"),
    ("RETRIEVAL_MAX_K", "0", "RETRIEVAL_MAX_K must be a whole number of at least 1, not 0"),
    ("RETRIEVAL_MMAP", "flase", "RETRIEVAL_MMAP must be true or false, not 'flase'"),
    ("RETRIEVAL_MAX_UPLOAD_MB", "20MB", "RETRIEVAL_MAX_UPLOAD_MB must be a number of at least 0.001, not '20MB'"),
    ("RETRIEVAL_RELOAD_INTERVAL_S", "-1", "RETRIEVAL_RELOAD_INTERVAL_S must be a number of at least 0, not -1"),
    ("RETRIEVAL_DEFAULT_K", "500", "RETRIEVAL_DEFAULT_K (500) must not be more than RETRIEVAL_MAX_K (100)"),
    # nan passed every bound: the workers failed to boot (MAX_UPLOAD_MB), or a healthy server answered every search
    # 503 (QUERY_TIMEOUT_S) or 500 (DECODE_TIMEOUT_S=inf)
    ("RETRIEVAL_MAX_UPLOAD_MB", "nan", "RETRIEVAL_MAX_UPLOAD_MB must be a number of at least 0.001, not 'nan'"),
    ("RETRIEVAL_QUERY_TIMEOUT_S", "nan", "RETRIEVAL_QUERY_TIMEOUT_S must be a number of at least 0.001, not 'nan'"),
    ("RETRIEVAL_DECODE_TIMEOUT_S", "inf", "RETRIEVAL_DECODE_TIMEOUT_S must be a number of at least 0.001, not 'inf'"),
])
def test_a_wrong_setting_is_refused_before_the_server_starts_naming_its_variable(sample_index, variable, value, said,
                                                                                monkeypatch):
    """Reproduces: RETRIEVAL_MAX_K=abc started a healthy server whose every search answered 500; GALLERY_PAGE_SIZE=abc
    failed every gallery page; MMAP=flase was taken for true; MAX_UPLOAD_MB=20MB and RELOAD_INTERVAL_S=-1 were refused
    without the variable's name. One line now, exit 2, before any worker; the app refuses them alike."""
    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--port", "1"], env={variable: value})
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == f"Error: {said}", result.output
    from api import create_app

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(said)):
        create_app({"INDEX_DIR": str(sample_index.index_dir)})


def test_a_misspelt_variable_is_named_with_the_one_meant(sample_index):
    """Reproduces: RETRIEVAL_DB_ULR=postgresql://... was ignored without a word and the command said there was no
    index in the folder (it had used SQLite); SERVE_IMAGES_PORTT and RETRIEVAL_RELOAD_INTERVAL likewise."""
    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--print-config"],
                                env={"RETRIEVAL_DB_ULR": "postgresql://x@127.0.0.1/photos", "SERVE_IMAGES_PORTT": "9",
                                     "RETRIEVAL_RELOAD_INTERVAL": "3", "RETRIEVAL_MAX_K": "50"})
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: RETRIEVAL_DB_ULR is set, but no command reads it (did you mean RETRIEVAL_DB_URL?)",
        "warning: RETRIEVAL_RELOAD_INTERVAL is set, but no command reads it (did you mean RETRIEVAL_RELOAD_INTERVAL_S?)",
        "warning: SERVE_IMAGES_PORTT is set, but serve-images has no option it names (did you mean SERVE_IMAGES_PORT?)"]


def test_an_option_with_a_retrieval_variable_reads_only_that_one(sample_index, tmp_path):
    """Reproduces: SERVE_IMAGES_DEVICE=cuda was warned about as unread, then used (and --print-config credited it to
    RETRIEVAL_DEVICE, which was not set); INDEX_IMAGES_INDEX_DIR likewise wrote an index where the warning said it
    would not (click reads PREFIX_NAME for an option even when it has its own variable)."""
    from commands.index_images import main as index_images

    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--print-config"],
                                env={"SERVE_IMAGES_DEVICE": "cuda", "SERVE_IMAGES_NPROBE": "7"})
    assert result.exit_code == 0, result.output
    assert "warning: SERVE_IMAGES_DEVICE is set, but --device reads RETRIEVAL_DEVICE: set that instead" in result.output
    assert "warning: SERVE_IMAGES_NPROBE is set, but --nprobe reads RETRIEVAL_NPROBE: set that instead" in result.output
    device = next(line for line in result.stdout.splitlines() if line.startswith("--device"))
    assert device.split()[1:] == ["cpu", "default"], device

    elsewhere = tmp_path / "elsewhere"
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(index_images, [str(sample_index.data_dir), "--weights", "random", "--workers", "0"],
                               env={"INDEX_IMAGES_INDEX_DIR": str(elsewhere)})
        assert result.exit_code == 0, result.output
        assert "INDEX_IMAGES_INDEX_DIR is set, but --index-dir reads RETRIEVAL_INDEX_DIR" in result.output
        assert Path("index", "catalog.db").is_file() and not elsewhere.exists()

    # the other way round: RETRIEVAL_DEVICE=cuda search-images ran on the CPU without a word (the server's variable)
    from commands.search_images import main as search_images

    query = str(sample_index.data_dir / "red_circles" / "red_circles_000.jpg")
    result = CliRunner().invoke(search_images, [query, "--index-dir", str(sample_index.index_dir), "-k", "1"],
                                env={"RETRIEVAL_DEVICE": "cuda"})
    assert result.exit_code == 0 and ("warning: RETRIEVAL_DEVICE is set, but it is the server's (serve-images); "
                                      "search-images reads SEARCH_IMAGES_DEVICE") in result.output, result.output


def test_a_wrong_value_in_an_option_variable_names_the_variable(sample_index):
    """Reproduces: SEARCH_IMAGES_K=abc said "Invalid value for '-k'", though no -k was typed (the docs promise the
    variable's name); INDEX_IMAGES_BATCH_SIZE=abc likewise."""
    from commands.index_images import main as index_images
    from commands.search_images import main as search_images

    query = str(next(sample_index.data_dir.rglob("*.jpg")))
    for command, args, variable, said in (
            (search_images, [query, "--index-dir", str(sample_index.index_dir)], "SEARCH_IMAGES_K",
             "Error: Invalid value for SEARCH_IMAGES_K (the environment's -k): 'abc' is not a valid integer range."),
            (index_images, [str(sample_index.data_dir)], "INDEX_IMAGES_BATCH_SIZE",
             "Error: Invalid value for INDEX_IMAGES_BATCH_SIZE (the environment's --batch-size): 'abc' is not a whole "
             "number or 'auto'")):
        result = CliRunner().invoke(command, args, env={variable: "abc"})
        assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == said, result.output
    typed = CliRunner().invoke(search_images, [query, "-k", "abc"], env={"SEARCH_IMAGES_K": "3"})
    assert "Invalid value for '-k'" in typed.output, "typed: the option's own name"


def test_variables_that_docker_compose_or_the_tests_read_are_not_called_misspelt(sample_index):
    """Reproduces: CI exports RETRIEVAL_REQUIRE_BROWSER=1 (and a docker-compose user RETRIEVAL_DATA=...), and every
    command warned that no command reads them, which also broke 24 tests that expect one line of output."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [root / "docker-compose.yml", root / ".ci" / "run", *sorted((root / "tests").rglob("*.py"))]
    read = set()
    for source in sources:
        text = source.read_text()
        read |= set(re.findall(r"\$\{(RETRIEVAL_[A-Z_]+)", text))                          # compose interpolation
        read |= set(re.findall(r"environ(?:\.get\(|\[)\s*\"(RETRIEVAL_[A-Z_]+)\"", text))    # os.environ reads
        read |= set(re.findall(r"_ENV = \"(RETRIEVAL_[A-Z_]+)\"", text))
    assert {"RETRIEVAL_DATA", "RETRIEVAL_REQUIRE_BROWSER", "RETRIEVAL_UPDATE_SNAPSHOTS"} <= read   # the scan works
    others = {name: None for name in os.environ if name.startswith("RETRIEVAL_") and name not in read}   # unset
    result = CliRunner().invoke(main, ["--index-dir", str(sample_index.index_dir), "--print-config"],
                                env={**others, **{name: "1" for name in read}})
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("warning:")] == []
