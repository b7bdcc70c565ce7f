"""A full disk and read-only folders (issue 20): index-images says so in one line (no traceback) and a re-run after
freeing space completes; the server serves thumbnails it cannot cache from memory and starts on a read-only index
folder; fine-tune checks --out's folder before training. Small tmpfs file systems stand in for a full or read-only
disk (root only: skipped with the reason when mounting is not permitted)."""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.fine_tune import main as fine_tune
from commands.index_images import main as index_images
from helpers.filesystems import fill, read_only_view, remount_read_only, tmpfs
from helpers.indexes import snapshot
from helpers.unprivileged import shared_folder
from retrieval.files import FULL, READ_ONLY, disk_trouble, mount_of, no_space_message
from retrieval.names import FAISS_FILE, random_weights_file
from retrieval.samples import make_sample_collection

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("full-disk") / "data"
    make_sample_collection(data, per_class=6, size=(160, 120), seed=3)
    return data


def test_disk_trouble_is_recognised_wherever_it_surfaces():
    """ENOSPC, SQLite's 'database or disk is full' through SQLAlchemy, torch's writer RuntimeError around an ENOSPC,
    EROFS and SQLite's readonly database: each is told; anything else is not."""
    import sqlite3

    from sqlalchemy.exc import OperationalError
    assert disk_trouble(OSError(errno.ENOSPC, "No space left on device")) == FULL
    full_db = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))
    assert disk_trouble(full_db) == FULL
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from exc
    except RuntimeError as wrapped:
        assert disk_trouble(wrapped) == FULL
    assert disk_trouble(RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")) == FULL
    assert disk_trouble(OSError(errno.EROFS, "Read-only file system")) == READ_ONLY
    ro_db = OperationalError("INSERT ...", {}, sqlite3.OperationalError("attempt to write a readonly database"))
    assert disk_trouble(ro_db) == READ_ONLY
    assert disk_trouble(ValueError("bad value")) is None
    assert disk_trouble(OSError(errno.ENOENT, "No such file")) is None


def test_no_space_message_names_the_device_and_what_to_free(tmp_path):
    with tmpfs(tmp_path / "fs", "4m") as fs:
        assert mount_of(fs) == ("tmpfs", str(fs))
        line = no_space_message(fs / "index", needed_bytes=2 * 2**20)
        assert line.startswith(f"no space left on tmpfs (mounted on {fs}) for {fs / 'index'}: free about ")
        assert line.endswith("and run again; nothing was lost")
        # more than the whole file system holds: freeing space cannot do it (a 30 MB disk was told to free 213 MB)
        line = no_space_message(fs / "index", needed_bytes=20 * 2**20)
        assert line == (f"no space left on tmpfs (mounted on {fs}) for {fs / 'index'}: it holds 4.0 MB in all, less "
                        "than the about 20 MB the run needs; pass an --index-dir on a larger disk (nothing was lost)")


def _assert_one_line_no_traceback(result, code: int, start: str) -> str:
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, text
    return lines[0]


def test_random_weights_on_a_full_disk_say_how_much_to_free(tmp_path, collection):
    """Reproduces: torch's RuntimeError when the random weights (233 MB) cannot be written on a 40 MB file system."""
    with tmpfs(tmp_path / "fs") as fs:
        result = CliRunner().invoke(index_images, [str(collection), "--index-dir", str(fs / "index"),
                                                   "--weights", "random", "--workers", "0", "--batch-size", "8"])
        line = _assert_one_line_no_traceback(result, 1, "error: no space left on tmpfs")
        assert f"for {fs / 'index'}: it holds 40.0 MB in all, less than the about " in line
        assert int(line.split("less than the about ")[1].split(" MB")[0]) >= 200    # the weights need ~233 MB
        assert line.endswith("pass an --index-dir on a larger disk (nothing was lost)")
        assert leftovers(fs) == []
        assert not random_weights_file(fs / "index", "alexnet").exists()


# 48 KB: the catalog's commit fails (SQLite 'database or disk is full'); 900 KB: the FAISS save (inside FAISS's
# writer); 160 and 400 KB: the FAISS save's temporary file
@pytest.mark.parametrize("leave_kb", [48, pytest.param(160, marks=pytest.mark.slow),
                                      pytest.param(400, marks=pytest.mark.slow), 900])
def test_full_disk_mid_run_then_a_rerun_after_freeing_space_completes(tmp_path, collection, sample_index, leave_kb):
    """Reproduces: OSError Errno 28 / 'database or disk is full' tracebacks when the catalog's commit (on the writer
    thread) or the FAISS save runs out of space, at several points of a run. After the ballast is deleted the same
    command completes: every image indexed, catalog and FAISS agree, no temporary file left."""
    weights = random_weights_file(sample_index.index_dir, "alexnet")   # outside the small file system
    args = [str(collection), "--weights", str(weights), "--workers", "0", "--batch-size", "8"]
    with tmpfs(tmp_path / "fs", "8m") as fs:
        index_dir = fs / "index"
        ballast = fill(fs, leave_kb * 1024)
        result = CliRunner().invoke(index_images, [*args, "--index-dir", str(index_dir)])
        if result.exit_code == 0:
            pytest.skip(f"{leave_kb} KB was enough for the whole index here")   # the others cover the failure
        line = _assert_one_line_no_traceback(result, 1, "error: no space left on tmpfs")
        assert line.endswith("and run again; nothing was lost")
        assert leftovers(fs) == []
        ballast.unlink()
        again = CliRunner().invoke(index_images, [*args, "--index-dir", str(index_dir)])
        assert again.exit_code == 0, again.output
        assert len(snapshot(index_dir)) == 30
        assert (index_dir / FAISS_FILE).is_file()
        assert leftovers(fs) == []


def test_read_only_index_folder_is_one_line_exit_2(tmp_path, collection, sample_index):
    """Reproduces: a raw OSError Errno 30 traceback from index-images on a read-only index folder (an existing index
    and a folder still to be made)."""
    with tmpfs(tmp_path / "fs", "8m") as fs:
        weights = random_weights_file(sample_index.index_dir, "alexnet")
        args = [str(collection), "--weights", str(weights), "--workers", "0", "--batch-size", "8"]
        built = CliRunner().invoke(index_images, [*args, "--index-dir", str(fs / "index")])
        assert built.exit_code == 0, built.output
        remount_read_only(fs)
        for index_dir in (fs / "index", fs / "new-index"):
            result = CliRunner().invoke(index_images, [*args, "--index-dir", str(index_dir)])
            line = _assert_one_line_no_traceback(result, 2, "Error: the index folder")
            assert line.startswith(f"Error: the index folder {index_dir} is read-only: "), line


def test_fine_tune_checks_out_folder_before_training(tmp_path, collection):
    """Reproduces: fine-tune --out into a read-only folder (or one without room for the weights) trained every epoch,
    then died with a torch traceback. Now: exit 2 and one line, before training."""
    with tmpfs(tmp_path / "fs", "8m") as fs:
        common = [str(collection), "--weights", "random", "--epochs", "1", "--device", "cpu"]
        result = CliRunner().invoke(fine_tune, [*common, "--out", str(fs / "tuned.pt")])
        line = _assert_one_line_no_traceback(result, 2, "Error: --out")
        assert "no space for the weights on tmpfs" in line and "fine-tuning" not in result.output
        remount_read_only(fs)
        result = CliRunner().invoke(fine_tune, [*common, "--out", str(fs / "sub" / "tuned.pt")])
        line = _assert_one_line_no_traceback(result, 2, "Error: --out")
        assert f"the folder {fs} is read-only" in line and "fine-tuning" not in result.output


def test_fine_tune_on_a_disk_that_fills_after_its_check_says_so_in_one_line(tmp_path, collection, monkeypatch):
    """Reproduces: a disk filled by another writer after fine-tune's check before training: torch.save's
    'RuntimeError: unexpected pos' traceback, exit 1, nothing saying the disk was full."""
    import commands.fine_tune as command

    checked = command._check_out

    def check_then_fill(out, model, overwrite=False):   # another writer fills the disk once the check has passed
        checked(out, model, overwrite)
        fill(out.parent, 64 * 2**10)

    with tmpfs(tmp_path / "fs", "300m") as fs:
        monkeypatch.setattr(command, "_check_out", check_then_fill)
        result = CliRunner().invoke(fine_tune, [str(collection), "--weights", "random", "--epochs", "1", "--train",
                                                "head", "--device", "cpu", "--out", str(fs / "tuned.pt")])
        line = _assert_one_line_no_traceback(result, 1, "Error: no space left on tmpfs")
        assert f"for {fs}" in line and "the weights need about 234 MB" in line, line
        assert not (fs / "tuned.pt").exists() and leftovers(fs) == []


def _thumbnail_ok(client, image_id: int = 1) -> None:
    response = client.get(f"/images/{image_id}/thumbnail")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/jpeg" and response.data[:2] == b"\xff\xd8"
    again = client.get(f"/images/{image_id}/thumbnail", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def _upload_search_ok(client, sample_index) -> None:
    picture = next(p for p in sorted(sample_index.data_dir.rglob("*")) if p.is_file())
    response = client.post("/gallery/search", data={"image": (picture.open("rb"), picture.name)},
                           content_type="multipart/form-data")
    assert response.status_code in (302, 303), response.get_data(as_text=True)[:500]
    page = client.get(response.headers["Location"])
    assert page.status_code == 200


@pytest.mark.parametrize("odd", ["file", "read-only", "full"])
def test_thumbnails_it_cannot_cache_are_served_from_memory(tmp_path, sample_index, odd, caplog):
    """Reproduces: 500 for a thumbnail the server cannot cache (thumbnails folder replaced by a file, read-only,
    full) and a server that could not start there (the recent-queries store in that folder). Now 200 from memory,
    and uploaded searches kept in memory, said in one warning line each."""
    from api import create_app

    with tmpfs(tmp_path / "fs", "4m") as fs:
        thumbs = fs / "thumbnails"
        if odd == "file":
            thumbs.write_bytes(b"not a folder")
        elif odd == "read-only":
            remount_read_only(fs)
        else:
            fill(fs, 0)
        app = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                          "THUMBNAIL_DIR": str(thumbs)})
        try:
            client = app.test_client()
            _thumbnail_ok(client, 1)
            _thumbnail_ok(client, 2)
            _upload_search_ok(client, sample_index)
        finally:
            app.extensions["retrieval"].close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("thumbnails cannot be cached" in w for w in warnings) == 1, warnings
    assert sum("uploaded queries are kept in memory" in w for w in warnings) == 1, warnings


def test_server_starts_on_a_read_only_index_folder(tmp_path, sample_index):
    """Reproduces: create_app (serve-images) failing on a read-only index folder (thumbnails and the recent-queries
    store inside it). It starts, searches, and serves thumbnails from memory."""
    from api import create_app

    with read_only_view(sample_index.index_dir, tmp_path / "ro-index") as index_dir:
        app = create_app({"INDEX_DIR": str(index_dir), "RELOAD_INTERVAL_S": 0})
        try:
            client = app.test_client()
            assert client.get("/healthz").status_code == 200
            _thumbnail_ok(client, 1)
            _upload_search_ok(client, sample_index)
        finally:
            app.extensions["retrieval"].close()


@pytest.mark.parametrize("command", ["search-images", "evaluate-index", "find-duplicates", "serve-images",
                                     "index-images", "index-images --check"])
def test_every_command_on_an_index_whose_disk_is_full_says_so_in_one_line(tmp_path, sample_index, command):
    """Reproduces: with the index folder's disk full (SQLite cannot make its 32 KB shared-memory file beside the
    catalog), search-images, evaluate-index and find-duplicates died with an 'OperationalError: disk I/O error'
    traceback, serve-images said 'the catalog ... cannot be read: disk I/O error' and index-images 'the catalog
    database failed ... run the same command again'; index-images --check 'the catalog cannot be read: disk I/O
    error', exit 2."""
    from commands.evaluate_index import main as evaluate_index
    from commands.find_duplicates import main as find_duplicates
    from commands.search_images import main as search_images
    from commands.serve_images import main as serve_images

    query = next(sample_index.data_dir.rglob("*.jpg"))
    runs = {"search-images": (search_images, [str(query)]), "evaluate-index": (evaluate_index, []),
            "find-duplicates": (find_duplicates, []), "serve-images": (serve_images, ["--port", "1"]),
            "index-images": (index_images, [str(sample_index.data_dir)]),
            "index-images --check": (index_images, [str(sample_index.data_dir), "--check"])}
    with tmpfs(tmp_path / "fs") as fs:
        index_dir = fs / "index"   # the catalog and FAISS file on the small disk; the 233 MB weights linked
        shutil.copytree(sample_index.index_dir, index_dir, ignore=shutil.ignore_patterns("random-weights-*"))
        random_weights_file(index_dir, "alexnet").symlink_to(random_weights_file(sample_index.index_dir, "alexnet"))
        db = sqlite3.connect(index_dir / "catalog.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()                 # the last connection: -wal and -shm go, and must be made again on the full disk
        assert sorted(p.name for p in index_dir.glob("catalog.db*")) == ["catalog.db"]
        fill(fs, 0)
        entry, args = runs[command]
        result = CliRunner().invoke(entry, [*args, "--index-dir", str(index_dir)])

        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        line, = result.output.strip().splitlines()
        if command == "index-images":   # it estimates the room a run needs
            assert line.startswith(f"error: no space left on tmpfs (mounted on {fs}) for {index_dir}: free about "), line
            assert line.endswith("and run again; nothing was lost"), line
        else:
            assert line == f"Error: {no_space_message(index_dir)}", line


@pytest.mark.slow
def test_index_images_on_a_full_disk_as_a_process(tmp_path, collection):
    """The console script on a full disk: exit 1, the one line on stderr, no traceback."""
    with tmpfs(tmp_path / "fs") as fs:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run([sys.executable, "-c", "from commands.index_images import index_images_entry as e; e()",
                               str(collection), "--index-dir", str(fs / "index"), "--weights", "random",
                               "--workers", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "error: no space left on tmpfs" in done.stderr and "nothing was lost" in done.stderr
        assert leftovers(fs) == []
    shutil.rmtree(tmp_path / "fs", ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["read-only index folder", "thumbnails folder is a file"])
def test_serve_images_starts_and_serves_thumbnails(tmp_path, sample_index, where):
    """Reproduces: serve-images (gunicorn) could not start on a read-only index folder or with a file for its
    thumbnails folder ('Worker exited with code 3'). Now it starts, answers searches and serves thumbnails."""
    import requests

    from helpers.servers import serve_images

    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    picture = next(p for p in sorted(sample_index.data_dir.rglob("*")) if p.is_file())

    def check(index_dir: Path) -> None:
        with serve_images(index_dir, tmp_path / "serve.log", "--workers", "2", **env) as base:
            for image_id in (1, 2, 3):
                response = requests.get(f"{base}/images/{image_id}/thumbnail", timeout=30)
                assert response.status_code == 200 and response.content[:2] == b"\xff\xd8"
            with picture.open("rb") as f:
                found = requests.post(f"{base}/search", files={"image": f}, timeout=60)
            assert found.status_code == 200, found.text

    if where == "read-only index folder":
        with read_only_view(sample_index.index_dir, tmp_path / "ro-index") as index_dir:
            check(index_dir)
    else:
        thumbs = tmp_path / "thumbs-file"
        thumbs.write_bytes(b"not a folder")
        env["RETRIEVAL_THUMBNAIL_DIR"] = str(thumbs)
        check(sample_index.index_dir)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.postgres
def test_a_full_disk_under_a_postgresql_catalog_is_one_line_and_a_rerun_completes(tmp_path, collection, postgres):
    """The database server's disk fills mid-run (its database in a tablespace on a small tmpfs): one line naming the
    catalog database, not the index folder's disk, and nothing lost: after freeing space the same command finishes."""
    reachable = shared_folder()   # the private server runs as nobody, who cannot reach into tmp_path
    try:
        with tmpfs(reachable / "space", "16m") as space:
            os.chown(space, *_nobody_ids())
            name = f"full_{os.getpid()}"
            postgres.admin(f"CREATE TABLESPACE {name} LOCATION '{space}'")
            postgres.admin(f"CREATE DATABASE {name} TABLESPACE {name}")
            try:
                url = postgres.url(name)
                ballast = fill(space, 480 * 1024)   # the schema and a few batches fit, not 30 vectors of 16 KB
                args = [str(collection), "--db-url", url, "--index-dir", str(tmp_path / "index"), "--weights", "random",
                        "--workers", "0", "--batch-size", "4"]
                result = CliRunner().invoke(index_images, args)
                line = _assert_one_line_no_traceback(result, 1, "error: ")
                assert line.startswith("error: no space left for the catalog database postgresql://retrieval:***@"), line
                assert line.endswith("nothing was lost") and "s3cret" not in result.output, line
                ballast.unlink()
                again = CliRunner().invoke(index_images, args)
                assert again.exit_code == 0, again.output
                assert len(snapshot(tmp_path / "index", url)) == 30
            finally:
                postgres.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                postgres.admin(f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def _nobody_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def test_a_read_only_index_whose_wal_holds_commits_is_read_with_them_or_refused_with_the_reason(tmp_path, sample_index):
    """A run killed before SQLite merged its log into catalog.db leaves the commits in catalog.db-wal. Seen through a
    read-only mount, the catalog was opened immutable, which ignores the log: an older index with no word (here the
    new label missing), or 'no such table' tracebacks for a first run. Now the log is read where its -shm file lies
    beside it, and otherwise every command says why it cannot be read and what to do."""
    from commands.search_images import main as search_images
    from retrieval.catalog import CATALOG_FILE

    index = tmp_path / "index"
    shutil.copytree(sample_index.index_dir, index)
    query = next(sample_index.data_dir.rglob("*.jpg"))
    path = query.relative_to(sample_index.data_dir).as_posix()
    killed = subprocess.run([sys.executable, "-c", "import os, sqlite3, sys\n"   # as a killed run leaves it
                             "db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA wal_autocheckpoint=0')\n"
                             "db.execute('UPDATE images SET label = ? WHERE path = ?', ('relabelled', sys.argv[2]))\n"
                             "db.commit(); os._exit(0)", str(index / CATALOG_FILE), path], timeout=60)
    assert killed.returncode == 0
    assert (index / f"{CATALOG_FILE}-wal").stat().st_size > 0 and (index / f"{CATALOG_FILE}-shm").exists()
    with read_only_view(index, tmp_path / "ro") as seen:
        result = CliRunner().invoke(search_images, [str(query), "--index-dir", str(seen), "-k", "1"])
        assert result.exit_code == 0 and "relabelled" in result.output, result.output
    os.unlink(index / f"{CATALOG_FILE}-shm")   # as a copy that left it out, or a tool that removed it
    with read_only_view(index, tmp_path / "ro2") as seen:
        result = CliRunner().invoke(search_images, [str(query), "--index-dir", str(seen), "-k", "1"])
        assert result.exit_code == 2, result.output
        assert "catalog.db-wal holds commits not yet merged into catalog.db" in result.output
        assert "open the index once where it can be written" in result.output


def test_the_room_a_run_needs_counts_the_faiss_file_as_it_is_stored(tmp_path):
    """Reproduces: on an 8 MB disk holding a whitened index, an update run was told it needed about 17 MB and to move
    to a larger disk, though it ran with 1 MB free: the estimate counted 16 kB of raw fc7 per image for the new FAISS
    file, six times what a whitened one stores."""
    from commands.index_images import _space_needed
    from indexer import index_folder
    from retrieval.files import SPACE_MARGIN
    from retrieval.vectors.index_types import IndexTypeConfig

    data = tmp_path / "data"
    make_sample_collection(data, per_class=12, size=(64, 48), seed=5)
    index_folder(data, tmp_path / "index", weights="random", workers=0,
                 vector_index=IndexTypeConfig(whiten=True, whiten_dim=8))
    stored = (tmp_path / "index" / FAISS_FILE).stat().st_size
    assert stored < 60 * 4096 * 4 / 4                                   # whitened: a fraction of the raw vectors
    assert _space_needed(data, tmp_path / "index", "alexnet", "random") == SPACE_MARGIN + stored   # nothing new
