"""The indexing job: scan the folder, diff it against the catalog, decode, extract, write, report."""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from retrieval.catalog import CATALOG_FILE, Catalog, IndexSettings
from retrieval.images import DEFAULT_MAX_PIXELS, Preprocessing
from retrieval.index_types import IndexTypeConfig, IndexTypeError, vector_work_needed
from retrieval.scan import DEFAULT_MAX_FILE_BYTES, ImageFile, scan_folder
from retrieval.names import DEFAULT_RANDOM_SEED, FAISS_FILE
from retrieval.system import available_cores, display_name

from .reader import Reader

if TYPE_CHECKING:   # torch, torchvision and FAISS are imported only when there is work for the network
    from retrieval.backbones import FeatureExtractor

# The planning half of a run (scan, diff against the catalog) needs neither torch nor FAISS, so an
# unchanged folder re-indexes without importing them; they are imported in _update when there is work.

log = logging.getLogger(__name__)

DEFAULTS = {"model": "alexnet", "layer": "fc7", "weights": "imagenet", "normalize": True}
LOCK_FILE = ".lock"


class ConfigError(Exception):
    """A usage or configuration problem the user can fix (exit status 2)."""


@dataclasses.dataclass
class JobConfig:
    data_dir: Path
    index_dir: Path
    model: str | None = None          # None: as recorded in the index, else DEFAULTS
    layer: str | None = None
    weights: str | None = None        # "imagenet", "random" or a state dict path
    normalize: bool | None = None     # L2-normalise vectors
    seed: int | None = None           # for --weights random; None: DEFAULT_RANDOM_SEED, or the index's
    device: str = "auto"
    batch_size: int | str = "auto"    # images per forward pass (and per catalog transaction); "auto": from free GPU memory, 32 on CPU
    workers: int | None = None        # decoding processes; None: one per core
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES   # larger files are skipped unread; None: no limit
    save_every_s: float = 30.0        # also save the FAISS file this often during long runs
    progress: bool = True
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


def run_index(cfg: JobConfig, on_extractor: Callable[[FeatureExtractor], None] | None = None) -> RunReport:
    """Bring the index in cfg.index_dir up to date with cfg.data_dir. Raises ConfigError for user errors.

    Plans first (scan the folder, diff it against the catalog): when there is nothing to do and the
    FAISS file is in step with the catalog, the run ends there, without loading torch, FAISS or the network.
    """
    started = time.perf_counter()
    data_dir, index_dir = cfg.data_dir, cfg.index_dir
    if not data_dir.is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist or is not a folder")
    with index_lock(index_dir):
        catalog = Catalog(index_dir, create=True)
        try:
            stored = catalog.settings()
            chosen = resolve_settings(cfg, stored)
            scan = scan_folder(data_dir, exclude=[index_dir], skip_folders_holding=CATALOG_FILE,
                               max_file_bytes=cfg.max_file_bytes)
            plan = plan_run(scan.images, scan.skipped, catalog)
            if stored is not None and not plan.todo and not _removals(plan, catalog):
                _record_refused(plan, catalog)
                report = RunReport(unchanged=plan.unchanged, vector_index=catalog.vector_index_record())
                if (index_dir / FAISS_FILE).exists() and catalog.vectors_in_step() \
                        and not vector_work_needed(cfg.vector_index, catalog, stored.dim):
                    return _report(report, catalog, catalog.count(), started)
                # FAISS work only (rebuild, another type, new search settings): from the catalog, no network
                report.vector_index, total = _maintain_vectors(cfg, catalog, stored.dim)
                return _report(report, catalog, total, started)
            workers = cfg.workers if cfg.workers is not None else default_workers()
            # decoding starts now, in workers forked before torch is imported, while the network loads
            with Reader(data_dir, plan.todo, workers=workers, prep=expected_preprocessing(stored),
                        max_pixels=cfg.max_pixels) as reader:
                return _update(cfg, catalog, stored, chosen, plan, reader, started, on_extractor)
        finally:
            catalog.close()


def _maintain_vectors(cfg: JobConfig, catalog: Catalog, dim: int) -> tuple[dict, int]:
    from retrieval.index_builder import maintain_vectors

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


def weights_error_message(exc: Exception) -> str:
    """A WeightsUnavailable in the command line's terms: with the ways forward when ImageNet weights are offline."""
    if not getattr(exc, "offline_imagenet", False):
        return str(exc)
    return (f"{exc}.\nWays forward:\n"
            f"  1. put that file at {exc.cache_path}\n"
            "  2. pass --weights PATH with a state dict file you have for this model\n"
            "  3. pass --weights random to run with seeded random weights (a demo: results show\n"
            "     colour and texture similarity, not what the picture shows)")


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


def _update(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict, plan: Plan, reader: Reader,
            started: float, on_extractor: Callable[[FeatureExtractor], None] | None) -> RunReport:
    from tqdm import tqdm

    from .extract import BatchExtractor

    from retrieval.backbones import DeviceUnavailable, WeightsUnavailable, build_extractor
    from retrieval.index_builder import IndexBuilder

    from .batch_size import resolve_batch_size

    index_dir = cfg.index_dir
    try:
        extractor, identity = build_extractor(chosen["model"], chosen["layer"], chosen["weights"], index_dir,
                                              cfg.device, seed=chosen["seed"], create=stored is None)
    except WeightsUnavailable as exc:
        raise ConfigError(weights_error_message(exc)) from exc
    except DeviceUnavailable as exc:
        raise ConfigError(f"{exc} (--device)") from exc
    if stored is not None and identity != stored.weights_identity:
        raise ConfigError(f"the weights now at {chosen['weights']!r} differ from the ones this index was built "
                          f"with ({stored.weights_identity}); use another index folder")
    if on_extractor:
        on_extractor(extractor)
    if stored is None:
        p = extractor.preprocessing
        catalog.save_settings(IndexSettings(
            model=chosen["model"], layer=chosen["layer"], weights=chosen["weights"], weights_identity=identity,
            seed=chosen["seed"], dim=extractor.dim, normalize=chosen["normalize"], data_dir=chosen["data_dir"],
            preprocessing=f"resize={p.resize_size},crop={p.crop_size},mean={list(p.mean)},std={list(p.std)},"
                          "interpolation=bilinear"))

    try:
        builder = IndexBuilder(catalog, index_dir / FAISS_FILE, extractor.dim, cfg.vector_index)
        vectors, dirty = builder.open()
    except IndexTypeError as exc:
        raise ConfigError(f"{exc} (--index-type)") from exc
    report = RunReport(unchanged=plan.unchanged)
    to_remove = _removals(plan, catalog)
    if to_remove:
        removed_ids = catalog.remove_paths(to_remove)
        vectors.remove(removed_ids)
        report.removed = len(removed_ids)
        dirty = True
    _record_refused(plan, catalog)

    batch_size = resolve_batch_size(cfg.batch_size, extractor)
    mapper = BatchExtractor(extractor, chosen["normalize"], batch_size)
    bar = tqdm(total=len(plan.todo), unit="img", desc="indexing", dynamic_ncols=True,
               disable=not (cfg.progress and sys.stderr.isatty()) or not plan.todo)
    last_save = time.monotonic()

    def save() -> None:
        builder.save(vectors)   # the file, then the catalog state and the FAISS type it holds

    try:
        for batch in reader.read(extractor.preprocessing, batch_size, pin_memory=extractor.device.type == "cuda"):
            feats = mapper(batch.pixels) if batch.pixels is not None else np.zeros((0, extractor.dim), np.float32)
            new_ids, replaced = catalog.write_batch(batch.rows, feats, batch.bad)   # the commit point
            vectors.remove(replaced)
            vectors.add(np.asarray(new_ids, dtype=np.int64), feats)
            vectors = builder.grown(vectors)   # exact Flat -> a trained type once the collection calls for one
            dirty = True
            report.indexed += len(batch.rows)
            for b in batch.bad:
                log.info("skipped %s: %s", display_name(b["path"]), b["reason"])
            bar.update(len(batch.rows) + len(batch.bad))
            if time.monotonic() - last_save > cfg.save_every_s:
                save()
                last_save = time.monotonic()
        vectors = builder.finish(vectors, dirty)   # another type at this size, recall of an approximate index
    finally:
        bar.close()
        if dirty or builder.built or not catalog.vectors_in_step() or builder.record != catalog.vector_index_record():
            save()

    assert len(vectors) == catalog.count(), "FAISS and the catalog disagree after a run"
    report.vector_index = builder.record
    return _report(report, catalog, len(vectors), started)


def _report(report: RunReport, catalog: Catalog, total: int, started: float) -> RunReport:
    report.skipped = [{"path": display_name(p), "reason": r} for p, r in catalog.skipped()]
    report.total = total
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_second = round(report.indexed / report.seconds, 2) if report.seconds > 0 else 0.0
    return report


def default_workers() -> int:
    """Decoding processes: one per core, leaving the model the main process (the OS shares the cores)."""
    return max(1, min(8, available_cores()))
