"""Layer tables (the classic VGG16 figures), first-layer filter grids, and the `model-info` command."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision import models

from commands.model_info import main as model_info_main
from retrieval.features.backbones import MODELS
from retrieval.features.model_info import filters_png, first_conv_weight, layer_table, per_image_activation_bytes

# The rows of the CS231n VGG16 table, in order: (type, [HxWxC], weights).
VGG16_CLASSIC = [
    ("INPUT", "[224x224x3]", 0),
    ("CONV3-64", "[224x224x64]", 1_728), ("CONV3-64", "[224x224x64]", 36_864), ("POOL2", "[112x112x64]", 0),
    ("CONV3-128", "[112x112x128]", 73_728), ("CONV3-128", "[112x112x128]", 147_456), ("POOL2", "[56x56x128]", 0),
    ("CONV3-256", "[56x56x256]", 294_912), ("CONV3-256", "[56x56x256]", 589_824),
    ("CONV3-256", "[56x56x256]", 589_824), ("POOL2", "[28x28x256]", 0),
    ("CONV3-512", "[28x28x512]", 1_179_648), ("CONV3-512", "[28x28x512]", 2_359_296),
    ("CONV3-512", "[28x28x512]", 2_359_296), ("POOL2", "[14x14x512]", 0),
    ("CONV3-512", "[14x14x512]", 2_359_296), ("CONV3-512", "[14x14x512]", 2_359_296),
    ("CONV3-512", "[14x14x512]", 2_359_296), ("POOL2", "[7x7x512]", 0),
    ("FC-4096", "[1x1x4096]", 102_760_448), ("FC-4096", "[1x1x4096]", 16_777_216), ("FC-1000", "[1x1x1000]", 4_096_000),
]


def test_vgg16_table_matches_the_classic_rows_and_true_totals():
    t = layer_table("vgg16", 224)
    assert [(r.kind, r.shape_text, r.weights) for r in t.rows] == VGG16_CLASSIC
    conv1 = t.row("conv1_1")
    assert (conv1.shape, conv1.activations, conv1.weights, conv1.biases) == ((64, 224, 224), 3_211_264, 1_728, 64)
    assert t.row("fc6").shape_text == "[1x1x4096]" and t.row("fc6").weights == 102_760_448
    assert t.row("fc8").weights == 4_096_000
    assert t.params == 138_357_544 and t.weights == 138_344_128 and t.biases == 13_416
    assert t.activations == 15_237_608                      # the true sum of the rows, input included
    assert t.forward_bytes == 15_237_608 * 4 and round(t.forward_bytes / 1e6) == 61   # not "24M, ~93 MB"
    assert t.backward_bytes == 2 * t.forward_bytes
    assert t.params == models.VGG16_Weights.IMAGENET1K_V1.meta["num_params"]
    assert [r.name for r in t.rows][-4:] == ["pool5", "fc6", "fc7", "fc8"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_totals_are_the_sums_of_the_rows_and_of_the_real_module(model):
    t = layer_table(model)
    with torch.device("meta"):
        net = MODELS[model].build()
    assert t.params == sum(p.numel() for p in net.parameters()) == MODELS[model].imagenet.num_params
    assert t.activations == sum(r.activations for r in t.rows)
    assert all(r.activations == int(np.prod(r.shape)) and r.memory_bytes == 4 * r.activations for r in t.rows)
    # our fc6/fc7 names are the Linear layers whose ReLU the feature extractor taps
    for layer, node in MODELS[model].layers.items():
        module = t.row(layer).module
        assert module.split(".")[0] == node.split(".")[0] and int(module.split(".")[1]) + 1 == int(node.split(".")[1])


def test_alexnet_table():
    t = layer_table("alexnet")
    assert [r.name for r in t.rows] == ["input", "conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5",
                                        "fc6", "fc7", "fc8"]
    assert t.row("conv1").shape_text == "[55x55x64]" and t.row("conv1").weights == 11 * 11 * 3 * 64
    assert t.row("pool5").shape_text == "[6x6x256]"
    assert t.row("fc6").weights == 6 * 6 * 256 * 4096
    assert t.params == 61_100_840 and t.activations == 733_032


def test_table_of_a_real_module_equals_the_meta_one():
    torch.manual_seed(0)
    net = models.alexnet(weights=None).eval()
    real, meta = layer_table(net, 224), layer_table("alexnet", 224)
    assert real.rows == meta.rows


def test_other_input_sizes():
    t = layer_table("vgg16", 256)
    assert t.row("pool5").shape_text == "[8x8x512]"
    assert t.row("avgpool").shape_text == "[7x7x512]"          # torchvision's adaptive pool gets a row when it resizes
    assert t.row("fc6").weights == 102_760_448
    assert per_image_activation_bytes("vgg16", 224) == 60_950_432
    with pytest.raises(ValueError, match="cannot take a 16x16 input"):
        layer_table("alexnet", 16)


def test_filters_png_from_a_state_dict_and_a_module():
    torch.manual_seed(0)
    state = {"features.0.weight": torch.randn(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}
    img = Image.open(io.BytesIO(filters_png(state)))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (8 * (44 + 2) + 2,) * 2   # 8x8 filters of 11 px x 4
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3))
    assert first_conv_weight(net).shape == (4, 3, 3, 3)
    assert Image.open(io.BytesIO(filters_png(net))).size == (2 * (48 + 2) + 2,) * 2


def test_cli_prints_the_table_and_the_totals():
    result = CliRunner().invoke(model_info_main, ["vgg16"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("[224x224x64]", "1,728", "102,760,448", "4,096,000", "138,357,544", "138,344,128", "15,237,608",
                 "61.0 MB", "121.9 MB"):
        assert text in out


def test_cli_json():
    result = CliRunner().invoke(model_info_main, ["alexnet", "--input-size", "227", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "alexnet" and data["input_size"] == 227
    assert data["layers"][1]["shape"] == [64, 56, 56]
    assert data["totals"]["params"] == 61_100_840
    assert data["totals"]["activations"] == sum(row["activations"] for row in data["layers"])


def test_cli_errors_exit_2():
    result = CliRunner().invoke(model_info_main, ["vgg16", "--input-size", "8"])
    assert result.exit_code == 2 and "cannot take a 8x8 input" in result.output and "Traceback" not in result.output
    assert CliRunner().invoke(model_info_main, ["resnet50"]).exit_code == 2
