"""Tests for the index-images and search-images command lines: JSON output, messages and exit statuses."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from commands.index_images import main as index_images
from commands.search_images import main as search_images
from retrieval.features.precision import cpu_bf16_instructions
from retrieval.samples import make_sample_collection
from helpers.precision import auto_precisions_here, needs_cpu_bf16
from helpers.scripts import console_script


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    make_sample_collection(folder, per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    (folder / "red_circles" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return folder


def run_json(runner, command, args):
    result = runner.invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_json_summary_and_search_json(runner, data, tmp_path):
    index_dir = str(tmp_path / "index")
    summary = run_json(runner, index_images, [str(data), "--index-dir", index_dir, "--weights", "random",
                                              "--workers", "0", "--json"])

    assert set(summary) == {"indexed", "unchanged", "removed", "skipped", "folders", "restamped", "moved",
                            "unreadable_formats", "total", "seconds", "images_per_second", "vector_index", "extraction", "repairs", "changes", "network"}
    assert summary["vector_index"]["factory"] == "Flat" and summary["vector_index"]["exact"]   # auto, small collection
    x = summary["extraction"]   # where the network ran, in what arithmetic, and where the run's time went
    assert (x["device"], x["decode"], x["batch_size"]) == ("cpu", "workers", 32)
    assert x["precision"] in auto_precisions_here()      # fp32, or bf16 where this CPU has bf16 units and it is faster
    assert set(x["stage_seconds"]) == {"wait for decoding", "device decoding", "wait for the network", "network",
                                       "write"}
    assert (summary["indexed"], summary["unchanged"], summary["removed"], summary["total"]) == (4, 0, 0, 4)
    assert [s["path"] for s in summary["skipped"]] == ["red_circles/broken.jpg"]
    assert summary["seconds"] > 0 and summary["images_per_second"] > 0

    query = data / "blue_squares" / "blue_squares_001.jpg"
    found = run_json(runner, search_images, [str(query), "-k", "3", "--index-dir", index_dir, "--json"])
    results = found["results"]
    assert len(results) == 3
    assert set(results[0]) == {"id", "path", "label", "distance", "file"}
    # a script run in another folder can act on the files (the paths are relative to the data folder)
    assert results[0]["file"] == str(query) and found["data_dir"] == str(data)
    assert results[0]["path"] == "blue_squares/blue_squares_001.jpg" and results[0]["label"] == "blue_squares"
    assert results[0]["distance"] == 0.0, "rounded to 6 decimals, as the API: the query itself is at 0.0"
    assert [r["distance"] for r in results] == sorted(r["distance"] for r in results)
    expanded = run_json(runner, search_images, [str(query), "-k", "3", "--qe", "2", "--index-dir", index_dir, "--json"])
    assert expanded["results"][0]["distance"] > 0, "the query averaged with its first 2 results is not the image itself"


def test_human_output_has_a_summary_and_a_ranked_table(runner, data, tmp_path):
    index_dir = str(tmp_path / "index")
    result = runner.invoke(index_images, [str(data), "--index-dir", index_dir, "--weights", "random", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "indexed 4" in result.output and "skipped red_circles/broken.jpg" in result.output

    query = data / "red_circles" / "red_circles_000.jpg"
    result = runner.invoke(search_images, [str(query), "-k", "2", "--index-dir", index_dir])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["rank", "distance", "label", "path"]
    assert lines[1].split()[0] == "1" and lines[1].endswith("red_circles/red_circles_000.jpg")


def test_the_human_output_ends_with_the_json_summary(runner, data, tmp_path):
    args = [str(data), "--index-dir", str(tmp_path / "index"), "--weights", "random", "--workers", "0"]
    human = runner.invoke(index_images, args)
    assert human.exit_code == 0, human.output
    last = human.stdout.strip().splitlines()[-1]
    assert last.startswith("summary {"), human.stdout
    summary = json.loads(last[len("summary "):])
    assert summary["indexed"] == 4 and summary["total"] == 4
    assert [s["path"] for s in summary["skipped"]] == ["red_circles/broken.jpg"]
    again = runner.invoke(index_images, [*args, "--json"])        # --json prints the same object, alone
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert rerun.keys() == summary.keys() and rerun["unchanged"] == 4 and rerun["indexed"] == 0


def test_on_a_terminal_a_person_reads_the_report_without_the_json_line_and_an_unmet_whiten_says_why(tmp_path):
    """The console script on a real terminal (a pseudo-terminal), run as a person does in a fresh folder."""
    from helpers.terminal import run_on_terminal

    make_sample_collection(tmp_path / "data", per_class=10, size=(80, 60), classes=["red_circles", "blue_squares"])
    status, text = run_on_terminal([console_script("index-images"), "data", "--weights", "random", "--whiten"],
                                   tmp_path)
    assert status == 0, text
    assert "indexed 20," in text and "summary {" not in text and "wait for decoding" not in text, text
    assert "--whiten waits for 128 images (the index has 20)" in text and "--whiten-dim 16 whitens these 20 now" in text


def test_on_a_terminal_the_seconds_after_the_bar_say_what_they_do(tmp_path):
    """Reproduces: past 128 images, the bar ended and the terminal stayed silent while the whitened index was built
    and its recall measured (13-20 s at 2,800 images in a review)."""
    from helpers.terminal import run_on_terminal

    make_sample_collection(tmp_path / "data", per_class=26, size=(48, 36), seed=2)   # 130 images: whitened, 32-d
    status, text = run_on_terminal([console_script("index-images"), "data", "--weights", "random"], tmp_path)
    assert status == 0 and "FAISS index: PCAW32,L2norm,Flat (exact in the whitened space)" in text, text
    status, text = run_on_terminal([console_script("index-images"), "data", "--index-type", "IVF8,Flat"], tmp_path)
    assert status == 0, text
    assert "\x1b[Kbuilding the FAISS index (PCAW32,L2norm,IVF8,Flat) from 130 vectors..." in text, text
    assert "\x1b[Kmeasuring the FAISS index's recall on 130 queries against exact search...\r\x1b[Kindexed 0" in text, \
        text   # said, then wiped before the report
    # a terminal that cannot erase a line (TERM=dumb: an editor's shell) printed the escape codes: no such lines there
    status, text = run_on_terminal([console_script("index-images"), "data", "--rebuild-index"], tmp_path,
                                   env={"TERM": "dumb"})
    assert status == 0 and "\x1b[K" not in text and "building the FAISS index" not in text, text


def test_index_dir_from_the_environment(runner, data, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path / "env-index"))
    result = runner.invoke(index_images, [str(data), "--weights", "random", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env-index" / "catalog.db").exists()
    # as a crontab line or a quoted value sets it, no shell expanding ~: it made a folder named "~" in the working one
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", "~/tilde-index")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(index_images, [str(data), "--weights", "random", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tilde-index" / "catalog.db").exists() and not (tmp_path / "~").exists()


@pytest.mark.skipif(cpu_bf16_instructions() is not None, reason="this CPU has bf16 units (AVX512-BF16 or AMX-BF16)")
def test_bf16_on_a_cpu_without_bf16_units_is_refused_before_any_work(runner, data, tmp_path):
    from retrieval.catalog import Catalog

    index_dir = str(tmp_path / "index")
    result = runner.invoke(index_images, [str(data), "--index-dir", index_dir, "--weights", "random", "--device", "cpu",
                                          "--precision", "bf16"])
    assert result.exit_code == 2 and "bf16" in result.output and "(--precision)" in result.output
    run_json(runner, index_images, [str(data), "--index-dir", index_dir, "--weights", "random", "--workers", "0",
                                    "--json"])
    catalog = Catalog(tmp_path / "index")
    try:
        assert catalog.extraction_record() == {"precisions": {"fp32": ["cpu"]},
                                               "last": {"precision": "fp32", "device": "cpu", "decode": "workers"}}
    finally:
        catalog.close()


@needs_cpu_bf16
def test_a_second_new_index_on_this_machine_takes_a_remembered_bf16_verdict(data, tmp_path):
    """Two index-images processes, each on a new index, sharing one user cache folder."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = []
    for name in ("first", "second"):
        done = subprocess.run([console_script("index-images"), str(data), "--index-dir", str(tmp_path / name), "--weights", "random",
                               "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout)["extraction"])
    first, second = runs
    assert first["precision_probe"]["remembered"] is False
    if first["precision"] == "bf16":
        assert second["precision"] == "bf16" and second["precision_probe"] == {**first["precision_probe"],
                                                                                "remembered": True}
    else:                          # a busy moment made fp32 look as fast: not remembered, so asked again
        assert second["precision_probe"]["remembered"] is False


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_cpu_bf16)])
def test_each_runs_precision_is_recorded_and_queries_and_later_runs_keep_it(runner, data, tmp_path, precision):
    from retrieval.catalog import Catalog

    index_dir = str(tmp_path / "index")
    first = run_json(runner, index_images, [str(data), "--index-dir", index_dir, "--weights", "random", "--workers", "0",
                                            "--precision", precision, "--json"])
    assert first["extraction"]["precision"] == precision
    with Image.open(data / "red_circles" / "red_circles_000.jpg") as original:   # a changed folder: a new picture
        original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "red_circles" / "later.jpg", quality=90)
    again = run_json(runner, index_images, [str(data), "--index-dir", index_dir, "--workers", "0", "--json"])
    assert again["indexed"] == 1 and again["extraction"]["precision"] == precision, "auto keeps the index's precision"
    catalog = Catalog(tmp_path / "index")
    try:
        assert catalog.extraction_record() == {"precisions": {precision: ["cpu"]},
                                               "last": {"precision": precision, "device": "cpu", "decode": "workers"}}
    finally:
        catalog.close()
    for name in ("red_circles/later.jpg", "blue_squares/blue_squares_000.jpg"):   # batch of 1 and batch of 4
        found = run_json(runner, search_images, [str(data / name), "-k", "2", "--index-dir", index_dir, "--json"])
        assert found["results"][0]["path"] == name and found["results"][0]["distance"] < 1e-4, found


def test_missing_data_folder_is_a_usage_error(runner, tmp_path):
    result = runner.invoke(index_images, [str(tmp_path / "nope"), "--index-dir", str(tmp_path / "index")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_unavailable_imagenet_weights_stop_with_status_2(runner, data, tmp_path, offline_hub):
    result = runner.invoke(index_images, [str(data), "--index-dir", str(tmp_path / "index")])

    assert result.exit_code == 2, result.output
    for hint in ("torch-home", "--weights PATH", "--weights random"):
        assert hint in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "index").exists(), "a first run that stopped before any work leaves no index folder behind"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert runner.invoke(index_images, [str(data), "--index-dir", str(tmp_path / "mine")]).exit_code == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's", "a folder that was there is kept"


@pytest.mark.parametrize("content", [b"hello, a text file", bytes(range(256)) * 20, b"\xff\xd8\xff\xe0 a JPEG's start"],
                         ids=["text", "binary", "jpeg"])
def test_a_weights_file_that_is_not_a_state_dict_is_status_2(runner, data, tmp_path, content):
    """--weights readme.txt (or a photo) raised torch's KeyError or UnpicklingError as a traceback, the latter
    advising weights_only=False, which would run code from the file."""
    (tmp_path / "weights.pt").write_bytes(content)
    result = runner.invoke(index_images, [str(data), "--index-dir", str(tmp_path / "index"),
                                          "--weights", str(tmp_path / "weights.pt")])

    assert result.exit_code == 2, result.output
    assert "is not a PyTorch weights file" in result.output and "weights_only" not in result.output, result.output
    assert not (tmp_path / "index").exists(), "nothing was indexed: no index folder left behind"


def test_an_empty_path_is_refused_not_taken_for_the_working_folder(runner, data, tmp_path, monkeypatch):
    """click resolves "" to the working folder: `index-images ""` (an unset shell variable) indexed it, and
    `--index-dir ""` wrote the index there."""
    monkeypatch.chdir(tmp_path)
    for args in (["", "--weights", "random"], [str(data), "--index-dir", "", "--weights", "random"]):
        result = runner.invoke(index_images, args)
        assert result.exit_code == 2 and "is empty; give a path" in result.output, (args, result.output)
    assert not (tmp_path / "catalog.db").exists() and not (tmp_path / "index").exists()


def test_a_first_run_from_inside_the_photos_folder_says_the_index_is_among_them(data, tmp_path, monkeypatch):
    """Reproduces (a messy photo folder): `cd data && index-images .` put ./index, with its 244 MB of weights, among
    the photos without a word. Said once, on the run that made it; an index beside the photos says nothing."""
    monkeypatch.chdir(data)
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([console_script("index-images"), *args, "--weights", "random"], capture_output=True,
                              text=True, timeout=300)

    inside = f"note: the index folder {data / 'index'} is inside the data folder"
    first = run(".")
    assert first.returncode == 0 and inside in first.stderr and "--index-dir ../index" in first.stderr, first.stderr
    again = run(".")
    assert again.returncode == 0 and inside not in again.stderr, "said once"
    beside = run(".", "--index-dir", "../index")
    assert beside.returncode == 0 and "is inside the data folder" not in beside.stderr


def test_index_built_with_another_model_is_status_2(runner, data, tmp_path):
    args = [str(data), "--index-dir", str(tmp_path / "index"), "--weights", "random", "--workers", "0"]
    assert runner.invoke(index_images, args + ["--json"]).exit_code == 0
    result = runner.invoke(index_images, args + ["--layer", "fc6"])
    assert result.exit_code == 2
    assert "built with layer 'fc7'" in result.output


def test_bad_batch_size_is_a_usage_error(runner, data, tmp_path):
    result = runner.invoke(index_images, [str(data), "--index-dir", str(tmp_path / "i"), "--batch-size", "zero"])
    assert result.exit_code == 2 and "batch" in result.output.lower()


def test_an_empty_catalog_file_is_no_index_said_in_one_line_and_left_as_it_was(runner, data, tmp_path):
    """Reproduces: a 0-byte catalog.db (touch, a copy that failed) or one without tables gave search-images,
    find-duplicates and evaluate-index an SQLAlchemy traceback ("no such table: index_settings"), and search-images
    wrote 4 kB into the file."""
    import sqlite3

    from commands.evaluate_index import main as evaluate_index
    from commands.find_duplicates import main as find_duplicates

    query = data / "red_circles" / "red_circles_000.jpg"
    empty, tableless = tmp_path / "empty", tmp_path / "tableless"
    empty.mkdir()
    (empty / "catalog.db").write_bytes(b"")
    tableless.mkdir()
    with sqlite3.connect(tableless / "catalog.db") as db:
        db.execute("CREATE TABLE notes (text)")
    for folder, said in [(empty, "its catalog.db is an empty file"), (tableless, "its catalog.db holds no index")]:
        for command, args in [(search_images, [str(query)]), (find_duplicates, []), (evaluate_index, []),
                              (index_images, [str(data), "--check"])]:
            result = runner.invoke(command, [*args, "--index-dir", str(folder)])
            assert result.exit_code == 2 and said in result.output and "run index-images first" in result.output, \
                (command.name, result.output)
            assert "Traceback" not in result.output
    assert (empty / "catalog.db").stat().st_size == 0
    with sqlite3.connect(tableless / "catalog.db") as db:   # someone else's database: not made a WAL one
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_lock_file_that_is_a_folder_is_named_not_taken_for_another_run(runner, data, tmp_path):
    """Reproduces: .lock made a folder (or unreadable to this user) gave index-images an IsADirectoryError traceback
    and --check "another index-images run is updating ..." with none running."""
    index_dir = tmp_path / "index"
    assert runner.invoke(index_images, [str(data), "--index-dir", str(index_dir), "--weights", "random",
                                        "--workers", "0"]).exit_code == 0
    (index_dir / ".lock").unlink()
    (index_dir / ".lock").mkdir()
    run = runner.invoke(index_images, [str(data), "--index-dir", str(index_dir)])
    assert run.exit_code == 2 and ".lock is a folder, not index-images' lock file: remove it" in run.output, run.output
    check = runner.invoke(index_images, [str(data), "--index-dir", str(index_dir), "--check"])
    assert "another index-images run" not in check.output and check.exit_code == 0, check.output


def test_search_errors_are_status_2(runner, data, tmp_path):
    query = data / "red_circles" / "red_circles_000.jpg"
    no_index = runner.invoke(search_images, [str(query), "--index-dir", str(tmp_path / "missing")])
    assert no_index.exit_code == 2 and "run index-images first" in no_index.output

    index_dir = str(tmp_path / "index")
    runner.invoke(index_images, [str(data), "--index-dir", index_dir, "--weights", "random", "--workers", "0", "--json"])
    unreadable = runner.invoke(search_images, [str(data / "red_circles" / "broken.jpg"), "--index-dir", index_dir])
    assert unreadable.exit_code == 2
    assert "cannot use" in unreadable.output and "Traceback" not in unreadable.output


def test_a_query_that_is_no_image_is_refused_before_the_network_loads(tmp_path):
    query = tmp_path / "notes.jpg"
    query.write_text("a shopping list, not a photo")
    probe = ("import sys\nfrom commands.search_images import main\ntry:\n    main()\nexcept SystemExit as e:\n"
             "    print(e.code, sorted(m for m in ('torch', 'faiss') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, str(query), "--index-dir", str(tmp_path / "index")],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []", result.stderr
    assert "cannot use" in result.stderr and "not an image" in result.stderr


@pytest.mark.parametrize("kind", ["a named pipe", "a character device"])
def test_a_query_that_is_no_regular_file_is_refused_not_waited_on(tmp_path, kind):
    """Reproduces: search-images on a named pipe waited for a writer for good (and on /dev/zero it would read until
    memory ran out); the library and the indexer open only regular files, checked on the open descriptor."""
    import os

    if kind == "a named pipe":
        query = tmp_path / "photo.jpg"
        os.mkfifo(query)
    else:
        query = "/dev/zero"
    result = subprocess.run([sys.executable, "-c", "from commands.search_images import main; main()", str(query),
                             "--index-dir", str(tmp_path / "index")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"Error: cannot read {query}: not a regular file ({kind})", result.stderr


def test_empty_index_gives_an_empty_result_list(runner, tmp_path):
    (tmp_path / "empty").mkdir()
    index_dir = str(tmp_path / "index")
    run_json(runner, index_images, [str(tmp_path / "empty"), "--index-dir", index_dir, "--weights", "random", "--json"])
    query = tmp_path / "q.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(query)
    found = run_json(runner, search_images, [str(query), "--index-dir", index_dir, "--json"])
    assert found == {"results": [], "data_dir": str(tmp_path / "empty")}


def test_an_empty_or_mistyped_folder_is_indexed_empty_and_said_so(tmp_path):
    """A folder with no images (a typo, the wrong folder, photos in .heic) still gives an index a later run fills, but the
    person is told it is empty, which extensions were looked for; a folder with images is not."""
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "IMG_0001.heic").write_bytes(b"\0" * 100)
    empty = subprocess.run([console_script("index-images"), "photos", "--weights", "random"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 0, empty.stderr
    assert "0 images in the index" in empty.stdout
    assert "note: no image files in" in empty.stderr and "photos or its subfolders (" in empty.stderr
    assert ".jpg" in empty.stderr and ".png" in empty.stderr and "the index is empty" in empty.stderr
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "photos" / "cats" / "cat.jpg")
    filled = subprocess.run([console_script("index-images"), "photos"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert filled.returncode == 0 and "1 image in the index" in filled.stdout, filled.stderr
    # the phone's HEIC photo beside it is counted, not passed over in silence
    assert ("  not indexed: 1 .heic (photo formats this program does not read: convert them to JPEG to index them)\n"
            in filled.stdout), filled.stdout
    # one new file's rate leaves start-up out (with it, a second's network loading made it "0.4 images/s")
    assert re.search(r"\(\d+\.\d s; \d+\.\d images/s after start-up\)", filled.stdout), filled.stdout
    assert "no image files" not in filled.stderr
    # the photo went through the index's random weights (recorded by the first run): said, with what to do instead
    assert "seeded random weights" in filled.stderr and "--weights imagenet" in filled.stderr, filled.stderr
    assert "seeded random weights" not in empty.stderr, "nothing was indexed with them"


def test_console_scripts_are_installed_and_explain_themselves():
    for script in ("index-images", "search-images"):
        out = subprocess.run([sys.executable, "-c", f"import sys; from importlib.metadata import entry_points; "
                              f"ep = entry_points(group='console_scripts')['{script}']; sys.argv = ['{script}', '--help']; "
                              "ep.load()()"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "Usage:" in out.stdout and "--index-dir" in out.stdout


def test_names_with_control_characters_print_escaped_one_line_each(runner, data, tmp_path):
    """A file name may hold a newline or a terminal escape sequence: printed raw, it split a row of the results table
    or the skipped list in two, or recoloured the terminal. Text output escapes them (\\n, \\x1b); JSON keeps them."""
    folder = data / "red_circles"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(folder / "new\nline.jpg")
    (folder / "bad\x1b[31mred.jpg").write_bytes(b"not an image")
    index = tmp_path / "index"
    indexed = runner.invoke(index_images, [str(data), "--index-dir", str(index), "--weights", "random"])
    assert indexed.exit_code == 0, indexed.output
    assert "  skipped red_circles/bad\\x1b[31mred.jpg: not an image" in indexed.output and "\x1b" not in indexed.output
    found = runner.invoke(search_images, [str(folder / "new\nline.jpg"), "--index-dir", str(index), "-k", "1"])
    assert found.exit_code == 0 and found.output.splitlines()[1].endswith("red_circles/new\\nline.jpg"), found.output
    # a right-to-left override reordered the rest of its line: "report\u202efdp.jpg" read as "reportgpj.pdf"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "report\u202efdp.jpg")
    assert runner.invoke(index_images, [str(data), "--index-dir", str(index)]).exit_code == 0
    found = runner.invoke(search_images, [str(folder / "report\u202efdp.jpg"), "--index-dir", str(index), "-k", "1"])
    assert "red_circles/report\\u202efdp.jpg" in found.output and "\u202e" not in found.output, found.output
    # a class so named reversed its row of scores in evaluate-index's tables (review of this change)
    (data / "\u202eevil").mkdir()
    for n in range(3):
        Image.new("RGB", (64, 48), (20, 20 + 60 * n, 200)).save(data / "\u202eevil" / f"{n}.jpg")
    assert runner.invoke(index_images, [str(data), "--index-dir", str(index)]).exit_code == 0
    from commands.evaluate_index import main as evaluate_index

    report = runner.invoke(evaluate_index, ["--index-dir", str(index)])
    assert report.exit_code == 0 and "\\u202eevil" in report.stdout and "\u202e" not in report.stdout, report.stdout
    as_json = run_json(runner, search_images, [str(folder / "new\nline.jpg"), "--index-dir", str(index), "-k", "1", "--json"])
    assert as_json["results"][0]["path"] == "red_circles/new\nline.jpg"


def test_a_shortcut_to_a_class_folder_leaves_the_index_as_it_was_and_is_named(tmp_path):
    """Reproduces (a photographer's 'Favourites' link to a class folder, sorted before it): the next run printed
    'removed 2' and re-labelled the class 'Favourites'; a link to a folder on another drive was dropped without a
    word. The index is as it was now, and both links are named with what to do."""
    make_sample_collection(tmp_path / "data", per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (64, 48), (20, 200, 30)).save(tmp_path / "elsewhere" / "trip.jpg")
    first = subprocess.run([console_script("index-images"), "data", "--weights", "random", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    os.symlink("red_circles", tmp_path / "data" / "Favourites")
    os.symlink("../elsewhere", tmp_path / "data" / "Trip")
    again = subprocess.run([console_script("index-images"), "data"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("indexed 0, unchanged 4, removed 0, skipped 0; 4 images in the index"), again.stdout
    assert "  folder left out: Favourites/: a link to the folder red_circles, which is indexed under its own name\n" \
        in again.stdout
    assert f"  folder left out: Trip/: a link to a folder outside the data folder ({tmp_path / 'elsewhere'}); " \
        in again.stdout
    found = subprocess.run([console_script("search-images"), "data/red_circles/red_circles_000.jpg", "-k", "1",
                            "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert json.loads(found.stdout)["results"][0]["path"] == "red_circles/red_circles_000.jpg", found.stdout


def test_an_indexed_photo_that_cannot_be_read_now_is_counted_as_removed(tmp_path):
    """Reproduces (a photo cut short by a failed copy): 'indexed 0, unchanged 3, removed 0, skipped 1; 3 images in the
    index', down from 4, the photo gone with no count saying so. It is counted as removed now, and named as skipped."""
    make_sample_collection(tmp_path / "data", per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    first = subprocess.run([console_script("index-images"), "data", "--weights", "random"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "4 images in the index" in first.stdout, first.stderr
    photo = tmp_path / "data" / "blue_squares" / "blue_squares_001.jpg"
    photo.write_bytes(photo.read_bytes()[:300])
    again = subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    summary = json.loads(again.stdout)
    assert (summary["indexed"], summary["unchanged"], summary["removed"], summary["total"]) == (0, 3, 1, 3), summary
    assert [s["path"] for s in summary["skipped"]] == ["blue_squares/blue_squares_001.jpg"]
    once_more = subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    assert json.loads(once_more.stdout)["removed"] == 0, "counted once, when it left"


def test_a_100_megapixel_cameras_jpeg_is_indexed_without_pillows_warning(tmp_path):
    """Reproduces: 'skipped red/GFX100_0001.jpg: image too large (11648x8736 = 101,756,928 pixels, limit 89,478,485):
    refused as a possible decompression bomb', after Pillow's DecompressionBombWarning on stderr."""
    (tmp_path / "data" / "red").mkdir(parents=True)
    Image.new("L", (11648, 8736), 90).save(tmp_path / "data" / "red" / "GFX100_0001.jpg", "JPEG", quality=80)
    done = subprocess.run([console_script("index-images"), "data", "--weights", "random", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["indexed"], summary["skipped"]) == (1, []), summary
    assert "Warning" not in done.stderr, done.stderr


def test_touched_files_keep_their_ids_and_are_not_extracted_again(tmp_path):
    """Reproduces: `touch` (or a restore, a copy that did not keep the times) re-extracted every file under a new id,
    so a bookmarked /gallery/ID answered 404. A file whose bytes are as indexed is kept now; one of the same size with
    other bytes is extracted again."""
    make_sample_collection(tmp_path / "data", per_class=2, size=(80, 60), classes=["red_circles", "blue_squares"])
    first = subprocess.run([console_script("index-images"), "data", "--weights", "random"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr

    def ids() -> dict[str, int]:
        found = subprocess.run([console_script("search-images"), "data/red_circles/red_circles_000.jpg", "-k", "4",
                                "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return {hit["path"]: hit["id"] for hit in json.loads(found.stdout)["results"]}

    before = ids()
    photos = sorted((tmp_path / "data").rglob("*.jpg"))
    for photo in photos:
        os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    edited = photos[0]
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF                                              # same size, other bytes (in the last scan's data)
    edited.write_bytes(bytes(data))
    again = subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    summary = json.loads(again.stdout)
    assert (summary["indexed"], summary["unchanged"], summary["restamped"]) == (1, 3, 3), summary
    after = ids()
    name = edited.relative_to(tmp_path / "data").as_posix()
    assert {p: i for p, i in after.items() if p != name} == {p: i for p, i in before.items() if p != name}
    assert after[name] != before[name]
    quiet = subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert (json.loads(quiet.stdout)["unchanged"], json.loads(quiet.stdout)["restamped"]) == (4, 0), "recorded"


@pytest.mark.slow
def test_output_to_a_full_disk_is_one_line_not_a_traceback(sample_index):
    """Reproduces: `search-images x.jpg > /dev/full` (stdout on a full disk) died with an 'OSError: [Errno 28]'
    traceback from click.echo, as did every command."""
    query = next(sample_index.data_dir.rglob("*.jpg"))
    with open("/dev/full", "w") as full:
        done = subprocess.run([console_script("search-images"), str(query), "--index-dir", str(sample_index.index_dir)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == ["Error: cannot write the output (stdout): No space left on device"], \
        done.stderr


def test_what_a_library_prints_during_the_run_goes_to_stderr_not_into_the_json(runner, data, tmp_path, monkeypatch):
    """Ray's driver prints a killed worker's "(raylet) A worker died ..." on stdout mid-run (CI saw it break --json)."""
    import indexer.run

    real = indexer.run.run_index

    def chatty(*args, **kwargs):
        print("(raylet) A worker died or was killed while executing a task")
        return real(*args, **kwargs)

    monkeypatch.setattr(indexer.run, "run_index", chatty)
    result = runner.invoke(index_images, [str(data), "--index-dir", str(tmp_path / "index"), "--weights", "random",
                                          "--workers", "0", "--json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["indexed"] == 4
    assert "(raylet) A worker died" in result.stderr


def test_a_renamed_class_folder_keeps_its_images_vectors_with_the_new_label(tmp_path):
    """Reproduces: `mv data/temples data/china_temples` sent all 262 photos through the network again, each under a
    new id ("indexed 262, removed 262"), though the catalog knew their bytes. A file moved within the folder keeps
    its id and vector, with its new path and label; the server sees the new labels (the FAISS file is saved again)."""
    from retrieval.catalog import Catalog

    make_sample_collection(tmp_path / "data", per_class=3, size=(80, 60), classes=["red_circles", "blue_squares"])
    first = subprocess.run([console_script("index-images"), "data", "--weights", "random", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    catalog = Catalog(tmp_path / "index")
    try:
        before = {p: (i, catalog.vector(i)) for p, (i, *_s) in catalog.file_states().items()}
    finally:
        catalog.close()
    faiss_before = (tmp_path / "index" / "vectors.faiss").stat().st_ino
    (tmp_path / "data" / "red_circles").rename(tmp_path / "data" / "circles")
    (tmp_path / "data" / "blue_squares" / "blue_squares_000.jpg").rename(tmp_path / "data" / "top.jpg")
    again = subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    summary = json.loads(again.stdout)
    assert (summary["indexed"], summary["moved"], summary["removed"], summary["total"]) == (0, 4, 0, 6), summary
    catalog = Catalog(tmp_path / "index")
    try:
        after = {p: (i, catalog.vector(i)) for p, (i, *_s) in catalog.file_states().items()}
        labels = {r.path: r.label for r in catalog.list_images()}
    finally:
        catalog.close()
    renamed = {"blue_squares/blue_squares_000.jpg": "top.jpg"}
    for old, (image_id, vector) in before.items():
        new = renamed.get(old, old.replace("red_circles/", "circles/", 1))
        assert after[new][0] == image_id and np.array_equal(after[new][1], vector), old
    assert labels["circles/red_circles_001.jpg"] == "circles" and labels["top.jpg"] is None
    assert (tmp_path / "index" / "vectors.faiss").stat().st_ino != faiss_before, "saved again: servers reload"

    # a good file moved onto the path of a skipped (bad) one is indexed, and skipped no more
    (tmp_path / "data" / "bad.jpg").write_bytes(b"not an image")
    subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path, capture_output=True, timeout=300)
    (tmp_path / "data" / "top.jpg").replace(tmp_path / "data" / "bad.jpg")
    moved = json.loads(subprocess.run([console_script("index-images"), "data", "--json"], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=300).stdout)
    assert moved["moved"] == 1 and moved["skipped"] == [], moved


@pytest.mark.parametrize("command, args", [
    ("index_images", ["DATA", "--max-file-mb", "nan"]),
    ("index_images", ["DATA", "--max-file-mb", "inf"]),
    ("search_images", ["QUERY", "--qe", "2", "--qe-alpha", "nan"]),
    ("fine_tune", ["DATA", "--out", "OUT", "--weights", "random", "--lr", "nan"]),
    ("find_duplicates", ["--threshold", "nan"]),
])
def test_nan_and_inf_are_refused_as_usage_errors(sample_index, tmp_path, command, args):
    """Reproduces: a nan passed every bound check (comparisons with it are false) and failed later with a traceback
    (--max-file-mb nan, --qe-alpha nan after the network's load, --lr nan); inf likewise."""
    import importlib

    main = importlib.import_module(f"commands.{command}").main
    query = sample_index.data_dir / "red_circles" / "red_circles_000.jpg"
    filled = [{"DATA": str(sample_index.data_dir), "QUERY": str(query), "OUT": str(tmp_path / "t.pt")}.get(a, a)
              for a in args]
    result = CliRunner().invoke(main, [*filled, "--index-dir", str(sample_index.index_dir)]
                                if command != "fine_tune" else filled)
    assert result.exit_code == 2, result.output
    assert "Invalid value for" in result.output and isinstance(result.exception, SystemExit), result.output


@pytest.mark.slow
def test_commands_started_with_stdout_closed_do_their_work_and_exit_0(sample_index, tmp_path):
    """Reproduces: `index-images data >&-` built the whole index, then failed on sys.stdout.isatty() (None) with a
    traceback and exit 1; search-images and find-duplicates failed at their last flush. A closed stdout now reads as
    /dev/null (and the catalog never takes its descriptor)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_index.data_dir, data)
    index = tmp_path / "index"
    query = data / "red_circles" / "red_circles_000.jpg"
    for argv in ([console_script("index-images"), str(data), "--index-dir", str(index), "--weights", "random"],
                 [console_script("search-images"), str(query), "--index-dir", str(index)],
                 [console_script("find-duplicates"), "--index-dir", str(index), "--threshold", "0.3"]):
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
                              preexec_fn=lambda: os.close(1))
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv[0], done.stderr)
    found = subprocess.run([console_script("search-images"), str(query), "--index-dir", str(index), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert json.loads(found.stdout)["results"][0]["path"] == "red_circles/red_circles_000.jpg"   # the index is whole


def test_a_query_piped_in_on_standard_input(sample_index):
    """`curl -s URL | search-images -`: the refusal of named pipes (which could block forever) left no way to search
    an image that is not a file."""
    query = (sample_index.data_dir / "red_circles" / "red_circles_000.jpg").read_bytes()
    args = ["-", "-k", "1", "--index-dir", str(sample_index.index_dir), "--json"]
    found = CliRunner().invoke(search_images, args, input=query)
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["results"][0]["path"] == "red_circles/red_circles_000.jpg"
    refused = CliRunner().invoke(search_images, args, input=b"not an image")
    assert refused.exit_code == 2 and "cannot use the image on standard input as a query" in refused.output
    empty = CliRunner().invoke(search_images, args, input=b"")
    assert empty.exit_code == 2 and "standard input was empty" in empty.output


def test_a_search_while_index_images_updates_the_index_says_so(sample_index, tmp_path):
    """Reproduces: a search during an index-images run answered from the images indexed so far, without a word
    (find-duplicates said it)."""
    import shutil

    index = tmp_path / "index"
    shutil.copytree(sample_index.index_dir, index)
    query = sample_index.data_dir / "red_circles" / "red_circles_000.jpg"
    args = [str(query), "-k", "1", "--index-dir", str(index), "--json"]
    quiet = CliRunner().invoke(search_images, args)
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom indexer.locks import index_lock\n"
                               f"with index_lock({str(index)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = CliRunner().invoke(search_images, args)
    finally:
        holder.kill()
        holder.wait()
    assert busy.exit_code == 0 and json.loads(busy.stdout)["results"][0]["path"] == "red_circles/red_circles_000.jpg"
    assert "note: an index-images run is updating this index now" in busy.stderr


@pytest.mark.parametrize("command, args, variable, value", [
    ("evaluate_index", [], "EVALUATE_INDEX_K", "1,x"),
    ("fine_tune", ["DATA", "--out", "OUT"], "FINE_TUNE_WEIGHTS", "nosuch.pt"),
    ("index_images", ["DATA"], "INDEX_IMAGES_WHITEN_DIM", "abc"),
])
def test_a_wrong_value_from_the_environment_is_named_as_the_variable(sample_index, tmp_path, command, args,
                                                                     variable, value):
    """Reproduces: EVALUATE_INDEX_K=1,x was reported as "Invalid value for '-k'" (and FINE_TUNE_WEIGHTS,
    INDEX_IMAGES_WHITEN_DIM alike): checked after parsing, these values lost where they came from."""
    import importlib

    main = importlib.import_module(f"commands.{command}").main
    filled = [{"DATA": str(sample_index.data_dir), "OUT": str(tmp_path / "t.pt")}.get(a, a) for a in args]
    result = CliRunner().invoke(main, [*filled, "--index-dir", str(tmp_path / "index")] if command != "fine_tune"
                                else filled, env={variable: value})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {variable} (the environment's" in result.output and repr(value) in result.output


@pytest.mark.parametrize("command", ["index_images", "search_images", "serve_images", "evaluate_index", "fine_tune",
                                     "model_info", "find_duplicates"])
def test_every_command_says_its_version(command):
    """What a bug report needs first; there was no --version (a scripter's review). Arguments it would need
    otherwise are not asked for."""
    import importlib
    from importlib.metadata import version

    result = CliRunner().invoke(importlib.import_module(f"commands.{command}").main, ["--version"])
    assert result.exit_code == 0, result.output
    assert f"{version('cnn-image-retrieval')} (cnn-image-retrieval; Python " in result.output


def test_several_queries_share_one_start_up(sample_index):
    """A script searching 50 photos paid the network's and the index's load (about 2 s here) 50 times: one run takes
    several queries now, each with its own list; a query that cannot be used refuses the run before any search."""
    red = sample_index.data_dir / "red_circles" / "red_circles_000.jpg"
    blue = sample_index.data_dir / "blue_squares" / "blue_squares_001.jpg"
    args = ["-k", "1", "--index-dir", str(sample_index.index_dir)]
    found = CliRunner().invoke(search_images, [str(red), str(blue), *args, "--json"])
    assert found.exit_code == 0, found.output
    doc = json.loads(found.stdout)
    assert [q["query"] for q in doc["queries"]] == [str(red), str(blue)]
    assert [q["results"][0]["path"] for q in doc["queries"]] == ["red_circles/red_circles_000.jpg",
                                                                 "blue_squares/blue_squares_001.jpg"]
    text = CliRunner().invoke(search_images, [str(red), str(blue), *args]).stdout
    assert f"query: {red}\n" in text and f"\nquery: {blue}\n" in text
    refused = CliRunner().invoke(search_images, [str(red), str(sample_index.index_dir / "catalog.db"), *args])
    assert refused.exit_code == 2 and "cannot use" in refused.output and "rank" not in refused.stdout


def test_search_images_takes_the_search_settings_a_server_takes(tmp_path):
    """Reproduces (scale-out review): search-images had no --nprobe / --ef-search and ignored RETRIEVAL_NPROBE, which
    serve-images and index-images read: with the variable exported, the CLI and the server answered differently. At
    nprobe = the number of lists an inverted file is searched whole: the results are exact search's."""
    from helpers.indexes import build_index

    make_sample_collection(tmp_path / "data", per_class=8, size=(64, 48), seed=4)   # 40 images: raw vectors
    build_index(tmp_path / "data", tmp_path / "ivf", vector_index="IVF4,Flat")
    build_index(tmp_path / "data", tmp_path / "flat")
    query = str(tmp_path / "data" / "red_circles" / "red_circles_000.jpg")
    def search(index: str, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([console_script("search-images"), query, "--index-dir", str(tmp_path / index), "-k", "10",
                               "--json", *options], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **(env or {})})

    exact = json.loads(search("flat").stdout)
    whole = search("ivf", "--nprobe", "64")
    assert whole.returncode == 0 and "nprobe 64 is more than the index's 4 lists: all 4 are searched" in whole.stderr
    assert [r["path"] for r in json.loads(whole.stdout)["results"]] == [r["path"] for r in exact["results"]]
    by_env = search("ivf", env={"RETRIEVAL_NPROBE": "64"})
    assert by_env.returncode == 0 and "all 4 are searched" in by_env.stderr and by_env.stdout == whole.stdout
    # a setting the index's type has no use for is said so (it searched exactly as without it, without a word)
    unused = search("flat", "--nprobe", "8", "--ef-search", "32")
    assert unused.returncode == 0 and json.loads(unused.stdout) == exact
    assert "--nprobe 8 (or RETRIEVAL_NPROBE) is not used: this index is not an inverted file (IVF)" in unused.stderr
    assert "--ef-search 32 (or RETRIEVAL_EF_SEARCH) is not used: this index is not an HNSW graph" in unused.stderr
    used = search("ivf", "--nprobe", "2")
    assert used.returncode == 0 and "is not used" not in used.stderr
