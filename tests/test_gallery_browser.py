"""The gallery in a real headless Chromium (Playwright): upload a photo, see its neighbours, walk on to a neighbour's page."""
from __future__ import annotations

import base64
import re

import pytest

from api import create_app
from helpers.browser import launch_chromium
from helpers.servers import serve_in_thread

pytestmark = pytest.mark.browser

QUERY = "orange_triangles/orange_triangles_003.jpg"


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def base_url(sample_index, tmp_path_factory):
    """A threaded werkzeug server on a free local port over the sample index."""
    app = create_app({"INDEX_DIR": str(sample_index.index_dir), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path_factory.mktemp("thumbnails"))})
    with serve_in_thread(app) as url:
        yield url
    app.extensions["retrieval"].close()


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_computed(page, url: str) -> None:
    """Open url; a page computed in the background (/evaluation) reloads until it is there: wait for that (60 s)."""
    page.goto(url)
    for _ in range(60):
        if page.locator("#computing").count() == 0:
            return
        page.wait_for_timeout(1000)
        page.reload()


def loaded_images(page, selector: str) -> int:
    """How many of the matching <img> elements actually decoded (naturalWidth > 0)."""
    page.wait_for_function("sel => [...document.querySelectorAll(sel)].every(i => i.complete)", arg=selector)
    return page.eval_on_selector_all(selector, "imgs => imgs.filter(i => i.naturalWidth > 0).length")


def test_upload_see_neighbours_and_follow_one(page, base_url, sample_index):
    page.goto(base_url + "/")
    assert page.locator("#image-count").inner_text() == "30"
    assert page.locator("#grid li").count() == 30

    # choosing a file submits it (no button to press)
    page.set_input_files("form[data-primary] input[type=file]", str(sample_index.data_dir / QUERY))
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    neighbours = page.locator("#neighbours li")
    assert neighbours.count() == 12
    first = neighbours.nth(0)
    assert first.locator(".rank").inner_text() == "#1"
    assert first.locator(".chip").inner_text() == "orange_triangles"
    assert float(first.locator(".distance").inner_text()) < 1e-3          # the photo itself is in the collection
    assert loaded_images(page, "#neighbours img") == 12
    assert loaded_images(page, "#query-image") == 1

    # follow the second neighbour to its own neighbour page
    target = neighbours.nth(1).locator("a")
    target_id = int(target.get_attribute("href").split("?", 1)[0].rsplit("/", 1)[1])
    target.click()
    page.wait_for_url(re.compile(rf"/gallery/{target_id}(\?from=[\w-]+)?$"))
    assert page.locator("h1.query-title").inner_text().endswith(".jpg")
    hrefs = page.eval_on_selector_all("#neighbours a", "links => links.map(a => a.getAttribute('href'))")
    assert len(hrefs) == 12 and not any(h.split("?")[0] == f"/gallery/{target_id}" for h in hrefs)
    assert loaded_images(page, "#neighbours img") == 12

    # and back again: the results page comes back without resubmitting the upload
    page.go_back()
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    assert page.locator("#neighbours li").count() == 12


def test_the_first_tab_skips_past_the_top_bar_to_the_page(page, base_url):
    """A keyboard user reached the first card after 9 Tabs: the first Tab now offers to skip to the content."""
    page.goto(base_url + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to the content"
    assert page.evaluate("document.activeElement.getBoundingClientRect().top") >= 0, "visible when focused"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"


def test_the_photo_chooser_opens_from_the_keyboard(page, base_url):
    """Tab to "Choose a photo" and press Enter (or Space): the file chooser opens, and nothing is submitted (a review
    reported Enter did nothing; in this Chromium both keys open it)."""
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))   # before the page loads: intercepted from then on
    for key in ("Enter", " "):
        page.goto(base_url + "/")          # a fresh page for each key
        choosers.clear()
        for _ in range(10):                 # Tab from the top of the page to "Choose a photo"
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.matches('form[data-primary] input[type=file]')"):
                break
        else:
            pytest.fail("Tab never reaches the photo chooser")
        page.keyboard.press(key)
        deadline = 50
        while not choosers and deadline:
            page.wait_for_timeout(100)
            deadline -= 1
        assert choosers, f"{key!r} on the focused chooser opened no file chooser"
        assert choosers[0].element.evaluate("e => e.closest('form').hasAttribute('data-primary')"), key
        assert page.url == base_url + "/", "the key opened the chooser; it did not submit the empty form"


def test_a_file_refused_by_the_top_bar_is_said_under_it_and_can_be_chosen_again(page, base_url, tmp_path):
    """Reproduces: on a page without the drop zone, a file that is no image was refused with the browser's alert box,
    and the chooser kept it, so choosing it again (after renaming it, say) was no change and did nothing."""
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    (tmp_path / "notes.txt").write_text("not a photo")
    page.goto(base_url + "/gallery/1")
    page.set_input_files(".topbar-upload input[type=file]", str(tmp_path / "notes.txt"))
    # the box is shown empty, then filled on the next frame (so a screen reader announces the same message again)
    page.wait_for_function("() => document.querySelector('.topbar-upload .form-error').textContent.includes('notes.txt')",
                           timeout=5000)
    assert page.locator(".topbar-upload .form-error").inner_text() == "“notes.txt” is not an image." and not dialogs
    assert page.eval_on_selector(".topbar-upload input[type=file]", "input => input.files.length") == 0
    assert page.url == base_url + "/gallery/1"


def test_a_photo_dropped_on_the_page_is_searched(page, base_url, sample_index):
    page.goto(base_url + "/?label=blue_squares")
    payload = base64.b64encode((sample_index.data_dir / "blue_squares/blue_squares_004.jpg").read_bytes()).decode()
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        const grid = document.querySelector("#grid");
        for (const type of ["dragenter", "dragover", "drop"]) {
            grid.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
    }""", payload)
    page.wait_for_url(re.compile(r"/gallery/query/[\w-]+"))
    assert page.locator("#neighbours li .chip").first.inner_text() == "blue_squares"
    assert "dropped.jpg" in page.locator(".query-panel").inner_text()


def test_pages_fit_a_phone_screen(browser, base_url):
    context = browser.new_context(viewport={"width": 375, "height": 812}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        for path in ("/", "/gallery/1", "/gallery/999999", "/evaluation"):
            open_computed(page, base_url + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, f"{path} scrolls sideways on a phone ({width} px wide)"
        page.goto(base_url + "/")
        columns = page.eval_on_selector("#grid", "g => getComputedStyle(g).gridTemplateColumns.split(' ').length")
        assert columns == 3
    finally:
        context.close()


def test_on_a_phone_a_cards_name_wraps_whole_after_its_underscores(browser, base_url):
    """Reproduces (a newcomer's phone screenshots): "orange_triangl" then "es_000.jpg" on a card, its label
    "orange_triangle" then "s": a name wrapped at any letter. It wraps after its _ and - now, whole."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(base_url + "/?label=orange_triangles")
        lines = page.eval_on_selector_all("#grid li", """cards => cards.map(card => {
            const lines = el => {                  // the text of each line the element is laid out in
                const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT), out = [];
                let top = null;
                for (let node; (node = walker.nextNode());) {
                    for (let i = 0; i < node.length; i++) {
                        const range = document.createRange();
                        range.setStart(node, i); range.setEnd(node, i + 1);
                        const y = Math.round(range.getBoundingClientRect().top);
                        if (top === null || y > top + 2) { out.push(""); top = y; }
                        out[out.length - 1] += node.data[i];
                    }
                }
                return out;
            };
            return {name: lines(card.querySelector('.filename-wrap')), label: lines(card.querySelector('.chip')),
                    hidden: getComputedStyle(card.querySelector('.filename')).display === 'none'};
        })""")
        assert lines and all(card["hidden"] for card in lines)
        for card in lines:
            for parts in (card["name"], card["label"]):
                assert all(part.endswith(("_", "-", "/")) for part in parts[:-1]), parts   # broken after _ - / only
        assert "".join(lines[0]["name"]).startswith("orange_triangles_") and len(lines[0]["name"]) > 1
    finally:
        context.close()


def test_a_long_file_name_on_a_card_gives_way_in_its_middle_and_keeps_its_end_in_view(page, base_url):
    """orange_triangles_003.jpg is wider than a card: its head is cut with an ellipsis, and its end (_003.jpg), what
    tells it from its neighbours, is shown whole inside the card, as is a short name."""
    page.goto(base_url + "/")
    cards = page.eval_on_selector_all("#grid li", """cards => cards.map(card => {
        const name = card.querySelector('.filename'), head = name.querySelector('.head'),
              tail = name.querySelector('.tail'), box = card.getBoundingClientRect(), t = tail.getBoundingClientRect();
        return {title: card.querySelector('a').title, tail: tail.textContent, cut: head.scrollWidth > head.clientWidth,
                inside: t.left >= box.left && t.right <= box.right + 0.5 && t.width > 0};
    })""")
    assert len(cards) == 30
    for card in cards:
        assert card["title"].endswith(card["tail"]) and card["inside"], card
    long = [c for c in cards if c["title"].startswith("orange_triangles/")]
    assert long and all(c["cut"] for c in long), "at 1280 px a card is narrower than orange_triangles_003.jpg"


LONG_LABEL = "Très_long_dossier_de_catégorie_avec_un_nom_vraiment_très_très_long_pour_tester"
LONG_NAME = "photo_" + "sans_espace_" * 8 + "001.jpg"
PANORAMA = "panorama.jpg"
SPACED_NAME = "100% red.jpg"   # the card's tail (its last 8 characters) begins with the space


@pytest.fixture(scope="module")
def long_names_url(tmp_path_factory):
    """A small index whose label and one file name are far wider than a phone, without a space to break at."""
    from helpers.indexes import build_index
    from retrieval.samples import make_sample_collection

    root = tmp_path_factory.mktemp("long-names")
    make_sample_collection(root / "data", per_class=3, size=(96, 72), classes=["red_circles", "blue_squares"], seed=5)
    (root / "data" / "red_circles" / "red_circles_000.jpg").rename(root / "data" / "red_circles" / LONG_NAME)
    (root / "data" / "red_circles" / "red_circles_001.jpg").rename(root / "data" / "red_circles" / SPACED_NAME)
    (root / "data" / "blue_squares").rename(root / "data" / LONG_LABEL)
    from PIL import Image, ImageDraw

    panorama = Image.new("RGB", (1200, 80), "white")   # 15:1, as a scanned strip or a phone's panorama
    ImageDraw.Draw(panorama).rectangle((0, 20, 1199, 60), fill="red")
    panorama.save(root / "data" / "red_circles" / PANORAMA)
    build_index(root / "data", root / "index")
    app = create_app({"INDEX_DIR": str(root / "index"), "RELOAD_INTERVAL_S": 0,
                      "THUMBNAIL_DIR": str(tmp_path_factory.mktemp("thumbnails"))})
    with serve_in_thread(app) as url:
        yield url, app.extensions["retrieval"].index.catalog.file_states()
    app.extensions["retrieval"].close()


@pytest.mark.parametrize("width", [390, 1280])
def test_long_names_without_spaces_never_widen_a_page_or_spill_from_their_box(browser, long_names_url, width):
    """Reproduces: a folder name of 80 characters without a space made the image page 816 px wide on a phone (the
    k choices off screen) and spilled its label and path out of the query panel on a desktop; the home page's label
    chip, the label's page heading and a long file name's breadcrumb made phones scroll sideways."""
    from urllib.parse import quote

    url, states = long_names_url
    by_label = next(i for p, (i, _s, _m) in states.items() if p.startswith(LONG_LABEL))
    by_name = states[f"red_circles/{LONG_NAME}"][0]
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    try:
        for path in ("/", f"/?label={quote(LONG_LABEL)}", f"/gallery/{by_label}", f"/gallery/{by_name}", "/evaluation"):
            open_computed(page, url + path)
            scroll = page.evaluate("document.documentElement.scrollWidth")
            assert scroll <= width, f"{path} is {scroll} px wide on a {width} px screen"
            spilled = page.evaluate("""() => [...document.querySelectorAll('.query-panel, .overview, .breadcrumbs')]
                .filter(box => box.scrollWidth > box.clientWidth + 1).map(box => box.className)""")
            assert not spilled, f"{path}: content wider than its box in {spilled}"
        page.goto(url + f"/gallery/{by_label}")
        chips = page.eval_on_selector_all(".k-choice a", "links => links.map(a => a.getBoundingClientRect().right)")
        assert chips and max(chips) <= width, "every k choice is on screen"
    finally:
        context.close()


def test_the_evaluation_charts_are_readable_in_dark_mode(browser, base_url):
    """Reproduces: with the browser in dark mode the precision chart's ticks and values were black on the dark panel."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    page = context.new_page()
    try:
        open_computed(page, base_url + "/evaluation")
        fills = page.eval_on_selector_all("#precision-chart svg text:not([fill])",
                                          "texts => texts.map(t => getComputedStyle(t).fill)")
        panel = page.eval_on_selector("#precision-chart", "f => getComputedStyle(f).backgroundColor")
        assert fills and all(fill != "rgb(0, 0, 0)" and fill != panel for fill in fills), (fills, panel)
    finally:
        context.close()


def test_a_space_where_a_cards_name_is_split_is_shown(page, long_names_url):
    """Reproduces: "100% red.jpg" read "100%red.jpg" on its card (the end kept in view, " red.jpg", is a flex item,
    whose leading space the browser dropped)."""
    url, _states = long_names_url
    page.goto(url + "/")
    shown = page.eval_on_selector_all("#grid li .filename", "names => names.map(n => [...n.children].map(part => part.innerText).join(''))")
    assert SPACED_NAME in shown, shown


def test_a_refused_upload_is_said_where_the_person_was_and_a_reload_sends_nothing(page, base_url, tmp_path):
    """Reproduces: a file the server refuses (a text file named .jpg, which only decoding tells) threw the person
    from the page they were on to the home page, scrolled to the top, focus lost, the message in an alert region
    that was already there (seldom announced); and before that, the address stayed /gallery/search, so a reload
    sent the file again ("Confirm Form Resubmission"). The refusal is now said in place, in the top bar of the page
    they were on, scrolled where it was; Escape closes it; the home page's drop zone says it under itself."""
    (tmp_path / "fake.jpg").write_text("not a photo")
    page.set_viewport_size({"width": 1000, "height": 600})
    page.goto(base_url + "/gallery/1?k=48")
    page.mouse.wheel(0, 900)
    page.wait_for_function("() => window.scrollY > 300")
    scrolled = page.evaluate("window.scrollY")
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    page.set_input_files(".topbar-upload input[type=file]", str(tmp_path / "fake.jpg"))
    error = page.locator(".topbar-upload .form-error")
    error.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => document.querySelector('.topbar-upload .form-error').textContent.includes('fake.jpg')")
    assert "not an image" in error.inner_text() or "cannot read" in error.inner_text(), error.inner_text()
    assert not navigations and page.url == base_url + "/gallery/1?k=48"
    assert page.evaluate("window.scrollY") == scrolled
    assert page.get_attribute(".topbar-upload", "aria-busy") == "false"
    page.keyboard.press("Escape")
    error.wait_for(state="hidden", timeout=5000)

    page.goto(base_url + "/")
    page.set_input_files("form[data-primary] input[type=file]", str(tmp_path / "fake.jpg"))
    page.wait_for_function("() => document.querySelector('form[data-primary] .form-error').textContent.includes('fake.jpg')")
    assert page.url == base_url + "/"
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.reload()
    assert not posts and page.locator("#grid li").count() > 0


def test_a_panorama_is_shown_whole_on_its_card_not_as_a_sliver(page, long_names_url):
    """Reproduces: a card crops its thumbnail to a square, so a 15:1 panorama showed a blown-up sliver of its middle
    (its thumbnail is 256 x 17). Very wide or tall pictures are fitted whole; the others still fill their square."""
    url, _states = long_names_url
    page.goto(url + "/")
    assert loaded_images(page, "#grid img") == page.locator("#grid img").count()
    fits = page.eval_on_selector_all("#grid li", """cards => Object.fromEntries(cards.map(card => [
        card.querySelector('a').title, getComputedStyle(card.querySelector('img')).objectFit]))""")
    assert fits.pop(f"red_circles/{PANORAMA}") == "contain"
    assert fits and set(fits.values()) == {"cover"}, fits


def test_a_page_still_computing_shows_its_answer_in_place_without_reloading(page, base_url, monkeypatch):
    """Reproduces: /duplicates and /evaluation reloaded themselves every 2-3 s while computing (an HTTP Refresh):
    focus, scroll and a screen reader's place were lost each time, and a link followed at that moment was cancelled.
    The page now asks again in the background and puts the answer in place: one document from start to end."""
    import time

    import api.duplicates

    real = api.duplicates.find_duplicates
    monkeypatch.setattr(api.duplicates, "find_duplicates", lambda *a, **kw: time.sleep(4) or real(*a, **kw))
    monkeypatch.setattr(api.duplicates, "WAIT_S", 0.1)
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    page.goto(base_url + "/duplicates?threshold=0.2345")   # a threshold not asked before: computed now
    assert page.locator("#computing").count() == 1
    navigations.clear()
    page.wait_for_selector("#duplicates-summary", timeout=120_000)
    assert page.locator("#computing").count() == 0 and not navigations, navigations
    assert "Near-duplicates" in page.title()


def test_on_a_phone_a_cards_name_and_label_wrap_whole_and_the_image_page_breaks_names_at_their_parts(browser,
                                                                                                    base_url):
    """Reproduces (a newcomer on a phone): cards read "blu…_010.jpg" and "blue_squ…", which said nothing; the image
    page's title broke as "blue_squares_004." / "jpg". Two cards a row, names and labels wrap whole; the title and
    path break after '_' and '/'."""
    context = browser.new_context(viewport={"width": 375, "height": 812})
    page = context.new_page()
    try:
        page.goto(base_url + "/")
        cut = page.eval_on_selector_all("#grid li .caption > *", "els => els.filter(e => "
                                        "[e, ...e.children].some(x => x.scrollWidth > x.clientWidth + 1)).length")
        assert cut == 0
        page.goto(base_url + "/gallery/1")
        assert "<wbr>" in page.inner_html(".query-title") and ".<wbr>jpg" not in page.inner_html(".query-title")
    finally:
        context.close()
