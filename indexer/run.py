"""index-images as a whole: lock the index, choose its settings, plan, then run the stages here or on Ray."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from retrieval.names import FAISS_FILE, REGIONS_FILE
from retrieval.vectors.index_types import vector_work_needed
from retrieval.vectors.regions import regions_file_in_step

from retrieval.catalog import CATALOG_FILE, Catalog, mask_url
from retrieval.features.weights import file_weights_identity
from retrieval.files import leftover_temporaries, sample_digest
from retrieval.images.scan import IMAGE_EXTENSIONS
from retrieval.system import display_name

from indexer.config import (ConfigError, JobConfig, RunReport, describe_network, finish_report, holds_indexed_images,
                            resolve_settings)
from indexer.local import run_local
from indexer.locks import writer_locks
from indexer.network import check_weights_file, record_training_images, restore_random_weights
from indexer.plan import Plan, plan, record_refused, removals
from indexer.write import maintain_vectors

if TYPE_CHECKING:
    from retrieval.catalog import IndexSettings
    from retrieval.features.backbones import FeatureExtractor

__all__ = ["ConfigError", "JobConfig", "RunReport", "run_index"]

# The stages, in the order a run goes through them:
#   plan     indexer/plan.py: scan the folder, diff it against the catalog; torch-free, so an unchanged folder
#            re-indexes without importing torch, FAISS or the network.
#   read     indexer/read.py: files decoded to uint8 crops (read_files), in worker processes (Reader).
#   extract  indexer/extract.py: the network over uint8 batches (BatchExtractor), loaded by indexer/network.py.
#   write    indexer/write.py (Writer): the one writer; one catalog transaction per batch, then the FAISS index.
# run_index (here) plans, then indexer/local.py wires them in this process; indexer/ray_job.py wires read and extract into Ray Data on a
# cluster and keeps plan and write on the driver.


def run_index(cfg: JobConfig, on_extractor: Callable[[FeatureExtractor], None] | None = None,
              on_cluster: Callable[[str], None] | None = None) -> RunReport:
    """Bring the index in cfg.index_dir up to date with cfg.data_dir. Raises ConfigError for user errors.

    Plans first (scan the folder, diff it against the catalog): when there is nothing to do and the
    FAISS file is in step with the catalog, the run ends there, without loading torch, FAISS or the network.
    With cfg.ray set, the read and extract stages run on a Ray cluster (on_cluster gets a line that
    describes it); plan and write stay here.
    """
    started = time.perf_counter()
    data_dir, index_dir = cfg.data_dir, cfg.index_dir
    if not data_dir.is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist or is not a folder")
    _check_index_folder(data_dir, index_dir)
    if cfg.ray is not None:
        from indexer.ray_job import probe_cluster, require_ray
        require_ray()     # before anything else: without Ray, say how to get it
        if address := cfg.ray or os.environ.get("RAY_ADDRESS", ""):
            probe_cluster(address)   # and a cluster that does not answer, at once (ray.init retries for minutes)
    fresh, locked = not index_dir.exists(), False
    try:
        with writer_locks(index_dir, cfg.db_url) as catalog:
            locked = True   # (a run that found the folder locked made none of it: another run's first files)
            stored = catalog.settings()
            imported = None
            if cfg.import_sqlite:
                imported = _import_sqlite(cfg, catalog, stored)
                stored = catalog.settings()
            elif stored is None and catalog.path is None:
                _refuse_sqlite_index_beside(index_dir, cfg.db_url)
            repairs = list(filter(None, [_remove_leftovers(index_dir),
                                         None if stored is None else restore_random_weights(index_dir, stored)]))
            report = _run(cfg, catalog, started, on_extractor, on_cluster)
            report.repairs[:0] = repairs
            if imported is not None:
                report.repairs.insert(0, imported)
            report.network = describe_network(catalog.settings())
            if catalog.bad_vectors:   # vectors that failed their checksum were left out of FAISS: extract them again
                paths = catalog.mark_for_extraction(sorted(catalog.bad_vectors))
                report.repairs.append(f"{len(paths)} vector(s) in the catalog fail their checksum (damaged), left out "
                                      "of the FAISS index: marked to be extracted again; run the same command again")
            return report
    except ConfigError:
        if fresh and locked:   # refused before any work: no half-made index folder (a later open would call it one)
            _discard_unused(index_dir)
        raise


def _import_sqlite(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None) -> str:
    """--import-sqlite: copy the index folder's SQLite catalog into the empty database (retrieval.catalog.transfer),
    then set catalog.db aside as catalog.db.imported (a run without --db-url would have updated it, apart from the
    database, and rewritten the FAISS file both share). -> the line the summary says it in. Raises ConfigError."""
    from retrieval.catalog.transfer import SourceUnreadable, copy_catalog
    from retrieval.system import progress_bar

    index_dir, sqlite = cfg.index_dir, cfg.index_dir / CATALOG_FILE
    if catalog.path is not None:
        raise ConfigError("--import-sqlite copies an index folder's SQLite catalog into a database server: give "
                          "--db-url postgresql://...")
    if stored is not None:
        raise ConfigError(f"{mask_url(cfg.db_url)} already holds an index: --import-sqlite fills an empty database "
                          "only (create another, or leave out --import-sqlite)")
    if not sqlite.is_file():
        raise ConfigError(f"--import-sqlite: {index_dir} holds no SQLite catalog ({CATALOG_FILE}) to import")
    # opened as a run of this version opens it: an older catalog gets the tables and columns it lacks (and the record
    # of an index older than the FAISS record: raw exact search, as it had), so every table the copy reads is there
    with contextlib.closing(Catalog(index_dir, create=True)) as source:
        settings = source.settings()
        if settings is None:
            raise ConfigError(f"--import-sqlite: {sqlite} holds no index (no settings)")
        if settings.data_dir != str(cfg.data_dir) and os.path.realpath(settings.data_dir) != str(cfg.data_dir):
            raise ConfigError(f"--import-sqlite: {sqlite} is the index of {settings.data_dir}, not of {cfg.data_dir}")
        total = len(source.ids())
        with progress_bar(cfg.progress, "importing", total) as bar:
            try:
                images = copy_catalog(source, catalog, progress=bar.update)
            except SourceUnreadable as exc:   # (not the database server's failure: running again cannot help)
                raise ConfigError(f"--import-sqlite: {exc}; nothing was imported") from exc
    for suffix in ("", "-wal", "-shm"):   # (the -wal holds nothing now: the source was closed cleanly)
        part = index_dir / (CATALOG_FILE + suffix)
        if part.exists():
            part.rename(index_dir / (CATALOG_FILE + ".imported" + suffix))
    return (f"imported {images:,} images from {CATALOG_FILE} into {mask_url(cfg.db_url)} (no image extracted "
            f"again); {CATALOG_FILE} is kept as {CATALOG_FILE}.imported: remove it once this index serves you")


def _refuse_sqlite_index_beside(index_dir: Path, db_url: str) -> None:
    """An empty catalog database asked for (--db-url) in an index folder that holds an index of its own (catalog.db):
    the run would have extracted every image again into the database, replacing the folder's FAISS file, its SQLite
    catalog left beside it, without a word. Raises ConfigError."""
    sqlite = index_dir / CATALOG_FILE
    if not sqlite.is_file():
        return
    try:
        with contextlib.closing(Catalog(index_dir)) as old:
            images = len(old.ids())
    except Exception:  # noqa: BLE001 - an unreadable catalog.db is no index to protect
        return
    if images:
        raise ConfigError(
            f"{index_dir} holds an index of {images:,} images in its own SQLite catalog ({CATALOG_FILE}), and "
            f"{mask_url(db_url)} is an empty database: a run would extract every image again into the database "
            "(and replace this folder's FAISS file). To carry this index over without extracting anything, run again "
            "with --import-sqlite; else give the PostgreSQL index a folder of its own (--index-dir), or leave out "
            "--db-url to go on with this one")


def _run(cfg: JobConfig, catalog: Catalog, started: float, on_extractor: Callable[[FeatureExtractor], None] | None,
         on_cluster: Callable[[str], None] | None) -> RunReport:
    """run_index's work under the writer locks."""
    index_dir = cfg.index_dir
    stored = catalog.settings()
    chosen = resolve_settings(cfg, stored, functools.partial(holds_indexed_images, catalog))
    moved_dir = chosen.pop("moved_data_dir", None)   # its data folder, moved (--data-moved): followed once planned
    moved_weights = None
    if (moved := chosen.pop("moved_weights", None)) is not None:   # its weights file, moved: the index follows it
        moved_weights = f"the weights file moved: {display_name(stored.weights)} -> {display_name(moved)}; the index " \
                        "loads it from there now"
        before = stored.weights_identity
        stored = dataclasses.replace(stored, weights=moved,
                                     weights_identity=file_weights_identity(Path(moved), stored.weights_sha256))
        catalog.save_settings(stored)
        # the same bytes: what was recorded of their training images still holds (the history may not have moved)
        if (known := catalog.training_record()) is not None and known["weights_identity"] == before:
            catalog.save_training_record({**known, "weights_identity": stored.weights_identity})
        catalog.touch()   # servers load the index again, its network from the new place
        chosen["weights"] = stored.weights_choice
    if stored is not None:   # the images its weights were fine-tuned on, if not known yet (no network needed)
        check_weights_file(index_dir, stored)
        record_training_images(catalog, stored.weights_choice, stored.weights_identity)
    if chosen["weights"].is_file and cfg.vector_index.whiten is None and catalog.vector_index_record() is None:
        # a new index of a weights file (fine-tune's output; new until its FAISS side is first recorded, a first run
        # killed before that included) searches fc7 as the fine-tune shaped it and chose its epoch in: whitened, its held-out mAP fell from 0.74-0.77 to 0.57-0.59 (benchmarks/bench_finetune_whitening.py)
        cfg = dataclasses.replace(cfg, vector_index=dataclasses.replace(cfg.vector_index, whiten=False))
    planned = plan(cfg, catalog)
    if planned.unlisted_root is not None:
        raise ConfigError(f"the data folder {display_name(str(cfg.data_dir))} {planned.unlisted_root}: nothing was "
                          "changed; run index-images as a user who may read it")
    moved_data = None
    if moved_dir is not None:   # the index follows its moved data folder
        moved_data = f"the data folder moved: {display_name(stored.data_dir)} -> {display_name(moved_dir)}; the " \
                     "index reads its images from there now"
        stored = dataclasses.replace(stored, data_dir=moved_dir)
        catalog.save_settings(stored)
        catalog.touch()   # servers load the index again, its images from the new place
    catalog.restamp((f.path, f.size, f.mtime_ns) for f in planned.restamp)   # touched, same bytes: kept as they are
    catalog.move((old, f.path, f.label) for old, f in planned.moves)          # moved, same bytes: new path and label
    removals_planned = removals(planned, catalog) if cfg.list_changes else []   # (before the run takes them out)
    report = _run_planned(cfg, catalog, stored, chosen, planned, started, on_extractor, on_cluster)
    report.repairs.extend(filter(None, [moved_data, moved_weights]))
    report.moved = len(planned.moves)
    if cfg.list_changes:
        report.changes = _changes(planned, removals_planned, report)
    report.folders = [{"path": display_name(path), "reason": reason} for path, reason in planned.folders.items()]
    report.restamped = len(planned.restamp)
    report.unreadable_formats = planned.unreadable_formats
    return report


def _changes(planned: Plan, removed: list[str], report: RunReport) -> dict:
    """What the run changed, path by path (index-images --list-changes): files added and changed (those it could not
    decode are among the skipped instead), moved or renamed ([old, new]), and removed from the index (gone from the
    folder, or refused now; a changed file that can no longer be read is removed too)."""
    skipped = {s["path"] for s in report.skipped}
    kept = [f.path for f in planned.todo if f.path not in skipped]
    return {"added": [p for p in kept if p not in planned.was_indexed],
            "changed": [p for p in kept if p in planned.was_indexed],
            "moved": [[old, f.path] for old, f in planned.moves],
            "removed": removed + [p for p in planned.was_indexed if p in skipped]}


def _run_planned(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict, planned: Plan,
                 started: float, on_extractor: Callable[[FeatureExtractor], None] | None,
                 on_cluster: Callable[[str], None] | None) -> RunReport:
    """_run's work once the folder is planned."""
    index_dir = cfg.index_dir
    if stored is not None and not planned.found and (indexed := catalog.count()):
        raise ConfigError(f"the data folder {display_name(str(cfg.data_dir))} holds no image files now, but the index has "
                          f"{indexed}: nothing was removed (a drive or network share not mounted?). Run it again once "
                          f"they are back; to empty the index, delete its folder {display_name(str(index_dir))}")
    if stored is not None and not planned.todo and not removals(planned, catalog):
        record_refused(planned, catalog)
        report = RunReport(unchanged=planned.unchanged, vector_index=catalog.vector_index_record())
        damaged = faiss_file_damaged(index_dir / FAISS_FILE, catalog)
        # after moves the FAISS file is saved again (the same vectors): a server loads a new version, new labels and all
        if not damaged and not planned.moves and (index_dir / FAISS_FILE).exists() and catalog.vectors_in_step() \
                and (not stored.regions or regions_file_in_step(index_dir / REGIONS_FILE, report.vector_index)) \
                and not vector_work_needed(cfg.vector_index, catalog, stored.dim):
            return finish_report(report, catalog, catalog.count(), started)
        # FAISS work only (rebuild, another type, new search settings): from the catalog, no network
        work = cfg
        if damaged:   # DESIGN invariant 1: the FAISS file is derived; a damaged one is rebuilt from the catalog
            work = dataclasses.replace(cfg, vector_index=dataclasses.replace(cfg.vector_index, rebuild=True))
        report.vector_index, total = maintain_vectors(work, catalog, stored.dim)
        if damaged:
            report.repairs.append(f"{damaged}: rebuilt from the catalog")
        return finish_report(report, catalog, total, started)
    if cfg.ray is not None:
        from indexer.ray_job import run_on_ray
        return run_on_ray(cfg, catalog, stored, chosen, planned, started, on_cluster)
    return run_local(cfg, catalog, stored, chosen, planned, started, on_extractor)


def _discard_unused(index_dir: Path) -> None:
    """Remove the index folder a first run made before it stopped on its configuration (ImageNet weights offline, a
    device missing): an empty catalog and a lock file, nothing a user made. Anything else there keeps the folder."""
    from indexer.locks import LOCK_FILE
    from retrieval.catalog import CATALOG_FILE

    made = {LOCK_FILE, CATALOG_FILE, f"{CATALOG_FILE}-wal", f"{CATALOG_FILE}-shm", f"{CATALOG_FILE}-journal"}
    try:
        if {p.name for p in index_dir.iterdir()} <= made and not _has_images(index_dir / CATALOG_FILE):
            for name in made:
                (index_dir / name).unlink(missing_ok=True)
            index_dir.rmdir()
    except OSError:
        pass   # left as it is: the next run opens it like any empty index


def _has_images(catalog_file: Path) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    if not catalog_file.exists():
        return False
    try:
        with contextlib.closing(Catalog(catalog_file.parent)) as catalog:
            return catalog.count() > 0
    except SQLAlchemyError:
        return True   # not a catalog this run made: keep it


def _remove_leftovers(index_dir: Path) -> str | None:
    """Remove the temporary files an index-images run killed mid-write left in the index folder (a half-written
    weights file is hundreds of MB); under the writer lock, no other writer's. -> the repair, in words, or None."""
    removed, freed = [], 0
    for path in leftover_temporaries(index_dir):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path.name)
        freed += size
    if not removed:
        return None
    return (f"removed {len(removed)} temporary file(s) an interrupted run left ({', '.join(removed[:3])}"
            f"{', ...' if len(removed) > 3 else ''}): {freed / 2**20:,.1f} MB freed")


def _check_index_folder(data_dir: Path, index_dir: Path) -> None:
    """Refuse an index folder that is the data folder, or one inside it that holds images: a folder holding an
    index is never scanned (retrieval.images.scan), so its images would silently leave the index (a typo:
    --index-dir data/cats)."""
    data, index = data_dir.resolve(), index_dir.resolve()
    if index == data:
        raise ConfigError(f"the index folder is the data folder {display_name(str(data_dir))}: its files would lie among "
                          "the images; pass another --index-dir (the default is index, in the working folder)")
    if data not in index.parents or not index.is_dir():
        return
    try:
        images = sorted(e.name for e in os.scandir(index) if not e.name.startswith(".")
                        and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and e.is_file())
    except OSError:
        return
    if images:
        raise ConfigError(f"the index folder {display_name(str(index_dir))} is inside the data folder and holds "
                          f"{len(images)} image(s) ({display_name(images[0])}{', ...' if len(images) > 1 else ''}): "
                          "a folder that holds an index is not scanned, so they would be left out; pass another "
                          "--index-dir, outside the data folder or in a folder of its own")


def faiss_file_damaged(path: Path, catalog: Catalog) -> str | None:
    """How the FAISS file is no longer the one last saved (truncated, garbled, unreadable), in words, told by its
    recorded size and digest without FAISS (retrieval.files.sample_digest); None when it is, none is recorded (saved
    before digests were) or the file is missing (rebuilt anyway)."""
    recorded = catalog.faiss_digest()
    if recorded is None:
        return None
    try:
        if sample_digest(path) == recorded:
            return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"the FAISS file could not be read ({exc.strerror or exc})"
    return ("the FAISS file was not the one last recorded (damaged, replaced, or a run stopped between saving it and "
            "recording it)")
