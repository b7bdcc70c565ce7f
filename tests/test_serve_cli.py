"""`serve-images` (api.cli): refuses a missing index clearly; serves the API under gunicorn; `flask --app api` works."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests
from click.testing import CliRunner

from api.cli import bind_address, main

SERVE = [sys.executable, "-c", "from api.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_index_exits_2_saying_run_index_images_first(tmp_path):
    result = CliRunner().invoke(main, ["--index-dir", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2, result.output
    assert "run index-images first" in result.output


def test_bind_address_brackets_ipv6():
    assert bind_address("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert bind_address("::1", 8000) == "[::1]:8000"


def test_serve_images_answers_over_http_and_stops_cleanly(sample_index):
    port = free_port()
    env = {**os.environ, "RETRIEVAL_RELOAD_INTERVAL_S": "0"}
    server = subprocess.Popen([*SERVE, "--index-dir", str(sample_index.index_dir), "--port", str(port), "--threads", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if requests.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "serve-images did not come up within 120 s"
            time.sleep(0.25)
        query = (sample_index.data_dir / "purple_checks" / "purple_checks_000.jpg").read_bytes()
        r = requests.post(base + "/search?k=3", files={"image": ("q.jpg", query, "image/jpeg")}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["path"] == "purple_checks/purple_checks_000.jpg"
        assert r.headers["Server"].startswith("gunicorn"), "a production server, not Flask's development server"
        assert requests.get(base + "/nope", timeout=5).json()["error"]["code"] == "not_found"
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert f"gallery and API at http://127.0.0.1:{port}/" in output


def test_flask_cli_finds_the_app_factory(sample_index):
    env = {**os.environ, "RETRIEVAL_INDEX_DIR": str(sample_index.index_dir), "RETRIEVAL_RELOAD_INTERVAL_S": "0"}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "api", "routes"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for route in ("/search", "/images/<int:image_id>/neighbours", "/stats", "/healthz", "/gallery/<int:image_id>"):
        assert route in result.stdout
