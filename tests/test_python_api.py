"""The Python API (retrieval.open_index, evaluate, compare; indexer.index_folder): what a notebook user types."""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval
from indexer import index_folder
from retrieval.samples import make_sample_collection

FAST = {"weights": "random", "workers": 0, "batch_size": 8}   # seeded random network, decoding in this process


@dataclasses.dataclass(frozen=True)
class Built:
    root: Path
    data: Path
    index: Path
    progress: list[tuple[int, int]]
    total: int


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """4 classes x 5 pictures indexed through index_folder with relative paths, a progress callback recording calls.
    One class is named with characters HTML must escape."""
    root = tmp_path_factory.mktemp("pyapi")
    data = root / "data"
    written = make_sample_collection(data, per_class=5, size=(120, 96), seed=3,
                                     classes=["red_circles", "blue_squares", "green_stripes", "purple_checks"])
    (data / "purple_checks").rename(data / "<b>&checks")
    calls: list[tuple[int, int]] = []
    here = os.getcwd()
    os.chdir(root)              # a notebook user types paths relative to the working folder
    try:
        report = index_folder("data", "index", progress=lambda done, total: calls.append((done, total)), **FAST)
    finally:
        os.chdir(here)
    assert report.indexed == len(written), report
    return Built(root, data, root / "index", calls, len(written))


@pytest.fixture(scope="module")
def index(built):
    with retrieval.open_index(built.index) as ix:
        yield ix


def test_import_retrieval_loads_no_torch():
    heavy = "('torch', 'torchvision', 'faiss', 'sqlalchemy', 'sklearn')"
    for imports, expected in (("retrieval", "[]"), ("retrieval, indexer", "['sqlalchemy']")):   # the catalog's
        code = f"import sys, {imports}; print(sorted(m for m in {heavy} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected, (imports, out)
    assert "open_index" in dir(retrieval) and retrieval.__doc__ and "index_folder" in retrieval.__doc__


def test_index_folder_reports_progress_up_to_the_total(built):
    done = [d for d, _ in built.progress]
    assert built.progress, "the callback was never called"
    assert {t for _, t in built.progress} == {built.total}
    assert done == sorted(done) and len(set(done)) == len(done), built.progress   # strictly increasing
    assert done[-1] == built.total


def test_index_folder_again_is_a_no_op_and_rejects_unknown_options(built):
    calls = []
    report = index_folder(built.data, built.index, progress=lambda d, t: calls.append(d), **FAST)
    assert (report.indexed, report.unchanged, calls) == (0, built.total, [])
    with pytest.raises(TypeError, match="unknown option"):
        index_folder(built.data, built.index, bacth_size=4)


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("batch_size", "64"), ("workers", "x"), ("workers", -1),
                                           ("seed", "abc"), ("max_pixels", 0), ("save_every_s", -1),
                                           ("layer", "fc9"), ("views", "bogus"), ("input_norm", "x"), ("model", "resnet"),
                                           ("normalize", "no"), ("device", "tpu"), ("precision", "fp8"), ("decode", "gpu"),
                                           ("progress", 5), ("vector_index", 3)])
def test_index_folder_refuses_a_bad_value_before_any_work_naming_the_option(built, option, value):
    """As the command line's types do: batch_size=0 was an AssertionError, workers="x" a TypeError from deep inside,
    and each was accepted without a word when nothing needed indexing."""
    from indexer.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{option} takes"):
        index_folder(built.data, built.index, **{**FAST, option: value})


def test_with_on_a_closed_index_says_it_is_closed(built):
    ix = retrieval.open_index(built.index)
    ix.close()
    with pytest.raises(ValueError, match="is closed; open it again"):
        with ix:
            pass


def test_a_wrong_name_leaves_no_index_folder_behind(built, tmp_path):
    """Reproduces: layer="fc9" (or views="bogus") was an AssertionError from the network's code, after a new index
    folder with its catalog and a 244 MB random-weights file had been made."""
    from indexer.config import ConfigError

    with pytest.raises(ConfigError, match="^layer takes one of 'fc6', 'fc7'"):
        index_folder(built.data, tmp_path / "new-index", weights="random", layer="fc9")
    with pytest.raises(ConfigError, match="--index-type"):   # refused by FAISS itself, before any work too
        index_folder(built.data, tmp_path / "new-index", weights="random", vector_index="IVF1024,PQ33")
    assert not (tmp_path / "new-index").exists()
    # weights refused once the run has begun (its catalog made): the folder goes again, as the command's does
    (tmp_path / "garbage.pt").write_bytes(b"not a state dict")
    for weights in (tmp_path / "nofile.pt", tmp_path / "garbage.pt"):
        with pytest.raises(ConfigError):
            index_folder(built.data, tmp_path / "new-index", weights=weights)
        assert not (tmp_path / "new-index").exists(), weights.name


def test_vector_index_takes_a_faiss_type_as_text(built):
    report = index_folder(built.data, built.index, vector_index="Flat", **FAST)
    assert report.vector_index["factory"] == "Flat"


def test_an_indexed_image_finds_itself_by_path_bytes_pil_and_array(built, index, monkeypatch):
    file = built.data / "red_circles" / "red_circles_002.jpg"
    monkeypatch.chdir(built.root)
    relative = Path("data/red_circles/red_circles_002.jpg")          # relative to the working folder
    rgb = Image.open(file).convert("RGB")
    results = [index.search(q, k=5) for q in
               (str(relative), relative, file.read_bytes(), Image.open(file), rgb, np.asarray(rgb))]
    first = results[0]
    assert first[0].path == "red_circles/red_circles_002.jpg" and first[0].distance < 1e-3
    assert first[0].file == file and first[0].label == "red_circles"
    assert first.query == str(relative)
    for r in results[1:]:   # the same preprocessing whatever the kind of query: the same hits
        assert [h.id for h in r] == [h.id for h in first], r.query
        assert np.allclose(r.distances, first.distances, atol=1e-4), r.query
    assert [len(r) for r in results] == [5] * 6
    assert first.distances == sorted(first.distances)


def test_search_refuses_what_is_not_an_image(index):
    with pytest.raises(TypeError, match="PIL image"):
        index.search(12345)
    with pytest.raises(ValueError, match="uint8"):
        index.search(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(retrieval.ImageDecodeError):   # a ValueError, caught by its name from the package
        index.search(b"not an image")
    with pytest.raises(FileNotFoundError, match="no-such-photo.jpg"):   # as open() would say, the file named
        index.search("no-such-photo.jpg")
    with pytest.raises(ValueError, match="k must"):
        index.search(b"x", k=0)
    with pytest.raises(ValueError, match="at least one pixel"):   # it was PIL's "cannot write empty image"
        index.search(np.zeros((0, 10, 3), dtype=np.uint8))


def test_a_closed_index_says_so_as_a_closed_file_does(built):
    """After close() a search reconnected silently; now it is a ValueError saying what to do, and repr still works."""
    ix = retrieval.open_index(built.index)
    ix.close()
    with pytest.raises(ValueError, match="is closed; open it again"):
        ix.search(built.data / "red_circles" / "red_circles_002.jpg")
    with pytest.raises(ValueError, match="is closed"):
        len(ix)
    assert "(closed)" in repr(ix)
    ix.close()                                  # a second close does nothing


def test_neighbours_by_hit_by_id_and_by_path_leave_the_image_out(built, index, monkeypatch):
    me = index.search(built.data / "blue_squares" / "blue_squares_001.jpg", k=1)[0]
    by_id = index.neighbours(me.id, k=4)
    assert me.id not in [h.id for h in by_id] and len(by_id) == 4
    assert [h.id for h in index.neighbours(me, k=4)] == [h.id for h in by_id]   # a result's hit, as it is
    import dataclasses

    with pytest.raises(retrieval.ImageNotIndexed, match="a result of another index"):   # not silently another image's
        index.neighbours(dataclasses.replace(me, path="elsewhere/other.jpg"))
    with pytest.raises(TypeError, match=r"neighbours\(hit\).*search\(hit.file\)"):
        index.search(me)
    monkeypatch.chdir(built.data)
    for path in ("blue_squares/blue_squares_001.jpg", Path("blue_squares/blue_squares_001.jpg").resolve()):
        assert [h.id for h in index.neighbours(path, k=4)] == [h.id for h in by_id]
    monkeypatch.chdir(built.root)   # relative to the working folder, or to the data folder: both found
    assert [h.id for h in index.neighbours("data/blue_squares/blue_squares_001.jpg", k=4)] == [h.id for h in by_id]
    with pytest.raises(retrieval.ImageNotIndexed):
        index.neighbours("nowhere.jpg")
    with pytest.raises(LookupError):
        index.neighbours(10**9)


def test_predict_a_new_picture_by_its_neighbours(index, tmp_path):
    new = make_sample_collection(tmp_path, per_class=1, size=(120, 96), seed=99, classes=["green_stripes"])[0]
    p = index.predict(Image.open(new), k=5)
    assert p.label == "green_stripes", p
    assert 1 <= p.votes <= p.voters <= 5 and len(p.neighbours) == 5
    assert "green_stripes" in p._repr_html_()


def test_len_info_and_features(built, index):
    info = index.info
    assert len(index) == info.count == built.total
    assert (info.model, info.layer, info.weights, info.dim) == ("alexnet", "fc7", "random", 4096)
    assert info.labels == {"<b>&checks": 5, "blue_squares": 5, "green_stripes": 5, "red_circles": 5}
    assert info.data_dir == built.data.resolve()
    v = index.features(built.data / "red_circles" / "red_circles_000.jpg")
    assert v.shape == (4096,) and v.dtype == np.float32 and abs(np.linalg.norm(v) - 1) < 1e-4
    assert (info.index_type, info.whitened_dim) == ("Flat", None)   # 20 images: whitening waits for 128


def test_info_says_when_distances_are_measured_in_a_whitened_space(tmp_path):
    """Reproduces: on a whitened index Hit.distance (0.557) was not the distance between the two images'
    features() (0.137), and nothing in IndexInfo said the searches compare whitened vectors."""
    from retrieval.vectors.index_types import IndexTypeConfig

    make_sample_collection(tmp_path / "data", per_class=12, size=(64, 48), seed=5)
    index_folder(tmp_path / "data", tmp_path / "index", vector_index=IndexTypeConfig(whiten=True, whiten_dim=8), **FAST)
    with retrieval.open_index(tmp_path / "index") as ix:
        info = ix.info
        assert (info.index_type, info.whitened_dim, info.dim) == ("PCAW8,L2norm,Flat", 8, 4096)
        first = sorted((tmp_path / "data").rglob("*.jpg"))[0]
        hit = ix.search(first, k=2)[1]
        raw = float(np.linalg.norm(ix.features(first) - ix.features(hit.file)))
        assert abs(hit.distance - raw) > 0.01   # as the docs now say: not the features' distance


def test_search_result_shows_thumbnails_and_escaped_labels(built, index):
    r = index.search(built.data / "<b>&checks" / "purple_checks_000.jpg", k=3)
    assert r[0].label == "<b>&checks"
    page = r._repr_html_()
    assert page.count('<img src="data:image/jpeg;base64,') == 4   # the query and its 3 neighbours
    assert "&lt;b&gt;&amp;checks" in page and "<b>&checks" not in page
    thumb = page.split('src="data:image/jpeg;base64,')[1].split('"')[0]
    import base64
    img = Image.open(io.BytesIO(base64.b64decode(thumb)))
    assert max(img.size) <= 96


def test_evaluate_and_compare(built, monkeypatch):
    monkeypatch.chdir(built.root)
    e = retrieval.evaluate("index", ks=(1, 3))
    assert e.images == built.total and e.classes == 4 and set(e.precision_at_k) == {1, 3}
    assert e.precision_at_k[1] > e.chance["retrieval_precision"]
    page = e._repr_html_()
    assert "precision@1" in page and "chance" in page and "&lt;b&gt;" not in page   # labels only in per_class
    c = retrieval.compare("index", built.index, ks=(1,), probe=False)   # an index against itself: no difference
    assert c.matched["images"] == built.total and c.a.probe_accuracy is None
    assert c.a.precision_at_k == c.b.precision_at_k
    assert "B &minus; A" in c._repr_html_() and "+0.000" in c._repr_html_()
    # print() shows the same tables as text (review: it printed the whole dataclass, result dict and all)
    text = str(e).splitlines()
    assert text[0].startswith(f"{built.index} (alexnet fc7") and "Evaluation(" not in str(e)
    assert text[1].split() == ["value", "chance"]
    assert f"{e.map:.3f}" in next(line for line in text if line.startswith("mAP")).split()
    assert next(line for line in text if line.startswith("linear probe")).split()[-2] == f"{e.probe_accuracy:.3f}"
    rows = str(c).splitlines()
    assert rows[0].startswith("A: ") and rows[1].startswith("B: ") and "Comparison(" not in str(c)
    assert next(line for line in rows if line.startswith("mAP")).split() == ["mAP", f"{c.a.map:.3f}", f"{c.b.map:.3f}",
                                                                            "+0.000", f"{c.a.chance['retrieval_precision']:.3f}"]
    assert next(line for line in rows if line.startswith("linear probe")).split()[3:5] == ["-", "-"]   # not run
    with pytest.raises(retrieval.EvaluationError, match=f"at most {built.total - 1} each"):
        retrieval.evaluate("index", ks=(built.total,))   # no k left to measure: said, not a traceback
    with pytest.raises(retrieval.IndexNotFound):
        retrieval.open_index("no-index-here")
    for call in (lambda: retrieval.evaluate("no-index-here"), lambda: retrieval.compare("index", "no-index-here")):
        with pytest.raises(retrieval.IndexNotFound, match="run index-images first"):   # a plain FileNotFoundError before
            call()


def test_duplicates_from_python_group_a_photo_with_its_copies(tmp_path, monkeypatch):
    """index.duplicates() as find-duplicates: a byte copy and a JPEG re-save of one picture in its group, the keeper
    (the largest) first; a given threshold skips the calibration; nothing in the folder changes."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=6, size=(120, 96), seed=5, classes=["red_circles", "blue_squares"])
    original = data / "red_circles" / "red_circles_002.jpg"
    (data / "red_circles" / "byte_copy.jpg").write_bytes(original.read_bytes())
    with Image.open(original) as img:
        img.resize((240, 192)).save(data / "red_circles" / "larger_resave.jpg", quality=60)
    before = sorted(p.name for p in data.rglob("*"))
    monkeypatch.chdir(tmp_path)
    index_folder("data", "index", **FAST)
    with retrieval.open_index("index") as index:
        found = index.duplicates()
        given = index.duplicates(threshold=found.threshold.value)
    group = next(g for g in found.groups if "red_circles/red_circles_002.jpg" in [m.path for m in g])
    paths = [m.path for m in group]
    assert paths[0] == "red_circles/larger_resave.jpg", "the largest is the suggested keeper"
    assert {"red_circles/byte_copy.jpg", "red_circles/red_circles_002.jpg"} <= set(paths)
    assert group[0].distance == 0 and group[0].width == 240 and found.images == 14
    assert found.threshold.source == "calibrated" and given.threshold.source == "given"
    assert [[m.id for m in g] for g in given.groups] == [[m.id for m in g] for g in found.groups]
    entries = {e["path"]: e for g in found.to_json()["groups"] for e in g}
    assert entries["red_circles/larger_resave.jpg"].keys() >= {"id", "path", "label", "width", "height", "bytes",
                                                                "sha256", "distance"}
    byte_copy, copied = entries["red_circles/byte_copy.jpg"], entries["red_circles/red_circles_002.jpg"]
    assert byte_copy["sha256"] == copied["sha256"] != entries["red_circles/larger_resave.jpg"]["sha256"], \
        "a script tells the byte copy from the re-save by its sha256"
    assert byte_copy["bytes"] == original.stat().st_size
    assert sorted(p.name for p in data.rglob("*")) == before
    # random weights: groups of drawings only alike come with find-duplicates' note, in Python too (it had none)
    assert any(len({m.sha256 for m in g}) > 1 for g in found.groups)
    assert found.notes() and "seeded random weights" in found.notes()[0]
    assert [g for g in found] == found.groups   # iterable, as a SearchResult is
    assert str(found).startswith(f"{len(found.groups)} group(s) of near-duplicates among 14 images") and \
        "note: this index's network has seeded random weights" in str(found)
    for refused in (-1, 0, 2, float("nan")):   # what find-duplicates --threshold refuses too
        with retrieval.open_index("index") as index, pytest.raises(retrieval.DuplicatesError):
            index.duplicates(threshold=refused)


def test_an_open_index_sees_what_another_process_indexed_since(tmp_path):
    """Reproduces: an Index opened in a notebook kept the vectors of the moment it was opened while its catalog was
    live: after index-images ran elsewhere, a new image was missing from search() (yet found by neighbours()), and
    info.count (105) disagreed with its labels (110). Each call now sees the index as on disk, as a server does."""
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(96, 72), seed=8, classes=["red_circles", "blue_squares"])
    index_folder(data, tmp_path / "index", **FAST)
    with retrieval.open_index(tmp_path / "index") as ix:
        assert len(ix) == 6
        new = data / "red_circles" / "late.png"
        Image.new("RGB", (96, 72), (20, 200, 220)).save(new)
        (data / "blue_squares" / "blue_squares_000.jpg").unlink()
        done = subprocess.run([sys.executable, "-c", "from commands.index_images import main; main()", str(data),
                               "--index-dir", str(tmp_path / "index"), "--workers", "0"], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert len(ix) == 6 and ix.info.count == sum(ix.info.labels.values()) == 6
        assert ix.search(new, k=1).hits[0].path == "red_circles/late.png"
        assert all(h.path != "blue_squares/blue_squares_000.jpg" for h in ix.search(new, k=6).hits)


@pytest.mark.parametrize("ks", [(0,), (), (1.5,), "abc", (True,)])
def test_evaluate_refuses_ks_that_are_not_whole_numbers_from_one_with_an_evaluation_error(built, ks):
    """Reproduces: ks=(0,) was an AssertionError (under python -O: 'min() arg is an empty sequence' and a divide by
    zero warning); ks=5 a TypeError. Now an EvaluationError (a ValueError) naming the value; one number is a list of one."""
    with pytest.raises(retrieval.EvaluationError, match="ks is a list of whole numbers from 1 up"):
        retrieval.evaluate(built.index, ks=ks)
    assert retrieval.evaluate(built.index, ks=np.int64(5)).ks == [5]


def test_odd_arguments_get_the_errors_the_docs_name(built, index):
    """Reproduces a review's list: a PIL image of mode I raised OSError (cannot write mode I as PNG); device='tpu'
    torch's RuntimeError listing a dozen backends; duplicates(threshold='0.3') a TypeError comparing int and str, and
    calibration_images=0 an error naming a command-line flag; search('') 'cannot read file: ... (a folder)'."""
    picture = Image.open(next(built.data.glob("red_circles/*.jpg")))
    assert index.search(picture.convert("I"), k=1).hits, "read as a file of 32-bit integers would be"
    with pytest.raises(ValueError, match="device is 'cpu', 'cuda' \\(or 'cuda:N'\\) or 'auto', not 'tpu'"):
        retrieval.open_index(built.index, device="tpu")
    with pytest.raises(TypeError, match="threshold is a number"):
        index.duplicates(threshold="0.3")
    with pytest.raises(retrieval.DuplicatesError, match="calibration_images is a whole number of at least 1"):
        index.duplicates(calibration_images=0)
    with pytest.raises(ValueError, match="the query path is empty"):
        index.search("")
    with pytest.raises(retrieval.ExpansionError):
        index.search(picture, qe=-1)
    # a second review's list: qe="2" a TypeError comparing str and int, qe=2.5 a slice error after the forward pass,
    # k=True taken for 1, evaluate(seed="x") scikit-learn's error about random_state, open_index(None) pathlib's
    for call, error, said in [(lambda: index.search(picture, qe="2"), retrieval.ExpansionError, "not '2'"),
                              (lambda: index.search(picture, qe=2.5), retrieval.ExpansionError, "not 2.5"),
                              (lambda: index.search(picture, qe=1, qe_alpha="3"), retrieval.ExpansionError, "not '3'"),
                              (lambda: index.search(picture, k=True), ValueError, "not True"),
                              (lambda: retrieval.evaluate(built.index, seed="x"), retrieval.EvaluationError, "seed is"),
                              (lambda: retrieval.evaluate(built.index, probe="no"), retrieval.EvaluationError, "probe is"),
                              (lambda: retrieval.open_index(None), TypeError, "an index folder is a path")]:
        with pytest.raises(error, match=said):
            call()
    # a hit's path is relative to the data folder: searched from elsewhere it was only "no such file"
    hit = index.search(picture, k=1)[0]
    with pytest.raises(FileNotFoundError, match="this is an indexed image's path, relative to the data folder"):
        index.search(hit.path)
    from indexer import ConfigError
    assert issubclass(ConfigError, ValueError) and issubclass(retrieval.DeviceUnavailable, RuntimeError)


def test_an_index_pickles_as_the_way_to_reopen_it_and_file_objects_are_queries(built, index):
    """Reproduces: pickle.dumps(index) and Pool.map over an index failed ('cannot pickle _thread.lock'); an io.BytesIO
    or an open file was refused as a query though PIL users pass them."""
    import io
    import pickle

    query = next(built.data.glob("red_circles/*.jpg"))
    expected = index.search(query, k=1).hits[0].path
    with pickle.loads(pickle.dumps(index)) as again:
        assert again.index_dir == index.index_dir and again.search(query, k=1).hits[0].path == expected
    with open(query, "rb") as f:
        assert index.search(f, k=1).hits[0].path == expected
    assert index.search(io.BytesIO(query.read_bytes()), k=1).hits[0].path == expected
    for encoding in ("latin-1", "utf-8"):   # utf-8, open()'s usual: a UnicodeDecodeError from read() before
        with open(query, encoding=encoding) as text, pytest.raises(TypeError, match="binary mode"):
            index.search(text, k=1)
    closed = retrieval.open_index(built.index)
    closed.close()
    with pytest.raises(ValueError, match="is closed"):
        pickle.dumps(closed)


def test_a_search_result_prints_as_a_table_and_turns_into_json(built, index):
    """Reproduces: json.dumps refused a SearchResult and dataclasses.asdict of one (a Path inside); print showed the
    dataclass's repr, every field of every hit on one line."""
    import json

    result = index.search(built.data / "red_circles" / "red_circles_000.jpg", k=3)
    doc = json.loads(json.dumps(result.to_json()))
    assert [r["id"] for r in doc["results"]] == [h.id for h in result] and doc["k"] == 3
    assert doc["results"][0]["path"] == "red_circles/red_circles_000.jpg" and doc["results"][0]["distance"] < 1e-3
    assert doc["results"][0]["file"] == str(built.data.resolve() / "red_circles" / "red_circles_000.jpg")
    lines = str(result).splitlines()
    assert lines[1].split() == ["rank", "distance", "label", "path"] and len(lines) == 2 + 3
    assert lines[2].split()[0] == "1" and lines[2].endswith("red_circles/red_circles_000.jpg")
