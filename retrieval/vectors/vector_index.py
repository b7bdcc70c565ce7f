"""The FAISS vector index keyed by catalog row id (exact IndexFlatL2 or any factory type), saved atomically, opened mmapped."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np

from retrieval.catalog import Catalog
from retrieval.files import NotARegularFile, atomic_write, descriptor_digest, open_regular, private_copy
from retrieval.vectors.index_types import FLAT, build_empty
from retrieval.vectors.faiss_parts import (fit_precomputed_tables, is_exact, ivf_of, native_ids, stored_ids, structure,
                                          underfed_clusterings, walk)
from retrieval.vectors.exact_scan import SCAN_MAX_QUERIES, exact_scan
from retrieval.vectors.pca import train_front_pca

# ids -> their catalog vectors in chunks: what an index that cannot remove ids is rebuilt from
VectorSource = Callable[[Iterable[int]], Iterator[tuple[np.ndarray, np.ndarray]]]

log = logging.getLogger(__name__)


class VectorIndex:
    """L2 search over (id, vector) pairs. Not thread-safe for writes; searches may run concurrently.

    Exact IndexIDMap2 over IndexFlatL2 by default; any FAISS factory type otherwise (retrieval.vectors.index_types).
    A memory-mapped index (load(mmap=True)) is read-only: add and remove refuse it."""

    def __init__(self, dim: int, index: faiss.Index | None = None, *, factory: str = FLAT, mapped: bool = False,
                 vector_source: VectorSource | None = None):
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        assert self.index.d == dim, f"FAISS index has dimension {self.index.d}, expected {dim}"
        self.factory = factory              # the factory string it was built from ("Flat": exact)
        self.mapped = mapped                # memory-mapped from its file (read-only)
        self.vector_source = vector_source  # where an index that cannot remove ids is rebuilt from
        self.exact = is_exact(self.index)   # searched by exact_scan, FAISS's exact kernel over its storage

    @classmethod
    def empty(cls, dim: int, factory: str, vector_source: VectorSource | None = None) -> "VectorIndex":
        """An empty index of this type, untrained (see train). Raises index_types.IndexTypeError."""
        return cls(dim, build_empty(factory, dim), factory=factory, vector_source=vector_source)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train an untrained type on a sample; vectors shape=(n, dim) float32. A PCA in front (PCAW, PCAR) is trained
        first by retrieval.vectors.pca.train_pca (FAISS's result, only the components kept), the rest by FAISS."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        train_front_pca(self.index, vectors)
        if short := underfed_clusterings(self.index, len(vectors)):
            log.warning("training %s on %d vectors, fewer than its k-means want (%s): its clusters are rougher, and "
                        "recall is measured below", self.factory, len(vectors), "; ".join(short))
        self.index.train(vectors)
        drop_training_state(self.index)
        fit_precomputed_tables(self.index)   # searched as a process that opens the file searches it

    def ids(self) -> np.ndarray:
        """shape=(N,), dtype=int64; in insertion order for id-mapped types, list by list for IVF types."""
        return stored_ids(self.index)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids shape=(n,) int64; vectors shape=(n, dim) float32."""
        if len(ids) == 0:
            return
        self._writable()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape} do not match ({len(ids)}, {self.dim})"
        assert self.index.is_trained, f"the {self.factory} index must be trained before vectors are added"
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids) -> int:  # noqa: ANN001 - any int sequence
        """Remove ids; types FAISS cannot remove from (HNSW) are rebuilt from vector_source without them."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids) == 0:
            return 0
        self._writable()
        try:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        except RuntimeError:   # "remove_ids not implemented for this type of index"
            if self.vector_source is None:
                raise
        keep = np.setdiff1d(self.ids(), ids)
        removed = len(self) - len(keep)
        if removed:
            log.info("%s cannot remove ids: rebuilt without %d of them", self.factory, removed)
            fresh = _clone(self.index)   # trained, same parameters
            fresh.reset()
            self.index = fresh
            for chunk_ids, vecs in self.vector_source(keep):
                self.index.add_with_ids(np.ascontiguousarray(vecs, np.float32), chunk_ids)
        return removed

    def _writable(self) -> None:
        assert not self.mapped, "a memory-mapped index is read-only (FAISS would abort on a write)"

    def search(self, queries: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """queries shape=(q, dim) float32 -> (distances shape=(q, k') float32 L2 (not squared), ids shape=(q, k') int64).

        k' = min(k, len(self)); nearest first. Exact for Flat; approximate types answer id -1 (distance inf)
        where they found fewer than k' (searched with their nprobe / efSearch). threads: how many threads scan the vectors for a
        few queries (at most one per core), or FAISS's OpenMP threads for a large batch.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries must be (q, {self.dim}), got {queries.shape}"
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if not self.exact:
            faiss.omp_set_num_threads(max(1, threads))   # per calling thread
            sq, ids = self.index.search(queries, k)      # -1 where a probed part holds fewer than k
            return np.sqrt(np.maximum(sq, 0.0)), ids
        if len(queries) <= SCAN_MAX_QUERIES:
            sq, pos = exact_scan(faiss.downcast_index(self.index.index), self.dim, queries, k, threads)
            ids = self.ids()[pos]                      # k <= len(self): every position is a real row
        else:
            faiss.omp_set_num_threads(max(1, threads))   # per calling thread
            sq, ids = self.index.search(queries, k)
        return np.sqrt(np.maximum(sq, 0.0)), ids

    def save(self, path: Path) -> None:
        """Replace path whole (retrieval.files.atomic_write): readers see the old or the new file, never a part."""
        # through Python's file: any path works (FAISS's own takes UTF-8 names only)
        atomic_write(path, lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write)))

    @classmethod
    def load(cls, path: Path, dim: int, *, factory: str | None = FLAT, mmap: bool = False,
             vector_source: VectorSource | None = None, expected: ExpectedDigest | None = None) -> "VectorIndex | None":
        """The saved index, or None when it is missing, unreadable, of another shape or not as saved (it is a cache).

        factory: the type the catalog says the file holds; a file of another structure is ignored (rebuilt).
        None takes whatever type the file holds (a reader that must not rebuild; its factory is then "?").
        mmap: map a private copy of the file instead of reading it (read-only; see _read): IVF lists and flat
        codes stay in the page cache, evictable, and nothing done to the file can take them away.
        expected: the (size, digest) index-images recorded for the file (Catalog.faiss_digest); a file that differs
        from it (truncated or rewritten in place since) is ignored."""
        path = Path(path)
        try:
            index, mapped = _read(path, mmap, expected)
        except FileNotFoundError:
            return None
        except NotAsSaved as exc:
            log.warning("ignoring the FAISS file %s: it is not the one index-images recorded (%s: changed in place, or "
                        "a run stopped between saving and recording it?); "
                        "rebuilding from the catalog", path, exc)
            return None
        except RuntimeError as exc:
            if path.exists():
                log.warning("ignoring unreadable FAISS file %s (%s); rebuilding from the catalog", path, exc)
            return None
        if index.d != dim:
            log.warning("ignoring FAISS file %s of another dimension; rebuilding from the catalog", path)
            return None
        fit_precomputed_tables(index)   # read without them: only the small ones are built
        if not (native_ids(index) and ivf_of(index) is not None) and not isinstance(index, faiss.IndexIDMap2):
            log.warning("ignoring FAISS file %s: it holds no catalog ids; rebuilding from the catalog", path)
            return None
        if factory is None:
            return cls(dim, index, factory=FLAT if is_exact(index) else "?", mapped=mapped, vector_source=vector_source)
        try:
            expected = structure(build_empty(factory, dim))
        except ValueError:
            expected = None
        if structure(index) != expected:
            log.warning("ignoring FAISS file %s: it is not the %s index the catalog records; rebuilding", path, factory)
            return None
        return cls(dim, index, factory=factory, mapped=mapped, vector_source=vector_source)

    @classmethod
    def open_reconciled(cls, path: Path, catalog: Catalog, dim: int, *, factory: str | None = FLAT,
                        mmap: bool = False, augmented: bool = False, ignore_file: bool = False,
                        rebuild: Callable[[], "VectorIndex | None"] | None = None) -> tuple["VectorIndex", bool]:
        """Load the FAISS file and make it agree with the catalog (DESIGN invariant 1).

        Ids missing from FAISS are added from the catalog's vectors; ids no longer in the catalog are removed.
        A file that is missing, unreadable or not of type factory gives an empty Flat index: the caller
        (retrieval.vectors.builder) rebuilds the type from the catalog, or rebuild() gives that index here (a reader:
        builder.rebuilt_from_catalog; None: the empty Flat). With mmap, an index that needs
        changes is read into memory instead (a mapped one is read-only). augmented: the file holds averaged
        vectors (database-side augmentation), not the catalog's (so they are not compared). ignore_file: take the
        file as missing (known to hold another build than the catalog records).
        -> (index, changed) where changed says whether it differs from the file.
        """
        index = None if ignore_file else cls.load(path, dim, factory=factory, mmap=mmap, vector_source=catalog.vectors,
                                                  expected=catalog.faiss_digest)
        if index is not None and not augmented and not index.agrees_with(catalog):
            log.warning("the FAISS file %s holds other vectors than the catalog under the same ids (saved from "
                        "another catalog?); rebuilding it from the catalog", path)
            index = None
        changed = index is None or not Path(path).exists() or (factory is not None and index.factory != factory)
        if index is None and rebuild is not None:
            index = rebuild()
        index = index or cls(dim, vector_source=catalog.vectors)
        if index.mapped and not _in_step(index, catalog):
            index = cls.load(path, dim, factory=factory, vector_source=catalog.vectors) or cls(dim)
        return index, reconcile(index, catalog) or changed

    def agrees_with(self, catalog: Catalog, sample: int = 8) -> bool:
        """Whether a few ids spread over the index hold the catalog's vectors for them (a FAISS file of another
        catalog, whose ids were handed out again, does not). An exact index gives them back to compare; any other
        type (whitened, compressed) is searched with them: three in four must find their own id among their
        nearest (1 in 10 of the vectors, at most 10), where another catalog's file answers other images."""
        have = self.ids()
        if len(have) == 0:
            return True
        picked = np.unique(have[np.linspace(0, len(have) - 1, min(sample, len(have))).astype(int)])
        if not is_exact(self.index):
            k = max(1, min(10, len(have) // 10))
            found = asked = 0
            for ids, vecs in catalog.vectors(picked):
                _, got = self.search(vecs, k)
                found += sum(int(i) in row for i, row in zip(ids.tolist(), got.tolist()))
                asked += len(ids)
            return found >= 0.75 * asked
        for ids, vecs in catalog.vectors(picked):
            for i, vec in zip(ids.tolist(), vecs):
                try:
                    stored = self.index.reconstruct(int(i))
                except RuntimeError:   # a type that keeps no vectors to give back
                    return True
                if not np.allclose(stored, vec, atol=1e-5):
                    return False
        return True

    def copy(self) -> "VectorIndex":
        """An independent, writable copy in memory (searches of this one may go on while the copy is changed).

        A memory-mapped index is copied through its serialised bytes: faiss.clone_index of one keeps viewing the
        read-only mapping, and removing from that clone wrote into it (a server's worker died of SIGSEGV when it
        caught up with a removal)."""
        index = faiss.deserialize_index(faiss.serialize_index(self.index)) if self.mapped else _clone(self.index)
        return VectorIndex(self.dim, index, factory=self.factory, vector_source=self.vector_source)

    def reconcile(self, catalog: Catalog) -> bool:
        """Make the index agree with the catalog (module function reconcile). -> whether anything changed."""
        return reconcile(self, catalog)


def _clone(index: faiss.Index) -> faiss.Index:
    """A copy in memory: faiss.clone_index, or through the serialised bytes for what it cannot clone (an L2norm
    transform, as whitening has)."""
    try:
        return faiss.clone_index(index)
    except RuntimeError:   # "clone not supported for this type of VectorTransform"
        return faiss.deserialize_index(faiss.serialize_index(index))


def _in_step(index: VectorIndex, catalog: Catalog) -> bool:
    have, want = index.ids(), catalog.ids()
    return len(have) == len(want) and np.array_equal(np.sort(have), want)


def reconcile(index: VectorIndex, catalog: Catalog) -> bool:
    """Add the catalog's ids missing from index, remove those gone from the catalog. -> whether it changed."""
    have = index.ids()
    want = catalog.ids()
    stale = np.setdiff1d(have, want)
    missing = np.setdiff1d(want, have)
    if len(stale):
        index.remove(stale)
    added = 0
    if len(missing):
        for ids, vecs in catalog.vectors(missing):   # vectors failing their checksum are left out
            index.add(ids, vecs)
            added += len(ids)
    if len(stale) or added:
        log.info("reconciled FAISS with the catalog: %d added, %d removed", added, len(stale))
    return bool(len(stale) or added)


def drop_training_state(index: faiss.Index) -> None:
    """Free what only training needs: a PCAMatrix keeps its full d_in x d_in eigenvector matrix (64 MB at 4096-d,
    as much as a million PQ codes) though applying it needs only its d_out x d_in projection."""
    for part in walk(index):
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                transform = faiss.downcast_VectorTransform(part.chain.at(i))
                if isinstance(transform, faiss.PCAMatrix):
                    transform.PCAMat.resize(0)


class NotAsSaved(RuntimeError):
    """The FAISS file is not the one index-images last saved (its size or digest differ from the catalog's record)."""


# index-images records the digest of a FAISS file just after renaming it into place: a reader that finds another
# digest looks again for this long before it takes the file for damaged
DIGEST_WAIT_S = 5.0

# (size, sha256 of retrieval.files.sample_digest) of the FAISS file as last saved, or None (not recorded)
ExpectedDigest = Callable[[], "tuple[int, str] | None"]


def _verify(fd: int, path: Path, expected: ExpectedDigest | None) -> None:
    """Raise NotAsSaved when the file open as fd is not the one the catalog records for path."""
    if expected is None or (want := expected()) is None:
        return
    have = descriptor_digest(fd)
    deadline = time.monotonic() + DIGEST_WAIT_S
    while tuple(want) != have:
        if want is None:
            return
        if time.monotonic() > deadline:
            raise NotAsSaved(f"{have[0]} bytes, {want[0]} when index-images saved it; or another digest")
        time.sleep(0.25)
        want = expected()


def _read(path: Path, mmap: bool, expected: ExpectedDigest | None = None) -> tuple[faiss.Index, bool]:
    """-> (index, memory-mapped), IVFPQ precomputed tables not built (see fit_precomputed_tables). Raises
    FileNotFoundError, RuntimeError (unreadable), NotAsSaved (expected: the file is not the one last saved).

    mmap maps a private copy of the file (retrieval.files.private_copy), never the file itself: index-images
    replaces it whole, but a file truncated or rewritten in place under a mapping of it would kill the process at its
    next search (SIGBUS). The copy goes next to the file, else into the temporary folder; where neither takes it, the
    index is read into memory (not mapped). The copy is what is verified against expected, so what is served is
    what was verified."""
    flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    try:
        copy = private_copy(path, (path.parent, None)) if mmap else None
    except NotARegularFile as exc:
        raise RuntimeError(str(exc)) from exc
    if copy is None:
        if mmap:
            log.warning("no room for a private copy of %s next to it or in the temporary folder: read into memory",
                        path)
        with open_regular(path) as f:   # through Python's file: a short read, never a signal, if it is truncated
            _verify(f.fileno(), path, expected)
            return faiss.read_index(faiss.PyCallbackIOReader(f.read), flags), False
    with copy:
        _verify(copy.fileno(), path, expected)
        if not os.path.isdir("/proc/self/fd"):   # no /proc mounted: nothing to give FAISS a name by
            return faiss.read_index(faiss.PyCallbackIOReader(copy.read), flags), False
        # FAISS maps a file by name: the copy has none but its descriptor's (always UTF-8); its mapping outlives it
        return faiss.read_index(f"/proc/self/fd/{copy.fileno()}",
                                flags | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY), True
