"""Folders and files this user may not write or read (issue 20): every command says so in one line with exit 2, never
a PermissionError traceback; an index this user may only read is searched, evaluated and served.

The tests run as root in CI, whom permissions do not bind: each command runs as an unprivileged user
(helpers.unprivileged: nobody, or root without capabilities where this Python is root's alone)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from helpers.servers import free_port, serve_images
from helpers.unprivileged import as_nobody, shared_folder, someone_elses, unprivileged
from retrieval.catalog import CATALOG_FILE
from retrieval.names import random_weights_file
from retrieval.samples import make_sample_collection

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HOME": "/"}
COMMANDS = {"index-images": "commands.index_images:index_images_entry",
            "search-images": "commands.search_images:search_images_entry",
            "evaluate-index": "commands.evaluate_index:evaluate_index_entry", "fine-tune": "commands.fine_tune:fine_tune_entry",
            "serve-images": "commands.serve_images:main"}

pytestmark = pytest.mark.slow   # every check is a command run as a process


def run(command: str, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The console script run as an unprivileged user, from / (a folder anyone may enter)."""
    module, function = COMMANDS[command].split(":")
    cmd = [sys.executable, "-c", f"from {module} import {function} as main; main()", *map(str, args)]
    return subprocess.run(unprivileged(cmd), capture_output=True, text=True, env=ENV, cwd="/", timeout=timeout)


def one_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one line a refused command prints (exit code, no traceback)."""
    assert done.returncode == code, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def work():
    """A folder anyone may read, with a sample collection and its index (built as the tests' own user)."""
    from helpers.indexes import build_index

    folder = shared_folder()
    make_sample_collection(folder / "data", per_class=2, size=(96, 72), seed=4)
    build_index(folder / "data", folder / "index")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    subprocess.run(["chmod", "-R", "u+rwX", str(folder)], check=False)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def locked(work, request) -> Path:
    """A folder this user may enter and read but not write in (another user's)."""
    folder = work / f"locked-{request.node.name}"
    folder.mkdir()
    return someone_elses(folder, 0o444)


def copy_of_index(work: Path, name: str) -> Path:
    copy = work / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(work / "index", copy)
    return copy


def test_index_images_where_this_user_may_not_make_the_index_folder(work, locked):
    """Reproduces: index-images --index-dir DIR, DIR's parent (or a folder above a missing parent) not writable: a
    PermissionError traceback. Now one line naming the folder, exit 2 (as for a read-only index folder)."""
    for index_dir in (locked / "index", locked / "missing" / "index"):
        line = one_line(run("index-images", work / "data", "--index-dir", index_dir, "--weights", "random"))
        assert line == (f"Error: cannot make the index folder {index_dir}: this user may not write in {locked}; "
                        "change its permissions or pass another --index-dir")


def test_fine_tune_out_where_this_user_may_not_write(work, locked):
    line = one_line(run("fine-tune", work / "data", "--out", locked / "sub" / "tuned.pt", "--weights", "random",
                        "--epochs", "1"))
    assert line.startswith(f"Error: --out {locked / 'sub' / 'tuned.pt'}: the folder {locked} is read-only for this user")


def test_an_index_this_user_may_only_read_is_searched_evaluated_and_served(work, tmp_path):
    """Another user's index (say, kept up to date by a service account): before, search-images and evaluate-index
    died with SQLite's 'attempt to write a readonly database' traceback and serve-images refused to start."""
    index = someone_elses(copy_of_index(work, "read-only-index"), 0o444)
    query = sorted((work / "data").rglob("*.jpg"))[3]

    found = run("search-images", query, "--index-dir", index, "-k", "3", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    first = json.loads(found.stdout)["results"][0]
    assert first["path"] == query.relative_to(work / "data").as_posix() and first["distance"] < 1e-3, found.stdout
    evaluated = run("evaluate-index", "--index-dir", index, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    line = one_line(run("index-images", work / "data", "--index-dir", index))
    assert line.startswith(f"Error: the index folder {index} is read-only: this user may not write in it")

    with serve_images(index, tmp_path / "serve.log", run_as=unprivileged) as base:
        with query.open("rb") as f:
            answer = requests.post(f"{base}/search?k=3", files={"image": f}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["distance"] < 1e-3
        assert requests.get(f"{base}/images/1/thumbnail", timeout=60).status_code == 200
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("unreadable", ["catalog", "weights"])
def test_an_index_file_this_user_may_not_read_is_one_line(work, unreadable):
    """A catalog or weights file of another user's that this user may not read: one line naming it, exit 2, from
    every command that needs it (serve-images used to end in gunicorn's 'Worker failed to boot')."""
    index = copy_of_index(work, f"unreadable-{unreadable}")
    path = index / CATALOG_FILE if unreadable == "catalog" else random_weights_file(index, "alexnet")
    someone_elses(path, 0)
    query = sorted((work / "data").rglob("*.jpg"))[0]
    runs = {"search-images": run("search-images", query, "--index-dir", index),
            "serve-images": run("serve-images", "--index-dir", index, "--port", str(free_port()), timeout=120)}
    if unreadable == "catalog":
        runs["evaluate-index"] = run("evaluate-index", "--index-dir", index)
        runs["index-images"] = run("index-images", work / "data", "--index-dir", index)
    for command, done in runs.items():
        line = one_line(done)
        assert str(path) in line and "this user may not read" in line, (command, line)   # index-images said "write"


def test_check_on_an_index_whose_lock_file_this_user_may_not_read_says_it_cannot_tell(work):
    """Another user's index whose lock file is theirs alone (umask 077): --check cannot tell whether their run is
    going, and says so (a review: treating it as free would check a FAISS file that lags its commits)."""
    index = someone_elses(copy_of_index(work, "private-lock"), 0o444)
    if not (index / ".lock").exists():
        (index / ".lock").touch()
    someone_elses(index / ".lock", 0)
    line = one_line(run("index-images", work / "data", "--index-dir", index, "--check"))
    assert line == (f"Error: cannot tell whether an index-images run is updating {index}: its lock file .lock is not "
                    "readable by this user; check as the index's owner, or when no run is going"), line


def test_a_refused_replace_names_the_file_replaced_and_for_root_what_refuses_it(tmp_path):
    """Reproduces (root, `chattr +i vectors.faiss`, then a run with one new image): the message named the hidden
    temporary file, gone by then, and said to change permissions, which do not bind root. Now it names vectors.faiss
    and, for root, what does refuse it."""
    import errno

    from commands.options import permission_denied

    tmp, target = tmp_path / ".vectors.faiss.123.456.tmp", tmp_path / "vectors.faiss"
    renamed = PermissionError(errno.EPERM, "Operation not permitted", str(tmp), None, str(target))
    assert permission_denied(renamed).startswith(f"permission denied: this user may not read or write {target}")
    written = PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert f"may not read or write {target}" in permission_denied(written)
    assert ("an immutable or append-only attribute" in permission_denied(renamed)) == (os.geteuid() == 0)


def test_a_class_folder_this_user_may_not_list_keeps_its_images_and_is_named(work):
    """Reproduces (a class folder made unreadable, a share's subfolder that fails to list): 'removed 10' and nothing
    more, its images gone from the index; only -v logged why. Now its images stay and a line says why; a data folder
    that cannot be listed at all changes nothing, exit 2 (click's check; the library says so too: run_index)."""
    folder = work / "unlisted"
    shutil.copytree(work / "data", folder / "data")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if as_nobody():
        someone_elses(folder, 0o644)    # the unprivileged user makes and updates the index here
    first = run("index-images", folder / "data", "--index-dir", folder / "index", "--weights", "random", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["total"] == len(list((folder / "data").rglob("*.jpg")))
    shut = sorted(p for p in (folder / "data").iterdir() if p.is_dir())[0]
    someone_elses(shut, 0)

    again = run("index-images", folder / "data", "--index-dir", folder / "index")
    assert again.returncode == 0, again.stderr[-3000:]
    total = json.loads(first.stdout)["total"]
    assert again.stdout.startswith(f"indexed 0, unchanged {total}, removed 0, skipped 0; {total} images"), again.stdout
    assert (f"  folder left out: {shut.name}/: cannot be listed: Permission denied; the 2 images indexed from it stay "
            "in the index as they were\n") in again.stdout

    someone_elses(folder / "data", 0)
    refused = run("index-images", folder / "data", "--index-dir", folder / "index")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"Directory '{folder / 'data'}' is not readable" in refused.stderr
    script = ("import sys\nfrom indexer import index_folder\n"
              "try:\n    index_folder(sys.argv[1], sys.argv[2])\nexcept ValueError as exc:\n    print(exc)")
    from_python = subprocess.run(unprivileged([sys.executable, "-c", script, str(folder / "data"), str(folder / "index")]),
                                 capture_output=True, text=True, env=ENV, cwd="/", timeout=300)
    assert from_python.stdout == (f"the data folder {folder / 'data'} cannot be listed: Permission denied: nothing was "
                                  "changed; run index-images as a user who may read it\n"), from_python.stderr[-3000:]


def test_a_file_made_readable_again_is_indexed_on_the_next_run(work):
    """Reproduces: a photo skipped as 'cannot read file: Permission denied' stayed skipped, with that reason, after
    chmod made it readable (chmod changes neither size nor mtime, and skipped files waited for a change). A file the OS
    would not read is tried on every run now; a file that would not decode still waits for a change."""
    folder = work / "readable-again"
    shutil.copytree(work / "data", folder / "data")
    (folder / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if as_nobody():
        someone_elses(folder, 0o644)
    photo = sorted((folder / "data").rglob("*.jpg"))[-1]
    assert photo.name != "broken.jpg"
    photo_mode, owner = photo.stat().st_mode, (photo.stat().st_uid, photo.stat().st_gid)
    someone_elses(photo, 0)
    first = run("index-images", folder / "data", "--index-dir", folder / "index", "--weights", "random", "--json")
    skipped = {s["path"]: s["reason"] for s in json.loads(first.stdout)["skipped"]}
    rel = photo.relative_to(folder / "data").as_posix()
    assert skipped[rel] == "cannot read file: Permission denied", skipped
    os.chown(photo, *owner)
    photo.chmod(photo_mode)
    again = run("index-images", folder / "data", "--index-dir", folder / "index", "--json")
    summary = json.loads(again.stdout)
    assert summary["indexed"] == 1 and [s["path"] for s in summary["skipped"]] == ["broken.jpg"], summary
