"""A built FAISS index, part by part: what it is made of (walk, structure, is_exact), the ids it holds, its search
parameters (nprobe, efSearch: SearchParams), set and tuned, and the IVFPQ precomputed tables it may keep."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:   # FAISS is imported by the functions that inspect an index
    import faiss

log = logging.getLogger(__name__)

NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512)
# An IVFPQ index (by residual, L2) can keep a precomputed table of nlist x M x ksub floats that spares a query
# computing a distance table per probed list; FAISS builds it when the file is read, up to 2 GB. At 1M
# vectors auto's IVF4096,PQ64 makes it 268 MB, more than the index file (77 MB). Larger tables are not
# built: searches then compute each probed list's table, with the same results (to float rounding); at 1M,
# nprobe 4, one query 0.665 ms against 0.645 with the table (docs/benchmarks.md, "Search at scale").
PRECOMPUTED_TABLE_MAX_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """Search-time knobs of approximate indexes; None leaves the index's own value."""
    nprobe: int | None = None
    ef_search: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, text: str | dict | None) -> "SearchParams":
        data = json.loads(text) if isinstance(text, str) else (text or {})
        return cls(**{k: data.get(k) for k in ("nprobe", "ef_search")})

    def used_by(self, index: "faiss.Index") -> "SearchParams":
        """These values that index has a use for: nprobe for an inverted file, efSearch for HNSW (an --ef-search
        given for an HNSW, kept for it, is no setting of the IVF built now: its nprobe is tuned as if none were)."""
        return SearchParams(self.nprobe if ivf_of(index) is not None else None,
                            self.ef_search if hnsw_of(index) is not None else None)

    def over(self, other: "SearchParams") -> "SearchParams":
        """These values where set, else other's."""
        return SearchParams(self.nprobe if self.nprobe is not None else other.nprobe,
                            self.ef_search if self.ef_search is not None else other.ef_search)


def structure(index: "faiss.Index") -> str:
    """What an index is made of (classes, dimensions, list counts, code sizes): equal for a FAISS file and a
    fresh build_empty of the factory string that made it."""
    import faiss

    parts = []
    for part in walk(index):
        fields = [type(part).__name__.replace("IndexFlatL2", "IndexFlat"), f"d={part.d}"]
        for name in ("nlist", "code_size"):
            if hasattr(part, name):
                fields.append(f"{name}={getattr(part, name)}")
        if isinstance(part, faiss.IndexHNSW):
            fields.append(f"M={part.hnsw.nb_neighbors(1)}")
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                vt = part.chain.at(i)
                fields.append(f"{type(faiss.downcast_VectorTransform(vt)).__name__}({vt.d_in}->{vt.d_out})")
        parts.append(" ".join(fields))
    return " / ".join(parts)


def walk(index: "faiss.Index") -> Iterator["faiss.Index"]:
    """The index and the indexes inside it (IDMap, pre-transform, HNSW storage, IVF quantizer left out), outermost first."""
    import faiss

    seen = 0
    while index is not None and seen < 8:
        index = faiss.downcast_index(index)
        yield index
        seen += 1
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            index = index.index
        elif isinstance(index, faiss.IndexHNSW):
            index = index.storage
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        else:
            index = None


def is_exact(index: "faiss.Index") -> bool:
    """Whether searches are exact: IndexFlatL2 behind the id map (recall is 1 by construction)."""
    import faiss

    parts = list(walk(index))
    return (len(parts) == 2 and isinstance(parts[0], faiss.IndexIDMap2) and isinstance(parts[1], faiss.IndexFlat)
            and parts[1].metric_type == faiss.METRIC_L2)


def underfed_clusterings(index: "faiss.Index", n: int) -> list[str]:
    """The k-means of index (IVF's coarse lists, PQ's codebooks) that n training vectors leave short of FAISS's
    minimum per centroid, each in words; their minimum is lowered to what n gives, so FAISS does not print its own
    warning for each (65 lines for IVF256,PQ64 on 2,000 vectors). The caller says it once."""
    import faiss

    short = []
    clusterings = []
    ivf = ivf_of(index)
    if ivf is not None:
        clusterings.append((f"{ivf.nlist} lists", ivf.cp, ivf.nlist))
    for part in walk(index):
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            clusterings.append((f"{pq.M} codebooks of {pq.ksub}", pq.cp, pq.ksub))
    for name, cp, k in clusterings:
        if n < k * cp.min_points_per_centroid:
            short.append(f"{name} want {k * cp.min_points_per_centroid:,}")
            cp.min_points_per_centroid = max(1, n // k)
    return short


def ivf_of(index: "faiss.Index") -> "faiss.IndexIVF | None":
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: "faiss.Index") -> "faiss.IndexHNSW | None":
    import faiss

    return next((p for p in walk(index) if isinstance(p, faiss.IndexHNSW)), None)


def apply_search_params(index: "faiss.Index", params: SearchParams) -> None:
    """Set nprobe / efSearch on the index (once, before searches run: FAISS reads them at each search)."""
    ivf = ivf_of(index)
    if ivf is not None and params.nprobe is not None:
        if params.nprobe > ivf.nlist:   # (--nprobe 64 on IVF16: it was clamped without a word)
            log.warning("nprobe %d is more than the index's %d lists: all %d are searched", params.nprobe, ivf.nlist,
                        ivf.nlist)
        ivf.nprobe = int(min(params.nprobe, ivf.nlist))
    hnsw = hnsw_of(index)
    if hnsw is not None and params.ef_search is not None:
        hnsw.hnsw.efSearch = int(params.ef_search)


def precomputed_table_bytes(ivfpq: "faiss.IndexIVFPQ") -> int:
    """The size of the table IndexIVFPQ.precompute_table builds: nlist x M x ksub floats (0 where it builds none)."""
    import faiss

    if not ivfpq.by_residual or ivfpq.metric_type != faiss.METRIC_L2:
        return 0
    return int(ivfpq.nlist) * int(ivfpq.pq.M) * int(ivfpq.pq.ksub) * 4


def fit_precomputed_tables(index: "faiss.Index", max_bytes: int | None = None) -> None:
    """Keep IVFPQ precomputed tables only up to max_bytes (None: PRECOMPUTED_TABLE_MAX_BYTES): larger ones are
    freed and never built again (FAISS then computes each probed list's table at search time); smaller ones are
    built where missing (a file read with IO_FLAG_SKIP_PRECOMPUTE_TABLE). Call once, before searches run."""
    import faiss

    max_bytes = PRECOMPUTED_TABLE_MAX_BYTES if max_bytes is None else max_bytes
    for part in walk(index):
        if not isinstance(part, faiss.IndexIVFPQ) or not part.is_trained:
            continue
        size = precomputed_table_bytes(part)
        if size > max_bytes:
            part.use_precomputed_table = -1     # FAISS: "force disable"; precompute_table() then frees the table
            part.precompute_table()
        elif size and part.precomputed_table.size() == 0:
            part.use_precomputed_table = 0      # FAISS decides (it builds tables up to 2 GB)
            part.precompute_table()


def search_params_of(index: "faiss.Index") -> SearchParams:
    """The index's current nprobe / efSearch (None for types without them)."""
    ivf = ivf_of(index)
    hnsw = hnsw_of(index)
    return SearchParams(int(ivf.nprobe) if ivf is not None else None,
                        int(hnsw.hnsw.efSearch) if hnsw is not None else None)


def tuning_ladder(index: "faiss.Index") -> list[SearchParams]:
    """Search settings to try in order, cheapest first, for auto-tuning (empty for types without any)."""
    ivf = ivf_of(index)
    if ivf is not None:
        return [SearchParams(nprobe=p) for p in NPROBE_LADDER if p <= ivf.nlist]
    if hnsw_of(index) is not None:
        return [SearchParams(ef_search=e) for e in EF_SEARCH_LADDER]
    return []


def native_ids(index: "faiss.Index") -> bool:
    """Whether the index keeps catalog ids itself (IVF types) rather than through an IndexIDMap2."""
    import faiss

    return not isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def stored_ids(index: "faiss.Index") -> np.ndarray:
    """All ids an index holds, shape=(N,), int64: the id map's in insertion order, an IVF's list by list."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(top.id_map).astype(np.int64, copy=False)
    ivf = ivf_of(index)
    assert ivf is not None, f"an index without ids: {structure(index)}"
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            ptr = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64, copy=True))
            invlists.release_ids(list_no, ptr)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
