"""The user's path: the README's commands in a fresh working folder, the gallery in headless Chromium, and `make demo`.

Everything runs as a user runs it: the console scripts as subprocesses whose working folder is a
temporary folder, relative paths exactly as the README writes them (`index-images data --weights
random`, the default index folder `index`), default options otherwise (decoding in worker
processes, `serve-images` under gunicorn). The browser then walks the gallery and, on every page,
checks that each <img> loaded, that no console error or 5xx answer appeared, and that label
folders named like markup are shown as text. `make demo` is started, checked and stopped the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from helpers.browser import PageErrors, broken_images, launch_chromium, screenshot
from helpers.scripts import console_script
from helpers.servers import free_port
from retrieval.samples import make_sample_collection

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent      # the console scripts live next to the interpreter (the venv's bin/)

PER_CLASS = 6                          # 5 sample classes x 6 pictures
MARKUP_PER_LABEL = 3
# Label folders named like markup. A folder name cannot hold "/": data/<b>x</b>/ is the folder "<b>x<"
# holding "b>/", so those pictures are labelled "<b>x<" (the first folder level) and their paths read "<b>x</b>/...".
MARKUP_FOLDERS = {"<b>x</b>": "<b>x<", 'a&b "q"': 'a&b "q"'}
TOTAL = 5 * PER_CLASS + len(MARKUP_FOLDERS) * MARKUP_PER_LABEL
GALLERY_K = 12                         # the gallery's default number of neighbours
DEMO_IMAGES = 60                       # make demo: 5 classes x 12 generated pictures

pytestmark = pytest.mark.slow   # the console scripts as subprocesses, gunicorn, make demo

SERVER_START_S = 180                   # bounds: server start-up (network load on 2 busy cores), commands, shutdown
COMMAND_S = 300
STOP_S = 30
EVALUATION_S = 120                     # /evaluation computes in the background on a first visit
ACCESS_5XX = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" 5\d\d ')                # gunicorn's access log line
SERVER_FAILURE = re.compile(r"Exception on |Traceback \(most recent call last\)|\[ERROR\]")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's bin/ first on PATH, no RETRIEVAL_* settings, no outer make."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RETRIEVAL_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def run_command(args: list[str], cwd: Path, timeout: int = COMMAND_S) -> subprocess.CompletedProcess:
    """Run a console script in cwd as a user would type it; the result carries stdout and stderr."""
    return subprocess.run([console_script(args[0]), *args[1:]], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)


def described(result: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(result.args)}\nexit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def log_tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until_healthy(proc: subprocess.Popen, base: str, log: Path, what: str, timeout: float = SERVER_START_S) -> None:
    """Poll GET /healthz until it answers 200; fail with the server's output if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode} before serving; its output:\n{log_tail(log)}")
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer GET /healthz within {timeout:.0f} s; its output:\n{log_tail(log)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False) -> int | None:
    """Send sig (to the process group when group), wait a bounded time, then SIGKILL; -> exit status, None if killed."""
    if proc.poll() is not None:
        return proc.returncode
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        return proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
        proc.wait(STOP_S)
        return None


@dataclasses.dataclass
class Server:
    """A server started in a working folder; its stdout and stderr go to log."""
    proc: subprocess.Popen
    base: str
    log: Path
    seen: int = 0          # how much of the log the page checks have already read

    def new_failures(self) -> list[str]:
        """5xx access-log lines and server-side exceptions written since the last call."""
        text = self.log.read_text(errors="replace")
        fresh, self.seen = text[self.seen:], len(text)
        return server_failures(fresh)


def server_failures(text: str) -> list[str]:
    return [line for line in text.splitlines() if ACCESS_5XX.search(line) or SERVER_FAILURE.search(line)]


def check_page(page, errors: PageErrors, server: Server, name: str) -> None:  # noqa: ANN001 - playwright Page
    """What a user would notice on the page in view: broken images, console errors, 5xx answers; screenshot it."""
    broken = broken_images(page)
    screenshot(page, name)
    time.sleep(0.2)   # let the server's access log catch up with the last answers
    problems = []
    if broken:
        total = page.evaluate("document.images.length")
        problems.append(f"{len(broken)} of {total} images did not load (naturalWidth 0): {broken[:6]}")
    console = errors.take()
    if console:
        problems.append(f"{len(console)} browser errors: {console[:6]}")
    failures = server.new_failures()
    if failures:
        problems.append(f"the server logged {len(failures)} failures: {failures[:6]}")
    assert not problems, f"{name} page {page.url}:\n  " + "\n  ".join(problems)


def open_page(page, url: str) -> None:  # noqa: ANN001 - playwright Page
    """Go to url as a user typing it; a 4xx or 5xx answer fails at once, with what the page says."""
    response = page.goto(url)
    assert response is not None and response.ok, \
        f"GET {url} answered {response.status if response else 'nothing'}: {page.locator('body').inner_text()[:300]!r}"


def assert_no_injected_markup(page, where: str) -> None:  # noqa: ANN001 - playwright Page
    """Label folder names like <b>x</b> must show as text: no <b> element exists anywhere in the page."""
    injected = page.evaluate("document.querySelectorAll('b').length")
    assert injected == 0, f"{where}: a label or path was inserted as HTML ({injected} <b> elements in the page)"


# --- the working folder: sample collection, markup labels, `index-images data --weights random` ----------------

@dataclasses.dataclass
class WorkingFolder:
    root: Path
    index_run: subprocess.CompletedProcess
    upload: Path           # a photo that is not in the collection


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> WorkingFolder:
    root = tmp_path_factory.mktemp("user-path")
    make_sample_collection(root / "data", per_class=PER_CLASS, size=(160, 120), seed=1)
    spare = make_sample_collection(root / "spare", per_class=MARKUP_PER_LABEL, size=(160, 120), seed=2,
                                   classes=["red_circles", "green_stripes"])
    for n, folder in enumerate(MARKUP_FOLDERS):
        (root / "data" / folder).mkdir(parents=True)
        for i, picture in enumerate(spare[n * MARKUP_PER_LABEL:(n + 1) * MARKUP_PER_LABEL]):
            shutil.copyfile(picture, root / "data" / folder / f"picture {i}.jpg")
    drawn = make_sample_collection(root / "spare", per_class=1, size=(320, 240), seed=7, classes=["purple_checks"])
    upload = root / "holiday photo.jpg"
    shutil.copyfile(drawn[0], upload)
    shutil.rmtree(root / "spare")

    index_run = run_command(["index-images", "data", "--weights", "random"], root)
    if index_run.returncode != 0:
        pytest.fail("the README's first command failed in a fresh working folder:\n" + described(index_run))
    return WorkingFolder(root, index_run, upload)


def test_index_images_indexes_the_folder_into_index(workdir):
    assert f"indexed {TOTAL}, unchanged 0" in workdir.index_run.stdout, described(workdir.index_run)
    assert (workdir.root / "index" / "catalog.db").is_file(), "the default index folder is ./index"


def test_search_images_finds_the_query_itself_first(workdir):
    result = run_command(["search-images", "data/purple_checks/purple_checks_002.jpg", "-k", "5"], workdir.root)
    assert result.returncode == 0, described(result)
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+\d", line)]
    assert len(rows) == 5, described(result)
    assert rows[0][1] == "0.0000" and rows[0][-1] == "purple_checks/purple_checks_002.jpg", described(result)


def readme_block(after: str, language: str = "") -> str:
    """The README's first fenced block of language after the line that starts with `after`."""
    text = (REPO / "README.md").read_text()
    return re.search(rf"^{re.escape(after)}.*?^```{language}\n(.*?)^```", text, re.S | re.M).group(1)


def test_the_readmes_search_examples_run_verbatim_after_indexing(workdir):
    line = next(line for line in readme_block("## Commands").splitlines() if line.startswith("search-images "))
    result = run_command(line.split("#")[0].split(), workdir.root)
    assert result.returncode == 0 and "red_circles/red_circles_000.jpg" in result.stdout, described(result)
    python = run_command([sys.executable, "-c", readme_block("From Python:", "python")], workdir.root)
    assert python.returncode == 0, described(python)


def test_evaluate_index_reports_every_label(workdir):
    result = run_command(["evaluate-index"], workdir.root)
    assert result.returncode == 0, described(result)
    assert f"{TOTAL} labelled images in 7 classes" in result.stdout, described(result)
    for label in MARKUP_FOLDERS.values():
        assert label in result.stdout, f"label {label!r} missing from the report:\n{described(result)}"


# --- serve-images (gunicorn, default options) and the gallery in Chromium ------------------------------------

@pytest.fixture(scope="module")
def server(workdir) -> Server:
    port = free_port()
    log = workdir.root / "serve-images.log"
    with log.open("w") as out:
        proc = subprocess.Popen([console_script("serve-images"), "--port", str(port), "--access-log"], cwd=workdir.root,
                                env=user_env(), stdout=out, stderr=subprocess.STDOUT)
    served = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_healthy(proc, served.base, log, "serve-images")
        yield served
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.mark.browser
def test_home_page_shows_the_whole_collection(page, server):
    errors = PageErrors(page)
    open_page(page, server.base + "/")
    check_page(page, errors, server, "home")
    assert page.locator("#image-count").inner_text() == str(TOTAL)
    assert page.locator("#grid li").count() == TOTAL


@pytest.mark.browser
def test_label_filter_shows_only_that_label(page, server):
    errors = PageErrors(page)
    open_page(page, server.base + "/")
    page.locator("nav.chips a.chip-link", has_text="purple_checks").click()
    page.wait_for_url(re.compile(r"[?&]label=purple_checks"))
    check_page(page, errors, server, "label filter")
    labels = page.locator("#grid li .chip").all_inner_texts()
    assert labels == ["purple_checks"] * PER_CLASS


@pytest.mark.browser
def test_markup_label_folders_show_as_text(page, server):
    errors = PageErrors(page)
    open_page(page, server.base + "/")
    chips = page.locator("nav.chips a.chip-link").all_inner_texts()
    for label in MARKUP_FOLDERS.values():
        assert any(chip.startswith(label + " ") for chip in chips), f"no filter link reading {label!r}: {chips}"
    assert_no_injected_markup(page, "home page")

    # filter by each: the label survives the URL round trip and heads the grid as text
    for label in MARKUP_FOLDERS.values():
        open_page(page, server.base + "/")
        page.locator("nav.chips a.chip-link").filter(has_text=label).first.click()
        page.wait_for_url(re.compile(r"[?&]label="))
        check_page(page, errors, server, f"label {label}")
        assert page.locator("#collection h2").inner_text().startswith(label), page.url
        assert page.locator("#grid li .chip").all_inner_texts() == [label] * MARKUP_PER_LABEL, page.url
        assert_no_injected_markup(page, f"label page of {label!r}")

    # an image page of the <b>x</b> folder: its path and label as text
    open_page(page, server.base + "/")
    page.locator("nav.chips a.chip-link").filter(has_text="<b>x<").first.click()
    page.wait_for_url(re.compile(r"[?&]label="))
    page.locator("#grid li a").first.click()
    page.wait_for_url(re.compile(r"/gallery/\d+$"))
    check_page(page, errors, server, "image page of a markup label")
    assert page.locator(".query-panel .path").inner_text().startswith("<b>x</b>/picture ")
    assert page.locator(".query-panel .chip").inner_text() == "<b>x<"
    assert_no_injected_markup(page, "image page in <b>x</b>/")


@pytest.mark.browser
def test_upload_a_photo_then_follow_a_neighbour(page, server, workdir):
    errors = PageErrors(page)
    open_page(page, server.base + "/")
    page.set_input_files("form[data-primary] input[type=file]", str(workdir.upload))   # choosing it submits it
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    check_page(page, errors, server, "upload results")
    assert "holiday photo.jpg" in page.locator(".query-panel").inner_text()
    neighbours = page.locator("#neighbours li")
    assert neighbours.count() == GALLERY_K
    assert neighbours.nth(0).locator(".chip").inner_text() == "purple_checks"
    assert page.locator("#already-indexed").count() == 0, "a new photo is not said to be in the collection"

    target = neighbours.nth(1).locator("a")
    target_id = int(target.get_attribute("href").split("?", 1)[0].rsplit("/", 1)[1])
    target.click()
    page.wait_for_url(re.compile(rf"/gallery/{target_id}\?from=[\w-]+$"))   # the search it came from, for the way back
    check_page(page, errors, server, "image page")
    assert page.locator("#neighbours li").count() == GALLERY_K
    page.locator("#back-to-search").click()            # "your photo" in the breadcrumbs: back to the upload's results
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    assert "holiday photo.jpg" in page.locator(".query-panel").inner_text()

    open_page(page, server.base + "/")                 # a photo of the collection itself, uploaded again
    page.set_input_files("form[data-primary] input[type=file]", str(workdir.root / "data/red_circles/red_circles_003.jpg"))
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    note = page.locator("#already-indexed")
    assert "already in the collection" in note.inner_text() and "red_circles/red_circles_003.jpg" in note.inner_text()
    note.locator("a").click()
    page.wait_for_url(re.compile(r"/gallery/\d+(\?from=[\w-]+)?$"))
    assert page.locator("h1.query-title").inner_text() == "red_circles_003.jpg"


@pytest.mark.browser
def test_evaluation_page(page, server):
    errors = PageErrors(page)
    open_page(page, server.base + "/evaluation")
    # the numbers may still be computing: the page then reloads itself until they are there
    page.wait_for_selector("#per-class", timeout=EVALUATION_S * 1000)
    check_page(page, errors, server, "evaluation")
    text = page.locator("main").inner_text()
    for label in MARKUP_FOLDERS.values():
        assert label in text, f"label {label!r} missing from /evaluation"
    assert_no_injected_markup(page, "/evaluation")


@pytest.mark.browser
def test_model_page(page, server):
    errors = PageErrors(page)
    open_page(page, server.base + "/model")
    check_page(page, errors, server, "model")
    assert page.locator("#filters").count() == 1, "the first-layer filters image is on /model"


def test_server_log_has_no_5xx(server):
    """Everything asked of the server so far (pages, images, uploads) was answered without a 5xx or a traceback."""
    time.sleep(0.2)
    text = server.log.read_text(errors="replace")
    assert '"GET / HTTP' in text, f"--access-log wrote no request lines; the log ends:\n{log_tail(server.log, 20)}"
    sent = re.findall(r'"GET /images/\d+/thumbnail\?v=[0-9a-f]{16} HTTP/1\.1" 200 (\S+)', text)   # versioned
    assert sent and all(size.isdigit() and int(size) > 0 for size in sent), \
        f"thumbnails are logged with their size, not 0: {sent[:5]}"
    failures = server_failures(text)
    assert not failures, "serve-images logged failures:\n" + "\n".join(failures[:20])


# --- crash and re-run, with the default decoding workers -------------------------------------------------------

def test_index_images_rerun_right_after_kill_9(tmp_path):
    """kill -9 in the middle of a run, then the same command at once: it finishes the job (README: crash-safe).

    The killed run's decoding workers must not outlive it for long either (they would hold files and cores).
    """
    make_sample_collection(tmp_path / "data", per_class=8, size=(320, 240), seed=3)
    total = 5 * 8
    log = tmp_path / "first-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([console_script("index-images"), "data", "--weights", "random"],
                                cwd=tmp_path, env=user_env(), stdout=out, stderr=subprocess.STDOUT)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + COMMAND_S
        parent = psutil.Process(proc.pid)
        while proc.poll() is None and time.monotonic() < deadline:   # wait for the decoding workers to run
            workers = parent.children(recursive=True)
            if workers:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"index-images finished (status {proc.returncode}) before its decoding workers could be seen; "
                        f"the test needs a longer run:\n{log_tail(log)}")
        assert workers, f"index-images started no decoding workers within {COMMAND_S} s (default options)"
        time.sleep(0.5)                          # inside the run: workers decoding, maybe a batch committed
        assert proc.poll() is None, "the run ended before it could be killed; the test proves nothing:\n" + log_tail(log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(STOP_S)

        rerun = run_command(["index-images", "data", "--weights", "random"], tmp_path)
        assert rerun.returncode == 0, "re-run right after kill -9 failed:\n" + described(rerun) + \
            "\n--- the killed run\n" + log_tail(log)
        assert re.search(rf"; {total} images in the index", rerun.stdout), described(rerun)
        alive = _wait_for_exit(workers, 10)
        assert not alive, f"decoding workers of the killed run still running 10 s after it: {[p.pid for p in alive]}"
    finally:
        stop(proc, signal.SIGKILL)
        for worker in workers:                   # orphaned decoding workers must not outlive the test
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass


# --- make demo ------------------------------------------------------------------------------------------------

@pytest.mark.browser
def test_make_demo_serves_the_gallery(browser, tmp_path):
    """`make demo` in a fresh folder: sample pictures, index, search, then the gallery until Ctrl-C.

    The folder holds links to the repository's Makefile, pyproject.toml and .venv. make runs with
    `-o .venv/.installed`: the stamp counts as up to date whatever the mtimes say, so make never
    reinstalls (a `pip install -e .` from this folder would point the venv's editable install here).
    Offline on purpose (empty TORCH_HOME, a proxy nothing listens on): the demo's random-weights path.
    """
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("make demo here needs the repository's .venv (make test creates it)")
    folder = tmp_path / "demo"
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (folder / name).symlink_to(REPO / name)
    port = free_port()
    unreachable = "http://127.0.0.1:9"
    env = user_env(DEMO_PORT=str(port), TORCH_HOME=str(tmp_path / "torch-home"), http_proxy=unreachable,
                   https_proxy=unreachable, HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable, no_proxy="", NO_PROXY="",
                   PYTHONFAULTHANDLER="1")   # a process that will not stop prints its threads' stacks on SIGABRT
    log = tmp_path / "make-demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen([make, "-o", ".venv/.installed", "demo"], cwd=folder, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)   # its own process group
    demo = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_healthy(proc, demo.base, log, "make demo", timeout=SERVER_START_S + COMMAND_S)
        output = log.read_text(errors="replace")
        assert "pip install" not in output, f"make demo reinstalled:\n{log_tail(log)}"
        assert "RANDOM weights" in output, f"offline, the demo says it uses random weights:\n{log_tail(log)}"
        assert "Sample search" in output and f"gallery and API at http://127.0.0.1:{port}/" in output, log_tail(log)
        assert "Downloading" not in output, "offline, no line that reads as if a download had started"
        assert output.index("RANDOM weights") < output.index("index-images data"), log_tail(log)
        assert f"indexed {DEMO_IMAGES}" in output and "summary {" not in output, "a logged demo: no machine-readable JSON line"

        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            errors = PageErrors(page)
            open_page(page, demo.base + "/")
            check_page(page, errors, demo, "demo home")
            assert page.locator("#image-count").inner_text() == str(DEMO_IMAGES)
            page.locator("#grid li a").first.click()
            page.wait_for_url(re.compile(r"/gallery/\d+$"))
            check_page(page, errors, demo, "demo image page")
            assert page.locator("#neighbours li").count() == GALLERY_K
        finally:
            context.close()
    finally:
        status = stop(proc, signal.SIGINT, group=True)        # Ctrl-C in the terminal: the whole process group
        leftovers = _wait_for_group_exit(proc.pid, STOP_S)
        stuck = [f"{p.pid} {' '.join(p.info['cmdline'] or [])}" for p in leftovers]
        for p in leftovers:          # SIGABRT: faulthandler writes where each thread is into the log, then SIGKILL
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        for p in _wait_for_exit(leftovers, 5):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert status is not None, f"make demo did not stop within {STOP_S} s of Ctrl-C:\n{log_tail(log)}"
    assert not leftovers, (f"processes of make demo still running {STOP_S} s after Ctrl-C: {stuck}; "
                           f"the log ends (with their threads' stacks):\n{log_tail(log, 120)}")
    assert not server_failures(log.read_text(errors="replace")), f"make demo's server logged failures:\n{log_tail(log)}"


def test_make_demo_on_a_port_in_use_says_so_before_any_work(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "commands.demo"], cwd=tmp_path, capture_output=True, text=True,
                                env=user_env(DEMO_PORT=str(port), PYTHONPATH=str(REPO)), timeout=COMMAND_S)
    assert result.returncode == 2, described(result)
    assert f"port {port} is in use" in result.stderr and "DEMO_PORT" in result.stderr, described(result)
    assert not (tmp_path / "data").exists() and not (tmp_path / "index").exists(), "refused before any work"


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init to reap it; it runs no more)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_exit(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of the processes runs; -> those still running after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.25)


def _wait_for_group_exit(pgid: int, timeout: float) -> list[psutil.Process]:
    """Wait until no process of the group runs; -> those still running after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in psutil.process_iter(["pid", "cmdline"]) if _in_group(p, pgid) and _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.25)


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False
