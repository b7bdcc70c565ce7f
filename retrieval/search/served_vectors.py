"""The FAISS side of an index snapshot (retrieval.search.index): the vectors a reader searches, and the regional
vectors beside them, brought up to date from the previous snapshot where the build is the same, else opened from the
folder's files (or built from the catalog where those are missing, another catalog's, or an earlier build)."""
from __future__ import annotations

from pathlib import Path

from retrieval.catalog import Catalog, IndexSettings
from retrieval.names import FAISS_FILE, REGIONS_FILE
from retrieval.search.snapshot import IndexSnapshot, network_key
from retrieval.vectors.regions import open_regions, reconcile_regions
from retrieval.vectors.vector_index import VectorIndex


def served_vectors(index_dir: Path, catalog: Catalog, settings: IndexSettings, record: dict | None,
                   previous: IndexSnapshot | None, signature: tuple | None, catalog_file: tuple, *,
                   mmap: bool) -> tuple[VectorIndex, VectorIndex | None]:
    """-> (the vectors to search, the regional vectors or None) for a snapshot of the index in index_dir, whose
    catalog records record; previous: the snapshot served until now (None at the start)."""
    from retrieval.vectors.builder import build_identity, outdated_build, rebuilt_from_catalog

    faiss_path = index_dir / FAISS_FILE
    on_server = catalog.path is None
    # a replica without the writer's FAISS file sees the same signature whatever the writer did: the recorded
    # build tells whether its own index can be brought up to date (new rows added) or must be built anew (the
    # writer changed the type, retrained its whitening, or averages its vectors with their neighbours' (DBA))
    reuse = on_server and previous is not None and previous.catalog_file == catalog_file \
        and previous.faiss_signature == signature and network_key(previous.settings) == network_key(settings) \
        and build_identity(previous.vector_record) == build_identity(record) and not (record or {}).get("dba")
    if reuse:
        # the same catalog, changed by a writer (whose FAISS file may be in another folder): bring a copy of
        # the served vectors up to date from the database, without reading every vector again
        vectors = previous.vectors.copy()
        vectors.reconcile(catalog)
    else:
        vectors, _ = VectorIndex.open_reconciled(
            faiss_path, catalog, settings.dim, factory=None, mmap=mmap, augmented=bool((record or {}).get("dba")),
            ignore_file=outdated_build(faiss_path, catalog, record),
            rebuild=lambda: rebuilt_from_catalog(catalog, faiss_path, settings.dim))
    regions = None
    if settings.regions and reuse and previous.regions is not None:   # as the main vectors above
        regions = previous.regions.copy()
        reconcile_regions(regions, catalog)
    elif settings.regions:   # the regions' file in step with the catalog and the vectors (rebuilt here if not)
        regions, _ = open_regions(index_dir / REGIONS_FILE, catalog, vectors)
    return vectors, regions
