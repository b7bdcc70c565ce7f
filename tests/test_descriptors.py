"""Tests for retrieval.features.descriptors: pooled last-conv layers (conv5-mac/spoc/gem/rmac) and descriptors averaged
over views (flip, flip+scales), recorded with the index and used for every query."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image, ImageOps
from torchvision import models

from commands.index_images import main as index_images
from commands.search_images import main as search_images
from helpers.indexes import build_index
from indexer.config import ConfigError
from retrieval.catalog import Catalog
from retrieval.features.backbones import FeatureExtractor
from retrieval.features.descriptors import ONE_PASS_MAX_IMAGES, gem, mac, rmac_regions, spoc
from retrieval.names import POOLED_LAYERS, feature_dim
from retrieval.samples import make_sample_collection
from retrieval.search.index import ImageIndex


@pytest.fixture(scope="module")
def alexnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return models.alexnet(weights=None).state_dict()


def photo_like(seed: int, size=(224, 224)) -> torch.Tensor:
    """uint8 (1, 3, H, W): smooth random blobs, not left-right symmetric."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand((1, 3, 7, 7), generator=g)
    img = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return (img * 255).to(torch.uint8)


# --- the poolings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, channels", [("alexnet", 256), ("vgg16", 512)])
def test_conv5_mac_is_the_global_max_of_torchvisions_pool5_output(model, channels):
    """pool5 tiles its input whole, so the maximum of its input (MAC) is the maximum of its output."""
    torch.manual_seed(1)
    net = getattr(models, model)(weights=None).eval()
    # fp32: this compares the pooling with torchvision's float32 pool5 (bf16 would differ by its rounding)
    extractor = FeatureExtractor(model, "conv5-mac", net.state_dict(), torch.device("cpu"), precision="fp32")
    pixels = torch.cat([photo_like(1), photo_like(2)])

    feats = extractor(pixels)
    with torch.no_grad():
        pool5 = net.features(extractor.preprocessing.normalise(pixels))       # (2, C, 6|7, 6|7)
    expected = F.normalize(pool5.amax(dim=(2, 3)), dim=1)

    assert feats.shape == (2, channels) and extractor.dim == channels == feature_dim(model, "conv5-mac")
    assert torch.allclose(feats, expected, atol=1e-5)


def test_gem_lies_between_the_average_and_the_maximum():
    maps = torch.rand((2, 8, 5, 5)) ** 4          # skewed, like ReLU activations
    assert torch.allclose(gem(maps, p=1.0), spoc(maps), atol=1e-5), "p=1 is the average"
    assert torch.allclose(gem(maps, p=200.0), mac(maps), rtol=0.05), "a large p approaches the maximum"
    g = gem(maps)
    assert (spoc(maps) <= g + 1e-6).all() and (g <= mac(maps) + 1e-6).all()


@pytest.mark.parametrize("height, width", [(13, 13), (14, 14), (6, 6), (13, 17), (20, 9), (1, 1)])
def test_rmac_regions_are_squares_inside_the_map_that_cover_it(height, width):
    regions = rmac_regions(height, width)
    covered = np.zeros((height, width), bool)
    for top, left, side in regions:
        assert side >= 1 and 0 <= top and top + side <= height and 0 <= left and left + side <= width
        covered[top:top + side, left:left + side] = True
    assert covered.all()
    assert len(set(regions)) == len(regions), "no region counted twice"
    if height == width == 13:
        assert len(regions) == 1 + 4 + 9, "a square map: the whole, 2x2 and 3x3 regions"


def test_pooled_layers_give_unit_vectors_of_the_conv_channels_that_differ_between_images(alexnet_state):
    pixels = torch.cat([photo_like(3), photo_like(4)])
    for layer in POOLED_LAYERS:
        extractor = FeatureExtractor("alexnet", layer, alexnet_state, torch.device("cpu"))
        feats = extractor(pixels)
        assert feats.shape == (2, 256) and extractor.dim == 256, layer
        assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5), layer
        assert not torch.allclose(feats[0], feats[1], atol=1e-3), layer


def test_pooled_layers_take_inputs_of_any_shape(alexnet_state):
    extractor = FeatureExtractor("alexnet", "conv5-gem", alexnet_state, torch.device("cpu"), views="flip+scales")
    assert extractor(photo_like(5, size=(180, 300))).shape == (1, 256)


# --- views ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["fc7", "conv5-rmac"])
def test_with_flip_an_image_and_its_mirror_have_the_same_descriptor(alexnet_state, layer):
    pixels = photo_like(6)
    mirror = torch.flip(pixels, dims=(3,))
    single = FeatureExtractor("alexnet", layer, alexnet_state, torch.device("cpu"))
    for views in ("flip", "flip+scales"):
        averaged = FeatureExtractor("alexnet", layer, alexnet_state, torch.device("cpu"), views=views)
        a, b = averaged(pixels), averaged(mirror)
        assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max())), (layer, views)
    a, b = single(pixels), single(mirror)
    assert not torch.allclose(a, b, atol=1e-2 * float(a.abs().max())), "one view alone sees the mirror as another image"


def test_flip_averages_the_image_and_its_mirror(alexnet_state):
    pixels = photo_like(7)
    # one precision for both (auto's probe, run per layer and views, may choose bf16 for one and fp32 for the other)
    single = FeatureExtractor("alexnet", "conv5-gem", alexnet_state, torch.device("cpu"), precision="fp32")
    averaged = FeatureExtractor("alexnet", "conv5-gem", alexnet_state, torch.device("cpu"), precision="fp32",
                                views="flip")
    both = (single(pixels) + single(torch.flip(pixels, dims=(3,)))) / 2
    assert torch.allclose(averaged(pixels), both, atol=1e-5)


@pytest.mark.parametrize("views", ["flip", "flip+scales"])
def test_a_query_and_an_indexing_batch_get_the_same_view_average(alexnet_state, views):
    """A few images go through the network with their views in one pass (the fc weights read once), a larger
    batch one pass per view: an image's descriptor must not depend on which."""
    many = torch.cat([photo_like(seed) for seed in range(ONE_PASS_MAX_IMAGES + 4)])
    averaged = FeatureExtractor("alexnet", "fc7", alexnet_state, torch.device("cpu"), precision="fp32", views=views)
    in_a_batch = averaged(many)                        # one pass per view
    for i in (0, 5, len(many) - 1):
        alone = averaged(many[i:i + 1])                # the views together, as a query
        assert torch.allclose(alone[0], in_a_batch[i], atol=1e-5 * float(alone.abs().max())), (views, i)


# --- recorded with the index, used for queries -------------------------------------------------------------------

@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    data = tmp_path_factory.mktemp("descriptors") / "data"
    make_sample_collection(data, per_class=2, size=(160, 120), seed=3,
                           classes=["red_circles", "blue_squares", "green_stripes"])
    return data


def run_json(runner: CliRunner, command, args: list[str]) -> dict:  # noqa: ANN001 - a click command
    result = runner.invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("layer, views", [(layer, "single") for layer in POOLED_LAYERS]
                         + [("fc7", "flip"), ("conv5-gem", "flip+scales")])
def test_an_index_records_its_layer_and_views_and_a_query_finds_the_image_itself(collection, tmp_path, layer, views):
    runner = CliRunner()
    index_dir = str(tmp_path / "index")
    summary = run_json(runner, index_images, [str(collection), "--index-dir", index_dir, "--weights", "random",
                                              "--workers", "0", "--layer", layer, "--views", views, "--json"])
    dim = feature_dim("alexnet", layer)
    assert summary["network"] == {"model": "alexnet", "layer": layer, "views": views, "input_norm": "weights",
                                  "regions": 0, "weights": "random", "dim": dim, "normalize": True}
    again = run_json(runner, index_images, [str(collection), "--index-dir", index_dir, "--json"])   # the index's own
    assert again["unchanged"] == 6 and again["network"] == summary["network"]

    query = collection / "blue_squares" / "blue_squares_001.jpg"
    found = run_json(runner, search_images, [str(query), "-k", "2", "--index-dir", index_dir, "--json"])
    assert found["results"][0]["path"] == "blue_squares/blue_squares_001.jpg"
    assert found["results"][0]["distance"] < 1e-3


def test_the_server_reports_the_index_layer_and_views(collection, tmp_path):
    from api import create_app

    build_index(collection, tmp_path / "index", layer="conv5-rmac", views="flip")
    app = create_app({"INDEX_DIR": str(tmp_path / "index"), "RELOAD_INTERVAL_S": 0})
    client = app.test_client()
    stats = client.get("/stats").get_json()
    assert (stats["layer"], stats["views"], stats["dim"]) == ("conv5-rmac", "flip", 256)
    with open(collection / "red_circles" / "red_circles_000.jpg", "rb") as f:
        answer = client.post("/search", data={"image": (f, "q.jpg")}, content_type="multipart/form-data").get_json()
    assert answer["index"]["views"] == "flip" and answer["index"]["layer"] == "conv5-rmac"
    assert answer["results"][0]["path"] == "red_circles/red_circles_000.jpg"
    assert answer["results"][0]["distance"] < 1e-3


def test_with_flip_a_mirrored_copy_finds_its_original_at_about_zero(tmp_path):
    data = tmp_path / "data"
    make_sample_collection(data, per_class=3, size=(320, 240), seed=5, classes=["red_circles", "purple_checks"])
    original = data / "red_circles" / "red_circles_001.jpg"
    mirror = tmp_path / "mirror.png"
    ImageOps.mirror(Image.open(original).convert("RGB")).save(mirror)
    distances = {}
    for views in ("single", "flip"):
        build_index(data, tmp_path / views, layer="conv5-gem", views=views)
        index = ImageIndex(tmp_path / views)
        try:
            hits, _ = index.search_image(mirror.read_bytes(), k=2)
        finally:
            index.close()
        assert hits[0].path == "red_circles/red_circles_001.jpg", views
        distances[views] = hits[0].distance
    assert distances["flip"] < 0.01 < distances["single"], distances


def test_another_layer_or_views_than_the_index_is_refused(collection, tmp_path):
    build_index(collection, tmp_path / "index", layer="conv5-mac", views="flip")
    with pytest.raises(ConfigError, match="views 'flip', not 'single'"):
        build_index(collection, tmp_path / "index", views="single")
    with pytest.raises(ConfigError, match="layer 'conv5-mac', not 'fc7'"):
        build_index(collection, tmp_path / "index", layer="fc7")


def test_an_index_made_before_views_reads_as_single_even_read_only(collection, tmp_path):
    build_index(collection, tmp_path / "index")
    db_file = tmp_path / "index" / "catalog.db"
    with sqlite3.connect(db_file) as db:
        db.execute("ALTER TABLE index_settings DROP COLUMN views")     # as the catalog was before views
    db_file.chmod(0o444)
    (tmp_path / "index").chmod(0o555)
    try:
        catalog = Catalog(tmp_path / "index")
        try:
            assert catalog.settings().views == "single"
        finally:
            catalog.close()
    finally:
        (tmp_path / "index").chmod(0o755)
        db_file.chmod(0o644)
    catalog = Catalog(tmp_path / "index")        # writable again: the column is added, NULL read as "single"
    try:
        assert catalog.settings().views == "single"
    finally:
        catalog.close()
    with sqlite3.connect(db_file) as db:
        assert "views" in [row[1] for row in db.execute("PRAGMA table_info(index_settings)")]
