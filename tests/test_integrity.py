"""Integrity (issue 20): damaged vectors, FAISS files and catalog pages are noticed, named, and repaired or explained."""
from __future__ import annotations

import json
import logging
import sqlite3
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from commands.index_images import main as index_images
from commands.search_images import main as search_images
from retrieval.catalog import CATALOG_FILE, Catalog
from retrieval.names import FAISS_FILE
from retrieval.search.index import ImageIndex
from retrieval.vectors.vector_index import VectorIndex

from helpers.catalogs import corrupt_table_root, private_copy

FAST = ["--weights", "random", "--workers", "0", "--batch-size", "8"]


@pytest.fixture
def copy(sample_index, tmp_path):
    """A private copy of the sample index folder (its data folder shared, read-only): -> (data_dir, index_dir)."""
    return sample_index.data_dir, private_copy(sample_index.index_dir, tmp_path / "index")


def flip_vector_bytes(index_dir, image_id: int | None = None) -> tuple[int, str]:
    """Flip a few bytes of one row's vector blob in place (its checksum left as it was). -> (id, path)."""
    with sqlite3.connect(index_dir / CATALOG_FILE) as db:
        if image_id is None:
            image_id = db.execute("SELECT id FROM images ORDER BY id LIMIT 1 OFFSET 3").fetchone()[0]
        blob, path = db.execute("SELECT vector, path FROM images WHERE id = ?", (image_id,)).fetchone()
        damaged = bytearray(blob)
        for at in (0, 1, 100, 2001):
            damaged[at] ^= 0x5A
        db.execute("UPDATE images SET vector = ? WHERE id = ?", (bytes(damaged), image_id))
    return image_id, path


def run(command, args):  # noqa: ANN001, ANN201
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def test_vectors_are_written_with_their_checksum(copy):
    _, index = copy
    with sqlite3.connect(index / CATALOG_FILE) as db:
        rows = db.execute("SELECT vector, vector_crc32 FROM images").fetchall()
    assert rows and all(crc == zlib.crc32(blob) for blob, crc in rows)


def test_an_index_made_before_checksums_opens_and_check_fills_them(copy):
    data, index = copy
    with sqlite3.connect(index / CATALOG_FILE) as db:
        db.execute("ALTER TABLE images DROP COLUMN vector_crc32")   # as the catalog was before issue 20
    catalog = Catalog(index)
    try:
        assert sum(len(ids) for ids, _ in catalog.vectors()) == catalog.count()   # unchecked, all used
    finally:
        catalog.close()
    with sqlite3.connect(index / CATALOG_FILE) as db:
        assert db.execute("SELECT count(*) FROM images WHERE vector_crc32 IS NULL").fetchone()[0] == 30

    result = run(index_images, [data, "--index-dir", index, "--check", "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["vectors"]["filled"] == 30 and report["vectors"]["bad"] == []
    with sqlite3.connect(index / CATALOG_FILE) as db:
        assert db.execute("SELECT count(*) FROM images WHERE vector_crc32 IS NULL").fetchone()[0] == 0


def test_a_server_leaves_a_vector_that_fails_its_checksum_out_and_logs_it_once(copy, caplog):
    # before: the server rebuilt FAISS from the damaged blob and answered with wrong neighbours
    _, index = copy
    bad_id, _ = flip_vector_bytes(index)
    (index / FAISS_FILE).unlink()   # the server builds its vectors from the catalog
    with caplog.at_level(logging.ERROR):
        served = ImageIndex(index, load_network=False)
    try:
        assert bad_id not in served.vectors.ids().tolist()
        assert len(served) == served.catalog.count() - 1
        served.catalog.vector(bad_id)   # read again: not logged again
        assert served.catalog.vector(bad_id) is None
    finally:
        served.close()
    logged = [r for r in caplog.records if f"image {bad_id} fails its checksum" in r.getMessage()]
    assert len(logged) == 1


def test_check_names_a_damaged_vector_and_the_next_run_extracts_it_again(copy):
    data, index = copy
    bad_id, path = flip_vector_bytes(index)

    result = run(index_images, [data, "--index-dir", index, "--check"])

    assert result.exit_code == 1
    assert path in result.output and "fail their checksum" in result.output
    assert f"run index-images {data} --index-dir {index}" in result.output
    again = run(index_images, [data, "--index-dir", index, "--check", "--json"])
    assert again.exit_code == 1 and json.loads(again.output)["vectors"]["bad"] == [{"id": bad_id, "path": path}]

    rerun = run(index_images, [data, "--index-dir", index, "--json", *FAST])

    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.output.strip().splitlines()[-1])["indexed"] == 1
    assert run(index_images, [data, "--index-dir", index, "--check"]).exit_code == 0


def test_check_finds_a_faiss_file_holding_other_vectors(copy):
    data, index = copy
    vectors = VectorIndex.load(index / FAISS_FILE, 4096)
    ids = vectors.ids()
    vectors.remove(ids[:1])
    vectors.add(ids[:1], np.ones((1, 4096), np.float32))
    vectors.save(index / FAISS_FILE)

    result = run(index_images, [data, "--index-dir", index, "--check"])

    assert result.exit_code == 1
    assert "other vectors than the catalog for 1 id" in result.output and "--rebuild-index" in result.output


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_no_op_run_rebuilds_a_damaged_faiss_file_and_says_so(copy, damage):
    # before: an unchanged folder re-indexed as a no-op, exit 0, and left the FAISS file unreadable
    data, index = copy
    faiss_file = index / FAISS_FILE
    raw = faiss_file.read_bytes()
    faiss_file.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else raw[:40] + b"\x00" * 64 + raw[104:])
    assert run(index_images, [data, "--index-dir", index, "--check"]).exit_code == 1

    result = run(index_images, [data, "--index-dir", index])

    assert result.exit_code == 0, result.output
    assert "the FAISS file was not the one last recorded" in result.output and "rebuilt from the catalog" in result.output
    assert len(VectorIndex.load(faiss_file, 4096)) == 30
    assert faiss_file.read_bytes() == raw   # the catalog's vectors, as before the damage
    assert run(index_images, [data, "--index-dir", index, "--check"]).exit_code == 0


def test_a_damaged_catalog_says_what_to_do_in_index_images_and_search_images(copy, sample_index):
    # before: exit 1, "the catalog database failed: database disk image is malformed ... run the same command again"
    data, index = copy
    corrupt_table_root(index / CATALOG_FILE, "images")
    expected = f"the catalog {index / CATALOG_FILE} is damaged (database disk image is malformed): restore it from a backup"

    result = run(index_images, [data, "--index-dir", index])

    assert result.exit_code == 2
    assert expected in result.output
    assert f"re-index into a new folder: index-images {data} --index-dir NEW" in result.output
    assert "run the same command again" not in result.output

    check = run(index_images, [data, "--index-dir", index, "--check"])
    assert check.exit_code == 1 and "quick_check" in check.output and "re-index into a new folder" in check.output

    query = next(p for p in sorted(data.rglob("*")) if p.is_file())
    searched = run(search_images, [query, "--index-dir", index])
    assert searched.exit_code == 2 and expected in searched.output


@pytest.mark.parametrize("command", ["evaluate-index", "evaluate-index --copies", "find-duplicates"])
def test_a_damaged_catalog_says_what_to_do_in_the_other_commands_that_read_it(copy, command):
    """Reproduces: evaluate-index on a damaged catalog died with an SQLAlchemy DatabaseError traceback."""
    from commands.evaluate_index import main as evaluate_index
    from commands.find_duplicates import main as find_duplicates

    _, index = copy
    corrupt_table_root(index / CATALOG_FILE, "images")
    entry = find_duplicates if command == "find-duplicates" else evaluate_index
    args = ["--copies", "10"] if command.endswith("--copies") else []

    result = run(entry, [*args, "--index-dir", index])

    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        f"Error: the catalog {index / CATALOG_FILE} is damaged (database disk image is malformed): restore it from "
        "a backup, or re-index into a new folder"), result.output


def test_serve_images_says_what_to_do_with_a_damaged_catalog(copy):
    from commands.options import UserError
    from commands.serve_images import check_index

    _, index = copy
    corrupt_table_root(index / CATALOG_FILE, "images")

    with pytest.raises(UserError, match=r"is damaged \(database disk image is malformed\): restore it from a backup"):
        check_index(index)


def test_the_api_says_an_image_s_stored_vector_is_damaged(copy, tmp_path):
    from api import create_app

    _, index = copy
    bad_id, _ = flip_vector_bytes(index)
    app = create_app({"INDEX_DIR": str(index), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "thumbnails")})
    try:
        answer = app.test_client().get(f"/images/{bad_id}/neighbours")
    finally:
        app.extensions["retrieval"].close()

    assert answer.status_code == 404
    assert "is damaged (it fails its checksum)" in answer.get_json()["error"]["message"]


def test_check_of_an_index_stopped_before_its_settings_says_to_rerun_with_the_first_runs_options(sample_index, tmp_path):
    """A run stopped at once (Ctrl-C while the network loads) leaves a catalog with no settings. --check tells the
    person to run it again with the options of that first run: the bare command would ask for ImageNet weights."""
    index = tmp_path / "index"
    Catalog(index, create=True).close()   # what such a run leaves: an empty catalog, no settings
    result = run(index_images, [sample_index.data_dir, "--index-dir", index, "--check"])
    assert result.exit_code == 1
    assert "the index is unfinished (no settings)" in result.output
    assert "again with the options of its first run (--weights, --model, ...)" in result.output
    rerun = run(index_images, [sample_index.data_dir, "--index-dir", index, "--json", *FAST])
    assert rerun.exit_code == 0, rerun.output
    assert run(index_images, [sample_index.data_dir, "--index-dir", index, "--check"]).exit_code == 0


def test_a_lost_or_damaged_random_weights_file_is_named_by_check_and_made_again_by_the_next_run(copy):
    """The seeded random weights are the index's network: lost or damaged, no query can be computed. --check says so
    and what to do; the next index-images run, even one with nothing to index, makes the very file again from the
    recorded seed."""
    data, index = copy
    weights = index / "random-weights-alexnet.pt"
    original = weights.read_bytes()
    weights.unlink()
    query = data / "red_circles" / "red_circles_000.jpg"
    refused = run(search_images, [query, "--index-dir", index])
    assert refused.exit_code == 2 and "or run index-images on the index's data folder" in refused.output

    check = run(index_images, [data, "--index-dir", index, "--check"])
    assert check.exit_code == 1 and "random weights file random-weights-alexnet.pt is missing" in check.output
    assert "makes the file again from the recorded seed" in check.output

    result = run(index_images, [data, "--index-dir", index])
    assert result.exit_code == 0 and "indexed 0, unchanged 30" in result.output, result.output
    assert "random-weights-alexnet.pt was missing: made again from seed 0" in result.output
    assert weights.read_bytes() == original
    found = run(search_images, [query, "--index-dir", index, "-k", "1"])
    assert found.exit_code == 0 and "red_circles/red_circles_000.jpg" in found.output

    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))   # one bit changed: not the network recorded
    damaged = run(index_images, [data, "--index-dir", index, "--check"])
    assert damaged.exit_code == 1 and "is not the one recorded" in damaged.output
    assert "makes the file again from the recorded seed" in damaged.output
    # an index-images run with nothing to index noticed nothing: the next search then refused to run
    result = run(index_images, [data, "--index-dir", index])
    assert result.exit_code == 0 and "indexed 0, unchanged 30" in result.output, result.output
    assert "random-weights-alexnet.pt was damaged (not the recorded bytes): made again from seed 0" in result.output
    assert weights.read_bytes() == original


def test_check_while_an_index_images_run_writes_says_to_wait(copy):
    """Between a run's commits and its next FAISS save the file lags the catalog: a check then would report damage
    that is not there. It says another run is writing, as a second writer is told: exit 75 for both (EX_TEMPFAIL: try
    again later), which a cron job tells from a mistake (2; it was 2 too)."""
    import subprocess
    import sys

    data, index = copy
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom indexer.locks import index_lock\n"
                               f"with index_lock({str(index)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run(index_images, [data, "--index-dir", index, "--check"])
        assert result.exit_code == 75 and "another index-images run is updating" in result.output, result.output
        second = run(index_images, [data, "--index-dir", index])
        assert second.exit_code == 75 and "another index-images run is updating" in second.output, second.output
    finally:
        holder.kill()
        holder.wait()
    assert run(index_images, [data, "--index-dir", index, "--check"]).exit_code == 0


def test_a_write_killed_midway_leaves_a_temporary_file_that_check_names_and_the_next_run_removes(copy):
    """kill -9 while a file of the index is written (random weights: hundreds of MB) leaves its hidden temporary
    file; it stayed forever and --check called the index sound. Now --check names it and the next run removes it."""
    import subprocess
    import sys

    data, index = copy
    killed = subprocess.run([sys.executable, "-c", "import os, signal\nfrom retrieval.files import atomic_file\n"
                             f"with atomic_file({str(index / 'random-weights-alexnet.pt')!r}) as f:\n"
                             "    f.write(b'w' * 3_000_000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == -9
    [leftover] = [p for p in index.iterdir() if p.name.startswith(".random-weights-alexnet.pt.")]

    check = run(index_images, [data, "--index-dir", index, "--check"])
    assert check.exit_code == 1 and f"1 temporary file(s) an interrupted run left, 2.9 MB: {leftover.name}" in check.output

    result = run(index_images, [data, "--index-dir", index])
    assert result.exit_code == 0 and "removed 1 temporary file(s) an interrupted run left" in result.output
    assert not leftover.exists() and (index / "random-weights-alexnet.pt").stat().st_size > 100_000_000
    assert run(index_images, [data, "--index-dir", index, "--check"]).exit_code == 0


def test_check_names_a_whitened_index_s_type(tmp_path):
    """Reproduces: 'FAISS file .../vectors.faiss: ?, readable' for a PCAW32,L2norm,Flat index (a file read back
    knows only whether it is exact); the type is the one index-images recorded."""
    from retrieval.samples import make_sample_collection

    make_sample_collection(tmp_path / "data", per_class=8, size=(96, 72))      # 40 images: whitened to 32 dimensions
    index = tmp_path / "index"
    run(index_images, [str(tmp_path / "data"), "--index-dir", str(index), "--weights", "random", "--whiten-dim", "32"])
    checked = run(index_images, [str(tmp_path / "data"), "--index-dir", str(index), "--check"])
    assert f"FAISS file {index / FAISS_FILE}: PCAW32,L2norm,Flat, readable" in checked.output, checked.output
