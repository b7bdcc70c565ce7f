"""Tests for FAISS index types: save/load/mmap, the auto choice, rebuilds from the catalog, recall, removals, crashes, serving."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from helpers.indexes import committed_rows, recorded_precision
from helpers.waiting import wait_for
from retrieval.samples import make_sample_collection
from retrieval.catalog import Catalog
from retrieval.vectors.builder import IndexBuilder, maintain_vectors
from retrieval.vectors import faiss_parts
from retrieval.vectors.faiss_parts import SearchParams, apply_search_params, fit_precomputed_tables
from retrieval.vectors.index_types import FLAT, IndexTypeConfig, IndexTypeError, auto_factory, vector_work_needed
from retrieval.names import FAISS_FILE
from retrieval.vectors.recall import exact_neighbours, measure, score
from retrieval.vectors.vector_index import VectorIndex

DIM = 32
TYPES = ["Flat", "IVF8,Flat", "IVF8,PQ8x4np", "PCAR16,IVF8,SQ8", "HNSW8", "PQ8x4np"]


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """n vectors around 12 seeded centres, shape=(n, dim) float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)) * 2
    return (centres[rng.integers(0, 12, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def fill(catalog: Catalog, vectors: np.ndarray, start: int = 0) -> list[int]:
    rows = [{"path": f"img{start + i:05d}.png", "label": None, "size": 1, "mtime_ns": 1, "width": 1, "height": 1,
             "sha256": "x"} for i in range(len(vectors))]
    return catalog.write_batch(rows, vectors, [])[0]


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path, create=True)
    yield cat
    cat.close()


def build(catalog: Catalog, tmp_path: Path, **config) -> VectorIndex:
    """One run's FAISS side (what index-images does with no new images), through the no-network path."""
    config = {"recall_queries": 100, "whiten": False, **config}   # the types themselves, on raw vectors
    maintain_vectors(catalog, tmp_path / FAISS_FILE, DIM, IndexTypeConfig(**config))
    return VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory=catalog.vector_index_record()["factory"])


def top_ids(index: VectorIndex, queries: np.ndarray, k: int = 5) -> np.ndarray:
    return index.search(queries, k)[1]


@pytest.mark.parametrize("factory", TYPES)
def test_every_type_round_trips_through_save_load_and_mmap(catalog, tmp_path, factory):
    vecs = clustered(400)
    ids = fill(catalog, vecs)
    original = build(catalog, tmp_path, index_type=factory)
    record = catalog.vector_index_record()
    assert record["factory"] == factory and record["count"] == 400
    queries = vecs[::40]

    loaded = VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory=factory)
    mapped = VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory=factory, mmap=True, vector_source=catalog.vectors)

    assert mapped.mapped and not loaded.mapped
    for index in (loaded, mapped):
        assert sorted(index.ids().tolist()) == ids
        assert np.array_equal(top_ids(index, queries), top_ids(original, queries))
    with pytest.raises(AssertionError, match="read-only"):
        mapped.add(np.array([10**6]), vecs[:1])
    assert VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory="IVF4,Flat" if factory != "IVF4,Flat" else FLAT) is None, \
        "a file of another type than the catalog records is not used"

    # how a server catches up with the catalog: a writable copy of the mapped index, changed while the mapped
    # one still answers (a clone that kept viewing the read-only mapping died of SIGSEGV on its first removal)
    changed = mapped.copy()
    assert changed.remove(ids[:10]) == 10
    changed.add(np.array([10**6]), vecs[:1])
    assert sorted(changed.ids().tolist()) == sorted(ids[10:] + [10**6])
    assert sorted(mapped.ids().tolist()) == ids and np.array_equal(top_ids(mapped, queries), top_ids(original, queries))


def test_auto_past_a_low_flat_max_stays_exact_until_its_type_can_train_and_says_so(catalog, tmp_path):
    """Reproduces (scale-out review): --auto-flat-max 100 on 150 images failed with "index type 'IVF64,PQ8np' needs at
    least 256 vectors to train ... (--index-type)", an option never given; a type asked for waits, so does auto's."""
    from commands.index_images import describe_vector_index

    fill(catalog, clustered(150))
    assert build(catalog, tmp_path, flat_max=100).exact
    line = describe_vector_index(catalog.vector_index_record())
    assert line == ("Flat (exact; auto's IVF64,PQ8np (past --auto-flat-max 100) waits for 256 images to train "
                    "(has 150), exact search until then)"), line   # (32-d test vectors: no PCA in front)
    fill(catalog, clustered(150, seed=3), start=150)
    assert not build(catalog, tmp_path).exact and catalog.vector_index_record()["factory"] == "IVF64,PQ8np"


def test_auto_keeps_flat_up_to_its_threshold_then_trains_a_compressed_type(catalog, tmp_path):
    assert auto_factory(50_000, 4096) == FLAT
    assert auto_factory(50_001, 4096) == "PCAR256,IVF1024,PQ64np"
    assert auto_factory(1_000_000, 4096) == "PCAR256,IVF4096,PQ64np"
    fill(catalog, clustered(399))
    assert build(catalog, tmp_path, flat_max=399).exact
    assert catalog.vector_index_record()["recall"] is None, "exact search: nothing to measure"

    fill(catalog, clustered(1, seed=5), start=399)   # 400 > flat_max: auto moves on, rebuilt from the catalog
    index = build(catalog, tmp_path)                 # flat_max is remembered with the index

    record = catalog.vector_index_record()
    assert record["requested"] == "auto" and record["factory"] == auto_factory(400, DIM, 399) == "IVF64,PQ8np"
    assert not index.exact and len(index) == 400
    assert record["train"]["size"] == 300, "trained on the catalog's vectors, the 100 recall queries held out"
    assert record["recall"]["queries"] == 100 and record["recall"]["held_out"]
    assert record["search_params"]["nprobe"] >= 1


def test_a_type_faiss_cannot_build_is_a_clear_error(catalog, tmp_path):
    fill(catalog, clustered(50))
    with pytest.raises(IndexTypeError, match="IVF8,Nonsense"):
        build(catalog, tmp_path, index_type="IVF8,Nonsense")
    assert not (tmp_path / FAISS_FILE).exists()


def test_a_trained_type_is_exact_flat_until_there_are_enough_vectors_to_train_it(catalog, tmp_path):
    fill(catalog, clustered(100))
    assert build(catalog, tmp_path, index_type="IVF8,PQ8np").exact, "PQ8 needs 256 training vectors"
    fill(catalog, clustered(200, seed=1), start=100)
    index = build(catalog, tmp_path)
    assert catalog.vector_index_record()["factory"] == "IVF8,PQ8np" and not index.exact


@pytest.mark.parametrize("factory", ["LSH", "PCAR16,LSH"])
def test_lsh_is_refused_as_not_l2(catalog, tmp_path, factory):
    """LSH says METRIC_L2 but ranks by the Hamming distance of binary codes (1-recall@1 0.68 on a small index): it was
    built; it is refused as the inner-product types are."""
    fill(catalog, clustered(50))
    with pytest.raises(IndexTypeError, match="is not an L2 index"):
        build(catalog, tmp_path, index_type=factory)


def test_a_type_asked_for_before_it_can_be_built_is_remembered_until_it_can(catalog, tmp_path):
    """Reproduces: --index-type IVF8,PQ8np on an auto index of 100 images (a PQ code book needs 256) was dropped: the
    run had no FAISS work to do (exact Flat either way), so the request went unrecorded and auto went on at 300."""
    fill(catalog, clustered(100))
    build(catalog, tmp_path)
    asked = IndexTypeConfig(index_type="IVF8,PQ8np", whiten=False)
    assert vector_work_needed(asked, catalog, DIM), "a new type asked for is work, even while it stays Flat"
    assert build(catalog, tmp_path, index_type="IVF8,PQ8np").exact
    assert catalog.vector_index_record()["requested"] == "IVF8,PQ8np"
    fill(catalog, clustered(200, seed=1), start=100)
    assert not build(catalog, tmp_path).exact and catalog.vector_index_record()["factory"] == "IVF8,PQ8np"


def test_search_settings_asked_for_one_type_are_not_carried_to_another(catalog, tmp_path):
    """Reproduces: --ef-search 64 asked for an HNSW index stayed 'requested' when IVF16,Flat was asked for next, so
    its nprobe was never tuned (left at 1: 1-recall@10 0.83) and the recall recorded was under efSearch 64."""
    fill(catalog, clustered(400))
    build(catalog, tmp_path, index_type="HNSW8", ef_search=64)
    assert catalog.vector_index_record()["requested_search_params"] == {"ef_search": 64}
    build(catalog, tmp_path, index_type="IVF16,Flat")
    record = catalog.vector_index_record()
    assert record["requested_search_params"] == {} and set(record["search_params"]) == {"nprobe"}
    measured = record["recall"]["results"]
    assert all(set(r["search_params"]) == {"nprobe"} for r in measured), measured
    assert measured[-1]["1-recall@10"] >= 0.95 and measured[-1]["search_params"] == record["search_params"]
    build(catalog, tmp_path, nprobe=4)   # settings asked for with the same type are kept by later runs
    build(catalog, tmp_path)
    assert catalog.vector_index_record()["requested_search_params"] == {"nprobe": 4}


def test_a_setting_the_type_has_no_use_for_leaves_its_own_tuned_and_measured(catalog, tmp_path):
    """Reproduces (scale-out review): --ef-search 64 on an IVF index (RETRIEVAL_EF_SEARCH exported for an HNSW server)
    stopped nprobe's tuning for good: a rebuild left nprobe 1 (top-5 as exact for 6 of 30 queries) and the recall was
    recorded under efSearch, which IVF has not ('recall not measured'); nor was the setting said to wait."""
    from commands.index_images import describe_vector_index, unused_search_params_note

    fill(catalog, clustered(400))
    build(catalog, tmp_path, index_type="IVF16,Flat", ef_search=64, rebuild=True)
    record = catalog.vector_index_record()
    assert record["requested_search_params"] == {"ef_search": 64}, "kept for when the type is HNSW"
    measured = record["recall"]["results"]
    assert all(set(r["search_params"]) == {"nprobe"} for r in measured), measured
    assert measured[-1]["1-recall@10"] >= 0.95 and record["search_params"] == measured[-1]["search_params"]
    assert "recall not measured" not in describe_vector_index(record)
    assert unused_search_params_note(record) == ("note: --ef-search kept for when the index is a type that uses it "
                                                 "(HNSW); IVF16,Flat has no use for it")


@pytest.mark.parametrize("factory", ["IVF8,PQ8x4np", "HNSW8"])
def test_rebuild_from_the_catalog_equals_the_original(catalog, tmp_path, factory):
    vecs = clustered(400)
    fill(catalog, vecs)
    original = build(catalog, tmp_path, index_type=factory)
    (tmp_path / FAISS_FILE).unlink()

    rebuilt = build(catalog, tmp_path, rebuild=True)

    assert sorted(rebuilt.ids().tolist()) == sorted(original.ids().tolist())
    assert np.array_equal(top_ids(rebuilt, vecs[::10], 10), top_ids(original, vecs[::10], 10))
    assert catalog.vector_index_record()["factory"] == factory


def test_recall_queries_the_index_was_also_trained_on_are_not_called_held_out(catalog, tmp_path):
    """Reproduces: a whitened IVF index of 295 images learned its whitening on all of them (as whitening does while
    the collection is small), and index-images still said "on 295 held-out queries" (the gallery "held-out images")."""
    from commands.index_images import describe_vector_index

    fill(catalog, clustered(150))
    build(catalog, tmp_path, index_type="IVF8,Flat", whiten=True)
    record = catalog.vector_index_record()
    assert record["factory"].startswith("PCAW") and record["factory"].endswith("IVF8,Flat"), record["factory"]
    assert record["train"]["size"] == 150 and record["train"]["trained_on_recall_queries"]
    assert record["recall"]["held_out"] is False
    assert "on 100 queries (trained on too: too few images to hold them out)" in describe_vector_index(record)


def test_recall_is_measured_against_indexflatl2(catalog):
    vecs = clustered(500)
    ids = np.array(fill(catalog, vecs))
    queries, query_ids = vecs[:50], ids[:50]
    truth = faiss.IndexFlatL2(DIM)
    truth.add(vecs)
    _, pos = truth.search(queries, 11)
    want = np.array([[ids[p] for p in row if ids[p] != own][:10] for row, own in zip(pos, query_ids)])

    exact = exact_neighbours(catalog.vectors(chunk=64), queries, query_ids)   # streamed in chunks

    assert np.array_equal(exact, want)
    exact_ivf = VectorIndex.empty(DIM, "IVF1,Flat")          # one list, searched whole: exact, but measured
    exact_ivf.train(vecs)
    exact_ivf.add(ids, vecs)
    result = measure(exact_ivf, queries, query_ids, exact, SearchParams(nprobe=1))
    assert (result.recall_1_at_1, result.recall_1_at_10, result.recall_10_at_10) == (1.0, 1.0, 1.0)
    coarse = VectorIndex.empty(DIM, "IVF16,PQ4x4np")
    coarse.train(vecs)
    coarse.add(ids, vecs)
    rough = measure(coarse, queries, query_ids, exact, SearchParams(nprobe=1))
    assert rough.recall_10_at_10 < 0.9 and rough.recall_1_at_1 < 1.0
    _, found = coarse.search(queries, 11)
    own_removed = np.array([[i for i in row if i != own][:10] for row, own in zip(found, query_ids)])
    assert score(own_removed, exact)[2] == pytest.approx(rough.recall_10_at_10)


def test_recorded_recall_is_at_the_recorded_search_settings(catalog, tmp_path):
    fill(catalog, clustered(400))
    build(catalog, tmp_path, index_type="IVF16,Flat", nprobe=2)
    record = catalog.vector_index_record()
    assert record["search_params"] == {"nprobe": 2} == record["requested_search_params"]
    assert [r["search_params"] for r in record["recall"]["results"]] == [{"nprobe": 2}]

    build(catalog, tmp_path, nprobe=16)   # new settings, same file: measured again, recorded with them
    record = catalog.vector_index_record()
    assert record["recall"]["results"][0]["search_params"] == {"nprobe": 16}
    assert record["recall"]["results"][0]["1-recall@10"] == 1.0, "all 16 lists: exact"


@pytest.mark.parametrize("factory", ["IVF8,PQ8x4np", "HNSW8", "PQ8x4np"])
def test_add_and_remove_on_a_trained_index(catalog, tmp_path, factory):
    vecs = clustered(400)
    ids = fill(catalog, vecs)
    build(catalog, tmp_path, index_type=factory)
    builder = IndexBuilder(catalog, tmp_path / FAISS_FILE, DIM, IndexTypeConfig(recall_queries=100, whiten=False))
    index, changed = builder.open()
    assert not changed
    gone = ids[:50]
    catalog.remove_paths([f"img{i:05d}.png" for i in range(50)])

    assert index.remove(gone) == 50                              # HNSW: rebuilt from the catalog without them
    new_ids = fill(catalog, clustered(20, seed=9), start=400)
    index.add(np.array(new_ids), clustered(20, seed=9))

    assert sorted(index.ids().tolist()) == sorted(ids[50:] + new_ids)
    found = index.search(vecs[:60], 10)[1]
    assert not set(found.ravel().tolist()) & set(gone)
    builder.save(builder.finish(index, True))
    assert sorted(VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory=factory).ids().tolist()) == sorted(ids[50:] + new_ids)


def test_mmap_maps_a_private_copy_also_of_paths_faiss_cannot_open(catalog, tmp_path):
    odd = tmp_path / os.fsdecode(b"caf\xe9")   # not UTF-8
    odd.mkdir()
    fill(catalog, clustered(100))
    index = VectorIndex.empty(DIM, "IVF4,Flat")
    index.train(clustered(100))
    index.add(catalog.ids(), clustered(100))
    index.save(odd / FAISS_FILE)
    loaded = VectorIndex.load(odd / FAISS_FILE, DIM, factory="IVF4,Flat", mmap=True)
    assert loaded is not None and loaded.mapped and len(loaded) == 100
    assert np.array_equal(loaded.search(clustered(100)[:5], 3)[1], index.search(clustered(100)[:5], 3)[1])


# --- index-images and the server over a trained index --------------------------------------------------------

N_IMAGES = 40
TRAINED = "IVF4,SQ8"   # trains on 4 vectors: small enough for a 40-image collection


def index_command(data: Path, index_dir: Path, precision: str = "auto") -> list[str]:
    return [sys.executable, "-c", "from commands.index_images import main; main()", str(data), "--index-dir", str(index_dir),
            "--weights", "random", "--batch-size", "1", "--workers", "0", "--index-type", TRAINED,
            "--recall-queries", "20", "--precision", precision, "--json"]


def state(index_dir: Path) -> tuple[dict, dict, dict]:
    """(path -> vector, path -> paths of its 5 FAISS neighbours, the FAISS record), checking FAISS agrees with the catalog."""
    cat = Catalog(index_dir)
    try:
        record = cat.vector_index_record()
        index = VectorIndex.load(index_dir / FAISS_FILE, 4096, factory=record["factory"])
        assert np.array_equal(np.sort(index.ids()), cat.ids()), "every FAISS id has a row and every row its entry"
        paths = {i: p for p, (i, _s, _m) in cat.file_states().items()}
        vectors, neighbours = {}, {}
        for ids, vecs in cat.vectors():
            found = index.search(vecs, 5)[1]
            for i, v, row in zip(ids.tolist(), vecs, found):
                vectors[paths[i]] = v
                neighbours[paths[i]] = [paths[int(j)] for j in row if j >= 0]
        return vectors, neighbours, record
    finally:
        cat.close()


@pytest.fixture(scope="module")
def trained_collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    make_sample_collection(data, per_class=N_IMAGES // 5, size=(64, 48), seed=6)
    reference = root / "reference"
    done = subprocess.run(index_command(data, reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return data, reference, json.loads(done.stdout)


@pytest.mark.slow
def test_index_images_reports_the_type_and_its_recall(trained_collection):
    _, _, summary = trained_collection
    info = summary["vector_index"]
    assert info["factory"] == TRAINED and not info["exact"] and info["train"]["count"] == N_IMAGES
    measured = info["recall"]["results"][-1]
    assert measured["search_params"] == info["search_params"]
    assert 0.0 < measured["1-recall@10"] <= 1.0 and info["recall"]["queries"] == 20


@pytest.mark.slow
def test_sigkill_of_a_trained_index_build_then_rerun_equals_an_uninterrupted_run(trained_collection, tmp_path):
    data, reference, _ = trained_collection
    index_dir = tmp_path / "index"
    precision = recorded_precision(reference)   # the same precision as the reference, so the same neighbours
    proc = subprocess.Popen(index_command(data, index_dir, precision), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: committed_rows(index_dir) >= N_IMAGES // 2 or proc.poll() is not None, 120, interval=0.005)
    assert proc.poll() is None, "the run ended before it could be killed; the test proves nothing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert N_IMAGES // 2 <= committed_rows(index_dir) < N_IMAGES

    rerun = subprocess.run(index_command(data, index_dir), capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr
    vectors, neighbours, record = state(index_dir)
    want_vectors, want_neighbours, want_record = state(reference)
    assert sorted(vectors) == sorted(want_vectors)
    for path, vec in want_vectors.items():
        assert np.allclose(vectors[path], vec, atol=1e-5), path
    assert neighbours == want_neighbours, "the same trained index: the same neighbours"
    assert record["train"]["size"] == want_record["train"]["size"] and record["factory"] == TRAINED


@pytest.mark.slow
def test_rebuild_index_needs_no_network(trained_collection, tmp_path, monkeypatch):
    """--rebuild-index with nothing new to index never builds the network (its weights could be gone)."""
    import shutil

    from click.testing import CliRunner

    from commands.index_images import main

    data, reference, _ = trained_collection
    index_dir = tmp_path / "copy"
    shutil.copytree(reference, index_dir)
    (index_dir / FAISS_FILE).unlink()
    import retrieval.features.backbones

    def refuse(*_a, **_k):
        raise AssertionError("the network was built")
    monkeypatch.setattr(retrieval.features.backbones, "build_extractor", refuse)

    result = CliRunner().invoke(main, [str(data), "--index-dir", str(index_dir), "--rebuild-index", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["vector_index"]["factory"] == TRAINED
    assert state(index_dir)[1] == state(reference)[1]
    said = CliRunner().invoke(main, [str(data), "--index-dir", str(index_dir), "--rebuild-index"]).stdout
    assert f"FAISS index (rebuilt from the catalog, as asked): {TRAINED}" in said   # a line of its own, not silence


@pytest.mark.slow
def test_the_server_answers_from_a_compressed_index(trained_collection, tmp_path):
    from api import create_app

    data, reference, _ = trained_collection
    app = create_app({"INDEX_DIR": str(reference), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t")})
    try:
        client = app.test_client()
        stats = client.get("/stats").get_json()["vector_index"]
        assert stats["type"] == TRAINED and stats["memory_mapped"] and not stats["exact"]
        assert stats["recall"]["search_params"] == stats["search_params"]
        some = sorted(data.rglob("*.jpg"))[3]
        with open(some, "rb") as f:
            found = client.post("/search", data={"image": (f, some.name)}).get_json()["results"]
        assert len(found) == 10
        assert some.relative_to(data).as_posix() in [h["path"] for h in found[:3]], "an indexed image finds itself"
        hit = found[0]["id"]
        neighbours = client.get(f"/images/{hit}/neighbours?k=5").get_json()["results"]
        assert len(neighbours) == 5 and hit not in [n["id"] for n in neighbours]
        page = client.get("/").get_data(as_text=True)
        assert TRAINED in page and "1-recall@10" in page
    finally:
        app.extensions["retrieval"].close()


@pytest.mark.slow
def test_serve_side_search_settings_override_the_recorded_ones(trained_collection, tmp_path):
    from api import create_app

    _, reference, _ = trained_collection
    app = create_app({"INDEX_DIR": str(reference), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t"),
                      "NPROBE": 3})
    try:
        stats = app.test_client().get("/stats").get_json()["vector_index"]
        assert stats["search_params"] == {"nprobe": 3}
        recorded = {tuple(r["search_params"].items()) for r in Catalog(reference).vector_index_record()["recall"]["results"]}
        assert (stats["recall"] is None) == ((("nprobe", 3),) not in recorded), "recall only for settings it was measured with"
    finally:
        app.extensions["retrieval"].close()


def test_index_images_refuses_a_factory_string_faiss_cannot_build_at_once(tmp_path):
    from click.testing import CliRunner

    from commands.index_images import main

    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--index-dir", str(tmp_path / "index"),
                                       "--index-type", "IVF8,Bogus", "--weights", "random"])
    assert result.exit_code == 2 and "IVF8,Bogus" in result.output and "--index-type" in result.output
    assert not (tmp_path / "index").exists(), "nothing written"
    # FAISS's own words, without its C++ signature and source location, and types that can be built
    assert "could not parse" in result.output and "faiss::" not in result.output
    assert ".cpp" not in result.output and "HNSW32" in result.output


def test_a_pca_index_file_does_not_keep_the_training_only_eigenvector_matrix(tmp_path):
    dim = 256
    vecs = clustered(600, dim)
    index = VectorIndex.empty(dim, "PCAR16,IVF8,SQ8")
    index.train(vecs)
    index.add(np.arange(600), vecs)
    index.save(tmp_path / FAISS_FILE)
    assert (tmp_path / FAISS_FILE).stat().st_size < dim * dim * 4, "the d x d PCA matrix alone would be this large"
    loaded = VectorIndex.load(tmp_path / FAISS_FILE, dim, factory="PCAR16,IVF8,SQ8", mmap=True)
    assert np.array_equal(loaded.search(vecs[:20], 5)[1], index.search(vecs[:20], 5)[1])


def precomputed_table_of(index: VectorIndex) -> faiss.IndexIVFPQ:
    return faiss.downcast_index(faiss.extract_index_ivf(index.index))


def test_an_ivfpq_searches_alike_without_its_precomputed_table(tmp_path):
    vecs, queries = clustered(3000), clustered(100, seed=1)
    index = VectorIndex.empty(DIM, "IVF16,PQ8np")
    index.train(vecs)
    index.add(np.arange(len(vecs)), vecs)
    index.save(tmp_path / FAISS_FILE)
    with_table = VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory="IVF16,PQ8np", mmap=True)
    without = VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory="IVF16,PQ8np", mmap=True)
    fit_precomputed_tables(without.index, max_bytes=0)
    assert precomputed_table_of(with_table).precomputed_table.size() == 16 * 8 * 256   # nlist x M x ksub floats
    assert precomputed_table_of(without).precomputed_table.size() == 0
    assert precomputed_table_of(without).use_precomputed_table == -1
    exact = faiss.IndexFlatL2(DIM)
    exact.add(vecs)
    truth = exact.search(queries, 10)[1]
    for nprobe in (1, 4, 16):
        apply_search_params(with_table.index, SearchParams(nprobe=nprobe))
        apply_search_params(without.index, SearchParams(nprobe=nprobe))
        d_table, i_table = with_table.search(queries, 10)
        d_none, i_none = without.search(queries, 10)
        assert np.array_equal(i_table, i_none), f"nprobe {nprobe}"
        np.testing.assert_allclose(d_table, d_none, rtol=1e-5, atol=1e-5)   # the two sums round differently
        assert score(i_table, truth) == score(i_none, truth)
    assert score(i_none, truth)[1] > 0.9, "nprobe 16 of 16 lists: only the PQ codes' error is left"


def test_a_served_index_does_not_build_a_precomputed_table_above_the_budget(tmp_path, monkeypatch):
    vecs = clustered(3000)
    index = VectorIndex.empty(DIM, "IVF16,PQ8np")
    index.train(vecs)
    index.add(np.arange(len(vecs)), vecs)
    assert precomputed_table_of(index).precomputed_table.size() > 0, "small: kept after training"
    index.save(tmp_path / FAISS_FILE)
    monkeypatch.setattr(faiss_parts, "PRECOMPUTED_TABLE_MAX_BYTES", 16 * 8 * 256 * 4 - 1)
    for mmap in (True, False):
        loaded = VectorIndex.load(tmp_path / FAISS_FILE, DIM, factory="IVF16,PQ8np", mmap=mmap)
        assert precomputed_table_of(loaded).precomputed_table.size() == 0
        assert np.array_equal(loaded.search(vecs[:50], 10)[1], index.search(vecs[:50], 10)[1])


@pytest.mark.slow
def test_a_type_too_large_for_the_collection_is_named_with_what_it_waits_for(trained_collection, tmp_path):
    """--index-type IVF4096 on 40 images: the index stays exact, and the report line says which type was asked for,
    how many images it needs to train and how many there are (not a bare "Flat (exact)")."""
    import shutil

    from click.testing import CliRunner

    from commands.index_images import main

    data, reference, _ = trained_collection
    index_dir = tmp_path / "index"
    shutil.copytree(reference, index_dir)
    result = CliRunner().invoke(main, [str(data), "--index-dir", str(index_dir), "--index-type", "IVF4096,PQ16"])
    assert result.exit_code == 0, result.output
    line = next(s for s in result.output.splitlines() if s.startswith("FAISS index: "))
    assert line.startswith("FAISS index: Flat (exact"), line
    assert f"IVF4096,PQ16 waits for 4096 images to train (has {N_IMAGES}), exact search until then" in line


def test_a_type_trained_on_fewer_vectors_than_its_k_means_want_says_so_once():
    """Reproduces: IVF256,PQ64 chosen on 2,000 images printed 65 lines of FAISS's 'WARNING clustering 2000 points to
    256 centroids: please provide at least 9984 training points', one per k-means; one line of ours says it now."""
    import subprocess
    import sys

    script = ("import logging, numpy as np\nlogging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
              "from retrieval.vectors.vector_index import VectorIndex\n"
              "v = VectorIndex.empty(256, 'IVF256,PQ64np')\n"
              "v.train(np.random.default_rng(0).standard_normal((2000, 256)).astype('float32'))\n"
              "assert v.index.is_trained")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "please provide at least" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "training IVF256,PQ64np on 2000 vectors, fewer than its k-means want (256 lists want 9,984; 64 codebooks of "
        "256 want 9,984): its clusters are rougher, and recall is measured below"]


def test_search_settings_asked_for_below_the_recall_target_are_said_so():
    """Reproduces: RETRIEVAL_NPROBE=2 in the shell (meant for serve-images) made index-images record nprobe 2 with
    1-recall@10 0.864 and no word; the report said only the number. A note says what it is and how to tune."""
    from commands.index_images import describe_vector_index, low_recall_note

    def info(asked: dict, recall: float) -> dict:
        return {"requested": "IVF16,Flat", "factory": "IVF16,Flat", "exact": False, "count": 200,
                "requested_search_params": asked, "search_params": {"nprobe": 2},
                "recall": {"queries": 200, "results": [{"search_params": {"nprobe": 2}, "1-recall@1": recall,
                                                        "1-recall@10": recall, "10-recall@10": recall}]}}

    low = low_recall_note(info({"nprobe": 2}, 0.864))
    assert low is not None and low.startswith("note: --nprobe 2 (asked for on the command line, or by RETRIEVAL_NPROBE")
    assert "0.864 of the true nearest in the first 10, under the 0.95 the tuning aims for" in low
    assert low_recall_note(info({"nprobe": 2}, 0.97)) is None, "enough recall"
    assert low_recall_note(info({}, 0.864)) is None, "tuned by index-images itself: its own choice, reported as is"
    assert "1-recall@10 0.864" in describe_vector_index(info({"nprobe": 2}, 0.864))


def test_a_requested_type_still_waiting_for_images_is_named_behind_whitening():
    """Reproduces: --index-type IVF4096,PQ64np on 2,000 images (whitened) printed only 'PCAW256,L2norm,Flat
    (IVF4096,PQ64np; recall not measured)', not that the type waits for more images."""
    from commands.index_images import describe_vector_index
    from retrieval.vectors.index_types import min_train_vectors

    line = describe_vector_index({"requested": "IVF4096,PQ64np", "factory": "PCAW256,L2norm,Flat", "exact": False,
                                  "count": 2000})
    assert line == (f"PCAW256,L2norm,Flat (exact in the whitened space; IVF4096,PQ64np waits for "
                    f"{min_train_vectors('IVF4096,PQ64np')} images to train (has 2000), exact search until then)")


def test_search_settings_the_index_type_has_no_use_for_are_said_to_wait(tmp_path):
    """Reproduces: `index-images data --nprobe 32` on a Flat index recorded the setting without a word, as if it had
    been used."""
    from click.testing import CliRunner

    from commands.index_images import main
    from retrieval.samples import make_sample_collection

    make_sample_collection(tmp_path / "data", per_class=1, size=(48, 36), classes=["red_circles", "blue_squares"])
    result = CliRunner().invoke(main, [str(tmp_path / "data"), "--index-dir", str(tmp_path / "index"), "--weights",
                                       "random", "--workers", "0", "--nprobe", "32"])
    assert result.exit_code == 0, result.output
    assert "note: --nprobe kept for when the index is a type that uses it (IVF); Flat has no use for it" in result.output


def test_an_nprobe_beyond_the_lists_is_said_to_search_them_all(caplog):
    """Reproduces: serve-images --nprobe 64 on an IVF16 index ran with nprobe 16 without a word."""
    import logging

    import faiss

    from retrieval.vectors.faiss_parts import SearchParams, apply_search_params, ivf_of

    index = faiss.index_factory(DIM, "IVF16,Flat")
    with caplog.at_level(logging.WARNING, logger="retrieval.vectors.faiss_parts"):
        apply_search_params(index, SearchParams(nprobe=64))
    assert ivf_of(index).nprobe == 16
    assert "nprobe 64 is more than the index's 16 lists: all 16 are searched" in caplog.text
