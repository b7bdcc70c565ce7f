"""The Dockerfile and docker-compose.yml, built and run for real: index a folder in a one-shot job, serve it, search it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from helpers.servers import free_port
from retrieval.samples import make_sample_collection

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "docker" / "build-images.sh"   # base image (cached by content), then docker-compose build
IMAGE = "cnn-image-retrieval:latest"        # docker-compose.yml's image name
HEALTHY_WITHIN_S = 300                      # start_period 120 s + a few checks, on a busy machine


def docker_unavailable() -> str | None:
    """Why this machine cannot run the test, or None when it can."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io docker-compose debootstrap)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        return f"the Docker daemon does not answer (start dockerd as root): {info.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def docker() -> None:
    """Skips without a working Docker; fails instead when RETRIEVAL_REQUIRE_DOCKER=1 (CI)."""
    reason = docker_unavailable()
    if reason is not None:
        if os.environ.get("RETRIEVAL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"RETRIEVAL_REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(reason)


def run(cmd: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
                    f"\n--- stderr\n{result.stderr[-5000:]}")
    return result


def image_id(name: str) -> str | None:
    result = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


class Compose:
    """docker-compose on the repository's compose file, as its own project with its own data folder and port."""

    def __init__(self, data_dir: Path, port: int):
        self.project = f"retrieval-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "RETRIEVAL_DATA": str(data_dir), "RETRIEVAL_PORT": str(port)}
        self.env.pop("RETRIEVAL_DB_URL", None)   # SQLite in the index volume

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker-compose", "-p", self.project, "--profile", "index", *args], timeout, self.env, check)

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", "--tail", "60", service, check=False).stdout


@pytest.fixture(scope="module")
def built_image(docker) -> str:
    """The base image (built locally by the repository's script, cached by content), then `docker-compose build`.

    The script holds a lock while it builds: in CI, .ci/run started it in the background before the suite, so this
    waits for that build and then finds every layer cached."""
    run(["bash", str(BUILD_SCRIPT)], timeout=3600)
    built = image_id(IMAGE)
    assert built is not None, f"docker-compose build did not tag {IMAGE}"
    return built


@pytest.fixture
def deployment(built_image, tmp_path):
    """A compose project over a small generated collection; always taken down with its volumes."""
    data = tmp_path / "data"
    files = make_sample_collection(data, per_class=3, size=(128, 96), seed=7)
    compose = Compose(data, free_port())
    try:
        yield compose, data, files
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300, check=False)


def wait_healthy(compose: Compose, container: str) -> None:
    start = time.monotonic()
    status = "?"
    while time.monotonic() - start < HEALTHY_WITHIN_S:
        status = run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container], 30).stdout.strip()
        if status == "healthy":
            return
        if status == "unhealthy":
            break
        time.sleep(2)
    pytest.fail(f"the api container is {status} after {time.monotonic() - start:.0f} s\n{compose.logs('api')}")


def test_index_job_then_api_in_containers(deployment):
    compose, data, files = deployment
    port = int(compose.env["RETRIEVAL_PORT"])

    # The indexer as a one-shot job (the GPU-free variant of the same service), on CPU.
    indexed = compose("run", "--rm", "-T", "indexer-cpu", "index-images", "/data", "--weights", "random",
                      "--device", "cpu", "--json", timeout=900)
    summary = json.loads(indexed.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == len(files) and summary["skipped"] == [], summary

    # The job runs unprivileged and cannot write to the photos.
    job_user = compose("run", "--rm", "-T", "indexer-cpu", "sh", "-c",
                       "id -u; touch /data/written-by-the-job 2>&1 || echo refused").stdout
    uid, refusal = job_user.strip().splitlines()[0], job_user
    assert uid.isdigit() and int(uid) != 0, job_user
    assert "Read-only file system" in refusal and "refused" in refusal, refusal
    assert not (data / "written-by-the-job").exists()

    # The API: up, healthy, answering through the port published on 127.0.0.1.
    compose("up", "-d", "api")
    api = compose.container("api")
    wait_healthy(compose, api)
    query = files[4]
    with open(query, "rb") as f:
        response = requests.post(f"http://127.0.0.1:{port}/search", files={"image": (query.name, f, "image/jpeg")},
                                 data={"k": "3"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == 3, body
    best = body["results"][0]
    assert best["path"] == query.relative_to(data).as_posix() and best["distance"] < 1e-3, body
    assert body["index"]["count"] == len(files), body["index"]
    assert body["predicted_label"]["label"] == query.parent.name, body

    # Every process in the API container runs as a non-root user; /data is a read-only mount.
    top = run(["docker", "top", api, "-eo", "pid,uid,args"], 30).stdout.splitlines()[1:]
    assert len(top) >= 2 and all(line.split()[1] != "0" for line in top), top   # gunicorn's arbiter and worker(s)
    mounts = json.loads(run(["docker", "inspect", "-f", "{{json .Mounts}}", api], 30).stdout)
    data_mount = [m for m in mounts if m["Destination"] == "/data"]
    assert data_mount and data_mount[0]["RW"] is False, mounts
    touch = run(["docker", "exec", api, "touch", "/data/written-by-the-api"], 60, check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch
    assert not (data / "written-by-the-api").exists()

    # Published on the loopback interface only.
    ports = json.loads(run(["docker", "inspect", "-f", "{{json .NetworkSettings.Ports}}", api], 30).stdout)
    assert [b["HostIp"] for b in ports["8000/tcp"]] == ["127.0.0.1"], ports

