"""Benchmark: how long `docker build` of the project image takes, cold and after typical edits, and how big it is.

Builds a copy of the build context (so the checkout is never edited) under the tag
cnn-image-retrieval:bench and times: a rebuild with nothing changed, one after a source edit, and
one after a pyproject.toml edit that leaves the dependencies alone (both must reuse the ~6 GB
dependency layer); each the median of --runs runs. With --cold it first removes the bench image and
cnn-image-retrieval:latest (their layers are the cache), and with --cold-base also the base image (rebuilt by docker/build-base-image.sh),
and times one cold build of each: what a fresh CI machine pays. Prints a table and saves JSON under
benchmarks/results/. Needs a running Docker daemon (as root for --cold-base).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TAG = "cnn-image-retrieval:bench"
BASE = "python:3.11-slim-bookworm"
CONTEXT = ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "retrieval", "indexer", "api", "commands"]


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def remove_if_untagged(image: str) -> None:
    """Remove an image that no tag names any more (a replaced build); one still tagged elsewhere stays."""
    tags = subprocess.run(["docker", "image", "inspect", "-f", "{{len .RepoTags}}", image], capture_output=True, text=True)
    if tags.returncode == 0 and tags.stdout.strip() == "0":
        subprocess.run(["docker", "image", "rm", image], capture_output=True)


def image_id(name: str) -> str | None:
    result = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def build(context: Path) -> float:
    """One `docker build`; the image it replaces under TAG is removed so runs don't pile up."""
    before = image_id(TAG)
    seconds = timed(["docker", "build", "-t", TAG, str(context)])
    if before is not None and before != image_id(TAG):
        remove_if_untagged(before)
    return seconds


def append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time one build from an empty build cache")
    parser.add_argument("--cold-base", action="store_true", help="and rebuild the base image first (root)")
    args = parser.parse_args()

    rows: dict[str, float] = {}
    if args.cold_base:
        subprocess.run(["docker", "image", "rm", "-f", BASE], capture_output=True)
        rows["base image, cold (debootstrap)"] = timed(["bash", str(ROOT / "docker" / "build-base-image.sh")])
    else:
        timed(["bash", str(ROOT / "docker" / "build-base-image.sh")])
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        for name in CONTEXT:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, context / name)
        if args.cold:   # every image built from this Dockerfile holds the cached layers
            subprocess.run(["docker", "image", "rm", "-f", TAG, "cnn-image-retrieval:latest"], capture_output=True)
            subprocess.run(["docker", "image", "prune", "-f"], capture_output=True)
            subprocess.run(["docker", "builder", "prune", "-f"], capture_output=True)
            rows["image, cold (pip downloads torch)"] = build(context)
        else:
            build(context)
        cases = {"image, nothing changed": lambda i: None,
                 "image, after a source edit": lambda i: append(context / "api" / "__init__.py", f"# {i}\n"),
                 "image, after a pyproject.toml edit (same dependencies)":
                     lambda i: append(context / "pyproject.toml", f"# {i}\n")}
        for name, edit in cases.items():
            times = []
            for i in range(args.runs):
                edit(i)
                times.append(build(context))
            rows[name] = statistics.median(times)
    layers = subprocess.run(["docker", "history", "--format", "{{.Size}}\t{{.CreatedBy}}", TAG],
                            capture_output=True, text=True).stdout
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", TAG],
                              capture_output=True, text=True).stdout)

    print(f"{'build':58} {'seconds':>8}")
    for name, seconds in rows.items():
        print(f"{name:58} {seconds:8.1f}")
    print(f"image size: {size / 1e9:.2f} GB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"docker_build_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"seconds": rows, "runs": args.runs, "image_bytes": size, "layers": layers,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
                              indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
