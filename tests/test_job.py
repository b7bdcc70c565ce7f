"""Tests for indexer.run: incremental runs, skipped files, settings that must agree, and search over the result."""
from __future__ import annotations

import io
import os
import random
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from indexer.config import ConfigError
from indexer.locks import index_lock
from retrieval.samples import draw_sample, make_sample_collection
from retrieval.catalog import Catalog
from retrieval.search.index import ImageIndex
from retrieval.names import FAISS_FILE
from retrieval.vectors.vector_index import VectorIndex

from helpers.images import bad_files
from helpers.waiting import wait_for


@pytest.fixture
def small_data(tmp_path):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(96, 72), classes=["red_circles", "blue_squares"], seed=2)
    return data


def catalog_state(index_dir, url=None):
    cat = Catalog(index_dir, url=url)
    try:
        rows = {p: i for p, (i, _s, _m) in cat.file_states().items()}
        vectors = {}
        for ids, vecs in cat.vectors():
            vectors.update(zip(ids.tolist(), vecs))
        return rows, vectors, cat.ids()
    finally:
        cat.close()


def faiss_ids(index_dir, dim=4096):
    return np.sort(VectorIndex.load(index_dir / FAISS_FILE, dim).ids())


def test_every_image_is_its_own_nearest_neighbour(sample_index):
    index = ImageIndex(sample_index.index_dir)
    try:
        for path, (image_id, _s, _m) in index.catalog.file_states().items():
            hits, _ = index.search_image((sample_index.data_dir / path).read_bytes(), 3)
            assert hits[0].id == image_id, path
            assert hits[0].distance < 1e-3
            assert hits[0].distance <= hits[1].distance <= hits[2].distance
    finally:
        index.close()


@pytest.fixture(scope="module")
def stored_index(sample_index):
    """The sample index opened for vector searches only (no network)."""
    index = ImageIndex(sample_index.index_dir, load_network=False)
    yield index
    index.close()


def test_search_agrees_with_brute_force_over_the_catalog(stored_index, sample_index):
    ids, vecs = next(stored_index.catalog.vectors())
    assert len(ids) == sample_index.report.total == 30
    for qi in range(0, len(ids), 7):
        hits = stored_index.search_vectors(vecs[qi:qi + 1], 5)[0]
        d = np.linalg.norm(vecs - vecs[qi], axis=1)
        order = np.argsort(d, kind="stable")[:5]
        assert [h.id for h in hits] == ids[order].tolist()
        assert np.allclose([h.distance for h in hits], d[order], atol=1e-4)


def test_vectors_are_l2_normalised_and_features_cluster_by_class(stored_index):
    ids, vecs = next(stored_index.catalog.vectors())
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    rows = stored_index.catalog.get_many(ids)
    same = sum(stored_index.search_vectors(vecs[i:i + 1], 1, exclude=[{int(ids[i])}])[0][0].label == rows[int(ids[i])].label
               for i in range(len(ids)))
    assert same / len(ids) > 0.5, "even random conv features separate colour/shape classes (chance is 0.2)"


def test_rerun_on_an_unchanged_folder_is_a_no_op(small_data, tmp_path, index_images, catalog_url):
    first = index_images(small_data, tmp_path / "index", db_url=catalog_url)
    stamp = os.stat(tmp_path / "index" / FAISS_FILE).st_mtime_ns
    rows_before, _, _ = catalog_state(tmp_path / "index", catalog_url)

    again = index_images(small_data, tmp_path / "index", db_url=catalog_url)

    assert (first.indexed, first.total) == (6, 6)
    assert (again.indexed, again.unchanged, again.removed, again.total) == (0, 6, 0, 6)
    assert os.stat(tmp_path / "index" / FAISS_FILE).st_mtime_ns == stamp, "nothing rewritten"
    assert catalog_state(tmp_path / "index", catalog_url)[0] == rows_before
    assert (tmp_path / "index" / "catalog.db").exists() == (catalog_url is None), "the catalog is where the URL says"


def test_added_changed_and_removed_files(small_data, tmp_path, index_images, catalog_url):
    index_dir = tmp_path / "index"
    index_images(small_data, index_dir, db_url=catalog_url)
    rows, vectors, _ = catalog_state(index_dir, catalog_url)

    new = small_data / "red_circles" / "new.png"
    Image.new("RGB", (80, 80), (250, 0, 0)).save(new)
    changed = small_data / "blue_squares" / "blue_squares_000.jpg"
    import random
    draw_sample("red_circles", (96, 72), random.Random(9)).save(changed, "JPEG")
    os.utime(changed, ns=(1, 1_000_000_000))   # a different mtime for sure
    (small_data / "red_circles" / "red_circles_001.jpg").unlink()

    report = index_images(small_data, index_dir, db_url=catalog_url)

    assert (report.indexed, report.unchanged, report.removed, report.total) == (2, 4, 1, 6)
    rows2, vectors2, catalog_ids = catalog_state(index_dir, catalog_url)
    assert "red_circles/red_circles_001.jpg" not in rows2
    assert "red_circles/new.png" in rows2
    assert rows2["blue_squares/blue_squares_000.jpg"] != rows["blue_squares/blue_squares_000.jpg"], "re-extracted"
    assert not np.allclose(vectors2[rows2["blue_squares/blue_squares_000.jpg"]],
                           vectors[rows["blue_squares/blue_squares_000.jpg"]])
    unchanged = "blue_squares/blue_squares_001.jpg"
    assert rows2[unchanged] == rows[unchanged] and np.array_equal(vectors2[rows2[unchanged]], vectors[rows[unchanged]])
    assert np.array_equal(faiss_ids(index_dir), np.sort(catalog_ids))

    index = ImageIndex(index_dir, db_url=catalog_url)
    try:
        hits, _ = index.search_image(changed.read_bytes(), 6)
        assert hits[0].path == "blue_squares/blue_squares_000.jpg" and hits[0].distance < 1e-3
        assert all(h.path != "red_circles/red_circles_001.jpg" for h in hits)
    finally:
        index.close()


def test_bad_files_are_skipped_with_reasons_and_never_stop_the_run(small_data, tmp_path, index_images, catalog_url):
    for name, data in bad_files().items():
        (small_data / "red_circles" / f"{name}.png").write_bytes(data)

    report = index_images(small_data, tmp_path / "index", db_url=catalog_url)

    assert report.indexed == report.total == 6
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {f"red_circles/{n}.png" for n in bad_files()}
    assert "empty" in reasons["red_circles/empty.png"]
    assert "not an image" in reasons["red_circles/text.png"]
    assert "decompression bomb" in reasons["red_circles/bomb.png"]
    assert reasons["red_circles/truncated.png"]

    again = index_images(small_data, tmp_path / "index", db_url=catalog_url)
    assert again.indexed == 0 and len(again.skipped) == 4, "bad files stay skipped, not re-decoded"

    shutil.copy(small_data / "red_circles" / "red_circles_000.jpg", small_data / "red_circles" / "text.png")
    fixed = index_images(small_data, tmp_path / "index", db_url=catalog_url)
    assert fixed.indexed == 1 and fixed.total == 7 and len(fixed.skipped) == 3


def test_an_indexed_file_that_turns_bad_leaves_the_index(small_data, tmp_path, index_images):
    index_images(small_data, tmp_path / "index")
    (small_data / "red_circles" / "red_circles_000.jpg").write_bytes(b"now garbage")

    report = index_images(small_data, tmp_path / "index")

    assert report.total == 5
    assert [s["path"] for s in report.skipped] == ["red_circles/red_circles_000.jpg"]
    assert len(faiss_ids(tmp_path / "index")) == 5


def test_empty_folder_gives_an_empty_index_that_answers_searches(tmp_path, index_images):
    (tmp_path / "empty").mkdir()
    report = index_images(tmp_path / "empty", tmp_path / "index")
    assert report.total == 0
    index = ImageIndex(tmp_path / "index")
    try:
        hits, _ = index.search_image(jpeg_bytes(), 5)
        assert hits == []
    finally:
        index.close()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()


def test_no_normalize_keeps_raw_fc7(small_data, tmp_path, index_images):
    index_images(small_data, tmp_path / "index", normalize=False)
    _, vectors, _ = catalog_state(tmp_path / "index")
    norms = np.linalg.norm(np.stack(list(vectors.values())), axis=1)
    assert not np.allclose(norms, 1.0)
    assert Catalog(tmp_path / "index").settings().normalize is False


@pytest.mark.parametrize("option, value, message", [
    ("model", "vgg16", "model 'alexnet'"),
    ("layer", "fc6", "layer 'fc7'"),
    ("weights", "imagenet", "weights 'random'"),
    ("normalize", False, "normalize True"),
])
def test_options_that_contradict_the_index_are_refused(small_data, tmp_path, index_images, option, value, message):
    index_images(small_data, tmp_path / "index")
    with pytest.raises(ConfigError, match=message):
        index_images(small_data, tmp_path / "index", **{option: value})


def test_another_data_folder_is_refused(small_data, tmp_path, index_images):
    index_images(small_data, tmp_path / "index")
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    with pytest.raises(ConfigError, match="was built from"):
        index_images(other, tmp_path / "index")


def test_a_moved_data_folder_keeps_its_index_without_extracting_again(small_data, tmp_path, index_images):
    """Reproduces: `mv lib photos; index-images photos` was refused ("use another index folder"): every image
    extracted again for a rename. Told that the folder moved (--data-moved), the index follows it when the folder it
    was made of is gone and the one given holds its images (paths, sizes, times, a few by their bytes); without it
    the refusal says so. A symbolic link left at the old name leads to the same folder; a copy beside the original,
    or a folder of other bytes at the same paths, sizes and times, is another folder."""
    index_images(small_data, tmp_path / "index")
    before = {r.path: r.id for r in Catalog(tmp_path / "index").list_images(limit=100)}
    moved = tmp_path / "photos"
    small_data.rename(moved)
    with pytest.raises(ConfigError, match="which is gone, and .* holds its images: if the folder moved here, run "
                                          "again with --data-moved"):
        index_images(moved, tmp_path / "index")
    assert Catalog(tmp_path / "index").settings().data_dir == str(small_data)   # nothing changed
    report = index_images(moved, tmp_path / "index", data_moved=True)
    assert report.indexed == 0 and report.unchanged == 6 and report.removed == 0
    assert any(r.startswith("the data folder moved:") and str(moved) in r for r in report.repairs), report.repairs
    assert Catalog(tmp_path / "index").settings().data_dir == str(moved)
    index = ImageIndex(tmp_path / "index", load_network=False)
    try:
        assert index.snapshot().data_dir == moved
    finally:
        index.close()
    assert {r.path: r.id for r in Catalog(tmp_path / "index").list_images(limit=100)} == before

    (tmp_path / "pictures").symlink_to(moved)   # another name for the folder the index reads
    index_images(tmp_path / "pictures", tmp_path / "index")
    shutil.copytree(moved, tmp_path / "copy")    # a copy beside it is another folder, --data-moved or not
    with pytest.raises(ConfigError, match=r"still there: --data-moved is for a folder moved away"):
        index_images(tmp_path / "copy", tmp_path / "index", data_moved=True)
    forged = tmp_path / "forged"                 # the same paths, sizes and times, other bytes
    for f in moved.rglob("*.jpg"):
        target = forged / f.relative_to(moved)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(f.stat().st_size))
        os.utime(target, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    shutil.rmtree(moved)
    (tmp_path / "pictures").unlink()
    with pytest.raises(ConfigError, match=r"\(which is gone\), and this folder does not hold its images"):
        index_images(forged, tmp_path / "index", data_moved=True)


def test_list_changes_names_each_file_added_changed_moved_and_removed(small_data, tmp_path, index_images):
    """index-images said only counts ("indexed 1, moved 24, removed 1"): which photo left the index, and was the one
    indexed a new one or a replaced one? --list-changes names them (report.changes)."""
    index_images(small_data, tmp_path / "index")
    files = sorted(p.relative_to(small_data).as_posix() for p in small_data.rglob("*.jpg"))
    (small_data / files[0]).unlink()                                              # removed
    (small_data / files[1]).rename(small_data / files[1].replace(".jpg", "_renamed.jpg"))   # moved
    draw_sample(files[2].split("/")[0], (64, 48), random.Random(7)).save(small_data / files[2], quality=90)  # changed
    draw_sample(files[2].split("/")[0], (64, 48), random.Random(8)).save(small_data / "new.jpg", quality=90)  # added
    os.utime(small_data / files[2], ns=(1, 1))   # not the time indexed, whatever the clock's resolution
    report = index_images(small_data, tmp_path / "index", list_changes=True)
    assert report.changes == {"added": ["new.jpg"], "changed": [files[2]],
                              "moved": [[files[1], files[1].replace(".jpg", "_renamed.jpg")]], "removed": [files[0]]}
    assert index_images(small_data, tmp_path / "index").changes is None   # not asked: no lists (a first run's 1M paths)


def test_options_left_out_come_from_the_index(small_data, tmp_path, index_images):
    index_images(small_data, tmp_path / "index", layer="fc6")
    report = index_images(small_data, tmp_path / "index", weights=None)
    assert report.unchanged == 6
    assert Catalog(tmp_path / "index").settings().layer == "fc6"


def test_a_second_writer_is_refused_while_one_runs(small_data, tmp_path, index_images):
    with index_lock(tmp_path / "index"):
        with pytest.raises(ConfigError, match="another index-images run"):
            index_images(small_data, tmp_path / "index")


@pytest.mark.postgres
def test_one_writer_per_database_whatever_its_index_folder(small_data, tmp_path, index_images, postgres_url):
    holder = Catalog(tmp_path / "index-a", create=True, url=postgres_url)   # as if index-images ran elsewhere
    try:
        with holder.writer_lock():
            with pytest.raises(ConfigError, match="another index-images run is updating the catalog in postgresql"):
                index_images(small_data, tmp_path / "index-b", db_url=postgres_url)
            assert not (tmp_path / "index-b" / FAISS_FILE).exists()
    finally:
        holder.close()
    assert index_images(small_data, tmp_path / "index-b", db_url=postgres_url).total == 6, "free once released"


def test_long_runs_save_the_faiss_file_as_they_go(small_data, tmp_path, index_images, monkeypatch):
    saved_sizes = []
    real_save = VectorIndex.save

    def recording_save(self, path):
        saved_sizes.append(len(self))
        real_save(self, path)
    monkeypatch.setattr(VectorIndex, "save", recording_save)

    index_images(small_data, tmp_path / "index", batch_size=2, save_every_s=0.0)

    assert saved_sizes[:3] == [2, 4, 6], "a server sees each batch without waiting for the end of the run"
    assert saved_sizes[-1] == 6


def malformed_avif() -> bytes:
    """A real AVIF whose coded payload is damaged: Pillow's AVIF decoder raises RuntimeError, not OSError."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "AVIF")
    data = bytearray(buf.getvalue())
    for i in range(len(data) - 40, len(data)):
        data[i] ^= 0xFF
    return bytes(data)


def tall_png(width: int = 2, height: int = 40_000_000) -> bytes:
    """A valid greyscale PNG of width x height pixels (about 120 KB): under the pixel limit, absurd in shape."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    rows = zlib.compress(b"\x00" + b"\x80" * width, 9) if height == 1 else zlib.compress((b"\x00" + b"\x80" * width) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_files_whose_decoder_raises_anything_are_skipped_and_the_run_goes_on(small_data, tmp_path, index_images):
    (small_data / "red_circles" / "avif-named.jpg").write_bytes(malformed_avif())
    (small_data / "red_circles" / "tall.png").write_bytes(tall_png())

    report = index_images(small_data, tmp_path / "index")

    assert report.indexed == report.total == 6
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"red_circles/avif-named.jpg", "red_circles/tall.png"}
    again = index_images(small_data, tmp_path / "index")
    assert (again.indexed, again.unchanged, again.total) == (0, 6, 6), "re-runs go on too"


def test_folder_names_that_are_not_utf8_are_indexed_and_shown_escaped(small_data, tmp_path, index_images, catalog_url):
    latin1 = small_data / os.fsdecode(b"caf\xe9")          # a folder named in Latin-1 on a UTF-8 system
    shutil.copytree(small_data / "red_circles", latin1)
    (latin1 / os.fsdecode(b"bad-\xff.jpg")).write_bytes(b"not an image")

    report = index_images(small_data, tmp_path / "index", db_url=catalog_url)

    assert report.indexed == report.total == 9
    assert [s["path"] for s in report.skipped] == ["caf\\xe9/bad-\\xff.jpg"], "shown escaped, never a crash"
    cat = Catalog(tmp_path / "index", url=catalog_url)
    try:
        labels = cat.labels()
        assert labels[os.fsdecode(b"caf\xe9")] == 3, "stored exactly: the same label as the folder"
        row = next(r for r in cat.list_images(label=os.fsdecode(b"caf\xe9")))
        assert (small_data / row.path).is_file(), "the stored path still opens the file"
    finally:
        cat.close()
    again = index_images(small_data, tmp_path / "index", db_url=catalog_url)
    assert (again.indexed, again.unchanged) == (0, 9)


def test_an_index_folder_inside_the_data_folder_is_not_indexed(small_data, index_images):
    first = index_images(small_data, small_data / "index")
    (small_data / "index-old").mkdir()
    (small_data / "index-old" / "catalog.db").write_bytes(b"")            # another index folder, by its catalog
    shutil.copy(small_data / "red_circles" / "red_circles_000.jpg", small_data / "index-old" / "x.jpg")
    second = index_images(small_data, small_data / "index")

    assert first.total == second.total == 6 and second.indexed == 0
    assert "index" not in Catalog(small_data / "index").labels()
    # an image lying in that other index folder is named, not left out silently
    assert [(s["path"], "holds an index (catalog.db)" in s["reason"]) for s in second.skipped] == [("index-old/x.jpg", True)]


def test_an_index_folder_made_in_a_class_folder_or_the_data_folder_is_refused(small_data, tmp_path, index_images):
    """--index-dir data/red_circles (a typo) would hide that class from every index of the folder (a folder holding an
    index is not scanned); --index-dir data would scatter the index among the images. Both refused before any work."""
    for index_dir, words in [(small_data / "red_circles", "holds 3 image(s) (red_circles_000.jpg, ...)"),
                             (small_data, "is the data folder")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            index_images(small_data, index_dir)
    assert sorted(p.name for p in small_data.iterdir()) == ["blue_squares", "red_circles"], "nothing written"
    assert not (small_data / "red_circles" / "catalog.db").exists()
    nested = index_images(small_data, small_data / "red_circles" / "index")   # a folder of its own there: fine
    assert nested.total == 6


def test_a_data_folder_found_empty_does_not_empty_the_index(small_data, tmp_path, index_images):
    """A drive or share not mounted for a moment looks like a folder whose images were all deleted: the run refuses
    to remove them all (hours of extraction on a large collection), says why and how to empty the index on purpose."""
    index_images(small_data, tmp_path / "index")
    held = tmp_path / "held"
    shutil.move(small_data, held)
    small_data.mkdir()
    with pytest.raises(ConfigError, match=r"holds no image files now, but the index has 6: nothing was removed"):
        index_images(small_data, tmp_path / "index")
    assert Catalog(tmp_path / "index").count() == 6
    small_data.rmdir()
    shutil.move(held, small_data)
    back = index_images(small_data, tmp_path / "index")
    assert (back.indexed, back.unchanged, back.removed) == (0, 6, 0)
    for image in list(small_data.rglob("*.jpg"))[:-1]:   # one left: removing all but one is an ordinary update
        image.unlink()
    assert index_images(small_data, tmp_path / "index").removed == 5


def test_files_over_the_size_limit_are_skipped_unread(small_data, tmp_path, index_images):
    big = small_data / "red_circles" / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(3 * 2**20)                                             # sparse: 3 MB of zeros, no disk used

    report = index_images(small_data, tmp_path / "index", max_file_bytes=2**20)

    assert report.indexed == 6
    assert [(s["path"], "too large" in s["reason"]) for s in report.skipped] == [("red_circles/huge.jpg", True)]


def test_a_seed_that_contradicts_the_index_is_refused(small_data, tmp_path, index_images):
    index_images(small_data, tmp_path / "index", seed=3)
    with pytest.raises(ConfigError, match="seed 3"):
        index_images(small_data, tmp_path / "index", seed=4)
    assert index_images(small_data, tmp_path / "index", seed=3).unchanged == 6


def test_a_no_op_rerun_imports_neither_torch_nor_faiss(small_data, tmp_path, index_images):
    import subprocess
    import sys

    index_images(small_data, tmp_path / "index")
    code = ("import sys, json; from commands.index_images import main\n"
            f"main([{str(small_data)!r}, '--index-dir', {str(tmp_path / 'index')!r}, '--json'], standalone_mode=False)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'faiss', 'torchvision', 'sklearn') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    summary, loaded = done.stdout.strip().splitlines()
    assert '"unchanged": 6' in summary and '"indexed": 0' in summary
    assert loaded == "[]"


def test_a_run_after_a_crash_between_commit_and_faiss_save_reconciles(small_data, tmp_path, index_images):
    index_dir = tmp_path / "index"
    index_images(small_data, index_dir)
    faiss_file = index_dir / FAISS_FILE
    old = faiss_file.read_bytes()
    (small_data / "red_circles" / "red_circles_000.jpg").unlink()
    index_images(small_data, index_dir)
    faiss_file.write_bytes(old)            # as if the run had died after its commit, before saving FAISS
    cat = Catalog(index_dir)
    cat.mark_vectors_saved(None)           # ... and before recording the save
    cat.close()

    report = index_images(small_data, index_dir)

    assert (report.indexed, report.total) == (0, 5)
    assert len(faiss_ids(index_dir)) == 5, "the no-op run noticed the stale FAISS file and reconciled it"


def test_a_file_that_kills_its_decoding_worker_is_skipped_and_the_run_goes_on(small_data, tmp_path, index_images,
                                                                               monkeypatch):
    import signal

    import indexer.read as reader

    real = reader.decode_for_model

    def deadly(path, *args, **kwargs):   # as if the kernel killed the worker for memory on this one file
        if str(path).endswith("red_circles_001.jpg"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(reader, "decode_for_model", deadly)   # the forked workers inherit it

    report = index_images(small_data, tmp_path / "index", workers=2, batch_size=2)

    assert (report.indexed, report.total) == (5, 5)
    assert [(s["path"], "killed the worker process" in s["reason"]) for s in report.skipped] == \
        [("red_circles/red_circles_001.jpg", True)]
    assert len(faiss_ids(tmp_path / "index")) == 5


def test_data_and_index_folders_whose_names_are_not_utf8(small_data, tmp_path, index_images):
    data = tmp_path / os.fsdecode(b"photos-\xe9t\xe9")
    shutil.move(small_data, data)
    index_dir = tmp_path / os.fsdecode(b"index-\xff")

    first = index_images(data, index_dir)
    again = index_images(data, index_dir)

    assert (first.indexed, again.unchanged, again.total) == (6, 6, 6)
    index = ImageIndex(index_dir)
    try:
        path = next(iter(index.catalog.file_states()))
        hits, _ = index.search_image((data / path).read_bytes(), 1)
        assert hits[0].path == path and hits[0].distance < 1e-3
    finally:
        index.close()


@pytest.mark.parametrize("device, gpu, cores, workers", [
    ("cpu", False, 16, 8), ("auto", False, 16, 8), ("cpu", True, 16, 8),    # the network on the CPU: at most 8
    ("auto", True, 16, 16), ("cuda", False, 16, 16), ("auto", True, 64, 32),   # on a GPU: every core, at most 32
    ("auto", True, 1, 1),
])
def test_default_decoding_workers_are_every_core_when_the_network_runs_on_a_gpu(monkeypatch, device, gpu, cores,
                                                                                 workers):
    import indexer.config as job

    monkeypatch.setattr(job, "available_cores", lambda: cores)
    monkeypatch.setattr(job, "gpu_present", lambda: gpu)
    assert job.default_workers(device) == workers


def test_a_run_without_workers_given_decodes_in_the_default_for_its_device(small_data, tmp_path, index_images,
                                                                         monkeypatch):
    import indexer.config as config
    import indexer.local as job

    started_with = []
    real_reader = job.Reader

    def recording_reader(*args, workers, **kwargs):  # noqa: ANN002, ANN003
        started_with.append(workers)
        return real_reader(*args, workers=workers, **kwargs)
    monkeypatch.setattr(job, "Reader", recording_reader)
    monkeypatch.setattr(config, "available_cores", lambda: 12)   # the Reader starts one process: 6 files are one task
    monkeypatch.setattr(config, "gpu_present", lambda: True)     # as on a GPU host; torch finds no CUDA here: the CPU runs it

    index_images(small_data, tmp_path / "cpu", workers=None, device="cpu")
    index_images(small_data, tmp_path / "auto", workers=None, device="auto")

    assert started_with == [8, 12]


def test_the_network_runs_with_the_garbage_collector_on(small_data, tmp_path):
    """Start-up (torch, the network) runs with Python's collector paused; a run's batches, which may last hours, do not."""
    import gc

    from indexer.run import JobConfig, run_index

    assert gc.isenabled()
    during = []
    run_index(JobConfig(data_dir=small_data, index_dir=tmp_path / "index", weights="random", workers=0, progress=False),
              on_extractor=lambda _extractor: during.append(gc.isenabled()))
    assert during == [True] and gc.isenabled()


def test_decoding_workers_run_ahead_through_the_network_start_up(tmp_path):
    """The workers do not stop after a few tasks each while the main process loads torch and the network: every file
    of a small collection is decoded before the first batch is asked for."""
    from indexer.read import DECODE_CHUNK, TASKS_AHEAD_PER_WORKER, Reader
    from retrieval.images.decode import Preprocessing
    from retrieval.images.scan import scan_folder

    data = tmp_path / "data"
    make_sample_collection(data, per_class=30, size=(64, 48), classes=["red_circles", "blue_squares", "green_stripes"],
                           seed=4)
    files = scan_folder(data).images
    assert len(files) > 2 * TASKS_AHEAD_PER_WORKER * DECODE_CHUNK
    with Reader(data, files, workers=2, prep=Preprocessing(), max_pixels=None) as reader:
        wait_for(lambda: all(f.done() for f in reader._pending), 60)
        assert reader._next == len(reader.tasks), "every task was handed to the workers before any batch was read"
        assert all(f.done() for f in reader._pending)
        assert sum(len(b.rows) for b in reader.read(Preprocessing(), 16)) == len(files)


def test_without_a_terminal_a_run_says_how_far_it_is_now_and_then(small_data, tmp_path, index_images, capsys,
                                                                   monkeypatch):
    """Reproduces (scale-out review): with stderr a log file (docker logs, nohup, a Ray job) nothing was printed
    between the start and the summary, hours at a million images; the bar shows on a terminal only."""
    import indexer.write

    monkeypatch.setattr(indexer.write, "HEARTBEAT_S", 0.0)
    index_images(small_data, tmp_path / "index", progress=True, batch_size=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("indexed ")]
    assert lines and all(re.fullmatch(r"indexed \d+ of \d+ \([\d,.]+ images/s, about \d+ s left\)", line)
                         for line in lines), lines
    capsys.readouterr()
    index_images(small_data, tmp_path / "quiet", progress=False, batch_size=2)   # --json: no such lines
    assert "images/s" not in capsys.readouterr().err


def test_an_index_older_than_the_vector_index_record_keeps_its_raw_exact_search(tmp_path, index_images):
    """Reproduces (upgrade review): an index made before the FAISS side was recorded (no vector_index table) was taken
    for a new one by the first run of this version: whitened (PCAW32) at 128 images or more, its neighbours changed
    and its distances 8 times larger, without a word; under 128 whitening waited, to change it months later."""
    import sqlite3

    from retrieval.search.index import ImageIndex
    from retrieval.vectors.index_types import IndexTypeConfig

    data, index = tmp_path / "data", tmp_path / "index"
    make_sample_collection(data, per_class=27, size=(48, 36), seed=6)          # 135 images
    index_images(data, index, vector_index=IndexTypeConfig(whiten=False))
    query = (data / "red_circles" / "red_circles_000.jpg").read_bytes()

    def searched() -> list:
        served = ImageIndex(index)
        try:
            return [(h.path, round(h.distance, 4)) for h in served.search_image(query, 6)[0]]
        finally:
            served.close()

    before = searched()
    with sqlite3.connect(index / "catalog.db") as conn:                         # as the versions before it left it
        conn.execute("DROP TABLE vector_index")
    first = index_images(data, index).vector_index                              # this version's first run
    assert first["factory"] == "Flat" and first["whiten"]["on"] is False and first["requested"] == "Flat", first
    assert searched() == before
    Image.new("RGB", (48, 36), (250, 250, 10)).save(data / "new.jpg")        # a run with work records it as it is
    report = index_images(data, index)
    assert report.vector_index["factory"] == "Flat" and report.vector_index["whiten"]["on"] is False, report.vector_index
    assert report.vector_index["requested"] == "Flat", "exact at any size, as it was (not auto's compressed type)"
    assert searched() == before
    report = index_images(data, index, vector_index=IndexTypeConfig(whiten=True))   # asked for: whitened from now on
    assert report.vector_index["factory"].startswith("PCAW")
    assert index_images(data, index).vector_index["factory"].startswith("PCAW")
