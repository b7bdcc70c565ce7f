"""FAISS index types: factory strings, the auto choice by collection size, training on a sample, the search
parameters asked for. What a built index is made of, and setting its search parameters: vectors/faiss_parts.py."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import TYPE_CHECKING

import numpy as np

from retrieval.vectors.faiss_parts import SearchParams, ivf_of, walk

if TYPE_CHECKING:   # FAISS is imported by the functions that build or inspect an index
    import faiss

    from retrieval.catalog import Catalog

log = logging.getLogger(__name__)

AUTO = "auto"
FLAT = "Flat"

# FAISS's guideline ("Guidelines to choose an index", github.com/facebookresearch/faiss/wiki): exact search
# while the collection is small; above, an IVF index with K = 4*sqrt(N) .. 16*sqrt(N) lists, trained on
# 30*K .. 256*K vectors, and codes compressed by PQ after a dimension reduction (PCA or OPQ).
AUTO_FLAT_MAX = 50_000        # auto keeps exact Flat up to this many vectors
AUTO_REDUCED_DIM = 256        # auto reduces 4096-d features to this many dimensions (PCA) before IVF
AUTO_PQ_BYTES = 64            # bytes per vector of the PQ code at 256 dimensions (4 dimensions per byte)
TRAIN_PER_LIST = 40           # training vectors per IVF list (FAISS warns below 39)
TRAIN_MIN = 10_000
TRAIN_MAX = 160_000           # 160k x 4096 float32 = 2.6 GB while training
PCA_POINTS_PER_D = 4          # a PCA trains on at most 4 * d_in of the sample (16,384 at 4096-d): its covariance
                              # costs n * d_in^2 (10x more at 160k), the IVF and PQ still train on the whole sample
RECALL_QUERIES = 1000         # held-out catalog vectors whose neighbours are checked against exact search
RECALL_TARGET = 0.95          # auto-tuned nprobe / efSearch: the smallest that reaches this 1-recall@10


class IndexTypeError(ValueError):
    """A factory string FAISS cannot build, or one this project cannot keep in step with the catalog."""


@dataclasses.dataclass(frozen=True)
class IndexTypeConfig:
    """How index-images chooses, trains and tunes the FAISS index (recorded with the index)."""
    index_type: str | None = None     # a FAISS index_factory string (Flat, PCA256,IVF1024,PQ64, HNSW32, ...) or "auto";
                                      # None: as recorded in the index, else auto
    flat_max: int | None = None       # auto: exact Flat up to this many vectors; None: as recorded, else AUTO_FLAT_MAX
    nprobe: int | None = None         # IVF lists searched per query; None: as recorded, else the smallest reaching
                                      # RECALL_TARGET 1-recall@10 on the recall sample
    ef_search: int | None = None      # HNSW search breadth; None: as recorded, else tuned like nprobe
    recall_queries: int | None = None  # held-out vectors for the recall measurement (and left out of training);
                                       # None: as recorded, else RECALL_QUERIES
    seed: int = 0                     # of the training and recall samples
    rebuild: bool = False             # rebuild (and retrain) the FAISS file from the catalog this run
    whiten: bool | None = None        # PCA-whiten in front of the type (retrieval.vectors.whitening); None: as recorded,
                                      # else WHITEN_DEFAULT for a new index (an index recorded without it keeps none)
    whiten_dim: int | str | None = None   # whitened dimensions or "auto" (by collection size, whitening.whitened_dim);
                                          # None: as recorded, else auto
    dba: int | None = None            # database-side augmentation: each stored vector averaged with its nearest dba
                                      # (retrieval.search.expansion); 0 off; None: as recorded, else 0


def auto_factory(n: int, dim: int, flat_max: int = AUTO_FLAT_MAX) -> str:
    """The factory string auto chooses for n vectors of dimension dim.

    Flat (exact) up to flat_max; above, PCA to AUTO_REDUCED_DIM (when dim is larger), an IVF with K lists,
    K the power of two nearest 4*sqrt(n) (FAISS's guideline: 4..16*sqrt(n)), and PQ codes of one byte per
    4 dimensions (AUTO_PQ_BYTES at 256), without polysemous training ("np": it only serves Hamming
    filtering, which these searches do not use, and costs minutes)."""
    if n <= flat_max:
        return FLAT
    reduced = min(dim, AUTO_REDUCED_DIM)
    nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(n))))
    m = max(1, reduced // 4) if reduced % 4 == 0 else math.gcd(reduced, AUTO_PQ_BYTES)
    pca = f"PCAR{reduced}," if reduced < dim else ""
    return f"{pca}IVF{nlist},PQ{m}np"


# Whether a new index whitens: decided by benchmarks/bench_quality.py (docs/quality.md)
WHITEN_DEFAULT = True
WHITEN_AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Whitening:
    """Whitening as asked for an index: on or off, and its dimension (None: auto; fewer while the collection is small)."""
    on: bool
    dim: int | None

    def to_json(self) -> dict:
        return {"on": self.on, "dim": self.dim}

    def __eq__(self, other: object) -> bool:   # the dimension of whitening that is off does not matter
        return isinstance(other, Whitening) and self.on == other.on and (not self.on or self.dim == other.dim)

    def __hash__(self) -> int:
        return hash((self.on, self.dim if self.on else None))


def requested_whitening(config: IndexTypeConfig, record: dict | None) -> Whitening:
    """--whiten / --whiten-dim over what the index recorded; a new index gets WHITEN_DEFAULT, an index recorded
    before whitening existed keeps raw vectors."""
    recorded = recorded_whitening(record) if record is not None else Whitening(WHITEN_DEFAULT, None)
    on = config.whiten if config.whiten is not None else recorded.on
    if config.whiten_dim is None:
        dim = recorded.dim
    else:
        dim = None if config.whiten_dim == WHITEN_AUTO else int(config.whiten_dim)
    return Whitening(bool(on), dim if on else recorded.dim)


def requested_dba(config: IndexTypeConfig, record: dict | None) -> int:
    return config.dba if config.dba is not None else int((record or {}).get("dba", 0))


def recorded_whitening(record: dict | None) -> Whitening:
    """What an index recorded (off for one recorded before whitening existed); the dimension only matters when on."""
    recorded = (record or {}).get("whiten") or {"on": False, "dim": None}
    return Whitening(bool(recorded["on"]), recorded.get("dim"))


def train_size(factory: str, n: int) -> int:
    """How many catalog vectors train an index of this type: 0 for untrained types (Flat, HNSW over Flat)."""
    lists = [int(k) for k in re.findall(r"IVF(\d+)", factory)]
    trained = bool(lists) or bool(re.search(r"(^|,)(PCA|OPQ|PQ|SQ|RR|ITQ|LSH)", factory))
    if not trained:
        return 0
    want = max(TRAIN_MIN, TRAIN_PER_LIST * max(lists, default=0))
    return min(n, TRAIN_MAX, want)


def vector_work_needed(config: IndexTypeConfig, catalog: "Catalog", dim: int) -> bool:
    """Whether a run with nothing new to index still has FAISS work: a rebuild asked for, another type asked for
    or chosen by auto at the catalog's size, other search settings, or no recall measured yet. Catalog only."""
    record = catalog.vector_index_record()
    if config.rebuild:
        return True
    if record is None:
        return config.index_type not in (None, AUTO, FLAT) or config.nprobe is not None or config.ef_search is not None \
            or bool(config.dba) \
            or wanted_factory(requested_type(config, None), flat_max(config, None), catalog.count(), dim,
                              requested_whitening(config, None)) != FLAT
    builder_wants = wanted_factory(requested_type(config, record), flat_max(config, record), catalog.count(), dim,
                                   requested_whitening(config, record))
    return (builder_wants != record["factory"] or requested_type(config, record) != record.get("requested")
            or requested_dba(config, record) != record.get("dba", 0)
            or requested_whitening(config, record) != recorded_whitening(record)
            or requested_params(config, record).to_json() != record.get("requested_search_params", {})
            or (has_recall_to_measure(record["factory"], bool(record.get("exact")), record.get("dba", 0))
                and record.get("recall") is None))


def has_recall_to_measure(factory: str, exact: bool, dba: int) -> bool:
    """Whether an index of this type has a recall against exact search to measure: an approximate type, or DBA's
    averaged vectors. A whitened Flat is exact in the whitened space (measured, it scored 0.998 only where ties
    between byte copies came out in another order)."""
    from retrieval.vectors.whitening import split_whitening

    return bool(dba) or not (exact or split_whitening(factory)[1] == FLAT)


def requested_type(config: IndexTypeConfig, record: dict | None) -> str:
    return config.index_type or (record or {}).get("requested") or AUTO


def flat_max(config: IndexTypeConfig, record: dict | None) -> int:
    return config.flat_max if config.flat_max is not None else (record or {}).get("flat_max", AUTO_FLAT_MAX)


def requested_params(config: IndexTypeConfig, record: dict | None) -> SearchParams:
    """The search settings asked for now, else those asked for before while the type asked for stays the same (an
    HNSW's efSearch means nothing to the IVF asked for next, whose nprobe is tuned anew)."""
    asked = SearchParams(config.nprobe, config.ef_search)
    if asked.to_json() or record is None or requested_type(config, record) != record.get("requested"):
        return asked
    return SearchParams.from_json(record.get("requested_search_params"))


def wanted_factory(requested: str, flat_max: int, n: int, dim: int, whitening: Whitening | None = None) -> str:
    """The type to build for n vectors: auto's choice, or the requested type once there are enough vectors to
    train it (exact Flat until then); with whitening, "PCAW{d},L2norm," in front and the type chosen for d
    dimensions, d as whitening.whitened_dim allows at n (no whitening while it allows none)."""
    from retrieval.vectors.whitening import whiten_prefix, whitened_dim

    if whitening is not None and whitening.on:
        d = whitened_dim(whitening.dim, n, dim)
        if d is not None:
            return whiten_prefix(d) + wanted_factory(requested, flat_max, n, d)
    chosen = auto_factory(n, dim, flat_max) if requested == AUTO else requested
    return chosen if n >= min_train_vectors(chosen) else FLAT   # (auto past a low --auto-flat-max: PQ needs 256)


def min_train_vectors(factory: str) -> int:
    """The fewest vectors this type can be trained on: one per IVF list, 2**nbits per PQ code book, d_out + 1 per
    PCA (centred, d_out vectors span only d_out - 1 directions: FAISS trains on them, but a whitening PCA then
    divides its last component by a zero eigenvalue, and every vector and query becomes NaN)."""
    need = [1]
    need += [int(k) for k in re.findall(r"IVF(\d+)", factory)]
    for m, bits in re.findall(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory):
        need.append(2 ** int(bits or 8))
    need += [256 for _ in re.findall(r"OPQ\d+", factory)]
    need += [int(k) + 1 for k in re.findall(r"PCA[RW]{0,2}(\d+)", factory)]   # PCA, PCAR, PCAW, PCAWR
    return max(need)


def build_empty(factory: str, dim: int) -> "faiss.Index":
    """An empty, untrained index for factory that takes catalog ids: IVF types take them natively, the others
    through IndexIDMap2 (whose id removal is only right for inner indexes that shift on removal). Raises
    IndexTypeError."""
    import faiss

    try:
        probe = faiss.index_factory(dim, factory)
    except RuntimeError as exc:
        raise IndexTypeError(f"FAISS cannot build index type {factory!r}: {_faiss_reason(exc)} (types are FAISS "
                             "factory strings, e.g. Flat, HNSW32, IVF1024,Flat, IVF1024,PQ64, or auto: see "
                             "docs/index-types.md)") from None
    if probe.metric_type != faiss.METRIC_L2 or any(isinstance(part, faiss.IndexLSH) for part in walk(probe)):
        # (LSH says L2 but ranks by the Hamming distance of binary codes)
        raise IndexTypeError(f"index type {factory!r} is not an L2 index; this project searches by L2 distance")
    index = probe if ivf_of(probe) is not None or factory.startswith("IDMap") else faiss.index_factory(dim, f"IDMap2,{factory}")
    for part in walk(index):
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                transform = faiss.downcast_VectorTransform(part.chain.at(i))
                if isinstance(transform, faiss.PCAMatrix):
                    transform.max_points_per_d = PCA_POINTS_PER_D
    return index


def check_factory(factory: str, dim: int) -> None:
    """Raise IndexTypeError when FAISS cannot build factory (without training it)."""
    if factory != AUTO:
        build_empty(factory, dim)


def seeded_samples(ids: np.ndarray, n_queries: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded samples of ids -> (held-out query ids, training ids), each sorted.

    Training takes from what the queries leave: recall is measured on vectors the index was not trained on."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_queries = min(n_queries, len(ids))
    queries = np.sort(ids[order[:n_queries]])
    rest = order[n_queries:]
    if len(rest) < n_train:      # a collection too small to hold both out: train on everything
        rest = order
    train = np.sort(ids[rest[:n_train]])
    return queries, train


def _faiss_reason(exc: BaseException) -> str:
    """A FAISS exception's message without its C++ function and location ("Error in <signature> at <file>:<line>: ")
    and the failed assertion before the words ("Error: '!(d % M == 0)' failed: ")."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    located = re.search(r"\bat \S+:\d+: (.*)$", text)
    reason = located.group(1) if located else text
    asserted = re.match(r"Error: '.*?' failed: (.*)$", reason)
    return (asserted.group(1) if asserted else reason).strip() or type(exc).__name__
