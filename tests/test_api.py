"""The JSON API (api.search_api) through Flask's test client: every endpoint, and every error status it promises."""
from __future__ import annotations

import dataclasses
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api import create_app
from retrieval.catalog import Catalog
from retrieval.search.index import IndexNotFound
from helpers.precision import auto_precisions_here

QUERY = "red_circles/red_circles_002.jpg"


def image_bytes(sample_index, rel: str = QUERY) -> bytes:
    return (sample_index.data_dir / rel).read_bytes()


def png_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def upload(client, data: bytes, url: str = "/search", **form):
    return client.post(url, data={"image": (io.BytesIO(data), "query.jpg"), **form}, content_type="multipart/form-data")


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"] and "Traceback" not in response.get_data(as_text=True)
    return body["error"]


# --- POST /search -----------------------------------------------------------------------------------

def test_search_finds_the_uploaded_image_first_then_its_class(client, sample_index):
    r = upload(client, image_bytes(sample_index), "/search?k=5")
    assert r.status_code == 200, r.data
    body = r.get_json()
    results = body["results"]
    assert len(results) == 5
    assert results[0]["path"] == QUERY and results[0]["distance"] < 1e-3
    distances = [h["distance"] for h in results]
    assert distances == sorted(distances)
    assert sum(h["label"] == "red_circles" for h in results) >= 3
    assert set(results[0]) == {"id", "path", "label", "distance", "image_url", "thumbnail_url", "gallery_url"}
    assert body["query"] == {"width": 160, "height": 120}
    assert body["index"] == {"model": "alexnet", "layer": "fc7", "views": "single", "input_norm": "weights", "regions": 0,
                             "dim": 4096, "count": 30}
    assert set(body["timings_ms"]) == {"decode", "features", "search"}
    assert all(v >= 0 for v in body["timings_ms"].values())


def test_search_result_urls_lead_to_the_image_its_thumbnail_and_its_gallery_page(client, sample_index):
    hit = upload(client, image_bytes(sample_index), "/search?k=1").get_json()["results"][0]
    assert client.get(hit["image_url"]).data == image_bytes(sample_index)
    assert client.get(hit["thumbnail_url"]).mimetype == "image/jpeg"
    page = client.get(hit["gallery_url"])
    assert page.status_code == 200 and QUERY.split("/")[-1] in page.get_data(as_text=True)


def test_search_accepts_the_raw_image_as_the_request_body(client, sample_index):
    raw = client.post("/search?k=3", data=image_bytes(sample_index), content_type="image/jpeg")
    form = upload(client, image_bytes(sample_index), "/search?k=3")
    assert raw.status_code == 200, raw.data
    assert [h["id"] for h in raw.get_json()["results"]] == [h["id"] for h in form.get_json()["results"]]


def test_search_k_defaults_to_10_and_may_come_from_the_form(client, sample_index):
    assert len(upload(client, image_bytes(sample_index)).get_json()["results"]) == 10
    assert len(upload(client, image_bytes(sample_index), k="4").get_json()["results"]) == 4
    assert len(upload(client, image_bytes(sample_index), "/search?k=100").get_json()["results"]) == 30  # all there is


@pytest.mark.parametrize("k", ["0", "101", "-1", "abc", "2.5", "", "١"])
def test_search_bad_k_is_400(client, sample_index, k):
    assert_error(upload(client, image_bytes(sample_index), f"/search?k={k}"), 400, "bad_k")


def test_search_bad_k_in_the_form_is_400(client, sample_index):
    assert_error(upload(client, image_bytes(sample_index), k="many"), 400, "bad_k")


@pytest.mark.parametrize("request_kwargs", [
    {"data": {}, "content_type": "multipart/form-data"},                                   # no field
    {"data": {"picture": (io.BytesIO(b"x"), "q.jpg")}, "content_type": "multipart/form-data"},  # wrong field
    {"data": b"", "content_type": "image/jpeg"},                                            # empty body
    {"data": b"hello", "content_type": "text/plain"},                                       # not an image type
    {},
])
def test_search_without_an_image_is_400(client, request_kwargs):
    assert_error(client.post("/search", **request_kwargs), 400, "missing_image")


@pytest.mark.parametrize("data", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b""])
def test_search_with_an_undecodable_upload_is_415(client, data):
    assert_error(upload(client, data), 415, "unsupported_image")


def test_search_with_a_truncated_jpeg_is_415(client, sample_index):
    assert_error(upload(client, image_bytes(sample_index)[:200]), 415, "unsupported_image")


def test_wrong_method_is_405_with_allow_header(client):
    r = client.get("/search")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert r.get_json()["error"]["message"] == "GET is not allowed here; use POST"
    r = client.delete("/images/1")
    assert_error(r, 405, "method_not_allowed")
    assert r.get_json()["error"]["message"] == "DELETE is not allowed here; use GET"   # not "HEAD, GET, OPTIONS"


def test_options_is_204_naming_the_methods_with_no_body(client):
    r = client.options("/search")
    assert r.status_code == 204 and set(r.headers["Allow"].split(", ")) == {"OPTIONS", "POST"} and r.get_data() == b""
    assert "Content-Type" not in r.headers   # it said text/html about nothing


@pytest.mark.parametrize("url", ["/nope", "/images/abc", "/images/-1/thumbnail", "/images/1/elsewhere"])
def test_unknown_route_is_404_json(client, url):
    assert_error(client.get(url), 404, "not_found")


def test_concurrent_queries_are_answered_correctly_and_share_forward_passes(app, sample_index):
    batcher = app.extensions["retrieval"].batcher
    before = (batcher.stats.batches, batcher.stats.queries)
    paths = sorted(p.relative_to(sample_index.data_dir).as_posix() for p in sample_index.data_dir.rglob("*.jpg"))[:8]
    start = threading.Barrier(len(paths))
    answers: dict[str, dict] = {}

    def query(rel: str) -> None:
        client = app.test_client()
        data = image_bytes(sample_index, rel)
        start.wait()
        answers[rel] = upload(client, data, "/search?k=2").get_json()

    threads = [threading.Thread(target=query, args=(rel,)) for rel in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for rel in paths:   # batched answers are each query's own, not a neighbour's
        assert answers[rel]["results"][0]["path"] == rel and answers[rel]["results"][0]["distance"] < 1e-3
    batches, queries = batcher.stats.batches - before[0], batcher.stats.queries - before[1]
    assert queries == len(paths)
    assert batches < queries, "8 simultaneous queries should share at least one forward pass"


def test_an_unexpected_failure_is_a_json_500_without_the_details(app, client, monkeypatch):
    def broken() -> dict:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.extensions["retrieval"], "stats", broken)
    r = client.get("/stats")
    assert_error(r, 500, "internal_error")
    assert "secret internals" not in r.get_data(as_text=True)


def test_a_query_that_waits_too_long_is_503(app, client, sample_index, monkeypatch):
    service = app.extensions["retrieval"]
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, query_timeout_s=1e-6))
    r = upload(client, image_bytes(sample_index))
    assert_error(r, 503, "overloaded")   # told apart from an index that cannot be served ("unavailable")
    assert r.headers["Retry-After"] == "1"


def test_search_with_query_expansion_averages_the_query_with_its_first_results(client, sample_index):
    plain = upload(client, image_bytes(sample_index), "/search?k=6").get_json()["results"]
    expanded = upload(client, image_bytes(sample_index), "/search?k=6&qe=3&qe_alpha=3").get_json()["results"]
    assert plain[0]["path"] == QUERY and plain[0]["distance"] < 1e-3
    # the query moved towards its first three results: no longer at distance 0 from itself, its class still first
    assert expanded[0]["distance"] > 1e-3 and {r["path"] for r in expanded[:3]} == {r["path"] for r in plain[:3]}
    assert sum(r["label"] == "red_circles" for r in expanded) >= sum(r["label"] == "red_circles" for r in plain) - 1
    form = upload(client, image_bytes(sample_index), "/search?k=6", qe="3", qe_alpha="3").get_json()["results"]
    assert [r["id"] for r in form] == [r["id"] for r in expanded]
    off = upload(client, image_bytes(sample_index), "/search?k=6&qe=0").get_json()["results"]
    assert [r["id"] for r in off] == [r["id"] for r in plain]


@pytest.mark.parametrize("query", ["qe=x", "qe=-1", "qe=51", "qe=2&qe_alpha=x", "qe=2&qe_alpha=-1", "qe=2&qe_alpha=nan",
                                   "qe=2&qe_alpha=101", "qe=2&qe_alpha=inf", "qe=2&qe_alpha=1e400", "qe=１",
                                   "qe=2&qe_alpha=1_0"])
def test_search_with_bad_query_expansion_is_400(client, sample_index, query):
    r = upload(client, image_bytes(sample_index), f"/search?{query}")
    assert_error(r, 400, "bad_query_expansion")
    message = r.get_json()["error"]["message"]   # one message for every way of getting it wrong, naming what was given
    assert message.startswith("qe must be a whole number from 0 to 50 and qe_alpha a number from 0 to 100, not qe=")
    assert "qe_alpha" not in query or "qe_alpha='" in message


def test_qe_alpha_is_any_way_of_writing_a_number(client, sample_index):
    """1e2 was refused though the docs say "a number" (and 101 was "not 101.0")."""
    ids = {alpha: [h["id"] for h in upload(client, image_bytes(sample_index), f"/search?k=6&qe=2&qe_alpha={alpha}")
                   .get_json()["results"]] for alpha in ("3", "3.0", "3e0", " 3 ")}
    assert len({tuple(v) for v in ids.values()}) == 1, ids


# --- GET /images/<id>/neighbours --------------------------------------------------------------------

def _id_of(app, rel: str) -> int:
    return app.extensions["retrieval"].index.catalog.file_states()[rel][0]


def test_neighbours_of_an_indexed_image_leave_it_out_and_need_no_forward_pass(app, client, monkeypatch):
    image_id = _id_of(app, QUERY)

    def no_forward_pass(_pixels):
        raise AssertionError("neighbours must come from the stored vector")

    monkeypatch.setattr(app.extensions["retrieval"].index, "embed", no_forward_pass)
    r = client.get(f"/images/{image_id}/neighbours?k=5")
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert len(body["results"]) == 5
    assert image_id not in [h["id"] for h in body["results"]]
    assert body["results"][0]["label"] == "red_circles"
    distances = [h["distance"] for h in body["results"]]
    assert distances == sorted(distances) and distances[0] > 0
    assert body["query"]["id"] == image_id and body["query"]["path"] == QUERY
    assert body["index"]["count"] == 30 and set(body["timings_ms"]) == {"decode", "features", "search"}


def test_neighbours_default_k_and_all_but_itself(app, client):
    image_id = _id_of(app, QUERY)
    assert len(client.get(f"/images/{image_id}/neighbours").get_json()["results"]) == 10
    assert len(client.get(f"/images/{image_id}/neighbours?k=100").get_json()["results"]) == 29


def test_neighbours_of_an_unknown_id_is_404(client):
    assert_error(client.get("/images/999999/neighbours"), 404, "not_found")


def test_neighbours_with_query_expansion(app, client):
    image_id = app.extensions["retrieval"].index.catalog.ids()[0]
    plain = client.get(f"/images/{image_id}/neighbours?k=5").get_json()["results"]
    expanded = client.get(f"/images/{image_id}/neighbours?k=5&qe=2").get_json()["results"]
    assert image_id not in {r["id"] for r in expanded} and len(expanded) == 5
    assert [r["distance"] for r in expanded] != [r["distance"] for r in plain]
    assert_error(client.get(f"/images/{image_id}/neighbours?qe=99"), 400, "bad_query_expansion")


def test_neighbours_with_bad_k_is_400(app, client):
    assert_error(client.get(f"/images/{_id_of(app, QUERY)}/neighbours?k=0"), 400, "bad_k")


# --- GET /images/<id>, thumbnails ----------------------------------------------------------------------

def test_original_image_is_served_by_id_with_its_content_type(app, client, sample_index):
    r = client.get(f"/images/{_id_of(app, QUERY)}")
    assert r.status_code == 200
    assert r.mimetype == "image/jpeg"
    assert r.data == image_bytes(sample_index)
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_unknown_image_id_is_404(client):
    assert_error(client.get("/images/999999"), 404, "not_found")
    assert_error(client.get("/images/999999/thumbnail"), 404, "not_found")


def test_thumbnail_is_a_small_jpeg_cached_on_disk_with_cache_headers(app, client):
    image_id = _id_of(app, QUERY)
    r = client.get(f"/images/{image_id}/thumbnail")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.data))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256 and thumb.size == (160, 120)
    assert "public" in r.headers["Cache-Control"] and "max-age" in r.headers["Cache-Control"]
    folder = Path(app.config["THUMBNAIL_DIR"])
    cached = list(folder.glob(f"{image_id}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.data
    again = client.get(f"/images/{image_id}/thumbnail", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304


def test_image_urls_name_the_content_so_a_rebuilt_index_never_shows_a_cached_other_picture(app, client, sample_index):
    """Reproduces: ids start again at 1 in a rebuilt index (and a file replaced in place keeps its id), and
    /images/3/thumbnail was cached by browsers for a week: the gallery showed the old index's picture under the
    new one's name. The API and the pages link versioned URLs (?v= the content hash), cached long; an unversioned
    or outdated URL is checked with the server each time."""
    hit = client.post("/search?k=1", data={"image": (io.BytesIO(image_bytes(sample_index)), "q.jpg")}).get_json()["results"][0]
    sha = app.extensions["retrieval"].index.catalog.get(hit["id"]).sha256
    assert hit["thumbnail_url"] == f"/images/{hit['id']}/thumbnail?v={sha[:16]}"
    assert hit["image_url"] == f"/images/{hit['id']}?v={sha[:16]}"
    for url in (hit["thumbnail_url"], hit["image_url"]):
        cached = client.get(url).headers["Cache-Control"]
        assert "max-age=604800" in cached and "immutable" in cached, cached
        for other in (url.split("?")[0], url.split("?")[0] + "?v=0123456789abcdef"):   # none, or another picture's
            r = client.get(other)
            assert r.status_code == 200 and "no-cache" in r.headers["Cache-Control"], r.headers["Cache-Control"]
            assert client.get(other, headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    page = client.get(f"/gallery/{hit['id']}").get_data(as_text=True)
    assert f'src="{hit["thumbnail_url"]}"' in page


@pytest.fixture
def one_red(tmp_path, index_images):
    """(data folder, Flask app) over an index of one picture, data/a/red.jpg (id 1), whose files a test may change."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (120, 90), (200, 40, 40)).save(data / "a" / "red.jpg", quality=90)
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0})
    yield data, app
    app.extensions["retrieval"].close()


def test_a_file_changed_since_indexing_is_never_cached_under_its_indexed_version(tmp_path, one_red):
    """Reproduces (a review): ?v= names the indexed bytes, but the file there now was changed and not re-indexed
    yet: browsers kept the new picture for a week under the old version, and the server kept its thumbnail under the
    old hash's name. Such a file is answered no-cache and its thumbnail is not kept; originals are never public."""
    data, app = one_red
    client = app.test_client()
    sha = app.extensions["retrieval"].index.catalog.get(1).sha256[:16]
    assert "private" in client.get(f"/images/1?v={sha}").headers["Cache-Control"]
    Image.new("RGB", (120, 90), (20, 40, 200)).save(data / "a" / "red.jpg", quality=90)   # blue now
    for url in (f"/images/1/thumbnail?v={sha}", f"/images/1?v={sha}"):
        r = client.get(url)
        assert r.status_code == 200 and "no-cache" in r.headers["Cache-Control"], (url, r.headers)
    thumb = Image.open(io.BytesIO(client.get(f"/images/1/thumbnail?v={sha}").data)).convert("RGB")
    assert thumb.getpixel((60, 45))[2] > 150, "the picture there now"
    assert not list((tmp_path / "index" / "thumbnails").glob("1-*.jpg")), "not kept under the indexed hash"


def test_a_cached_thumbnail_is_served_while_its_file_is_missing(tmp_path, one_red, monkeypatch):
    """The data folder's drive unmounted (or a file deleted, not re-indexed yet): the gallery's cards were all
    broken pictures though their thumbnails were cached, and nothing said why; the original is 404 file_missing.
    Now the cached ones are served, and /healthz and every page say the folder is not there."""
    data, app = one_red
    client = app.test_client()
    made = client.get("/images/1/thumbnail").data
    (data / "a" / "red.jpg").unlink()
    r = client.get("/images/1/thumbnail")
    assert r.status_code == 200 and r.data == made
    assert_error(client.get("/images/1"), 404, "file_missing")
    page = client.get("/gallery/1/original")   # "Open original": a page that says why, not the API's JSON
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "no longer in the data folder" in page.get_data(as_text=True)
    for cached in (tmp_path / "index" / "thumbnails").glob("1-*.jpg"):
        cached.unlink()
    assert_error(client.get("/images/1/thumbnail"), 404, "file_missing")
    assert "warning" not in client.get("/healthz").get_json()
    (data / "a").rmdir()
    data.rename(tmp_path / "unmounted")        # the whole folder gone: every page and /healthz say so
    import api.collection_files

    monkeypatch.setattr(api.collection_files, "DATA_FOLDER_LOOK_S", 0)   # (looked at once in 5 s: a hung mount hung pages)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["status"] == "ok"   # searches still answer
    assert f"the data folder {data} is not there" in health.get_json()["warning"]
    assert f"--index-dir {tmp_path / 'index'} --data-moved" in health.get_json()["warning"]
    page = client.get("/").get_data(as_text=True)
    # the pages, anyone's, name the folder only (not the server's paths)
    assert 'id="data-folder-missing"' in page and "The data folder data is not there" in page
    assert "index-images NEW_PLACE --index-dir INDEX --data-moved" in page and str(tmp_path) not in page


def test_thumbnail_of_a_large_image_fits_256_px(tmp_path, index_images):
    data = tmp_path / "data"
    (data / "big").mkdir(parents=True)
    Image.new("RGB", (1200, 500), (10, 120, 200)).save(data / "big" / "wide.jpg", quality=90)
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0})
    try:
        r = app.test_client().get("/images/1/thumbnail")
        assert Image.open(io.BytesIO(r.data)).size == (256, 107)
        assert list((tmp_path / "index" / "thumbnails").glob("1-*.jpg")), "cached under INDEX_DIR/thumbnails by default"
    finally:
        app.extensions["retrieval"].close()


# --- /stats, /healthz --------------------------------------------------------------------------------

def test_stats_describe_the_index(client):
    body = client.get("/stats").get_json()
    assert body["count"] == 30
    assert body["labels"] == [{"label": name, "count": 6} for name in
                              ["blue_squares", "green_stripes", "orange_triangles", "purple_checks", "red_circles"]]
    assert (body["model"], body["layer"], body["dim"]) == ("alexnet", "fc7", 4096)
    assert body["skipped"] == 0
    assert body["updated_at"].endswith("Z") and body["updated_at"][:2] == "20"
    assert body["catalog"] == "sqlite"
    (precision, devices), = body["extraction"]["precisions"].items()   # how the vectors were computed
    assert precision in auto_precisions_here() and devices == ["cpu"]


def test_healthz_is_200_once_loaded(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok", "count": 30}


# --- configuration and limits ------------------------------------------------------------------------

def test_environment_sets_config_and_the_argument_wins(sample_index, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(sample_index.index_dir))
    monkeypatch.setenv("RETRIEVAL_MAX_UPLOAD_MB", "0.01")       # about 10 kB
    monkeypatch.setenv("RETRIEVAL_GALLERY_K", "3")
    app = create_app({"GALLERY_K": 5, "MAX_PIXELS": 100 * 100, "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path)})
    try:
        assert app.config["INDEX_DIR"] == str(sample_index.index_dir)
        assert app.config["MAX_CONTENT_LENGTH"] == int(0.01 * 1024 * 1024)
        assert app.config["GALLERY_K"] == 5
        client = app.test_client()

        # 413: over the upload limit, as JSON (multipart and raw body)
        error = assert_error(upload(client, os.urandom(20_000)), 413, "upload_too_large")
        assert "MB limit" in error["message"]
        assert_error(client.post("/search", data=os.urandom(20_000), content_type="image/jpeg"), 413, "upload_too_large")

        # 415: more pixels than MAX_PIXELS is refused as a decompression bomb, before decoding
        error = assert_error(upload(client, image_bytes(sample_index)), 415, "unsupported_image")   # 160x120 > 100x100
        assert "decompression bomb" in error["message"]

        # under both limits: answered
        assert upload(client, png_bytes((64, 48))).status_code == 200
    finally:
        app.extensions["retrieval"].close()


def test_missing_index_fails_with_a_clear_message(tmp_path):
    with pytest.raises(IndexNotFound, match="run index-images first"):
        create_app({"INDEX_DIR": str(tmp_path / "nowhere")})


def test_bad_config_value_fails_with_a_clear_message(sample_index, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_BATCH_MAX_SIZE", "lots")
    with pytest.raises(ValueError, match="RETRIEVAL_BATCH_MAX_SIZE must be a whole number of at least 1, not .lots."):
        create_app({"INDEX_DIR": str(sample_index.index_dir)})


def test_empty_index_answers_200_with_no_results(tmp_path, index_images):
    (tmp_path / "data").mkdir()
    index_images(tmp_path / "data", tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0})
    try:
        client = app.test_client()
        r = upload(client, png_bytes())
        assert r.status_code == 200, r.data
        assert r.get_json()["results"] == [] and r.get_json()["index"]["count"] == 0
        assert client.get("/stats").get_json()["count"] == 0
        assert client.get("/").status_code == 200
        assert_error(client.get("/images/1/neighbours"), 404, "not_found")
    finally:
        app.extensions["retrieval"].close()


# --- files are served only from inside the data folder -----------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n<html><script>alert(1)</script></html>\nshowpage\n"


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """An index whose catalog was forced to hold paths that lead outside the data folder."""
    from helpers.indexes import build_index

    root = tmp_path_factory.mktemp("forged")
    data, outside = root / "data", root / "outside"
    (data / "shapes").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(data / "shapes" / "red.jpg", quality=90)
    (data / "shapes" / "png-named.jpg").write_bytes(png_bytes((50, 40), (20, 160, 60)))   # PNG bytes, .jpg name
    Image.new("RGB", (40, 30), (30, 30, 220)).save(data / "shapes" / "gone.jpg", quality=90)
    Image.new("RGB", (40, 30), (200, 40, 40)).save(data / "shapes" / "phone.jpg", "MPO", save_all=True,
                                                   append_images=[Image.new("RGB", (40, 30))])   # a phone's 2 pictures
    for name in ("text-now.jpg", "pipe-now.jpg", "eps-now.jpg"):
        Image.new("RGB", (40, 30), (90, 90, 20)).save(data / "shapes" / name, quality=90)
    build_index(data, root / "index")
    (data / "shapes" / "gone.jpg").unlink()                       # deleted after indexing
    (data / "shapes" / "text-now.jpg").write_text("hello text")   # overwritten after indexing
    (data / "shapes" / "pipe-now.jpg").unlink()
    os.mkfifo(data / "shapes" / "pipe-now.jpg")                   # a named pipe in its place
    (data / "shapes" / "eps-now.jpg").write_bytes(EPS)            # PostScript in its place, which Pillow identifies
    Image.new("RGB", (40, 30), (9, 9, 9)).save(outside / "secret.jpg", quality=90)
    (data / "shapes" / "escape.jpg").symlink_to(outside / "secret.jpg")          # symlink out of the folder
    (data / "shapes" / "alias.jpg").symlink_to(data / "shapes" / "red.jpg")      # symlink that stays inside
    catalog = Catalog(root / "index")
    rows = [{"path": p, "label": "shapes", "size": 1, "mtime_ns": 1, "width": 40, "height": 30, "sha256": "0" * 64}
            for p in ("shapes/escape.jpg", "../outside/secret.jpg", "shapes/alias.jpg")]
    ids, _ = catalog.write_batch(rows, np.random.default_rng(0).random((3, 4096), dtype=np.float32), [])
    states = catalog.file_states()
    catalog.close()
    app = create_app({"INDEX_DIR": str(root / "index"), "RELOAD_INTERVAL_S": 0})
    yield app, dict(zip(("escape", "dotdot", "alias"), ids)), states
    app.extensions["retrieval"].close()


def test_a_symlink_pointing_outside_the_data_folder_is_refused(forged):
    app, ids, _ = forged
    client = app.test_client()
    for name in ("escape", "dotdot"):
        assert_error(client.get(f"/images/{ids[name]}"), 403, "forbidden")
        assert_error(client.get(f"/images/{ids[name]}/thumbnail"), 403, "forbidden")


def test_a_symlink_inside_the_data_folder_is_served(forged):
    app, ids, _ = forged
    r = app.test_client().get(f"/images/{ids['alias']}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"


def test_content_type_comes_from_the_file_not_its_name(forged):
    app, _, states = forged
    r = app.test_client().get(f"/images/{states['shapes/png-named.jpg'][0]}")
    assert r.status_code == 200 and r.mimetype == "image/png"
    r = app.test_client().get(f"/images/{states['shapes/phone.jpg'][0]}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg", "Pillow's image/mpo: a browser would download it"


def test_an_indexed_file_deleted_since_is_404(forged):
    app, _, states = forged
    assert_error(app.test_client().get(f"/images/{states['shapes/gone.jpg'][0]}"), 404, "file_missing")


def test_an_indexed_file_that_holds_no_image_now_is_404_file_unreadable(forged):
    """Reproduces: an indexed JPEG overwritten with text was served 200 image/jpeg (the type from its name), and one
    replaced by a named pipe was said to be 'no longer in the data folder'. Both are now what the docs say:
    404 file_unreadable, with the reason, for the original and its thumbnail alike."""
    app, _, states = forged
    client = app.test_client()
    for name, reason in [("text-now.jpg", "it is not an image now"), ("pipe-now.jpg", "it is not a regular file now"),
                         ("eps-now.jpg", "it is not an image now")]:   # was 200 application/postscript
        for url in (f"/images/{states[f'shapes/{name}'][0]}", f"/images/{states[f'shapes/{name}'][0]}/thumbnail"):
            r = client.get(url)
            assert_error(r, 404, "file_unreadable")
            assert url.endswith("thumbnail") or reason in r.get_json()["error"]["message"], r.get_json()


def test_an_upload_is_searched_with_the_temporary_folder_full(client, monkeypatch):
    """Reproduces (TMPDIR on a full disk): a 3 MB PNG sent as a form answered 500 internal_error, 'No space left on
    device', as Werkzeug spools form files over 500 KB to a temporary file; the same bytes sent raw were searched.
    Uploads stay in memory now (they are at most MAX_UPLOAD_MB)."""
    import errno
    import tempfile

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, full)
    noise = np.random.default_rng(0).integers(0, 255, (700, 900, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, "PNG")
    assert big.tell() > 1_000_000
    answer = upload(client, big.getvalue())
    assert answer.status_code == 200, answer.get_json()


def test_thumbnails_of_images_no_longer_indexed_are_removed_when_a_server_starts(sample_index, tmp_path):
    """Reproduces: after images came and went (removed, or changed and re-indexed under new ids), index/thumbnails kept
    every thumbnail ever made (20 orphans after a few runs). A starting worker removes those of images the index no
    longer holds and those of another size; the others, and the uploads' store, stay."""
    thumbs = tmp_path / "thumbnails"
    first = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(thumbs)})
    try:
        client = first.test_client()
        assert client.get("/images/1/thumbnail").status_code == 200
        made = sorted(p.name for p in thumbs.glob("*.jpg"))
        assert len(made) == 1 and made[0].startswith("1-")
    finally:
        first.extensions["retrieval"].close()
    orphans = ["999999-0123456789abcdef-256.jpg", made[0].replace("1-", "2-", 1), made[0].replace("-256.", "-128.")]
    for name in orphans:
        (thumbs / name).write_bytes(b"\xff\xd8 old thumbnail")
    (thumbs / "notes.txt").write_text("not ours")
    second = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(thumbs)})
    try:
        from helpers.waiting import wait_for

        assert wait_for(lambda: not any((thumbs / name).exists() for name in orphans), 30, interval=0.1), \
            sorted(p.name for p in thumbs.iterdir())
        assert (thumbs / made[0]).exists() and (thumbs / "notes.txt").exists()
    finally:
        second.extensions["retrieval"].close()
