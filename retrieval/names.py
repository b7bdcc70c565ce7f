"""Names and defaults the command lines and the library share, importable without torch or FAISS."""
from __future__ import annotations

from pathlib import Path

MODEL_NAMES = ("alexnet", "vgg16")       # torchvision backbones (retrieval.features.backbones.MODELS has one entry each)
LAYERS = ("fc6", "fc7")                  # feature layers, each taken after its ReLU
INDEX_DIR_ENV = "RETRIEVAL_INDEX_DIR"    # default index folder for every command and the server
DB_URL_ENV = "RETRIEVAL_DB_URL"          # the catalog's SQLAlchemy URL for every command and the server (default: SQLite)
DEFAULT_KS = (1, 5, 10)                  # neighbours for precision@k and the kNN vote in evaluations
FAISS_FILE = "vectors.faiss"             # the vector index in an index folder (derived from the catalog)
# fine-tune's objectives (retrieval.learning.objectives explains each) and its default, chosen by measurement
# (benchmarks/sweep_finetune.py, bench_finetune_quality.py)
FINE_TUNE_METRIC_LOSSES = ("proxy-anchor", "norm-softmax", "supcon", "triplet")
FINE_TUNE_OBJECTIVES = ("ce", *FINE_TUNE_METRIC_LOSSES, *(f"ce+{m}" for m in FINE_TUNE_METRIC_LOSSES))
DEFAULT_FINE_TUNE_OBJECTIVE = "ce+proxy-anchor"
DEFAULT_RANDOM_SEED = 0                  # seed of --weights random when none is given
MAX_NPROBE = 1 << 16                     # IVF lists searched per query: at most this many (an IVF65536 searched whole)
MAX_EF_SEARCH = 100_000                  # HNSW efSearch: beyond this a query allocates gigabytes and answers nothing


def random_weights_file(index_dir: Path, model: str) -> Path:
    """Where an index keeps its seeded random weights (--weights random)."""
    return Path(index_dir) / f"random-weights-{model}.pt"
