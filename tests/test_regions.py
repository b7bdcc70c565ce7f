"""index-images --regions: each image also holds the vectors of five regions (four corners and the centre, 80% of
each side); every search scores an image by its nearest vector, so a cropped copy finds its original. Checked against
brute force over the catalog's vectors, through removal, re-indexing, a lost or stale side file and --check; an index
without regions is left as it was."""
from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import retrieval
from commands.index_images import main as index_images
from commands.search_images import main as search_images
from helpers.indexes import build_index
from indexer.check import check_index
from indexer.config import ConfigError
from retrieval.catalog import Catalog
from retrieval.images.preprocessing import REGION_COUNT, region_boxes
from retrieval.names import FAISS_FILE, REGIONS_FILE
from retrieval.samples import make_sample_collection
from retrieval.vectors.vector_index import VectorIndex
from retrieval.vectors.whitening import whitening_of

IMAGES = 40          # whitened at --whiten-dim 32 (kept from 1.25 x 32 = 40 images)
PNG = {"fmt": "PNG"}  # lossless: a crop saved from an indexed picture has exactly its pixels


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """One folder of 40 pictures indexed twice with the same seeded random network: with regions and without."""
    root = tmp_path_factory.mktemp("regions")
    data = root / "data"
    make_sample_collection(data, per_class=IMAGES // 5, size=(200, 150), seed=3, **PNG)
    build_index(data, root / "with", regions=True, vector_index=_whiten(32))
    build_index(data, root / "without", vector_index=_whiten(32))
    return data, root / "with", root / "without"


def _whiten(dim: int):
    from retrieval.vectors.index_types import IndexTypeConfig

    return IndexTypeConfig(whiten_dim=dim)


def _all_vectors(index_dir):
    """(owner image ids, vectors) of every vector an index holds in its catalog: each image's own and its regions'."""
    cat = Catalog(index_dir)
    try:
        parts = list(cat.vectors()) + list(cat.region_vectors())
    finally:
        cat.close()
    return np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])


def _brute_force(index_dir, query: np.ndarray, k: int, exclude: int | None = None) -> tuple[list[int], np.ndarray]:
    """The k images nearest to query by their nearest vector, over every vector in the catalog, in the index's space."""
    owners, vectors = _all_vectors(index_dir)
    stored = VectorIndex.load(index_dir / FAISS_FILE, 4096, factory=None)   # kept: the transforms are its own
    whiten = whitening_of(stored.index)
    assert whiten is not None, "the fixture's indexes are whitened"
    d = np.linalg.norm(whiten(vectors) - whiten(query[None, :]), axis=1)              # (all vectors,)
    best: dict[int, float] = {}
    for owner, dist in zip(owners.tolist(), d.tolist()):
        if owner != exclude:
            best[owner] = min(best.get(owner, np.inf), dist)
    ranked = sorted(best.items(), key=lambda item: item[1])[:k]
    return [i for i, _ in ranked], np.array([dist for _, dist in ranked])


def _crop_copy(data, path: str, box_number: int, out) -> str:
    """A copy of an indexed picture cut to one of its regions, saved losslessly outside the folder."""
    img = Image.open(data / path).convert("RGB")
    img.crop(region_boxes(*img.size)[box_number]).save(out)
    return str(out)


def test_search_with_regions_is_the_best_of_each_images_vectors(indexes, tmp_path):
    data, with_regions, _ = indexes
    query = _crop_copy(data, "red_circles/red_circles_002.png", 1, tmp_path / "query.png")
    with retrieval.open_index(with_regions) as index:
        assert index._index.snapshot().regions is not None and index.info.regions == REGION_COUNT
        vector = index.features(query)
        found = index.search(query, k=12)
        want_ids, want_d = _brute_force(with_regions, vector, 12)
        assert [h.id for h in found] == want_ids
        np.testing.assert_allclose([h.distance for h in found], want_d, atol=1e-4)
        assert len({h.id for h in found}) == 12, "each image once"
        # neighbours of an indexed image: itself and its regions left out, the rest as brute force has them
        me = found[0].id
        own = Catalog(with_regions)
        try:
            stored = own.vector(me)
        finally:
            own.close()
        neighbours = index.neighbours(me, k=10)
        want_ids, want_d = _brute_force(with_regions, stored, 10, exclude=me)
        assert me not in [h.id for h in neighbours]
        assert [h.id for h in neighbours] == want_ids
        np.testing.assert_allclose([h.distance for h in neighbours], want_d, atol=1e-4)


def test_a_cropped_copy_finds_its_original_through_its_region(indexes, tmp_path):
    """Each picture's top-right region, cut out and searched: with regions every one finds its original first, at
    distance ~0 (its region's vector); the index of whole images alone finds them further away, and first less often."""
    data, with_regions, without = indexes
    pictures = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))[::4]
    first = {"with": 0, "without": 0}
    with retrieval.open_index(with_regions) as a, retrieval.open_index(without) as b:
        for n, path in enumerate(pictures):
            query = _crop_copy(data, path, 1, tmp_path / f"crop{n}.png")
            hit = a.search(query, k=1)[0]
            assert hit.path == path and hit.distance < 1e-3, (path, hit)
            plain = b.search(query, k=len(b))
            rank = [h.path for h in plain].index(path)
            assert plain[rank].distance > 0.05, "the whole image's vector is not the crop's"
            first["with"] += 1
            first["without"] += rank == 0
    assert first["with"] == len(pictures) and first["without"] < len(pictures), first


def test_regions_are_recorded_and_stored_beside_the_vectors(indexes):
    _, with_regions, without = indexes
    cat = Catalog(with_regions)
    try:
        assert cat.settings().regions == REGION_COUNT and cat.settings().preprocessing.endswith(",regions=5")
        assert cat.region_count() == REGION_COUNT * cat.count()
        side = VectorIndex.load(with_regions / REGIONS_FILE, 4096, factory=None)
        assert np.array_equal(np.sort(side.ids()), np.repeat(cat.ids(), REGION_COUNT))
        assert cat.vector_index_record()["regions"]["count"] == REGION_COUNT * cat.count()
    finally:
        cat.close()


def test_an_index_without_regions_has_none_of_it(indexes):
    _, _, without = indexes
    assert not (without / REGIONS_FILE).exists()
    with sqlite3.connect(without / "catalog.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        record = db.execute("SELECT preprocessing FROM index_settings").fetchone()[0]
    assert "region_vectors" not in tables and "regions" not in record
    cat = Catalog(without)
    try:
        assert cat.settings().regions == 0 and "regions" not in cat.vector_index_record()
    finally:
        cat.close()
    with retrieval.open_index(without) as index:
        assert index._index.snapshot().regions is None


def test_regions_cannot_be_turned_on_or_off_on_an_index(indexes):
    data, with_regions, without = indexes
    with pytest.raises(ConfigError, match="regions 0, not 5"):
        build_index(data, without, regions=True)
    with pytest.raises(ConfigError, match="regions 5, not 0"):
        build_index(data, with_regions, regions=False)


def test_removal_changes_and_lost_side_files_keep_regions_with_the_catalog(tmp_path):
    data = tmp_path / "data"
    paths = make_sample_collection(data, per_class=3, size=(120, 90), **PNG)
    index_dir = tmp_path / "index"
    build_index(data, index_dir, regions=True)
    stale = tmp_path / "stale.faiss"
    shutil.copy(index_dir / REGIONS_FILE, stale)
    paths[0].unlink()                                                      # removed
    Image.new("RGB", (120, 90), (10, 200, 30)).save(paths[1])              # changed: extracted again
    (data / "extra").mkdir()
    Image.new("RGB", (120, 90), (200, 30, 100)).save(data / "extra" / "added.png")   # added
    report = build_index(data, index_dir)
    assert (report.removed, report.indexed) == (1, 2)
    _assert_in_step(index_dir)
    shutil.copy(stale, index_dir / REGIONS_FILE)            # a side file saved before that run: reconciled on open
    with retrieval.open_index(index_dir) as index:
        side = index._index.snapshot().regions
        assert len(side) == REGION_COUNT * len(index)
    assert not check_index(data, index_dir, None)["ok"]     # --check sees the stale file ...
    build_index(data, index_dir)                            # ... and the next run repairs it
    _assert_in_step(index_dir)
    (index_dir / REGIONS_FILE).unlink()                     # lost: an unchanged folder's run rebuilds it
    build_index(data, index_dir)
    _assert_in_step(index_dir)
    assert check_index(data, index_dir, None)["ok"]


def _assert_in_step(index_dir, url: str | None = None) -> None:
    cat = Catalog(index_dir, url=url)
    try:
        ids = cat.ids()
        owners = np.concatenate([i for i, _ in list(cat.vectors()) + list(cat.region_vectors())])
        assert np.array_equal(np.sort(owners), np.sort(np.concatenate([ids, np.repeat(ids, REGION_COUNT)])))
        side = VectorIndex.load(index_dir / REGIONS_FILE, 4096, factory=None)
        assert np.array_equal(np.sort(side.ids()), np.repeat(ids, REGION_COUNT)), "each image's regions, no other"
    finally:
        cat.close()


def test_regions_through_the_commands(tmp_path):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(120, 90), **PNG)
    index_dir = tmp_path / "index"
    runner = CliRunner()
    base = [str(data), "--index-dir", str(index_dir), "--weights", "random", "--workers", "1", "--json"]
    refused = runner.invoke(index_images, base + ["--regions", "--index-type", "HNSW32"])
    assert refused.exit_code == 2 and "Flat or auto" in refused.output, refused.output
    refused = runner.invoke(index_images, base + ["--regions", "--decode", "device"])
    assert refused.exit_code == 2 and "--decode auto" in refused.output, refused.output
    done = runner.invoke(index_images, base + ["--regions"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    assert summary["network"]["regions"] == REGION_COUNT and summary["vector_index"]["regions"]["count"] == 50
    again = runner.invoke(index_images, base[:-1])   # nothing to do: the text summary names the regions
    assert again.exit_code == 0 and "regional vectors: 50 (5 per image)" in again.output, again.output
    query = _crop_copy(data, "blue_squares/blue_squares_001.png", 4, tmp_path / "q.png")
    found = runner.invoke(search_images, [query, "--index-dir", str(index_dir), "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)["results"]
    assert hits[0]["path"] == "blue_squares/blue_squares_001.png" and len({h["path"] for h in hits}) == 3


def test_a_large_jpeg_finds_itself_at_distance_zero(tmp_path):
    """The regions come from the same decode as the whole image, which is decoded as a query is (JPEG draft mode
    included): an indexed photo searched by its own file is at distance 0."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=1, size=(1500, 1100))   # JPEGs drafted to a quarter on decoding
    index_dir = tmp_path / "index"
    build_index(data, index_dir, regions=True)
    with retrieval.open_index(index_dir) as index:
        for path in sorted(data.rglob("*.jpg")):
            hit = index.search(str(path), k=1)[0]
            assert hit.path == path.relative_to(data).as_posix() and hit.distance < 1e-3, hit


def test_a_run_that_fails_midway_leaves_regions_in_step_and_a_rerun_completes_them(tmp_path, monkeypatch):
    """A batch whose commit fails (a full disk, a kill) is the run's error; what was committed keeps its regions in
    both the catalog and regions.faiss, and the next run adds the rest, each image with its five regions."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(120, 90), **PNG)
    index_dir = tmp_path / "index"
    real_write_batch = Catalog.write_batch
    calls = []

    def failing_write_batch(self, rows, vectors, skipped, regions=None):  # noqa: ANN001
        calls.append(len(rows))
        if len(calls) == 3:
            raise OSError("no space left on device")
        return real_write_batch(self, rows, vectors, skipped, regions)

    monkeypatch.setattr(Catalog, "write_batch", failing_write_batch)
    with pytest.raises(OSError, match="no space left"):
        build_index(data, index_dir, regions=True, batch_size=2)
    monkeypatch.undo()
    cat = Catalog(index_dir)
    try:
        assert cat.count() == 4 and cat.region_count() == 4 * REGION_COUNT
    finally:
        cat.close()
    _assert_in_step(index_dir)
    report = build_index(data, index_dir, batch_size=2)
    assert report.indexed == 6 and report.unchanged == 4
    _assert_in_step(index_dir)


def test_regions_on_either_catalog_back_end(tmp_path, catalog_url):
    data = tmp_path / "data"
    paths = make_sample_collection(data, per_class=2, size=(120, 90), **PNG)
    index_dir = tmp_path / "index"
    build_index(data, index_dir, regions=True, db_url=catalog_url)
    _assert_in_step(index_dir, catalog_url)
    paths[3].unlink()
    assert build_index(data, index_dir, db_url=catalog_url).removed == 1
    _assert_in_step(index_dir, catalog_url)
    query = _crop_copy(data, paths[5].relative_to(data).as_posix(), 2, tmp_path / "q.png")
    with retrieval.open_index(index_dir, db_url=catalog_url) as index:
        hit = index.search(query, k=1)[0]
    assert hit.path == paths[5].relative_to(data).as_posix() and hit.distance < 1e-3


def test_the_server_searches_with_regions(indexes, tmp_path):
    """POST /search and an image's neighbours through the Flask app answer each image once, by its nearest vector;
    /stats describes the regional vectors."""
    from api import create_app

    data, with_regions, _ = indexes
    original = "green_stripes/green_stripes_004.png"
    query = _crop_copy(data, original, 3, tmp_path / "q.png")
    app = create_app({"INDEX_DIR": str(with_regions), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t")})
    try:
        client = app.test_client()
        with open(query, "rb") as f:
            found = client.post("/search?k=6", data=f.read(), content_type="image/png")
        assert found.status_code == 200, found.get_data(as_text=True)
        results = found.get_json()["results"]
        assert results[0]["path"] == original and results[0]["distance"] < 1e-3
        assert len({r["id"] for r in results}) == 6
        assert found.get_json()["index"]["regions"] == REGION_COUNT     # the answer says how it was searched
        me = results[0]["id"]
        neighbours = client.get(f"/images/{me}/neighbours?k=8").get_json()["results"]
        assert me not in {r["id"] for r in neighbours} and len({r["id"] for r in neighbours}) == 8
        stats = client.get("/stats").get_json()
        assert stats["vector_index"]["regions"]["count"] == REGION_COUNT * IMAGES
    finally:
        app.extensions["retrieval"].close()


def test_a_damaged_regional_vector_is_found_by_check_and_extracted_again(tmp_path):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=1, size=(120, 90), **PNG)
    index_dir = tmp_path / "index"
    build_index(data, index_dir, regions=True)
    with sqlite3.connect(index_dir / "catalog.db") as db:   # one region's bytes changed behind the catalog's back
        image_id, blob = db.execute("SELECT image_id, vector FROM region_vectors WHERE region = 2 LIMIT 1").fetchone()
        db.execute("UPDATE region_vectors SET vector = ? WHERE image_id = ? AND region = 2",
                   (bytes(reversed(blob)), image_id))
    report = check_index(data, index_dir, None)
    assert not report["ok"] and [v["id"] for v in report["vectors"]["bad"]] == [image_id]
    again = build_index(data, index_dir)
    assert again.indexed == 1   # the image of the damaged region, extracted again with all its regions
    _assert_in_step(index_dir)
    assert check_index(data, index_dir, None)["ok"]
