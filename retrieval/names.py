"""Names and defaults the command lines and the library share, importable without torch or FAISS."""
from __future__ import annotations

from pathlib import Path

MODEL_NAMES = ("alexnet", "vgg16")       # torchvision backbones (retrieval.features.backbones.MODELS has one entry each)
FC_LAYERS = ("fc6", "fc7")               # fully connected feature layers, each taken after its ReLU
POOLED_LAYERS = ("conv5-mac", "conv5-spoc", "conv5-gem", "conv5-rmac")   # the last conv block (pool5's input) pooled:
                                         # max, average, generalised mean (p=3), regional max; L2-normalised
POOLED_INPUT = 224                       # pooled layers see the image's shorter side whole, resized to this, centre
                                         # square (fc layers: 224 cut from 256); measured: docs/indexing.md
LAYERS = FC_LAYERS + POOLED_LAYERS       # what --layer takes (retrieval.features.descriptors makes the pooled ones)
VIEWS = ("single", "flip", "flip+scales")   # a descriptor from the image alone, averaged with its mirror's, or over
                                         # the image and its mirror at three scales (retrieval.features.descriptors)
INPUT_NORMS = ("weights", "image")       # the network's input normalised by the weights' own mean and std, or by each
                                         # image's own (retrieval.images.decode.Preprocessing.normalise)
DECODES = ("auto", "workers", "device")   # index-images --decode: JPEGs decoded by Pillow workers, on the device, or both
INDEX_DIR_ENV = "RETRIEVAL_INDEX_DIR"    # default index folder for every command and the server
DB_URL_ENV = "RETRIEVAL_DB_URL"          # the catalog's SQLAlchemy URL for every command and the server (default: SQLite)
DEFAULT_KS = (1, 5, 10)                  # neighbours for precision@k and the kNN vote in evaluations
FAISS_FILE = "vectors.faiss"             # the vector index in an index folder (derived from the catalog)
REGIONS_FILE = "regions.faiss"           # index-images --regions: the regional vectors' index beside it (likewise)
# fine-tune's objectives (retrieval.learning.objectives explains each) and its default, chosen by measurement
# (benchmarks/sweep_finetune.py, bench_finetune_quality.py)
FINE_TUNE_METRIC_LOSSES = ("proxy-anchor", "norm-softmax", "supcon", "triplet")
FINE_TUNE_OBJECTIVES = ("ce", *FINE_TUNE_METRIC_LOSSES, *(f"ce+{m}" for m in FINE_TUNE_METRIC_LOSSES))
DEFAULT_FINE_TUNE_OBJECTIVE = "ce+proxy-anchor"
DEFAULT_RANDOM_SEED = 0                  # seed of --weights random when none is given
MAX_NPROBE = 1 << 16                     # IVF lists searched per query: at most this many (an IVF65536 searched whole)
MAX_EF_SEARCH = 100_000                  # HNSW efSearch: beyond this a query allocates gigabytes and answers nothing

CONV5_CHANNELS = {"alexnet": 256, "vgg16": 512}   # the last conv block's channels: a pooled layer's dimension
FC_DIM = 4096                            # fc6 and fc7 of both backbones


def feature_dim(model: str, layer: str) -> int:
    """The vectors' dimension for a backbone's layer (torch-free; the extractor reports the same)."""
    return CONV5_CHANNELS[model] if layer in POOLED_LAYERS else FC_DIM


def random_weights_file(index_dir: Path, model: str) -> Path:
    """Where an index keeps its seeded random weights (--weights random)."""
    return Path(index_dir) / f"random-weights-{model}.pt"


def is_device_name(device: object) -> bool:
    """Whether device names a device this project runs on: "auto", "cpu", "cuda" or "cuda:N"."""
    return isinstance(device, str) and (device in ("auto", "cpu", "cuda")
                                        or (device.startswith("cuda:") and device[5:].isdigit()))

MODEL_PARAMETERS = {"alexnet": 61_100_840, "vgg16": 138_357_544}   # float32 each in a weights (state dict) file
AUTO_TRAIN_BATCH_CAP = 64   # fine-tune's batch size auto never trains on larger batches (small collections)
