"""index-images --input-norm image: each image normalised by its own per-channel mean and standard deviation before
the network, so a brighter or darker copy of a photo finds its original; recorded with the index and used for every
query (the CLI, the server, the Python API)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

import retrieval
from commands.index_images import main as index_images
from commands.search_images import main as search_images
from helpers.indexes import build_index
from indexer.config import ConfigError
from retrieval.images.decode import Preprocessing

ORIGINAL = "class1/picture04.png"


def smooth_picture(seed: int) -> Image.Image:
    """320x240 smooth random colour fields in mid-tones (40-180): brightened by 1.4 nothing is clipped to white."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 181, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
    fine = Image.fromarray(rng.integers(40, 181, (24, 32, 3), dtype=np.uint8)).resize((320, 240), Image.BICUBIC)
    return Image.blend(coarse, fine, 0.3)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """12 pictures in 3 folders, and a darker (0.6) and a brighter (1.4) copy of one of them outside the folder."""
    root = tmp_path_factory.mktemp("input-norm")
    data = root / "data"
    for i in range(12):
        (data / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        smooth_picture(i).save(data / f"class{i % 3}" / f"picture{i:02d}.png")
    copies = {}
    for name, factor in (("darker", 0.6), ("brighter", 1.4)):
        copies[name] = root / f"{name}.png"
        ImageEnhance.Brightness(Image.open(data / ORIGINAL)).enhance(factor).save(copies[name])
    return data, copies


def run_json(args: list[str], command=index_images) -> dict:  # noqa: ANN001 - a click command
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_darker_or_brighter_copy_finds_its_original_far_closer_when_each_image_is_normalised_by_its_own(
        collection, tmp_path):
    data, copies = collection
    distance = {}
    for norm in ("weights", "image"):
        index_dir = str(tmp_path / norm)
        summary = run_json([str(data), "--index-dir", index_dir, "--weights", "random", "--workers", "0",
                            "--input-norm", norm, "--json"])
        assert summary["network"]["input_norm"] == norm
        for name, copy in copies.items():
            found = run_json([str(copy), "-k", "3", "--index-dir", index_dir, "--json"], search_images)
            distance[norm, name] = found["results"][0]["distance"]
            if norm == "image":
                assert found["results"][0]["path"] == ORIGINAL, (name, found["results"])
    for name in copies:
        assert distance["image", name] < 0.5 * distance["weights", name], distance
    assert distance["image", "darker"] < 0.05, distance      # no pixel clipped: the same input, up to rounding


def test_the_index_keeps_its_normalisation_for_later_runs_and_every_query(collection, tmp_path):
    data, copies = collection
    build_index(data, tmp_path / "index", input_norm="image")
    with pytest.raises(ConfigError, match="input_norm 'image', not 'weights'"):
        build_index(data, tmp_path / "index", input_norm="weights")
    again = build_index(data, tmp_path / "index")                   # no option: the index's own
    assert again.network["input_norm"] == "image" and again.unchanged == 12

    with retrieval.open_index(tmp_path / "index") as index:       # the Python API
        assert index.info.input_norm == "image"
        hits = index.search(copies["darker"], k=1)
        assert hits[0].path == ORIGINAL and hits[0].distance < 0.05

    from api import create_app

    client = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0}).test_client()
    assert client.get("/stats").get_json()["input_norm"] == "image"
    with open(copies["darker"], "rb") as f:
        answer = client.post("/search", data={"image": (f, "q.png")}, content_type="multipart/form-data").get_json()
    assert answer["index"]["input_norm"] == "image"
    assert answer["results"][0]["path"] == ORIGINAL and answer["results"][0]["distance"] < 0.05


def test_a_flat_picture_is_indexed_with_a_finite_vector(tmp_path):
    data = tmp_path / "data"
    (data / "blank").mkdir(parents=True)
    Image.new("RGB", (200, 150), (90, 90, 90)).save(data / "blank" / "grey.png")
    smooth_picture(0).save(data / "blank" / "picture.png")
    report = build_index(data, tmp_path / "index", input_norm="image")
    assert report.indexed == 2 and not report.skipped
    with retrieval.open_index(tmp_path / "index") as index:
        vector = index.features(data / "blank" / "grey.png")
    assert np.all(np.isfinite(vector)) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4


def test_the_recorded_text_reads_back_and_an_older_record_means_the_weights_normalisation():
    image = Preprocessing(input_norm="image")
    assert Preprocessing.from_record(image.to_record()) == image
    older = "resize=256,crop=224,mean=[0.485, 0.456, 0.406],std=[0.229, 0.224, 0.225],interpolation=bilinear"
    assert Preprocessing.from_record(older) == Preprocessing() and Preprocessing().to_record() == older
