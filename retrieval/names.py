"""Names and defaults the command lines and the library share, importable without torch or FAISS."""
from __future__ import annotations

from pathlib import Path

MODEL_NAMES = ("alexnet", "vgg16")       # torchvision backbones (retrieval.features.backbones.MODELS has one entry each)
LAYERS = ("fc6", "fc7")                  # feature layers, each taken after its ReLU
INDEX_DIR_ENV = "RETRIEVAL_INDEX_DIR"    # default index folder for every command and the server
DB_URL_ENV = "RETRIEVAL_DB_URL"          # the catalog's SQLAlchemy URL for every command and the server (default: SQLite)
DEFAULT_KS = (1, 5, 10)                  # neighbours for precision@k and the kNN vote in evaluations
FAISS_FILE = "vectors.faiss"             # the vector index in an index folder (derived from the catalog)
DEFAULT_RANDOM_SEED = 0                  # seed of --weights random when none is given
MAX_NPROBE = 1 << 16                     # IVF lists searched per query: at most this many (an IVF65536 searched whole)
MAX_EF_SEARCH = 100_000                  # HNSW efSearch: beyond this a query allocates gigabytes and answers nothing


def random_weights_file(index_dir: Path, model: str) -> Path:
    """Where an index keeps its seeded random weights (--weights random)."""
    return Path(index_dir) / f"random-weights-{model}.pt"
