"""features/architectures.py defines AlexNet and VGG16 without importing torchvision (whose import costs 1.7 s of
every command's start-up): they must be torchvision's networks exactly, or every index, fine-tuned weights file
and ImageNet download would silently mean another network."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision.models as tv

from retrieval.features.backbones import MODELS, random_state_dict

TORCHVISION = {"alexnet": (tv.alexnet, tv.AlexNet_Weights.IMAGENET1K_V1),
               "vgg16": (tv.vgg16, tv.VGG16_Weights.IMAGENET1K_V1)}


@pytest.mark.parametrize("model", list(MODELS))
def test_seeded_initialisation_is_torchvisions_bit_for_bit(model):
    build, _ = TORCHVISION[model]
    for seed in (0, 7):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            theirs = build(weights=None).state_dict()
        ours = random_state_dict(model, seed)
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), f"{model} seed {seed}: {key} differs"


@pytest.mark.parametrize("model", list(MODELS))
def test_same_weights_give_the_same_outputs_and_fc_layers(model):
    build, _ = TORCHVISION[model]
    torch.manual_seed(3)
    theirs = build(weights=None).eval()
    ours = MODELS[model].build().eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        for name, node in MODELS[model].layers.items():        # fc6/fc7 are the same module in both
            index = int(node.split(".")[1])
            assert repr(ours.classifier[index]) == repr(theirs.classifier[index]) == "ReLU(inplace=True)", name
            assert repr(ours.classifier[:index + 1]) == repr(theirs.classifier[:index + 1])
    assert repr(ours) .replace(type(ours).__name__, "") == repr(theirs).replace(type(theirs).__name__, "")


@pytest.mark.parametrize("model", list(MODELS))
def test_imagenet_weights_are_torchvisions(model):
    _, weights = TORCHVISION[model]
    ours = MODELS[model].imagenet
    transform = weights.transforms()
    assert ours.name == f"{type(weights).__name__}.{weights.name}"
    assert ours.url == weights.url
    assert ours.num_params == weights.meta["num_params"] == sum(p.numel() for p in MODELS[model].build().parameters())
    assert (ours.resize_size, ours.crop_size) == (transform.resize_size[0], transform.crop_size[0])
    assert (list(ours.mean), list(ours.std)) == (list(transform.mean), list(transform.std))


def test_indexing_and_searching_on_the_cpu_never_import_torchvision(tmp_path):
    """A user waits for every command's imports: torchvision's cost 1.7 s (it imports torch._dynamo)."""
    from retrieval.samples import make_sample_collection

    make_sample_collection(tmp_path / "data", per_class=3)
    script = (
        "import sys\n"
        "from indexer import index_folder\n"
        "import retrieval\n"
        f"index_folder({str(tmp_path / 'data')!r}, {str(tmp_path / 'index')!r}, weights='random', device='cpu')\n"
        f"with retrieval.open_index({str(tmp_path / 'index')!r}) as index:\n"
        "    first = next(iter(sorted(index.data_dir.rglob('*.jpg'))))\n"
        "    assert index.search(first, k=3).hits\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
