"""The gallery pages (api.gallery) through Flask's test client: home grid, upload, query and neighbour pages."""
from __future__ import annotations

import io
import json
import re

import numpy as np
from PIL import Image

import pytest
from helpers.precision import auto_precisions_here


QUERY = "green_stripes/green_stripes_001.jpg"


@pytest.fixture(scope="module")
def app_config() -> dict:
    return {"GALLERY_PAGE_SIZE": 8}


def gallery_links(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'href="/gallery/(\d+)(?:\?[^"]*)?"', html)]


def neighbour_hrefs(html: str) -> list[str]:
    return re.findall(r'href="(/gallery/\d+[^"]*)"', html.split('id="neighbours"', 1)[1])


def post_photo(client, data: bytes, **extra):
    return client.post("/gallery/search", data={"image": (io.BytesIO(data), "holiday.jpg"), **extra},
                       content_type="multipart/form-data")


def active_choices(html: str) -> list[str]:
    """The hrefs of the chosen chips (k, expansion, label): marked aria-current, not only coloured."""
    return re.findall(r'class="chip-link active" aria-current="true"[^>]*href="([^"]*)"', html)


def active_choice(html: str) -> str:
    (only,) = active_choices(html)
    return only

def test_home_shows_upload_form_overview_labels_and_a_grid_page(client):
    html = client.get("/").get_data(as_text=True)
    assert 'action="/gallery/search"' in html and 'type="file"' in html and 'enctype="multipart/form-data"' in html
    assert 'id="image-count">30<' in html and "alexnet · fc7" in html
    assert any(f'id="index-precision">{p} on cpu<' in html for p in auto_precisions_here())   # how vectors were made
    for label in ("blue_squares", "green_stripes", "orange_triangles", "purple_checks", "red_circles"):
        assert f"?label={label}" in html
    assert len(gallery_links(html)) == 8                      # GALLERY_PAGE_SIZE
    assert "Page 1 of 4" in html
    assert 'href="http' not in html and 'src="http' not in html, "no external resources: the gallery works offline"
    # a second line behind the escaping, and no framing by other sites (the browser tests see the pages work under it)
    headers = client.get("/").headers
    assert "script-src 'self';" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "SAMEORIGIN"


def test_home_pages_through_the_whole_collection(client):
    seen = []
    for page in range(1, 5):
        seen += gallery_links(client.get(f"/?page={page}").get_data(as_text=True))
    assert len(seen) == 30 and len(set(seen)) == 30
    assert gallery_links(client.get("/?page=99").get_data(as_text=True)) == gallery_links(
        client.get("/?page=4").get_data(as_text=True)), "past the end shows the last page"
    assert client.get("/?page=abc").status_code == 200


def test_home_label_filter(app, client):
    html = client.get("/?label=purple_checks").get_data(as_text=True)
    ids = gallery_links(html)
    records = app.extensions["retrieval"].index.catalog.get_many(ids)
    assert len(ids) == 6 and {r.label for r in records.values()} == {"purple_checks"}
    assert "No images labelled" in client.get("/?label=unicorns").get_data(as_text=True)


def test_upload_redirects_to_a_results_page_with_the_neighbours(client, sample_index):
    r = post_photo(client, (sample_index.data_dir / QUERY).read_bytes())
    assert r.status_code == 303
    location = r.headers["Location"]
    assert re.fullmatch(r"/gallery/query/[A-Za-z0-9_-]+\?k=12", location)
    page = client.get(location)
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    neighbours = gallery_links(html.split('id="neighbours"', 1)[1])
    assert len(neighbours) == 12
    assert "#1<" in html and "#12<" in html and "green_stripes" in html
    # read out in words ("#1" and a bare number read badly; the split name read as two)
    names = re.findall(r'<a href="/gallery/\d+[^"]*" title="[^"]*"\s+aria-label="([^"]*)"', html)
    assert len(names) == 12 and re.fullmatch(r"[\w.]+\.jpg, \w+, rank 1, distance \d\.\d{3}", names[0]), names[0]
    preview = client.get(re.search(r'id="query-image" src="([^"]+)"', html).group(1))
    assert preview.status_code == 200 and preview.mimetype == "image/jpeg"


def test_an_uploads_long_file_name_is_kept_short_and_its_results_page_is_not_cached(app, client, sample_index):
    """Security review: a 100,000-character file name was stored and shown whole; the results page of a private
    upload had no Cache-Control."""
    name = "a" * 100_000 + ".jpg"
    r = client.post("/gallery/search", data={"image": (io.BytesIO((sample_index.data_dir / QUERY).read_bytes()), name)},
                    content_type="multipart/form-data")
    assert r.status_code == 303
    page = client.get(r.headers["Location"])
    html = page.get_data(as_text=True)
    assert "a" * 127 + "…" + "a" * 123 + ".jpg" in html and "a" * 300 not in html
    assert "no-store" in page.headers["Cache-Control"] and "private" in page.headers["Cache-Control"]


def test_query_page_k_choice(client, sample_index):
    location = post_photo(client, (sample_index.data_dir / QUERY).read_bytes()).headers["Location"]
    html = client.get(location.replace("k=12", "k=6")).get_data(as_text=True)
    assert len(gallery_links(html.split('id="neighbours"', 1)[1])) == 6


def test_results_pages_offer_query_expansion_and_keep_it_with_k(client, sample_index):
    location = post_photo(client, (sample_index.data_dir / QUERY).read_bytes()).headers["Location"]
    html = client.get(location).get_data(as_text=True)
    control = html.split('id="qe-choice"', 1)[1].split("</nav>", 1)[0]
    assert "?k=12&amp;qe=3" in control and active_choice(control) == "?k=12&amp;qe=0"
    page = client.get(location + "&qe=3")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and len(gallery_links(html.split('id="neighbours"', 1)[1])) == 12
    assert "?k=12&amp;qe=3" in active_choices(html) and "?k=6&amp;qe=3" in html   # k choices keep the expansion
    # the page says the distances are now from the expanded query (an identical image need not come first)
    assert 'id="expanded"' in html and "Expanded with the top 3" in html and 'id="already-indexed"' not in html
    assert 'id="expanded"' not in client.get(location).get_data(as_text=True)
    # typed: read as gallery pages read a typed k (it was a 400 page for qe, while k was clamped)
    unreadable = client.get(location + "&qe=lots")
    assert unreadable.status_code == 200 and 'id="expanded"' not in unreadable.get_data(as_text=True)
    assert "Expanded with the top 50" in client.get(location + "&qe=99").get_data(as_text=True)
    assert client.get("/images/1/neighbours?qe=lots").status_code == 400   # the API: said
    image_page = client.get(f"/gallery/{gallery_links(html)[0]}?qe=3")
    assert image_page.status_code == 200 and "?k=12&amp;qe=3" in active_choices(image_page.get_data(as_text=True))


def test_a_neighbours_page_keeps_the_searchs_k_and_expansion(client, sample_index):
    """Search with 24 neighbours and expansion, click a neighbour: its page is a search of 24 with expansion too
    (links carry only what differs from the defaults), and links back to the uploaded search it started from."""
    location = post_photo(client, (sample_index.data_dir / QUERY).read_bytes()).headers["Location"]
    token = location.split("/gallery/query/", 1)[1].split("?", 1)[0]
    plain = neighbour_hrefs(client.get(location).get_data(as_text=True))
    assert plain and all(href.endswith(f"?from={token}") for href in plain), "the gallery's default k: only the origin"
    hrefs = neighbour_hrefs(client.get(location.replace("k=12", "k=24") + "&qe=3&qe_alpha=2").get_data(as_text=True))
    carried = f"?k=24&amp;qe=3&amp;qe_alpha=2.0&amp;from={token}"
    assert len(hrefs) == 24 and all(href.endswith(carried) for href in hrefs), hrefs[:3]
    html = client.get(hrefs[0].replace("&amp;", "&")).get_data(as_text=True)
    assert len(neighbour_hrefs(html)) == 24 and 'id="expanded"' in html and "Expanded with the top 3" in html
    assert all(href.endswith(carried) for href in neighbour_hrefs(html)), "and on"
    # so do the page's own choices of k and of expansion, and its JSON link
    assert f'href="?k=6&amp;qe=3&amp;qe_alpha=2.0&amp;from={token}"' in html
    assert f'href="?k=24&amp;qe=10&amp;qe_alpha=2.0&amp;from={token}"' in html
    assert f'href="?k=24&amp;qe=0&amp;from={token}"' in html and "qe=3&amp;qe_alpha=2.0\">JSON" in html
    # the way back: "your photo" in the breadcrumbs, on every page after it (there was only the browser's Back), to
    # the photo's search with the settings chosen on the way (it was 12 neighbours, no expansion)
    assert f'<a href="/gallery/query/{token}?k=24&amp;qe=3&amp;qe_alpha=2.0" id="back-to-search">your photo</a>' in html
    page = client.get(neighbour_hrefs(html)[0].replace("&amp;", "&")).get_data(as_text=True)
    assert 'id="back-to-search"' in page
    # "Without expansion" in the expansion's note keeps the way back too, as the "off" chip does
    note = html.split('id="expanded"', 1)[1].split("</p>", 1)[0]
    assert f'href="?k=24&amp;qe=0&amp;from={token}">Without expansion' in note
    plain_page = client.get(plain[0]).get_data(as_text=True)
    assert f'<a href="/gallery/query/{token}" id="back-to-search">' in plain_page, "defaults: the bare search"
    # a made-up or expired token is dropped quietly: the page asked for, without the link
    first_id = hrefs[0].split("/gallery/", 1)[1].split("?", 1)[0]
    for bogus in ("no-such-search", "<script>"):
        other = client.get(f"/gallery/{first_id}", query_string={"from": bogus})
        assert other.status_code == 200 and 'id="back-to-search"' not in other.get_data(as_text=True)


def test_upload_of_a_non_image_shows_the_form_again_with_the_reason(client):
    r = post_photo(client, b"%PDF-1.4 not a photo")
    assert r.status_code == 415 and r.mimetype == "text/html"
    assert "“holiday.jpg”: not an image, or in a format this program cannot read" in r.get_data(as_text=True)
    assert "“holiday.jpg”" in r.get_data(as_text=True), "the file is named, as the page's own check names it"


def test_upload_without_a_file_shows_the_form_again(client):
    r = client.post("/gallery/search", data={}, content_type="multipart/form-data")
    assert r.status_code == 400 and 'type="file"' in r.get_data(as_text=True)
    # the browser is left on the upload's URL: opened again without the form (reload, bookmark), it is the home page
    again = client.get("/gallery/search")
    assert again.status_code == 302 and again.headers["Location"] == "/"


def test_unknown_query_token_is_a_404_page(client):
    r = client.get("/gallery/query/not-a-token")
    assert r.status_code == 404 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert "expired" in html
    # it says so in its heading and offers the upload it asks for (it was "Not found" and a link home only)
    assert "<h1>This search has expired</h1>" in html and 'action="/gallery/search"' in html
    assert 'aria-label="Upload the photo again"' in html
    # an error page names the served network as the others do (it said "CNN feature space")
    assert "alexnet fc7 image search</title>" in html and "alexnet fc7 feature space" in html


def test_neighbour_page_links_to_each_neighbours_own_page(app, client):
    image_id = app.extensions["retrieval"].index.catalog.file_states()[QUERY][0]
    html = client.get(f"/gallery/{image_id}").get_data(as_text=True)
    neighbours = gallery_links(html.split('id="neighbours"', 1)[1])
    assert len(neighbours) == 12 and image_id not in neighbours
    sha = app.extensions["retrieval"].index.catalog.get(image_id).sha256[:16]
    assert f'src="/images/{image_id}/thumbnail?v={sha}"' in html and f'href="/gallery/{image_id}/original"' in html
    opened = client.get(f"/gallery/{image_id}/original")   # the file's own, versioned address
    assert opened.status_code == 302 and opened.headers["Location"] == f"/images/{image_id}?v={sha}"
    step = client.get(f"/gallery/{neighbours[0]}")                       # walk on through feature space
    assert step.status_code == 200
    assert neighbours[0] not in gallery_links(step.get_data(as_text=True).split('id="neighbours"', 1)[1])


def test_the_gallery_votes_with_the_apis_k_while_it_shows_more_neighbours(app, client):
    image_id = app.extensions["retrieval"].index.catalog.file_states()[QUERY][0]
    html = client.get(f"/gallery/{image_id}").get_data(as_text=True)
    shown = gallery_links(html.split('id="neighbours"', 1)[1])
    api = client.get(f"/images/{image_id}/neighbours").get_json()       # the API's default k: 10
    prediction = re.search(r'id="prediction">predicted: <strong>([^<]+)</strong>, (\d+) of (\d+)', html)
    assert len(shown) == 12 and len(api["results"]) == 10
    assert prediction.groups() == (api["predicted_label"]["label"], str(api["predicted_label"]["votes"]), "10")
    assert "majority vote of the 10 nearest" in html


def test_unknown_gallery_image_is_a_404_page(client):
    r = client.get("/gallery/999999")
    assert r.status_code == 404 and r.mimetype == "text/html" and "no image with id 999999" in r.get_data(as_text=True)


def test_a_typed_k_on_a_gallery_page_is_clamped_as_a_page_number_is(app, client):
    """People type gallery URLs: ?k=1000 shows the most a page may (MAX_K), ?k=abc the default, as ?page=999 shows
    the last page, a repeated k the last; the JSON API refuses them (400 bad_k, repeated_k)."""
    def shown(url: str) -> int:
        r = client.get(url)
        assert r.status_code == 200 and r.mimetype == "text/html", url
        return r.get_data(as_text=True).count('class="card')

    assert app.config["MAX_K"] >= 30   # the sample index's 30 images: every other one fits on a page
    assert shown("/gallery/1?k=1000") == 29
    assert shown("/gallery/1?k=abc") == shown("/gallery/1") == app.config["GALLERY_K"]
    assert shown("/gallery/1?k=10&k=3") == 3     # a k typed after a link's: the last one (was a 400 page)
    assert client.get("/images/1/neighbours?k=1000").status_code == 400
    assert client.get("/images/1/neighbours?k=10&k=3").status_code == 400   # the API: which one was meant?


def test_static_files_are_served(client):
    # /favicon.ico, which browsers ask for on the JSON answers (a 404 in their console), is the gallery's icon
    assert client.get("/favicon.ico", follow_redirects=True).mimetype == "image/svg+xml"
    for name, mime in (("gallery.css", "text/css"), ("gallery.js", "text/javascript"), ("favicon.svg", "image/svg+xml")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.mimetype == mime, name


def test_a_search_made_on_one_worker_process_opens_on_another(app, client, sample_index):
    """gunicorn --workers 2: the upload and its results page may reach different processes (each its own app)."""
    from api import create_app

    other = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                        "THUMBNAIL_DIR": app.config["THUMBNAIL_DIR"], "GALLERY_PAGE_SIZE": 8})
    try:
        location = post_photo(client, (sample_index.data_dir / QUERY).read_bytes()).headers["Location"]
        page = other.test_client().get(location)
        assert page.status_code == 200, page.get_data(as_text=True)
        assert len(gallery_links(page.get_data(as_text=True).split('id="neighbours"', 1)[1])) == 12
        preview = other.test_client().get(location.split("?")[0] + "/image")
        assert preview.status_code == 200 and preview.mimetype == "image/jpeg"
    finally:
        other.extensions["retrieval"].close()


def test_names_that_are_not_utf8_or_hold_a_newline_are_served_and_shown_escaped(tmp_path, index_images):
    import os
    import shutil

    from api import create_app
    from retrieval.samples import make_sample_collection

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    latin1 = data / os.fsdecode(b"caf\xe9")
    latin1.mkdir()
    shutil.copy(data / "red_circles" / "red_circles_000.jpg", latin1 / os.fsdecode(b"gr\xfcn.jpg"))
    shutil.copy(data / "blue_squares" / "blue_squares_000.jpg", data / "blue_squares" / "two\nlines.jpg")
    (data / "\u202eevil").mkdir()   # a right-to-left override: its chip read "3 live" (its count reordered with it)
    shutil.copy(data / "blue_squares" / "blue_squares_000.jpg", data / "\u202eevil" / "x.jpg")
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    client = app.test_client()
    try:
        html = client.get("/").get_data(as_text=True)
        assert "caf\\xe9" in html and "?label=caf%5Cxe9" in html
        assert "\u202e" not in html and "\\u202eevil <span>1</span>" in html and "?label=%5Cu202eevil" in html
        assert len(gallery_links(client.get("/?label=%5Cu202eevil").get_data(as_text=True))) == 1
        filtered = client.get("/?label=caf%5Cxe9")
        assert filtered.status_code == 200 and len(gallery_links(filtered.get_data(as_text=True))) == 1
        for image_id in gallery_links(html):
            for url in (f"/gallery/{image_id}", f"/images/{image_id}", f"/images/{image_id}/thumbnail",
                        f"/images/{image_id}/neighbours"):
                assert client.get(url).status_code == 200, url
        stats = client.get("/stats")
        assert stats.status_code == 200
        # the JSON answers as search-images --json writes the names (they went out as lone surrogates, \udce9, which
        # a strict client cannot encode and a browser turns into U+FFFD)
        assert "\\udc" not in stats.get_data(as_text=True) and "caf\\\\xe9" in stats.get_data(as_text=True)
        own = client.get(f"/images/{gallery_links(filtered.get_data(as_text=True))[0]}/neighbours?k=5").get_json()
        assert own["query"]["path"] == "caf\\xe9/gr\\xfcn.jpg" and own["query"]["label"] == "caf\\xe9", own["query"]
        json.dumps(own, ensure_ascii=False).encode("utf-8")   # (raised UnicodeEncodeError)
    finally:
        app.extensions["retrieval"].close()


def test_overview_counts_labels_not_the_unlabelled_and_cards_keep_the_end_of_long_names(tmp_path, index_images):
    """Photos at the top of the data folder have no label: the overview says how many, beside the number of labels
    (the chips), instead of counting "no label" as one; a long file name gives way in its middle, so cards of
    holiday_in_the_mountains_001.jpg and ..._002.jpg can be told apart, and the card's tooltip holds it whole."""
    import shutil

    from api import create_app
    from retrieval.samples import make_sample_collection

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    for n in (1, 2):
        shutil.copy(data / "red_circles" / "red_circles_000.jpg", data / f"holiday_in_the_mountains_{n:03d}.jpg")
    for year in ("2019", "2021"):   # a camera's names repeat from one trip to the next
        (data / "blue_squares" / year).mkdir()
        shutil.copy(data / "blue_squares" / "blue_squares_000.jpg", data / "blue_squares" / year / "IMG_0001.JPG")
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        client = app.test_client()
        html = client.get("/").get_data(as_text=True)
        assert re.search(r'id="label-count">2 <a class="muted" href="/\?unlabelled=1#collection">· 2 images without '
                         'one</a>', html), html
        for n in (1, 2):
            assert f'title="holiday_in_the_mountains_{n:03d}.jpg"' in html
            # the head gives way (CSS ellipsis), the tail stays: tests/test_gallery_browser.py checks what shows
            assert (f'<span class="filename"><span class="head">holiday_in_the_mountains</span>'
                    f'<span class="tail">_{n:03d}.jpg</span></span>') in html
        # Reproduces (a messy photo folder): no way to see only the images without a label (a chip per label, none
        # for them); and two cards read "IMG_0001.JPG · blue_squares" for different pictures
        assert re.search(r'href="/\?unlabelled=1#collection">no label <span>2</span></a>', html), html
        only = client.get("/?unlabelled=1").get_data(as_text=True)
        assert sorted(re.findall(r'title="([^"]+)"', only)) == ["holiday_in_the_mountains_001.jpg",
                                                               "holiday_in_the_mountains_002.jpg"]
        assert "<h2>Without a label" in only and 'chip-unlabelled active' in only
        nested = client.get("/?label=blue_squares").get_data(as_text=True)
        for year in ("2019", "2021"):
            assert f'<span class="head">{year}/IMG_</span><span class="tail">0001.JPG</span>' in nested
    finally:
        app.extensions["retrieval"].close()


def test_a_mistyped_page_url_is_an_html_page_for_a_browser_and_json_for_a_program(client):
    """Reproduces: /gallery/abc, /gallery/-1 and /nonexistent showed a browser the API's JSON listing its routes."""
    browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    for url in ("/gallery/abc", "/gallery/-1", "/nonexistent"):
        page = client.get(url, headers=browser)
        assert page.status_code == 404 and page.mimetype == "text/html"
        assert "there is no such page here" in page.get_data(as_text=True)
        program = client.get(url, headers={"Accept": "*/*"})
        assert program.status_code == 404 and program.get_json()["error"]["code"] == "not_found"
    # the API's own addresses answer JSON whoever asks: a browser-like client (fetch from a page, an HTTP library
    # sending a browser's Accept) got the HTML page for a mistyped id or a wrong method
    for method, url, status in (("GET", "/images/abc", 404), ("GET", "/images/1/elsewhere", 404), ("GET", "/search", 405),
                                ("POST", "/stats", 405), ("GET", "/search/", 404)):
        answer = client.open(url, method=method, headers=browser)
        assert answer.status_code == status and answer.mimetype == "application/json", (method, url)


def test_neighbour_cards_name_their_file(client, sample_index):
    """The name was only in a tooltip, which touch screens never show: each neighbour's card shows it."""
    location = post_photo(client, (sample_index.data_dir / QUERY).read_bytes()).headers["Location"]
    grid = client.get(location).get_data(as_text=True).split('id="neighbours"', 1)[1].split("</ol>", 1)[0]
    assert grid.count('<li class="card">') == 12 and grid.count('class="filename"') == 12


def test_a_weak_vote_says_the_picture_may_be_of_none_of_the_labels(app, client):
    """Reproduces: a drawing unlike the whole collection was shown 'predicted: purple_checks, 4 of 10' as boldly as a
    vote of 10 of 10. A label that won half or fewer of the votes it could win (k, or its images in the collection
    where they are fewer: 6 here) is said to be a weak vote (a page per image of the collection, an upload of noise)."""
    seen = {"weak": 0, "strong": 0}
    labels = app.extensions["retrieval"].index.catalog.labels()
    pages = [client.get(f"/gallery/{i}").get_data(as_text=True)
             for _, (i, _, _) in sorted(app.extensions["retrieval"].index.catalog.file_states().items())]
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(noise, "PNG")
    searched = client.post("/gallery/search", data={"image": (io.BytesIO(noise.getvalue()), "noise.png")},
                           content_type="multipart/form-data", follow_redirects=True)
    for html in [*pages, searched.get_data(as_text=True)]:
        label, votes, k = re.search(r'id="prediction">predicted: <strong>([^<]+)</strong>, (\d+) of (\d+)', html).groups()
        weak = int(votes) * 2 <= min(int(k), labels[label])
        assert ('id="weak-vote"' in html) == weak, (votes, k)
        seen["weak" if weak else "strong"] += 1
    assert seen["strong"], seen
    # the same rule on votes made up to be weak and strong (these drawings vote clearly; the noise too)
    from retrieval.search.snapshot import Hit

    service = app.extensions["retrieval"]
    name, size = next((lab, n) for lab, n in labels.items() if lab is not None)
    others = [lab for lab in labels if lab not in (None, name)]

    def hits(mine: int) -> list[Hit]:
        return [Hit(i, f"{name}/{i}.jpg", name, 0.1) for i in range(mine)] + \
            [Hit(100 + i, f"x/{i}.jpg", others[i % len(others)], 0.2) for i in range(10 - mine)]

    assert service.predict(hits(3)) == {"label": name, "votes": 3, "k": 10, "weak": True}
    assert service.predict(hits(min(size, 10) // 2 + 1))["weak"] is False


def test_a_whitened_index_searched_exactly_is_called_exact_with_no_recall_row(tmp_path, index_images):
    """Reproduces: the overview of a whitened index said "Search: PCAW32,L2norm,Flat" and a Recall row "(... held-out
    images)", as if the search were approximate, where index-images says "exact in the whitened space"."""
    from api import create_app
    from retrieval.samples import make_sample_collection

    data = tmp_path / "data"
    make_sample_collection(data, per_class=26, size=(48, 36), seed=2)     # 130 images: whitened (auto, 32-d)
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        html = app.test_client().get("/").get_data(as_text=True)
        assert 'id="index-type">exact, in the whitened space (PCAW32,L2norm,Flat)</dd>' in html
        assert 'id="index-recall"' not in html and "PCA-whitened to 32-d" in html
    finally:
        app.extensions["retrieval"].close()
    # an inverted file behind the whitening is approximate: it was called exact too (its type ends in "Flat")
    index_images(data, tmp_path / "ivf", vector_index="IVF4,Flat")
    app = create_app({"INDEX_DIR": str(tmp_path / "ivf"), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t2")})
    try:
        html = app.test_client().get("/").get_data(as_text=True)
        assert 'id="index-type">PCAW32,L2norm,IVF4,Flat · nprobe' in html and 'id="index-recall">1-recall@10' in html
    finally:
        app.extensions["retrieval"].close()


def test_the_overview_names_the_skipped_files_and_why(tmp_path, index_images):
    """Reproduces: "Skipped files 4" on the home page, with no way to see which files or why (/stats: a count)."""
    from api import create_app
    from retrieval.samples import make_sample_collection

    data = tmp_path / "data"
    make_sample_collection(data, per_class=2, size=(64, 48), classes=["red_circles", "blue_squares"])
    (data / "red_circles" / "broken <1>.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    index_images(data, tmp_path / "index")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path / "thumbs")})
    try:
        html = app.test_client().get("/").get_data(as_text=True)
        skipped = html.split('id="skipped">', 1)[1].split("</dd>", 1)[0]
        assert skipped.startswith("1") and "<code>red_circles/broken &lt;1&gt;.jpg</code>: cannot decode image" in skipped
    finally:
        app.extensions["retrieval"].close()


def test_an_upload_sent_by_the_pages_script_is_answered_in_json_to_show_a_refusal_in_place(client, sample_index):
    """The pages' script sends uploads with fetch (X-Requested-With: fetch): a refusal comes back as JSON for the page
    to show where the person was (a form post answered it with the home page, scrolled to the top, focus lost); a
    search comes back as the results page's address. A form post without the script is answered as before."""
    def sent(data: bytes, name: str = "holiday.jpg"):
        return client.post("/gallery/search?k=6", data={"image": (io.BytesIO(data), name)},
                           content_type="multipart/form-data", headers={"X-Requested-With": "fetch"})

    found = sent((sample_index.data_dir / QUERY).read_bytes())
    assert found.status_code == 200 and re.fullmatch(r"/gallery/query/[A-Za-z0-9_-]+\?k=6", found.get_json()["url"])
    assert client.get(found.get_json()["url"]).status_code == 200
    refused = sent(b"GIF89a not really", "fake.jpg")
    assert refused.status_code == 415 and refused.mimetype == "application/json"
    assert refused.get_json()["error"]["message"].startswith("“fake.jpg”: ")
    by_form = post_photo(client, b"GIF89a not really")
    assert by_form.status_code == 415 and by_form.mimetype == "text/html"
    assert "<title>Error: Find similar images" in by_form.get_data(as_text=True)
