"""find-duplicates and evaluate-index --copies: near-duplicate groups from whitened vectors, a threshold calibrated on
the collection's own edited copies, byte copies always grouped, the /duplicates page; and the array functions below."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers.indexes import build_index
from helpers.scripts import console_script
from retrieval.images.edits import edited_copies
from retrieval.samples import make_colour_collection, make_sample_collection
from retrieval.vectors.duplicates import (choose_threshold, close_pairs, complete_groups, connected_groups,
                                          pair_scores)
from retrieval.vectors.whitening import learn_whitening, whiten

BIN = Path(sys.executable).parent
COPY_EDITS = ["jpeg30", "downscale", "blur", "crop"]


def _collection(data: Path) -> dict:
    """5 classes x 4 drawings; the first of each class with 4 edited copies next to it; one byte copy.
    -> {"originals": {original path: [its copies' paths]}, "byte_copy": (original, copy)} (paths relative to data)."""
    paths = make_sample_collection(data, per_class=4, seed=3)
    originals = {}
    for p in paths[::4]:
        copies = []
        for edit, img in edited_copies(Image.open(p), 0, COPY_EDITS).items():
            img.save(p.with_name(f"{p.stem}_{edit}.jpg"), quality=90)
            copies.append(p.with_name(f"{p.stem}_{edit}.jpg").relative_to(data).as_posix())
        originals[p.relative_to(data).as_posix()] = copies
    shutil.copyfile(paths[1], paths[1].with_name("byte_copy.jpg"))
    return {"originals": originals, "byte_copy": (paths[1].relative_to(data).as_posix(),
                                                  paths[1].with_name("byte_copy.jpg").relative_to(data).as_posix())}


def _folder_state(data: Path) -> dict[str, str]:
    return {p.relative_to(data).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(data.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("dupes")
    truth = _collection(root / "data")
    build_index(root / "data", root / "index")
    return root, truth


def _check_groups(groups: list[list[dict]], truth: dict) -> None:
    """The byte copy is grouped with its original; every original's JPEG-30 copy with it; no group mixes two originals."""
    group_of = {m["path"]: n for n, g in enumerate(groups) for m in g}
    original, byte_copy = truth["byte_copy"]
    assert byte_copy in group_of and group_of.get(original) == group_of[byte_copy], groups
    family = {p: o for o, copies in truth["originals"].items() for p in [o, *copies]}
    for o, copies in truth["originals"].items():
        jpeg = next(c for c in copies if c.endswith("_jpeg30.jpg"))
        assert o in group_of and group_of[o] == group_of.get(jpeg), (o, groups)
    for g in groups:
        assert len({family[m["path"]] for m in g if m["path"] in family}) <= 1, f"two originals in one group: {g}"


def test_find_duplicates_groups_copies_and_byte_copies(collection):
    from commands.find_duplicates import main

    root, truth = collection
    before = _folder_state(root / "data")
    result = CliRunner().invoke(main, ["--index-dir", str(root / "index"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    _check_groups(doc["groups"], truth)
    assert doc["threshold"]["source"] == "calibrated" and 0 < doc["threshold"]["value"] < 2
    # the certain group (a byte copy) first, before the larger groups of edited copies (a review found real copies
    # at groups 6 and 10 of 107 on /duplicates, below groups of pictures only alike)
    assert truth["byte_copy"][1] in {m["path"] for m in doc["groups"][0]}
    assert len(doc["groups"][0]) < max(len(g) for g in doc["groups"])
    for g in doc["groups"]:
        assert set(g[0]) >= {"id", "path", "label", "width", "height", "distance"} and g[0]["distance"] == 0
        after_keeper = [m["distance"] for m in g[1:]]
        assert after_keeper == sorted(after_keeper), "the others nearest the keeper first"
    assert _folder_state(root / "data") == before, "find-duplicates changed the folder"

    text = CliRunner().invoke(main, ["--index-dir", str(root / "index")])
    assert text.exit_code == 0, text.output
    assert "calibrated on this collection" in text.output and "keep" in text.output
    assert "distance to it, between vectors whitened on this collection" in text.output
    # a newcomer read make demo's alike drawings, grouped, as copies: random weights are named
    assert "note: this index's network has seeded random weights" in text.output
    keeper_line = next(line for line in text.output.splitlines() if line.strip().startswith("keep ") and "x" in line)
    assert keeper_line.split()[1] == "320x240", "the keeper is the largest image of its group"


def test_a_given_threshold_overrides_the_calibration(collection):
    from commands.find_duplicates import main

    root, truth = collection
    tiny = CliRunner().invoke(main, ["--index-dir", str(root / "index"), "--json", "--threshold", "1e-6"])
    assert tiny.exit_code == 0, tiny.output
    doc = json.loads(tiny.stdout)
    assert doc["threshold"] == {"value": 1e-6, "source": "given", "calibration_images": 0, "calibration": None}
    assert [sorted(m["path"] for m in g) for g in doc["groups"]] == [sorted(truth["byte_copy"])], \
        "at a threshold of about 0 only the byte-identical files are one group"
    assert "seeded random weights" not in tiny.stderr, "byte copies are copies whatever the network"


def test_a_collection_without_copies_is_left_ungrouped_and_planted_copies_are_found(tmp_path):
    """30 drawings, none a copy of another: at the defaults (almost) none is grouped, where the calibration that
    weighed every image as having 8 copies grouped 10. The same drawings with a byte copy and three edited copies
    (JPEG 30, a third of the size, blurred) added: each copy is grouped with its original, and the other drawings
    stay (almost) ungrouped."""
    from commands.find_duplicates import main

    data = tmp_path / "data"
    paths = make_colour_collection(data, per_class=10, size=(320, 240))
    build_index(data, tmp_path / "index")
    alone = CliRunner().invoke(main, ["--index-dir", str(tmp_path / "index"), "--json"])
    assert alone.exit_code == 0, alone.output
    grouped = [m["path"] for g in json.loads(alone.stdout)["groups"] for m in g]
    assert len(grouped) <= 3, f"{len(grouped)} of 30 drawings without copies grouped: {grouped}"

    planted = {paths[0]: "same", paths[11]: "jpeg30", paths[22]: "downscale", paths[16]: "blur"}
    pairs = []
    for src, edit in planted.items():
        dst = src.with_name(f"{src.stem}_{edit}.png")
        if edit == "same":
            shutil.copyfile(src, dst.with_suffix(src.suffix))
            dst = dst.with_suffix(src.suffix)
        else:
            edited_copies(Image.open(src), 0, [edit])[edit].save(dst)
        pairs.append((src.relative_to(data).as_posix(), dst.relative_to(data).as_posix()))
    build_index(data, tmp_path / "index2")
    both = CliRunner().invoke(main, ["--index-dir", str(tmp_path / "index2"), "--json"])
    assert both.exit_code == 0, both.output
    groups = json.loads(both.stdout)["groups"]
    group_of = {m["path"]: n for n, g in enumerate(groups) for m in g}
    for original, copy in pairs:
        assert copy in group_of and group_of.get(original) == group_of[copy], (original, copy, groups)
    others = [p for p in group_of if p not in {x for pair in pairs for x in pair}]
    assert len(others) <= 3, f"drawings without copies grouped: {others}"


def test_a_handful_of_photos_are_not_grouped_with_one_another(tmp_path):
    """Whitening learned on a few images keeps n // 4 components: 3 or 5 distinct photos came out one-dimensional and
    all were grouped, at a threshold of 0.000. Below MIN_WHITENED images the raw unit vectors are compared."""
    from commands.find_duplicates import format_groups
    from retrieval.search.duplicates import find_duplicates
    from retrieval.search.index import ImageIndex
    from retrieval.vectors.duplicates import MIN_WHITENED

    data = tmp_path / "data"
    paths = make_sample_collection(data, per_class=1, seed=4)            # 5 drawings, one of each class
    first = paths[0]
    edited_copies(Image.open(first), 0, ["jpeg30"])["jpeg30"].save(first.with_name("copy.jpg"), quality=90)
    build_index(data, tmp_path / "index")
    assert len(paths) + 1 < MIN_WHITENED
    index = ImageIndex(tmp_path / "index")
    try:
        result = find_duplicates(index)
    finally:
        index.close()

    groups = [sorted(image.path for image in group) for group in result.groups]
    assert groups == [sorted([first.relative_to(data).as_posix(), first.with_name("copy.jpg").relative_to(data).as_posix()])]
    assert result.threshold.value > 0.01, result.threshold.describe()
    # the legend says which distances these are (it said "whitened on this collection" whatever the size)
    assert not result.whitened and "between the raw unit vectors (fewer than 32 images" in format_groups(result)


def test_a_symlink_is_never_the_keeper_and_other_names_of_one_file_are_marked_links(tmp_path):
    """Reproduces: noise/link_to_noise_001.jpg -> noise_001.jpg was suggested as the keeper and its target marked
    'same' (a copy): deleting the 'copy' as suggested left a dangling link and lost the photo. The real file is
    kept now, and a symlink or hard link to it is marked 'link' (removing it frees nothing)."""
    data = tmp_path / "data"
    paths = make_sample_collection(data, per_class=1, seed=4)
    target = paths[0]
    os.symlink(target.name, target.with_name("a_link.jpg"))                 # sorts first; same size and mtime
    os.link(paths[1], paths[1].with_name("hard.jpg"))
    shutil.copyfile(paths[2], paths[2].with_name("copy.jpg"))               # a byte copy: another file
    build_index(data, tmp_path / "index")
    done = subprocess.run([console_script("find-duplicates"), "--index-dir", "index", "--json", "--threshold", "0.001"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    groups = {g[0]["path"]: [(m["path"], m["link_to"]) for m in g[1:]] for g in json.loads(done.stdout)["groups"]}
    rel = lambda p: p.relative_to(data).as_posix()  # noqa: E731
    assert groups[rel(target)] == [(rel(target.with_name("a_link.jpg")), rel(target))]
    hard = sorted([rel(paths[1]), rel(paths[1].with_name("hard.jpg"))],    # neither a symlink: the usual order,
                  key=lambda p: (len(p.rsplit("/", 1)[-1]), p))            # the plainer (shorter) name first
    assert groups[hard[0]] == [(hard[1], hard[0])]
    assert groups[rel(paths[2])] == [(rel(paths[2].with_name("copy.jpg")), None)]
    text = subprocess.run([console_script("find-duplicates"), "--index-dir", "index", "--threshold", "0.001"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300).stdout
    assert f"   link   320x240  {rel(target.with_name('a_link.jpg'))}  (another name of {rel(target)}'s file)" in text
    # a copy made since the index was: the groups cannot hold it, and it is said (a photographer expected to see it)
    assert "note: the data folder changed" not in done.stderr
    shutil.copyfile(paths[3], paths[3].with_name("new_copy.jpg"))
    lagging = subprocess.run([console_script("find-duplicates"), "--index-dir", "index", "--threshold", "0.001"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert lagging.returncode == 0, lagging.stderr
    assert (f"note: the data folder changed since it was indexed (1 new or changed file, 0 gone): these groups are of "
            f"the index as it was; run index-images {data} first to include them") in lagging.stderr, lagging.stderr


def test_find_duplicates_without_an_index_is_one_line(tmp_path):
    from commands.find_duplicates import main

    result = CliRunner().invoke(main, ["--index-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "run index-images first" in result.output


@pytest.mark.slow
def test_user_path_find_duplicates_and_copies_measure(collection, tmp_path):
    root, truth = collection
    before = _folder_state(root / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIND_DUPLICATES_", "EVALUATE_INDEX_"))}
    out = subprocess.run([str(BIN / "find-duplicates"), "--index-dir", str(root / "index"), "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    _check_groups(json.loads(out.stdout)["groups"], truth)
    assert _folder_state(root / "data") == before
    assert "edited copies" not in out.stderr, "no progress bar where no person watches"
    from helpers.terminal import run_on_terminal

    status, text = run_on_terminal([str(BIN / "find-duplicates"), "--index-dir", str(root / "index")], tmp_path)
    assert status == 0, text
    assert "reading vectors" in text and "edited copies" in text and "192/192" in text, text   # 24 images x 8 edits
    assert "groups of near-duplicates" in text and "keep" in text, text

    ev = subprocess.run([str(BIN / "evaluate-index"), "--index-dir", str(root / "index"), "--copies", "5", "--json"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert ev.returncode == 0, ev.stderr
    r = json.loads(ev.stdout)
    assert r["copies"] == 5 * 8 and 0 <= r["duplicates"]["f1"] <= 1
    assert r["also_calibrated"] == 0, "41 images: the measured ones are not those the threshold was calibrated on"
    assert 0 <= r["recall_at_1"] <= 1 and r["recall_at_1"] > 10 * r["chance_at_1"], r
    assert _folder_state(root / "data") == before


@pytest.mark.slow
@pytest.mark.browser
def test_duplicates_page_shows_the_groups_with_thumbnails(collection, tmp_path):
    from helpers.browser import PageErrors, broken_images, launch_chromium, screenshot
    from helpers.servers import serve_images

    root, truth = collection
    with serve_images(root / "index", tmp_path / "server.log") as base, launch_chromium() as browser:
        page = browser.new_page()
        errors = PageErrors(page)
        page.goto(base + "/")
        page.click("text=duplicates")
        page.wait_for_selector(".duplicate-group", timeout=180_000)   # the page reloads itself while computing
        assert page.url.endswith("/duplicates")
        shown = page.locator(".duplicate-group img").count()
        assert shown >= 2 * len(truth["originals"]), "every group shows its images"
        assert broken_images(page) == []
        assert truth["byte_copy"][1].rsplit("/", 1)[-1] in page.content()
        assert "seeded random weights" in page.locator(".groups-note").inner_text()
        how = page.locator("#threshold-details").text_content()
        assert "calibrated on this collection" in how and "--threshold (from Python" not in how, \
            "the page offers ?threshold=D, not the command's option"
        screenshot(page, "duplicates")
        assert errors.take() == []


def test_duplicates_page_at_a_threshold_of_ones_own(collection, tmp_path, monkeypatch):
    """/duplicates?threshold=D groups at D, as find-duplicates --threshold D does, with a way back; a threshold out
    of range is a 400 page that says why. The groups come a page at a time (107 groups made a page 32,750 px tall)."""
    import time

    import api.duplicates
    from api import create_app
    from retrieval.search.duplicates import find_duplicates
    from retrieval.search.index import ImageIndex

    root, _ = collection
    app = create_app({"INDEX_DIR": str(root / "index"), "RELOAD_INTERVAL_S": 0, "THUMBNAIL_DIR": str(tmp_path / "t")})
    try:
        client = app.test_client()
        deadline = time.monotonic() + 120
        while True:   # the page computes in the background and says so until the groups are ready
            page = client.get("/duplicates?threshold=0.3")
            if 'id="computing"' not in page.get_data(as_text=True) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        html = page.get_data(as_text=True)
        assert page.status_code == 200 and "threshold 0.300 (given)." in html and 'id="calibrated-link"' in html, html
        index = ImageIndex(root / "index", load_network=False)
        try:
            expected = len(find_duplicates(index, threshold=0.3).groups)
        finally:
            index.close()
        per_page = api.duplicates.GROUPS_PER_PAGE
        assert html.count('class="panel duplicate-group"') == min(expected, per_page)
        # the byte copy is marked as such beside its keeper, and its group says so (they sat unmarked among groups of
        # pictures only alike, the keeper's "keep" styled as a label)
        assert html.count('class="badge badge-keep"') == min(expected, per_page)
        assert '<span class="badge badge-same-file">same file</span>' in html and "2 identical files</span>" in html
        monkeypatch.setattr(api.duplicates, "GROUPS_PER_PAGE", 2)
        assert expected > 2, "the page test needs more groups than a page holds"
        first = client.get("/duplicates?threshold=0.3").get_data(as_text=True)
        assert first.count('class="panel duplicate-group"') == 2 and "Group 2:" in first and "Group 3:" not in first
        assert 'href="/duplicates?page=2&amp;threshold=0.3#groups">Next' in first
        second = client.get("/duplicates?page=2&threshold=0.3").get_data(as_text=True)
        assert "Group 3:" in second and "Group 1:" not in second and f"Page 2 of {-(-expected // 2)}" in second
        refused = client.get("/duplicates?threshold=3")
        assert refused.status_code == 400 and "below 2" in refused.get_data(as_text=True)
        typo = client.get("/duplicates?threshold=abc")   # named as typed (it said "not nan")
        assert typo.status_code == 400 and "below 2, not &#39;abc&#39;" in typo.get_data(as_text=True)

        # a threshold that links everything: one group of the whole collection, shown in part (security review:
        # every image of a large collection on one page)
        monkeypatch.setattr(api.duplicates, "MEMBERS_SHOWN", 5)
        deadline = time.monotonic() + 120
        while 'id="computing"' in (loose := client.get("/duplicates?threshold=1.99").get_data(as_text=True)) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Group 1:" in loose and "Group 2:" not in loose, loose
        group = loose.split("Group 1:", 1)[1].split("</section>", 1)[0]
        size = int(group.split(" images", 1)[0])
        assert size > 5 and group.count("<li") == 5, group
        assert f"{size - 5} more\n  images of this group are not shown here" in group, group

        # While other groups are computed (another threshold here; a changed index alike), the page showed the last
        # ones under "computing": images deleted since offered as keepers, beside the copies one would then delete.
        import threading

        release = threading.Event()
        real = api.duplicates.find_duplicates
        monkeypatch.setattr(api.duplicates, "find_duplicates", lambda *a, **kw: release.wait(60) and real(*a, **kw))
        monkeypatch.setattr(api.duplicates, "WAIT_S", 0.2)
        waiting = client.get("/duplicates?threshold=0.25")
        html = waiting.get_data(as_text=True)
        assert 'id="computing"' in html and 'data-poll-s="' in html
        assert "duplicate-group" not in html and "badge-keep" not in html
        release.set()
    finally:
        app.extensions["retrieval"].close()


# --- the array functions -------------------------------------------------------------------------------------


def test_close_pairs_match_brute_force_exact_and_approximate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[150:] = x[:150] + rng.normal(scale=0.05, size=(150, 8)).astype(np.float32)   # 150 close pairs
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(d < 0.5, 1)))}
    pairs, dist = close_pairs(x, 0.5)
    assert set(map(tuple, pairs.tolist())) == brute
    assert np.allclose(dist, d[pairs[:, 0], pairs[:, 1]], atol=1e-4)
    approx, _ = close_pairs(x, 0.5, exact_max=10)   # the IVF k-NN path
    found = set(map(tuple, approx.tolist()))
    assert found <= brute and len(found) >= 0.9 * len(brute)
    blocks, _ = close_pairs(x, 0.5, range_results_max=1000)   # the range search a few rows at a time: the same
    assert set(map(tuple, blocks.tolist())) == brute


def test_a_threshold_that_links_everything_takes_each_images_nearest_not_every_pair():
    """Reproduces: ?threshold=1.99 on /duplicates (or find-duplicates --threshold 1.99) had the range search return
    every pair of the collection: 4.4 GB at 8,000 images, n^2. Past a bound each image's k nearest are taken."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    everything, _ = close_pairs(x, 1.99 * 2)
    assert len(everything) == 400 * 399 // 2
    bounded, dist = close_pairs(x, 1.99 * 2, range_results_max=10_000, k=5)
    assert 400 * 5 // 2 <= len(bounded) <= 400 * 5, len(bounded)
    assert set(map(tuple, bounded.tolist())) <= set(map(tuple, everything.tolist())) and (dist < 1.99 * 2).all()
    assert connected_groups(400, bounded) == [list(range(400))], "still one group, as the threshold says"


def test_groups_join_through_pairs():
    assert connected_groups(6, [(0, 1), (1, 2), (4, 5)]) == [[0, 1, 2], [4, 5]]
    assert connected_groups(3, []) == []


def test_a_chain_of_near_images_is_not_one_group():
    """Neighbouring crops of one photo: a~b, b~c, c~d each under the threshold, a and d far apart. Joined pair by
    pair they would be one group; find-duplicates' groups keep every two members under the threshold."""
    from retrieval.search.duplicates import group_rows

    x = np.array([[0, 0], [0.3, 0], [0.6, 0], [0.9, 0], [5, 5], [5.1, 5]], np.float32)
    assert connected_groups(len(x), close_pairs(x, 0.4)[0]) == [[0, 1, 2, 3], [4, 5]], "the chain the old rule made"
    groups = group_rows(x, 0.4, [])
    assert [4, 5] in groups
    assert not any({0, 3} <= set(g) or {0, 2} <= set(g) for g in groups), groups
    assert all(len(g) == 2 for g in groups) and len(groups) == 3, groups


def test_byte_copies_are_one_group_whatever_the_rule():
    """Rows 0 and 4 hold the same file: one group with row 1 (near both), though 4 has no pair of its own; rows 2 and 3
    hold another file and are one group even at a threshold of about 0; groups of the same file never split."""
    from retrieval.search.duplicates import group_rows

    x = np.array([[0, 0], [0.1, 0], [3, 3], [3.001, 3], [9, 9], [-4, 2]], np.float32)   # row 4 is not near row 0
    assert sorted(group_rows(x, 0.5, [[0, 4], [2, 3]])) == [[0, 1, 4], [2, 3]]
    assert sorted(group_rows(x, 1e-6, [[0, 4], [2, 3]])) == [[0, 4], [2, 3]]


def test_complete_groups_hold_only_close_images_and_find_the_copies():
    """Clusters of 6 near copies among scattered vectors, a few clusters close enough to bridge: every two members of
    a group are closer than the threshold (brute force), and each cluster is found whole."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(30, 8)).astype(np.float32)
    step = rng.normal(size=(15, 8)).astype(np.float32)
    centres[1::2] = centres[0::2] + 0.28 * step / np.linalg.norm(step, axis=1, keepdims=True)   # bridged clusters
    x = np.concatenate([np.repeat(centres, 6, axis=0) + rng.normal(scale=0.02, size=(180, 8)).astype(np.float32),
                        rng.normal(size=(200, 8)).astype(np.float32) * 3])
    t = 0.3
    pairs, _ = close_pairs(x, t)
    chained = connected_groups(len(x), pairs)
    assert max(map(len, chained)) > 6, "some clusters bridge into one component"
    for linkage_max in (4096, 10):   # 10: large components are linked in runs
        groups = complete_groups(x, pairs, t, linkage_max=linkage_max)
        for g in groups:
            d = np.linalg.norm(x[g][:, None] - x[g][None], axis=2)
            assert d.max() < t and len(g) <= linkage_max, g
        if linkage_max > 12:   # every component (two bridged clusters) linked whole
            assert sorted(map(tuple, groups)) == [tuple(range(6 * c, 6 * c + 6)) for c in range(30)]


def test_threshold_separates_copies_from_neighbours():
    rng = np.random.default_rng(1)
    copies, neighbours = rng.uniform(0.0, 0.3, 100), rng.uniform(0.6, 1.2, 400)
    choice = choose_threshold(copies, neighbours)
    assert 0.3 <= choice.threshold <= 0.6 and choice.copy_recall == 1 and choice.neighbour_share == 0


def test_the_threshold_follows_how_many_copies_the_collection_seems_to_hold():
    """The same made copies against two collections: one whose images' nearest others include a tenth of copies (as
    close as the made ones), one with none of them. The first is taken to hold about that share of copies and gets a
    threshold that finds most copies; the second joins none of its neighbours."""
    rng = np.random.default_rng(5)
    copies = rng.uniform(0.0, 0.5, 200)
    others = rng.uniform(0.3, 1.2, 900)
    with_copies = choose_threshold(copies, np.concatenate([rng.uniform(0.0, 0.5, 100), others]))
    without = choose_threshold(copies, others)
    assert 0.05 <= with_copies.copy_rate <= 0.2 and with_copies.copy_recall >= 0.6
    assert without.copy_rate < with_copies.copy_rate and without.threshold < with_copies.threshold
    assert np.mean(others < without.threshold) <= 0.01 and without.neighbour_share <= 0.01


def _neighbour_rows(rng, groups: int, size: int, others: int, k: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour distance rows of a collection holding `groups` photos each with size - 1 copies, and `others`
    pictures without any: a photo's copies lie 0-0.3 from it, two copies of one photo 0.1-0.5 apart (as measured with
    flip and image normalisation: medians 0.16 and 0.30), other pictures 0.7-1.2 away -> (rows shape=(n, k), the
    distances of the true pairs, each once)."""
    rows, true = [], []
    for _ in range(groups):
        original = rng.uniform(0.0, 0.3, size - 1)
        rows.append(original)
        true.append(original)
        for c in range(size - 1):
            siblings = rng.uniform(0.1, 0.5, size - 2)
            rows.append(np.concatenate([[original[c]], siblings]))
            true.append(siblings[c:])        # each sibling pair once (from its first copy)
    rows += [np.array([])] * others
    out = np.full((len(rows), k), np.inf)
    for i, r in enumerate(rows):
        out[i] = np.sort(np.concatenate([r, rng.uniform(0.7, 1.2, k - len(r))]))
    return out, np.concatenate(true)


def test_copies_that_come_in_groups_are_grouped_whole_not_only_each_with_its_original():
    """Reproduces: a folder where photos come with several edits each (bursts, exports) had them cut into small
    groups: the threshold fitted the distance of a copy to its photo, and two copies of a photo lie further apart.
    With the made copies' distances to each other (sibling distances) the threshold reaches them; where copies come
    singly, it is the threshold it was."""
    rng = np.random.default_rng(7)
    copies, siblings = rng.uniform(0.0, 0.3, 192), rng.uniform(0.1, 0.5, 672)
    rows, true = _neighbour_rows(rng, groups=20, size=9, others=330)
    grouped = choose_threshold(copies, rows, sibling_distances=siblings)
    as_made = choose_threshold(copies, rows)
    found, found_before = np.mean(true < grouped.threshold), np.mean(true < as_made.threshold)
    assert found >= 0.9 and found_before <= 0.6, (found, found_before)
    assert grouped.group_size > 3 and np.mean(rows[180:] < grouped.threshold) == 0, "no other picture joined"
    assert grouped.copy_recall > as_made.copy_recall and grouped.copy_rate > as_made.copy_rate

    singles = np.full((400, 32), np.inf)
    singles[:] = np.sort(rng.uniform(0.7, 1.2, (400, 32)), axis=1)
    singles[:40, 0] = rng.uniform(0.0, 0.3, 40)                  # 40 pictures with one copy each
    alone = choose_threshold(copies, singles, sibling_distances=siblings)
    assert alone == choose_threshold(copies, singles) and alone.group_size == 2


def test_where_copies_and_neighbours_overlap_a_stricter_threshold_is_offered():
    """A collection whose pictures lie as close to each other as to their copies (the demo's drawings): the chosen
    threshold joins many non-copies, and the strict one keeps them under 1%, at the recall it reports."""
    rng = np.random.default_rng(3)
    copies = rng.uniform(0.0, 0.5, 200)
    neighbours = np.concatenate([rng.uniform(0.1, 0.5, 80), rng.uniform(0.6, 1.2, 720)])   # a tenth as close as copies
    choice = choose_threshold(copies, neighbours)
    assert choice.neighbour_share > 0.05
    assert choice.strict_threshold < choice.threshold
    assert np.mean(neighbours < choice.strict_threshold) <= 0.01
    assert choice.strict_copy_recall == pytest.approx(np.mean(copies < choice.strict_threshold))
    clean = choose_threshold(rng.uniform(0.0, 0.3, 100), rng.uniform(0.6, 1.2, 400))
    assert clean.strict_threshold == clean.threshold, "nothing stricter to offer where they do not overlap"


def test_the_caution_names_the_stricter_threshold_only_where_neighbours_fall_under_the_chosen_one():
    from retrieval.search.duplicates import Threshold

    rng = np.random.default_rng(3)
    copies = rng.uniform(0.0, 0.5, 200)
    crowded = choose_threshold(copies, np.concatenate([rng.uniform(0.1, 0.5, 80), rng.uniform(0.6, 1.2, 720)]))
    caution = Threshold(crowded.threshold, "calibrated", crowded, 24).caution()
    assert caution is not None and f"threshold {crowded.strict_threshold:.3f}" in caution
    assert f"{crowded.strict_copy_recall:.0%} of the copies" in caution
    clean = choose_threshold(copies, rng.uniform(0.6, 1.2, 800))
    assert Threshold(clean.threshold, "calibrated", clean, 24).caution() is None
    assert Threshold(0.4, "given", None).caution() is None
    # pictures as alike as copies (a messy folder of near-identical drawings): a threshold finding 0% of the copies
    # was offered ('threshold 0.012 keeps that under 1% and still finds 0% of the copies'); none is now
    alike = choose_threshold(rng.uniform(0.2, 0.5, 200), rng.uniform(0.0, 0.6, 800))
    said = Threshold(alike.threshold, "calibrated", alike, 24)
    assert alike.strict_copy_recall < 0.1 and said.caution() is not None and not said.strict_offered()
    assert "no threshold keeps that under 1% and still finds copies" in said.caution()
    assert f"threshold {alike.strict_threshold:.3f}" not in said.caution()


def test_whitening_spreads_vectors_that_all_point_one_way():
    rng = np.random.default_rng(2)
    x = (5 + rng.normal(size=(200, 64))).astype(np.float32)     # every pair's cosine near 1
    w = whiten(learn_whitening(x, 16), x)
    assert w.shape == (200, 16) and np.allclose(np.linalg.norm(w, axis=1), 1, atol=1e-4)
    cos = w @ w.T
    assert np.abs(cos[np.triu_indices(200, 1)]).mean() < 0.3


def test_pair_scores():
    s = pair_scores([[1, 2, 3]], [[1, 2], [3, 4]])
    assert (s["precision"], s["recall"]) == (1 / 3, 1 / 2)


@pytest.mark.parametrize("index_type", ["HNSW32", "IVF4,PQ8x4"])
def test_compressed_indexes_give_the_same_groups(collection, tmp_path, index_type):
    """The groups come from the catalog's vectors: a compressed FAISS index of the same folder groups alike."""
    from retrieval.search.duplicates import find_duplicates
    from retrieval.search.index import ImageIndex
    from retrieval.vectors.index_types import IndexTypeConfig

    root, _ = collection
    build_index(root / "data", tmp_path / "index", vector_index=IndexTypeConfig(index_type=index_type))
    groups = {}
    for where in (root / "index", tmp_path / "index"):
        index = ImageIndex(where, load_network=False)
        try:
            assert index.vectors.exact == (where == root / "index")
            groups[where] = [sorted(m.path for m in g) for g in find_duplicates(index, threshold=0.5).groups]
        finally:
            index.close()
    assert groups[root / "index"] and groups[root / "index"] == groups[tmp_path / "index"]


def test_byte_copies_of_one_another_inside_a_group_are_marked_not_only_those_of_the_keeper(tmp_path):
    """Reproduces: rockets/IMG_00943.jpg and its byte copy sat in a larger group under another keeper, shown as
    "0.250" and "0.250": the one certain duplicate of the group was not marked."""
    from commands.find_duplicates import format_groups
    from retrieval.search.duplicates import find_duplicates
    from retrieval.search.index import ImageIndex

    data = tmp_path / "data"
    paths = make_sample_collection(data, per_class=1, size=(160, 120), seed=4)
    first = paths[0]
    edited = edited_copies(Image.open(first), 0, ["jpeg30"])["jpeg30"]
    edited.save(first.with_name("edited.jpg"), quality=90)
    shutil.copyfile(first.with_name("edited.jpg"), first.with_name("edited_copy.jpg"))
    build_index(data, tmp_path / "index")
    index = ImageIndex(tmp_path / "index")
    try:
        result = find_duplicates(index, threshold=1.0)
    finally:
        index.close()
    group = next(g for g in result.groups if any(m.path.endswith("edited_copy.jpg") for m in g))
    assert "edited" not in group[0].path, "a larger file is kept: the byte copies are two of the others"
    text = format_groups(result)
    twin = next(line for line in text.splitlines() if "edited" in line and "byte-identical to" in line)
    assert twin.rstrip().endswith("edited.jpg)") or twin.rstrip().endswith("edited_copy.jpg)"), twin
    assert result.groups[0] is group or len({m.sha256 for m in result.groups[0]}) < len(result.groups[0])


def test_the_keeper_of_files_alike_in_size_and_age_is_the_one_named_plainly():
    """Reproduces: 'best_cat copy.jpg' was suggested as the keeper over 'best_cat.jpg' (same pixels, bytes and
    time; ' ' sorts before '.'), so the file a person would keep was listed among the ones to delete."""
    from retrieval.catalog.values import ImageRecord
    from retrieval.search.duplicate_groups import keeper_order

    names = ["cats/best_cat copy.jpg", "cats/best_cat (1).jpg", "cats/best_cat.jpg", "a/best_cat - Copy.jpg"]
    records = [ImageRecord(i, p, "cats", 100, 5, 64, 48, "0" * 64) for i, p in enumerate(names)]
    assert min(records, key=keeper_order).path == "cats/best_cat.jpg"
    bigger = ImageRecord(9, "cats/best_cat copy 2.jpg", "cats", 100, 5, 128, 96, "1" * 64)
    assert min([*records, bigger], key=keeper_order) is bigger     # the largest first, whatever its name
