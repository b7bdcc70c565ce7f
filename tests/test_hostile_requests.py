"""Hostile requests never get a 5xx: fuzzed ids, k and uploads (test client), and chunked or odd ones under gunicorn."""
from __future__ import annotations

import io
import json
import random
import shutil
import socket
import urllib.parse

import pytest
import requests
from PIL import Image

from api.gunicorn_worker import MAX_HEAD_BYTES, RequestReadAhead
from api.query_input import MAX_IMAGE_ID
from helpers.indexes import build_index
from helpers.servers import serve_images
from retrieval.catalog import Catalog

ID_ROUTES = ("/images/{}", "/images/{}/thumbnail", "/images/{}/neighbours", "/gallery/{}")
HOSTILE_IDS = [
    str(MAX_IMAGE_ID + 1), "99999999999999999999", "9" * 5000, "-1", "+1", "0", " 1", "1 ", "\t1", "1\n",
    "", "1.0", "1e3", "0x10", "1_000", "NaN", "١", "٣٢", "１２", "߁", "𝟏", "²", "\x00", "%00", "..", "1/..",
]
HOSTILE_K = ["0", "-1", "101", "9" * 5000, "0" * 5000, "1" * 4301, "1e2", "5.0", "0x5", "+5", "١", "５", "",
             " ", "\x00", "5\n", "NaN", "inf", "true", "[5]"]


def _no_5xx(response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.get_data(as_text=True)[:300])


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, fmt)
    return out.getvalue()


def hostile_uploads() -> dict[str, bytes]:
    rng = random.Random(7)
    jpeg, png = image_bytes("JPEG"), image_bytes("PNG")
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, "PNG")     # 100 megapixels in a few kB: more than MAX_PIXELS allows
    return {
        "empty": b"",
        "one byte": b"\xff",
        "random bytes": rng.randbytes(4096),
        "text": b"hello, not an image\n" * 10,
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "jpeg header only": jpeg[:20],
        "truncated png": png[: len(png) // 2],
        "png with random tail": png[:33] + rng.randbytes(500),
        "gif header only": b"GIF89a\x10\x00\x10\x00",
        "avif ftyp then garbage": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + rng.randbytes(600),
        "heic ftyp then garbage": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00heicmif1" + rng.randbytes(600),
        "webp riff then garbage": b"RIFF\x00\x01\x00\x00WEBPVP8 " + rng.randbytes(300),
        "decompression bomb": bomb.getvalue(),
        "huge declared size": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xff\xff\xff\xff\xff\xff\xff\x08\x02\x00\x00\x00",
    }


# --- the app, through Flask's test client -----------------------------------------------------------

@pytest.fixture(scope="module")
def known_id(app) -> int:
    return app.extensions["retrieval"].index.catalog.list_images(limit=1)[0].id


@pytest.mark.parametrize("route", ID_ROUTES)
def test_hostile_ids_are_404_never_5xx(client, route):
    for raw in HOSTILE_IDS:
        r = client.get(route.format(_quote(raw)))
        _no_5xx(r, raw)
        assert r.status_code in (404, 308), (raw, r.status_code)   # 308: werkzeug's redirect of "1/.." paths


@pytest.mark.parametrize("route", ID_ROUTES)
def test_the_largest_64_bit_id_is_a_plain_unknown_image(client, route):
    assert client.get(route.format(MAX_IMAGE_ID)).status_code == 404
    assert client.get(route.format(MAX_IMAGE_ID + 1)).status_code == 404


def test_non_ascii_digits_are_not_ids(client, known_id):
    arabic = str(known_id).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    assert client.get(f"/images/{known_id}").status_code == 200
    assert client.get(f"/images/{_quote(arabic)}").status_code == 404


def test_random_ids_never_5xx(client, known_id):
    rng = random.Random(11)
    alphabet = "0123456789" * 4 + "-+ ._x١５\n%/"
    for _ in range(150):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        _no_5xx(client.get(f"/images/{_quote(raw)}/neighbours"), raw)


def test_hostile_k_is_400_never_5xx(client, known_id):
    query = image_bytes()
    for raw in HOSTILE_K:
        for url in (f"/images/{known_id}/neighbours?k={_quote(raw)}", f"/gallery/{known_id}?k={_quote(raw)}"):
            r = client.get(url)
            _no_5xx(r, url[:80])
            assert r.status_code in (200, 400), (url[:80], r.status_code)
        r = client.post(f"/search?k={_quote(raw)}", data={"image": (io.BytesIO(query), "q.jpg")})
        _no_5xx(r, raw[:40])
    r = client.get(f"/images/{known_id}/neighbours?k={'9' * 5000}")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_k"
    assert len(r.get_json()["error"]["message"]) < 200, "the message does not echo 5,000 digits"
    assert client.get(f"/images/{known_id}/neighbours?k={'0' * 5000}3").status_code == 200   # it is 3


def test_hostile_uploads_are_4xx_never_5xx(client):
    for name, data in hostile_uploads().items():
        for url in ("/search", "/gallery/search"):
            r = client.post(url, data={"image": (io.BytesIO(data), "upload.jpg")})
            _no_5xx(r, f"{name} multipart {url}")
            assert r.status_code in (400, 413, 415), (name, url, r.status_code)
        r = client.post("/search", data=data, content_type="image/jpeg")
        _no_5xx(r, f"{name} raw")
        assert r.status_code in (400, 413, 415), (name, r.status_code)


def test_malformed_multipart_never_5xx(client):
    bodies = [b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\nxx",   # no end
              b"no boundary at all", b"--b--\r\n", b"--b\r\n\r\n--b--\r\n", b"\x00" * 100]
    for body in bodies:
        for ctype in ("multipart/form-data; boundary=b", "multipart/form-data", "multipart/form-data; boundary="):
            r = client.post("/search", data=body, content_type=ctype)
            _no_5xx(r, (body[:20], ctype))


class _StalledBody(io.BytesIO):
    """A request body whose reads time out, as a socket with serve-images' read timeout does."""

    def read(self, *_args) -> bytes:
        raise TimeoutError("timed out")

    readinto = readline = read1 = read


@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=b"])
def test_a_body_that_stops_arriving_is_408(client, content_type):
    r = client.post("/search", input_stream=_StalledBody(), content_type=content_type,
                    environ_overrides={"CONTENT_LENGTH": "1000"})
    assert r.status_code == 408 and r.get_json()["error"]["code"] == "request_timeout", r.data


# --- reading requests ahead (api.gunicorn_worker) ----------------------------------------------------

def _complete_at(request: bytes, step: int = 7) -> int | None:
    """Feed a request in small pieces; -> how many bytes it took to be complete, None if it never was."""
    reader = RequestReadAhead()
    for end in range(step, len(request) + step, step):
        if reader.feed(request[end - step:end]):
            return min(end, len(request))
    return None


def test_read_ahead_waits_for_the_whole_request():
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _complete_at(get) == len(get)
    assert _complete_at(get[:-2]) is None
    post = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    assert _complete_at(post) == len(post)
    assert _complete_at(post[:-1]) is None      # one byte short: still waiting
    chunked = (b"POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n")
    assert _complete_at(chunked) == len(chunked)
    assert _complete_at(chunked[:-2]) is None   # the empty line after the trailers is missing
    assert _complete_at(chunked.replace(b"Trailer: t\r\n", b"")) == len(chunked) - len(b"Trailer: t\r\n")


def test_read_ahead_hands_malformed_framing_to_gunicorns_parser_at_once():
    for head in (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 b"POST / HTTP/1.1\r\nno colon here\r\n\r\n"):
        assert RequestReadAhead(head).complete, head
    too_long = RequestReadAhead(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
    assert too_long.complete and too_long.head_too_long
    huge = RequestReadAhead(b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n")
    assert huge.complete, "a body over the read-ahead limit goes to the app, which answers 413 unread"


# --- under gunicorn: a real serve-images -----------------------------------------------------------

NEWLINE_NAME = "new\nline.jpg"
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def odd_index(tmp_path_factory):
    """An index whose data folder holds a file with a newline in its name."""
    root = tmp_path_factory.mktemp("odd")
    data = root / "data"
    (data / "odd").mkdir(parents=True)
    (data / "odd" / "plain.jpg").write_bytes(image_bytes("JPEG", (80, 60)))
    shutil.copy(data / "odd" / "plain.jpg", data / "odd" / NEWLINE_NAME)
    report = build_index(data, root / "index")
    assert report.indexed == 2, report
    return root


@pytest.fixture(scope="module")
def odd_server(odd_index):
    log = odd_index / "server.log"
    with serve_images(odd_index / "index", log, "--threads", "4", RETRIEVAL_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB)) as base:
        yield base
    output = log.read_text()
    assert "Traceback" not in output and "unhandled error" not in output, output


def _exchange(base: str, request: bytes, *, limit_s: float = 30) -> bytes:
    """Send raw bytes to the server, -> everything it answers until it closes (or limit_s passes)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):   # the server answered early and closed
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.startswith(b"HTTP/1.1 4"):
                    break   # a refusal: its head is enough
        except ConnectionResetError:
            pass
    return answer


def _chunked(data: bytes, size: int = 64 * 1024) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


@pytest.mark.slow
def test_a_chunked_upload_over_the_limit_is_413_under_gunicorn(odd_server):
    over = random.Random(3).randbytes(MAX_UPLOAD_MB * 1024 * 1024 + 100_000)
    raw = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + _chunked(over))
    assert _exchange(odd_server, raw).startswith(b"HTTP/1.1 413 "), "the raw body"
    form = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + over + b"\r\n--b--\r\n")
    raw = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + _chunked(form))
    assert _exchange(odd_server, raw).startswith(b"HTTP/1.1 413 "), "the multipart form"
    # a chunked upload under the limit is read whole: a real image is searched
    small = image_bytes("JPEG", (80, 60))
    raw = (b"POST /search?k=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n" + _chunked(small, 1000))
    assert _exchange(odd_server, raw).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
def test_expect_100_continue_is_answered_then_the_body_read(odd_server):
    small = image_bytes("JPEG", (80, 60))
    host, port = odd_server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /search?k=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(small))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(small)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b"HTTP/1.1 200 " in answer


@pytest.mark.slow
def test_a_file_name_with_a_newline_is_served_under_gunicorn(odd_server, odd_index):
    catalog = Catalog(odd_index / "index")
    try:
        image_id = next(r.id for r in catalog.list_images(limit=10) if r.path == f"odd/{NEWLINE_NAME}")
    finally:
        catalog.close()
    r = requests.get(f"{odd_server}/images/{image_id}", timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == (odd_index / "data" / "odd" / NEWLINE_NAME).read_bytes()
    assert "\n" not in r.headers.get("Content-Disposition", "")
    for url in (f"/images/{image_id}/thumbnail", f"/images/{image_id}/neighbours", f"/gallery/{image_id}"):
        assert requests.get(odd_server + url, timeout=30).status_code == 200, url


@pytest.mark.slow
def test_hostile_ids_are_404_under_gunicorn(odd_server):
    for raw in ("99999999999999999999", "١", "-1", "9" * 300):
        for route in ID_ROUTES:
            assert requests.get(odd_server + route.format(_quote(raw)), timeout=30).status_code == 404, (route, raw)


@pytest.mark.slow
def test_long_request_lines_and_headers_are_answered_in_json_under_gunicorn(odd_server):
    """gunicorn's own limits (4 KB request line, 8 KB header) would answer an HTML 414/431; the API answers JSON:
    a long k reaches the app (400 bad_k), a 10 KB header is served, a head over 64 KB is 431 headers_too_large
    whether it arrives in pieces or with its end in the same read."""
    def answer(raw: bytes) -> tuple[str, bytes]:   # every request says Connection: close: read until the server closes
        host, port = odd_server.rsplit("/", 1)[1].split(":")
        got = b""
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                sock.sendall(raw)
                while chunk := sock.recv(65536):
                    got += chunk
            except (BrokenPipeError, ConnectionResetError):   # a refusal may close before all was sent
                pass
        head, _, body = got.partition(b"\r\n\r\n")
        assert b"application/json" in head.lower(), head[:300]
        return head.split(b"\r\n", 1)[0].decode(), body

    status, body = answer(b"GET /stats?k=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status.startswith("HTTP/1.1 200 "), (status, body[:300])   # /stats takes no k: a long line is no error
    raw = b"GET /images/1/neighbours?k=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, body = answer(raw)
    assert status.startswith("HTTP/1.1 400 ") and b"bad_k" in body, (status, body[:300])
    status, body = answer(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\nConnection: close\r\n\r\n")
    assert status.startswith("HTTP/1.1 200 "), (status, body[:300])
    status, body = answer(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\nConnection: close\r\n\r\n")
    assert status.startswith("HTTP/1.1 431 ") and (not body or b"headers_too_large" in body), (status, body[:300])


def _read_until_closed(base: str, request: bytes, *, half_close: bool = False, limit_s: float = 30) -> bytes:
    """Send raw bytes (then shut the sending side when half_close), -> all the server answers until it closes."""
    host, port = base.rsplit("/", 1)[1].split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=limit_s) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


@pytest.mark.parametrize("request_bytes", [
    b"GET /images/ 33 HTTP/1.1\r\nHost: x\r\n\r\n",                    # a space in the target: four parts
    b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",          # a NUL in a header value
    b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",   # a negative length
    b"G\xc3\xa9T /stats HTTP/1.1\r\nHost: x\r\n\r\n",                    # not a method
], ids=["request-line", "nul-header", "negative-length", "method"])
def test_requests_gunicorns_parser_refuses_are_answered_in_json(odd_server, request_bytes):
    """They got gunicorn's HTML 400 page, though the docs say every error is JSON."""
    answer = _read_until_closed(odd_server, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"]["code"] == "bad_request", body


def test_a_body_cut_short_by_the_client_closing_its_side_is_answered_400(odd_server):
    """Content-Length 100, three bytes, then the client shuts its sending side: it got no answer at all."""
    answer = _read_until_closed(odd_server, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                            b"Content-Length: 100\r\n\r\nabc", half_close=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head.lower(), answer[:300]
    assert "cut short" in json.loads(body)["error"]["message"], body


def test_a_parameter_given_twice_is_refused_not_read_once(client, known_id):
    """k=1&k=abc: the first was read and the second ignored without a word; now neither is guessed."""
    for url in (f"/images/{known_id}/neighbours?k=1&k=abc", f"/images/{known_id}/neighbours?qe=1&qe=3"):
        r = client.get(url)
        assert r.status_code == 400 and r.mimetype == "application/json", url
        assert "given 2 times" in r.get_json()["error"]["message"], url
    r = client.post("/search?k=2&k=3", data={"image": (io.BytesIO(image_bytes()), "q.jpg")})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "repeated_k"
    r = client.post("/search", data={"image": (io.BytesIO(image_bytes()), "q.jpg"), "k": ["2", "3"]})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "repeated_k"
    assert len(client.post("/search?k=2", data={"image": (io.BytesIO(image_bytes()), "q.jpg")}).get_json()["results"]) == 2
