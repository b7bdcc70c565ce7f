"""Snapshot of the user-visible behaviour (issue 17, "behaviour unchanged"): proof that a restructuring changed nothing.

What is recorded, and compared on every run:

* tests/snapshots/help/<command>.txt: the exact ``--help`` text of every console script (index-images,
  search-images, serve-images, evaluate-index, model-info, fine-tune, find-duplicates), run as a subprocess
  through the installed console script next to sys.executable, with COLUMNS=100 and no option environment
  variables set.
* tests/snapshots/json_keys.json: the key structure (not the values) of the JSON the commands print with --json
  (index-images, a fresh run and the "summary " last line of an unchanged re-run; search-images; evaluate-index,
  also with --copies; find-duplicates; model-info) and of the Flask API's answers (GET /stats, POST /search,
  GET /images/<id>/neighbours, GET /healthz, an error body). The structure is the JSON with every dict's keys
  sorted (recursively), every list replaced by a one-element list holding its first element's structure ([] when
  empty), and every scalar replaced by its JSON type: "str", "number" (ints and floats alike), "bool" or "null".
* Exit statuses (usage and "no index" errors), and that index-images' last line starts with "summary ":
  these are plain assertions, not snapshot files.

On a difference the test fails with a unified diff (snapshot -> now). To accept an intended change, rewrite the
snapshot files and review them with git diff:

    RETRIEVAL_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_behaviour_snapshot.py

(a rewritten snapshot is reported as a skip, so the run cannot be mistaken for a comparison).

Survives the move to the new layout: no project module is imported by its internal path. The commands run
through their console scripts; the Flask part uses only ``from api import create_app``. The collection is a few
Pillow drawings in a temporary folder, indexed once per module with ``--weights random --device cpu`` (no
network; the CPU so that the structure does not depend on whether the machine has a GPU).
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from helpers.scripts import console_script

pytestmark = pytest.mark.slow   # every command run as a subprocess (the index, --help, --json)

SNAPSHOTS = Path(__file__).parent / "snapshots"
HELP_DIR = SNAPSHOTS / "help"
JSON_KEYS = SNAPSHOTS / "json_keys.json"
UPDATE = os.environ.get("RETRIEVAL_UPDATE_SNAPSHOTS", "") not in ("", "0")

COMMANDS = ["index-images", "search-images", "serve-images", "evaluate-index", "model-info", "fine-tune", "find-duplicates"]
# Environment variables the commands and the app read for their options: unset, so the machine's don't leak in.
OPTION_ENV_PREFIXES = ("RETRIEVAL_", *(f"{c.upper().replace('-', '_')}_" for c in COMMANDS))
QUERY = "data/reds/reds_0.jpg"          # relative to the work folder
TIMEOUT_S = 300


# --- helpers --------------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OPTION_ENV_PREFIXES)}
    env["COLUMNS"] = "100"
    return env


def run(command: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(command), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def run_ok(command: str, *args: str, cwd: Path | None = None) -> str:
    """stdout of a command that must succeed."""
    result = run(command, *args, cwd=cwd)
    assert result.returncode == 0, (f"{command} {' '.join(args)} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def structure(value: Any) -> Any:
    """The key structure of a JSON value (see the module docstring)."""
    if isinstance(value, dict):
        return {key: structure(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [structure(value[0])] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    raise TypeError(f"not a JSON value: {value!r}")


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def diff(expected: str, actual: str, name: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                 fromfile=f"{name} (snapshot)", tofile=f"{name} (now)")
    return "".join(lines)


def compare_text(path: Path, actual: str) -> None:
    """actual must equal the file at path; with RETRIEVAL_UPDATE_SNAPSHOTS=1 the file is rewritten instead."""
    expected = path.read_text(encoding="utf-8") if path.exists() else None
    if expected == actual:
        return
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        pytest.skip(f"snapshot rewritten: {path}")
    if expected is None:
        pytest.fail(f"no snapshot {path}; create it with RETRIEVAL_UPDATE_SNAPSHOTS=1")
    pytest.fail(f"{path.name} differs from its snapshot (RETRIEVAL_UPDATE_SNAPSHOTS=1 rewrites it if intended):\n"
                + diff(expected, actual, str(path.relative_to(SNAPSHOTS.parent))), pytrace=False)


def compare_structure(section: str, value: Any) -> None:
    """The structure of value must equal json_keys.json's section; with RETRIEVAL_UPDATE_SNAPSHOTS=1 it replaces it."""
    snapshot = json.loads(JSON_KEYS.read_text(encoding="utf-8")) if JSON_KEYS.exists() else {}
    actual = structure(value)
    if section in snapshot and snapshot[section] == actual:
        return
    if UPDATE:
        snapshot[section] = actual
        JSON_KEYS.parent.mkdir(parents=True, exist_ok=True)
        JSON_KEYS.write_text(json_text(snapshot), encoding="utf-8")
        pytest.skip(f"snapshot rewritten: {JSON_KEYS.name} [{section!r}]")
    if section not in snapshot:
        pytest.fail(f"{JSON_KEYS.name} has no section {section!r}; create it with RETRIEVAL_UPDATE_SNAPSHOTS=1")
    pytest.fail(f"the key structure of {section!r} differs from {JSON_KEYS.name} "
                f"(RETRIEVAL_UPDATE_SNAPSHOTS=1 rewrites it if intended):\n"
                + diff(json_text(snapshot[section]), json_text(actual), f"{JSON_KEYS.name} [{section}]"),
                pytrace=False)


def draw_collection(data: Path) -> None:
    """6 small pictures in 2 class folders (red circles, blue squares), and one file that is not an image (so that
    index-images' list of skipped files is not empty)."""
    for label, colour in (("reds", (200, 30, 30)), ("blues", (30, 30, 200))):
        folder = data / label
        folder.mkdir(parents=True)
        for i in range(3):
            image = Image.new("RGB", (96, 72), (240, 240, 240))
            x, y = 10 + 15 * i, 8 + 10 * i
            shape = ImageDraw.Draw(image).ellipse if label == "reds" else ImageDraw.Draw(image).rectangle
            shape([x, y, x + 40, y + 40], fill=colour)
            image.save(folder / f"{label}_{i}.jpg", quality=90)
    (data / "reds" / "broken.jpg").write_bytes(b"not a jpeg")


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: Path                 # the commands' working folder: data/ (the collection) and index/
    first_run: dict            # index-images --json on the fresh index
    rerun_stdout: str          # index-images (human output) run again, nothing changed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """One small index for every JSON test, built with relative paths from its folder."""
    root = tmp_path_factory.mktemp("behaviour")
    draw_collection(root / "data")
    first = run_ok("index-images", "data", "--index-dir", "index", "--json", "--weights", "random",
                   "--device", "cpu", "--precision", "fp32", cwd=root)   # auto's choice varies by CPU (a /stats key)
    rerun = run_ok("index-images", "data", "--index-dir", "index", "--weights", "random", "--device", "cpu",
                   cwd=root)
    return Workspace(root, json.loads(first), rerun)


# --- help texts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_text_is_unchanged(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    compare_text(HELP_DIR / f"{command}.txt", result.stdout)


# --- exit statuses --------------------------------------------------------------------------------

@pytest.mark.parametrize("command, args", [
    ("index-images", ["missing-folder"]),                          # usage: DATA_DIR does not exist
    ("model-info", ["resnet"]),                                    # usage: not a model name
    ("search-images", [QUERY, "--index-dir", "no-index"]),         # no index
    ("evaluate-index", ["--index-dir", "no-index"]),               # no index
    ("find-duplicates", ["--index-dir", "no-index"]),              # no index
    ("serve-images", ["--index-dir", "no-index"]),                 # no index
    ("evaluate-index", ["--index-dir", "index", "-k", "50"]),      # more neighbours than the images give
    ("find-duplicates", ["--index-dir", "index", "--threshold", "2"]),   # every image would be one group
], ids=["index-images-missing-folder", "model-info-bad-model", "search-images-no-index",
        "evaluate-index-no-index", "find-duplicates-no-index", "serve-images-no-index", "evaluate-index-k-too-large",
        "find-duplicates-threshold-2"])
def test_user_errors_exit_with_status_2(command, args, workspace):
    result = run(command, *args, cwd=workspace.root)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Error:" in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- the commands' JSON ---------------------------------------------------------------------------

def test_index_images_json(workspace):
    assert workspace.first_run["indexed"] == 6 and len(workspace.first_run["skipped"]) == 1
    compare_structure("index-images --json", workspace.first_run)


def test_index_images_last_line_is_the_summary(workspace):
    last = workspace.rerun_stdout.rstrip("\n").split("\n")[-1]
    assert last.startswith("summary "), workspace.rerun_stdout
    summary = json.loads(last[len("summary "):])
    assert summary["unchanged"] == 6 and summary["indexed"] == 0
    compare_structure("index-images summary line (re-run, nothing changed)", summary)


def test_search_images_json(workspace):
    out = json.loads(run_ok("search-images", QUERY, "--index-dir", "index", "-k", "3", "--json", cwd=workspace.root))
    assert len(out["results"]) == 3 and out["results"][0]["path"] == "reds/reds_0.jpg"
    compare_structure("search-images --json", out)


def test_evaluate_index_json(workspace):
    out = json.loads(run_ok("evaluate-index", "--index-dir", "index", "--json", cwd=workspace.root))
    compare_structure("evaluate-index --json", out)


def test_find_duplicates_json(workspace):
    out = json.loads(run_ok("find-duplicates", "--index-dir", "index", "--json", cwd=workspace.root))
    # the sample drawings hold no copies, so the calibrated threshold groups none of them: a group's keys are
    # taken from a run at a given, loose threshold
    assert out["groups"] == [], out["groups"]
    loose = json.loads(run_ok("find-duplicates", "--index-dir", "index", "--json", "--threshold", "1.0",
                              cwd=workspace.root))
    compare_structure("find-duplicates --json", {**out, "groups": loose["groups"]})


def test_evaluate_index_copies_json(workspace):
    out = json.loads(run_ok("evaluate-index", "--index-dir", "index", "--copies", "2", "--json", cwd=workspace.root))
    compare_structure("evaluate-index --copies 2 --json", out)


def test_model_info_json():
    out = json.loads(run_ok("model-info", "alexnet", "--json"))
    compare_structure("model-info alexnet --json", out)


# --- the Flask API --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(workspace, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for key in os.environ:
            if key.startswith("RETRIEVAL_"):
                env.delenv(key)
        from api import create_app

        app = create_app({"INDEX_DIR": str(workspace.root / "index"), "RELOAD_INTERVAL_S": 0,
                          "THUMBNAIL_DIR": str(tmp_path_factory.mktemp("thumbnails"))})
        yield app.test_client()
        service = app.extensions.get("retrieval")
        if hasattr(service, "close"):
            service.close()


def answer(response, status: int = 200) -> Any:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    return response.get_json()


def test_api_stats(client):
    compare_structure("GET /stats", answer(client.get("/stats")))


def search_upload(client, workspace, k: int) -> Any:
    image = (workspace.root / QUERY).read_bytes()
    return answer(client.post(f"/search?k={k}", data={"image": (io.BytesIO(image), "query.jpg")},
                              content_type="multipart/form-data"))


def test_api_search(client, workspace):
    body = search_upload(client, workspace, 3)
    assert len(body["results"]) == 3 and body["results"][0]["path"] == "reds/reds_0.jpg"
    compare_structure("POST /search", body)


def test_api_neighbours(client, workspace):
    image_id = search_upload(client, workspace, 1)["results"][0]["id"]
    compare_structure("GET /images/<id>/neighbours", answer(client.get(f"/images/{image_id}/neighbours?k=3")))


def test_api_error_body(client):
    body = answer(client.post("/search", data=b"not an image", content_type="image/jpeg"), 415)
    compare_structure("error body (POST /search, not an image)", body)


def test_api_healthz(client):
    compare_structure("GET /healthz", answer(client.get("/healthz")))
