"""The indexing job as four stages: plan (scan + diff), read (decode), extract (the network), write (the one writer)."""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from retrieval.catalog.catalog import CATALOG_FILE, Catalog, CatalogBusy, CatalogUnavailable, IndexSettings, catalog_sqlite_file
from retrieval.features.digests import hash_ahead
from retrieval.images.decode import DEFAULT_MAX_PIXELS, Preprocessing
from retrieval.vectors.index_types import IndexTypeConfig, IndexTypeError, vector_work_needed
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES, ImageFile, scan_folder
from retrieval.names import DEFAULT_RANDOM_SEED, FAISS_FILE, random_weights_file
from retrieval.system import available_cores, collector_paused, display_name, gpu_present

from indexer.read import Reader
from indexer.stage_thread import StageThread

if TYPE_CHECKING:   # torch, torchvision and FAISS are imported only when there is work for the network
    from retrieval.features.backbones import FeatureExtractor

# The stages, in the order a run goes through them:
#   plan     plan() here: scan the folder, diff it against the catalog; torch-free, so an unchanged folder
#            re-indexes without importing torch, FAISS or the network.
#   read     indexer/read.py: files decoded to uint8 crops (read_files), in worker processes (Reader).
#   extract  indexer/extract.py: the network over uint8 batches (BatchExtractor), loaded by load_network() here.
#   write    Writer here: the one writer; one catalog transaction per batch, then the FAISS index.
# run_index wires them in this process; indexer/ray_job.py wires read and extract into Ray Data on a
# cluster and keeps plan and write on the driver.

log = logging.getLogger(__name__)

DEFAULTS = {"model": "alexnet", "layer": "fc7", "weights": "imagenet", "normalize": True}
LOCK_FILE = ".lock"
MAX_WORKERS_CPU = 8    # decoding processes by default when the network runs on the CPU
MAX_WORKERS_GPU = 32   # ... and on a GPU: a fast one needs every core decoding (an H200 takes 8,000 images/s)


class ConfigError(Exception):
    """A usage or configuration problem the user can fix (exit status 2)."""


@dataclasses.dataclass
class JobConfig:
    data_dir: Path
    index_dir: Path
    db_url: str | None = None         # the catalog's SQLAlchemy URL; None: SQLite in index_dir (catalog.db)
    model: str | None = None          # None: as recorded in the index, else DEFAULTS
    layer: str | None = None
    weights: str | None = None        # "imagenet", "random" or a state dict path
    normalize: bool | None = None     # L2-normalise vectors
    seed: int | None = None           # for --weights random; None: DEFAULT_RANDOM_SEED, or the index's
    device: str = "auto"
    precision: str = "auto"           # the network's arithmetic: fp32, bf16 (CUDA), auto: bf16 on CUDA, else fp32
    decode: str = "auto"              # JPEGs decoded by the "workers" (Pillow) or on the network's "device"
                                      # (torchvision; nvJPEG on CUDA); auto: both, see device_share()
    batch_size: int | str = "auto"    # images per forward pass (and per catalog transaction); "auto": from free GPU memory, 32 on CPU
    workers: int | None = None        # decoding processes; None: default_workers(device)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES   # larger files are skipped unread; None: no limit
    save_every_s: float = 30.0        # also save the FAISS file this often during long runs
    progress: bool = True
    ray: str | None = None            # None: this process; "": a new local Ray cluster (or $RAY_ADDRESS);
                                      # else the address of a running cluster ("auto", "HOST:PORT", "ray://...")
    vector_index: IndexTypeConfig = dataclasses.field(default_factory=IndexTypeConfig)   # FAISS type, training, recall

    def __post_init__(self) -> None:
        # Absolute once, here where the paths enter: nothing deeper depends on the working directory.
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.index_dir = Path(self.index_dir).expanduser().resolve()


@dataclasses.dataclass
class RunReport:
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)   # [{"path", "reason"}], all files not indexed
    total: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    vector_index: dict | None = None   # the FAISS type, training, search settings and recall (index_builder.describe)
    extraction: dict | None = None     # device, precision, decoding and batch size of this run, and where its time went

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run has to do, from the folder scan and the catalog."""
    todo: list[ImageFile]                 # new or changed
    remove: list[str]                     # paths gone from the folder
    refused: dict[str, str]               # found but refused before decoding (path -> reason)
    unchanged: int


def plan_run(scan_images: list[ImageFile], refused: dict[str, str], catalog: Catalog) -> Plan:
    known = catalog.file_states()
    known_skipped = catalog.skipped_states()
    present = {f.path for f in scan_images} | set(refused)
    todo, unchanged = [], 0
    for f in scan_images:
        state = known.get(f.path)
        if state is not None and state[1:] == (f.size, f.mtime_ns):
            unchanged += 1
            continue
        skipped = known_skipped.get(f.path)
        if state is None and skipped is not None and skipped[:2] == (f.size, f.mtime_ns):
            continue  # still the same bad file: no need to decode it again
        todo.append(f)
    remove = sorted((set(known) | set(known_skipped)) - present)
    return Plan(todo, remove, refused, unchanged)


# --- the job --------------------------------------------------------------------------------------

_held_locks: set[Path] = set()          # index folders this process holds (POSIX locks do not exclude their owner)
_held_locks_guard = threading.Lock()


@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index folder at a time.

    A POSIX record lock (fcntl.lockf) belongs to the process that took it: forked decoding workers do
    not inherit it, and it goes away the moment that process dies, kill -9 included, so a re-run can
    start at once. (flock's lock belongs to the open file, which forked children share.)
    """
    index_dir = Path(index_dir).resolve()
    index_dir.mkdir(parents=True, exist_ok=True)
    busy = ConfigError(f"another index-images run is updating {index_dir}; wait for it to finish")
    with _held_locks_guard:
        if index_dir in _held_locks:
            raise busy
        _held_locks.add(index_dir)
    try:
        with open(index_dir / LOCK_FILE, "a+") as fh:
            try:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:   # EACCES or EAGAIN: held by another process
                raise busy from None
            yield
    finally:
        with _held_locks_guard:
            _held_locks.discard(index_dir)


@contextmanager
def writer_locks(index_dir: Path, db_url: str | None) -> Iterator[Catalog]:
    """The one writer's locks, then its catalog (created if new). Raises ConfigError when another run holds one.

    The index folder's lock file always (its FAISS file); for an SQLite catalog elsewhere, the lock file of
    the folder holding it too; on a database server (PostgreSQL), the database's own writer lock, which
    guards the catalog whichever index folders its writers use (Catalog.writer_lock)."""
    try:
        sqlite_file = catalog_sqlite_file(index_dir, db_url)
    except CatalogUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    with ExitStack() as stack:
        folders = {Path(index_dir).resolve()} | ({sqlite_file.parent.resolve()} if sqlite_file is not None else set())
        for folder in sorted(folders):
            stack.enter_context(index_lock(folder))
        try:
            catalog = Catalog(index_dir, create=True, url=db_url)
        except CatalogUnavailable as exc:
            raise ConfigError(str(exc)) from exc
        stack.callback(catalog.close)
        try:
            stack.enter_context(catalog.writer_lock())
        except CatalogBusy as exc:
            raise ConfigError(str(exc)) from None
        yield catalog


def resolve_settings(cfg: JobConfig, stored: IndexSettings | None) -> dict:
    """Choose model/layer/weights/normalize/seed: explicit options must agree with an existing index."""
    data_dir = str(Path(cfg.data_dir).resolve())
    chosen = {}
    for key in ("model", "layer", "weights", "normalize", "seed"):
        asked = getattr(cfg, key)
        if stored is None:
            chosen[key] = ({**DEFAULTS, "seed": DEFAULT_RANDOM_SEED}[key]) if asked is None else asked
            continue
        have = getattr(stored, key)
        if key == "weights" and asked not in (None, "imagenet", "random"):
            asked = str(Path(asked).resolve()) if have not in ("imagenet", "random") else asked
        if key == "seed" and stored.weights != "random":
            asked = None   # the seed only matters for random weights
        if asked is not None and asked != have:
            raise ConfigError(
                f"the index at {cfg.index_dir} was built with {key} {have!r}, not {asked!r}; "
                "one index holds one network's features: use another index folder for a new index")
        chosen[key] = have
    if stored is not None and stored.data_dir != data_dir:
        raise ConfigError(f"the index at {cfg.index_dir} was built from {stored.data_dir}, not {data_dir}; "
                          "use another index folder for another data folder")
    if stored is None and chosen["weights"] not in ("imagenet", "random"):
        chosen["weights"] = str(Path(chosen["weights"]).resolve())
    chosen["data_dir"] = data_dir
    return chosen


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
    if cfg.ray is not None:
        from indexer.ray_job import require_ray
        require_ray()     # before anything else: without Ray, say how to get it
    with writer_locks(index_dir, cfg.db_url) as catalog:
        stored = catalog.settings()
        chosen = resolve_settings(cfg, stored)
        planned = plan(cfg, catalog)
        if stored is not None and not planned.todo and not _removals(planned, catalog):
            _record_refused(planned, catalog)
            report = RunReport(unchanged=planned.unchanged, vector_index=catalog.vector_index_record())
            if (index_dir / FAISS_FILE).exists() and catalog.vectors_in_step() \
                    and not vector_work_needed(cfg.vector_index, catalog, stored.dim):
                return _report(report, catalog, catalog.count(), started)
            # FAISS work only (rebuild, another type, new search settings): from the catalog, no network
            report.vector_index, total = _maintain_vectors(cfg, catalog, stored.dim)
            return _report(report, catalog, total, started)
        if cfg.ray is not None:
            from indexer.ray_job import run_on_ray
            return run_on_ray(cfg, catalog, stored, chosen, planned, started, on_cluster)
        workers = cfg.workers if cfg.workers is not None else default_workers(cfg.device)
        # decoding starts now, in workers forked before torch is imported, while the network loads
        with Reader(data_dir, planned.todo, workers=workers, prep=expected_preprocessing(stored),
                    max_pixels=cfg.max_pixels, device_share=device_share(cfg)) as reader:
            return _update(cfg, catalog, stored, chosen, planned, reader, started, on_extractor)


def plan(cfg: JobConfig, catalog: Catalog) -> Plan:
    """The plan stage: scan the data folder and diff it against the catalog (torch-free)."""
    scan = scan_folder(cfg.data_dir, exclude=[cfg.index_dir], skip_folders_holding=CATALOG_FILE,
                       max_file_bytes=cfg.max_file_bytes)
    return plan_run(scan.images, scan.skipped, catalog)


def _maintain_vectors(cfg: JobConfig, catalog: Catalog, dim: int) -> tuple[dict, int]:
    from retrieval.vectors.builder import maintain_vectors

    try:
        return maintain_vectors(catalog, cfg.index_dir / FAISS_FILE, dim, cfg.vector_index)
    except IndexTypeError as exc:
        raise ConfigError(f"{exc} (--index-type)") from exc


def expected_preprocessing(stored: IndexSettings | None) -> Preprocessing:
    """The decode sizes a run will most likely use, before the network is loaded: the index's recorded ones,
    or the ImageNet standard (Preprocessing's defaults) for a new index. The network's own are checked later."""
    if stored is not None:
        fields = dict(part.split("=", 1) for part in stored.preprocessing.split(",") if "=" in part)
        try:
            return Preprocessing(resize_size=int(fields["resize"]), crop_size=int(fields["crop"]))
        except (KeyError, ValueError):
            pass
    return Preprocessing()


def _removals(plan: Plan, catalog: Catalog) -> list[str]:
    """Paths to take out of the index: gone from the folder, or indexed and now refused before decoding."""
    indexed_paths = catalog.file_states() if plan.refused else {}
    return plan.remove + [p for p in plan.refused if p in indexed_paths]


def _record_refused(plan: Plan, catalog: Catalog) -> None:
    """Record files refused before decoding (too large, symlinks out) that the catalog does not list yet."""
    if not plan.refused:
        return
    known = catalog.skipped_states()
    fresh = [{"path": p, "size": 0, "mtime_ns": 0, "reason": r} for p, r in plan.refused.items() if p not in known]
    if fresh:
        catalog.write_batch([], np.zeros((0, 0), np.float32), fresh)


def load_network(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict,
                 device: str) -> FeatureExtractor:
    """The extract stage's network: the index's recorded one (a new index records its settings here).

    Raises ConfigError when the weights cannot be had, differ from the recorded ones, or the device is missing."""
    from retrieval.features.backbones import (DeviceUnavailable, PrecisionUnavailable, WeightsUnavailable, build_extractor,
                                              weights_error_message)

    try:
        extractor, identity = build_extractor(chosen["model"], chosen["layer"], chosen["weights"], cfg.index_dir,
                                              device, seed=chosen["seed"], create=stored is None,
                                              precision=cfg.precision)
    except WeightsUnavailable as exc:
        raise ConfigError(weights_error_message(exc)) from exc
    except PrecisionUnavailable as exc:
        raise ConfigError(f"{exc} (--precision)") from exc
    except DeviceUnavailable as exc:
        raise ConfigError(f"{exc} (--device)") from exc
    if stored is not None and identity != stored.weights_identity:
        raise ConfigError(f"the weights now at {chosen['weights']!r} differ from the ones this index was built "
                          f"with ({stored.weights_identity}); use another index folder")
    if stored is None:
        p = extractor.preprocessing
        catalog.save_settings(IndexSettings(
            model=chosen["model"], layer=chosen["layer"], weights=chosen["weights"], weights_identity=identity,
            seed=chosen["seed"], dim=extractor.dim, normalize=chosen["normalize"], data_dir=chosen["data_dir"],
            preprocessing=f"resize={p.resize_size},crop={p.crop_size},mean={list(p.mean)},std={list(p.std)},"
                          "interpolation=bilinear"))
    return extractor


class Writer:
    """The write stage, the one writer of an index: one catalog transaction per batch (the commit point),
    then the same change to the FAISS index, saved every cfg.save_every_s and at the end.

    Opening it reconciles the FAISS file with the catalog and applies the plan's removals. Use as a
    context manager: inside, batches are committed in order on a writer thread, so the network works on
    the next batch meanwhile (on a GPU, the write is off the critical path); the progress bar counts the
    files committed. On the way out the queued batches are committed (none after a failed one), and the
    FAISS file is saved whenever it differs from the saved one, also after an error, so a re-run only
    redoes the batches that were never committed. The catalog and the FAISS index belong to the writer
    thread while it runs: the caller must not use them between __enter__ and __exit__.
    """

    def __init__(self, cfg: JobConfig, catalog: Catalog, plan: Plan, dim: int):
        from retrieval.vectors.builder import IndexBuilder

        self.catalog, self.save_every_s = catalog, cfg.save_every_s
        try:   # the FAISS type: exact Flat, or trained from a catalog sample (retrieval.vectors.builder)
            self.builder = IndexBuilder(catalog, cfg.index_dir / FAISS_FILE, dim, cfg.vector_index)
            self.vectors, self.dirty = self.builder.open()
        except IndexTypeError as exc:
            raise ConfigError(f"{exc} (--index-type)") from exc
        self.report = RunReport(unchanged=plan.unchanged)
        to_remove = _removals(plan, catalog)
        if to_remove:
            removed_ids = catalog.remove_paths(to_remove)
            self.vectors.remove(removed_ids)
            self.report.removed = len(removed_ids)
            self.dirty = True
        _record_refused(plan, catalog)
        self.last_save = time.monotonic()
        self.bar = progress_bar(cfg, plan)
        self.stage: StageThread | None = None   # the writer thread, while in the with block

    def write(self, rows: list[dict], feats: np.ndarray, bad: list[dict]) -> None:
        """Queue one batch for the writer thread: rows (catalog fields) with feats shape=(len(rows), dim) float32,
        and skipped files. Returns at once when the queue has room. Raises what an earlier batch's commit raised."""
        assert self.stage is not None, "write() inside the with block"
        self.stage.put((rows, feats, bad))

    def commit(self, rows: list[dict], feats: np.ndarray, bad: list[dict]) -> None:
        """Commit one batch (on the writer thread): the catalog transaction, then FAISS, then a save when due."""
        new_ids, replaced = self.catalog.write_batch(rows, feats, bad)   # the commit point
        self.vectors.remove(replaced)
        self.vectors.add(np.asarray(new_ids, dtype=np.int64), feats)
        self.vectors = self.builder.grown(self.vectors)   # exact Flat -> a trained type once the collection calls for one
        self.dirty = True
        self.report.indexed += len(rows)
        for b in bad:
            log.info("skipped %s: %s", display_name(b["path"]), b["reason"])
        if time.monotonic() - self.last_save > self.save_every_s:
            self.save()
            self.last_save = time.monotonic()
        self.bar.update(len(rows) + len(bad))

    def save(self) -> None:
        self.builder.save(self.vectors)   # the file, then the catalog state and the FAISS type it holds

    def __enter__(self) -> "Writer":
        # one batch waits while one is written: the network never runs more than two batches ahead. A transaction
        # cut off when the process exits is lost as in a kill -9 (the catalog rolls it back)
        self.stage = StageThread(lambda batch: self.commit(*batch), name="index-writer")
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:  # noqa: ANN001 - context manager protocol
        # The queued batches were made before the caller's error (an interrupt, a failed forward pass) and
        # are committed, as a run without the thread would have; a failed commit dropped the ones after it.
        self.stage.close()
        self.bar.close()
        failure = self.stage.failure
        failed = exc_type is not None or failure is not None
        if not failed:   # another type at this size; the recall of an approximate index
            self.vectors = self.builder.finish(self.vectors, self.dirty)
        if self.dirty or self.builder.built or not self.catalog.vectors_in_step() \
                or self.builder.record != self.catalog.vector_index_record():
            self.save()
        if exc is not failure:
            self.stage.raise_failure()   # the writer thread's error is the run's, as if the write had run in the caller
        if not failed:
            assert len(self.vectors) == self.catalog.count(), "FAISS and the catalog disagree after a run"
            self.report.vector_index = self.builder.record


def progress_bar(cfg: JobConfig, plan: Plan):  # noqa: ANN201 - tqdm
    """The run's progress bar (images/s, ETA) on a terminal; silent otherwise. It counts committed files."""
    from tqdm import tqdm

    return tqdm(total=len(plan.todo), unit="img", desc="indexing", dynamic_ncols=True,
                disable=not (cfg.progress and sys.stderr.isatty()) or not plan.todo)


def _update(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict, plan: Plan, reader: Reader,
            started: float, on_extractor: Callable[[FeatureExtractor], None] | None) -> RunReport:
    """This process's wiring of the stages: read (the Reader's workers) -> extract -> write."""
    hash_ahead(weights_file(chosen, cfg.index_dir))   # the weights' identity, hashed while torch is imported
    with collector_paused():                          # torch, torchvision and the network: about 0.6 s sooner
        from retrieval.features.batch_size import resolve_batch_size
        from indexer.extract import BatchExtractor, DeviceBatches, StageClock

        extractor = load_network(cfg, catalog, stored, chosen, cfg.device)
    if on_extractor:
        on_extractor(extractor)
    batch_size = resolve_batch_size(cfg.batch_size, extractor)
    mapper = BatchExtractor(extractor, chosen["normalize"], batch_size)
    clock = StageClock()
    to_device = DeviceBatches(extractor, reader, cfg.max_pixels, adaptive=cfg.decode == "auto")
    catalog.note_extraction(extractor.precision, device_label(extractor), to_device.decode)
    with Writer(cfg, catalog, plan, extractor.dim) as writer, to_device:
        def extract(item: tuple) -> None:   # on the network's thread, while this one reads and decodes the next batch
            pixels, rows, bad = item
            with clock("network"):
                feats = mapper(pixels) if pixels is not None else np.zeros((0, extractor.dim), np.float32)
            with clock("write"):             # waits only while the writer thread is still on the batch before last
                writer.write(rows, feats, bad)   # committed on the writer thread while the next batch runs

        batches = clock.timed("wait for decoding", reader.read(extractor.preprocessing, batch_size,
                                                               pin_memory=extractor.device.type == "cuda"))
        loop_started = time.perf_counter()
        network = StageThread(extract, name="index-network")
        try:
            for batch in batches:
                to_device.balance(clock)              # --decode auto: who waited for whom, and the share moved
                with clock("device decoding"):
                    item = to_device(batch)           # JPEGs left by the workers decoded on the device
                with clock("wait for the network"):
                    network.put(item)
        finally:
            network.close()                           # the batches handed over are extracted and written
        network.raise_failure()
        loop_seconds = time.perf_counter() - loop_started
    report = _report(writer.report, catalog, len(writer.vectors), started)
    report.extraction = {"device": device_label(extractor), "precision": extractor.precision,
                         "decode": to_device.decode, "device_decoded": to_device.decoded,
                         "device_share": to_device.shares(),
                         "batch_size": batch_size, "workers": reader.workers, "stage_seconds": clock.seconds(),
                         # the images' own rate, start-up (imports, network, first CUDA calls) and final save left out
                         "loop_seconds": round(loop_seconds, 3),
                         "loop_images_per_second": round(report.indexed / loop_seconds, 1) if loop_seconds else 0.0}
    return report


def weights_file(chosen: dict, index_dir: Path) -> Path | None:
    """The file the run's weights are loaded and hashed from: the index's random weights or a state dict file
    (None for ImageNet weights, whose identity is their name)."""
    if chosen["weights"] == "imagenet":
        return None
    return random_weights_file(index_dir, chosen["model"]) if chosen["weights"] == "random" else Path(chosen["weights"])


def device_label(extractor: FeatureExtractor) -> str:
    """"cpu", or "cuda (NVIDIA H200)": what the catalog records of where vectors were computed."""
    if extractor.device.type != "cuda":
        return extractor.device.type
    import torch

    return f"cuda ({torch.cuda.get_device_name(extractor.device)})"


# --decode auto on a GPU: the share of JPEGs decoded there (nvJPEG) at the start; the main loop moves it so that
# neither the workers nor the GPU's decoder waits for the other (extract.DeviceBatches.balance).
AUTO_DEVICE_SHARE = 0.5


def device_share(cfg: JobConfig) -> float | None:
    """The share of JPEGs the decoding workers leave for the network's device at the start (1: all), or None (the
    workers decode everything). Decided before torch is imported: the workers start first."""
    if cfg.decode == "workers":
        return None
    if cfg.decode == "device":
        return 1.0
    assert cfg.decode == "auto", f"unknown decode {cfg.decode!r}"
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpu_present())
    return AUTO_DEVICE_SHARE if on_gpu else None


def _report(report: RunReport, catalog: Catalog, total: int, started: float) -> RunReport:
    report.skipped = [{"path": display_name(p), "reason": r} for p, r in catalog.skipped()]
    report.total = total
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_second = round(report.indexed / report.seconds, 2) if report.seconds > 0 else 0.0
    return report


def default_workers(device: str) -> int:
    """Decoding processes when --workers is not given: one per core, leaving the model the main process (the OS
    shares the cores). On a GPU (device "cuda", or "auto" with one present) the main process mostly waits on it,
    so up to MAX_WORKERS_GPU; on the CPU up to MAX_WORKERS_CPU. Decided before torch is imported (gpu_present)."""
    on_gpu = device == "cuda" or (device == "auto" and gpu_present())
    return max(1, min(MAX_WORKERS_GPU if on_gpu else MAX_WORKERS_CPU, available_cores()))
