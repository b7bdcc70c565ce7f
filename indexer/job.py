"""The indexing job: scan the folder, diff it against the catalog, decode, extract, write, report."""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from retrieval.backbones import DEFAULT_RANDOM_SEED, FeatureExtractor, build_extractor
from retrieval.catalog import Catalog, IndexSettings
from retrieval.images import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessing, decode_for_model
from retrieval.scan import ImageFile, scan_folder
from retrieval.system import available_cores
from retrieval.index import embed
from retrieval.vector_index import FAISS_FILE, VectorIndex

from .batch_size import resolve_batch_size

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
    seed: int = DEFAULT_RANDOM_SEED   # for --weights random
    device: str = "auto"
    batch_size: int | str = "auto"    # images per forward pass (and per catalog transaction); "auto": from free GPU memory, 32 on CPU
    workers: int | None = None        # decoding processes; None: one per core
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    save_every_s: float = 30.0        # also save the FAISS file this often during long runs
    progress: bool = True


@dataclasses.dataclass
class RunReport:
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)   # [{"path", "reason"}], all files not indexed
    total: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0

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


# --- reader ---------------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Reads and decodes files in DataLoader workers; a bad file becomes an error item, never an exception."""

    def __init__(self, data_dir: Path, files: list[ImageFile], prep: Preprocessing, max_pixels: int | None):
        self.data_dir, self.files, self.prep, self.max_pixels = Path(data_dir), files, prep, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        f = self.files[i]
        try:
            data = (self.data_dir / f.path).read_bytes()
            decoded = decode_for_model(data, self.prep, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            return {"file": f, "error": str(exc)}
        except OSError as exc:
            return {"file": f, "error": f"cannot read file: {exc.strerror or exc}"}
        return {"file": f, "decoded": decoded}


@dataclasses.dataclass
class Batch:
    pixels: torch.Tensor | None     # uint8, shape=(n, 3, H, W)
    rows: list[dict]                # catalog fields for each of the n images
    bad: list[dict]                 # skipped files: path, size, mtime_ns, reason


def collate(items: list[dict]) -> Batch:
    good = [it for it in items if "decoded" in it]
    rows = [{"path": it["file"].path, "label": it["file"].label, "size": it["file"].size,
             "mtime_ns": it["file"].mtime_ns, "width": it["decoded"].width, "height": it["decoded"].height,
             "sha256": it["decoded"].sha256} for it in good]
    bad = [{"path": it["file"].path, "size": it["file"].size, "mtime_ns": it["file"].mtime_ns, "reason": it["error"]}
           for it in items if "error" in it]
    pixels = torch.stack([it["decoded"].pixels for it in good]) if good else None
    return Batch(pixels, rows, bad)


def read_batches(data_dir: Path, files: list[ImageFile], prep: Preprocessing, *, batch_size: int, workers: int,
                 max_pixels: int | None, pin_memory: bool = False) -> Iterator[Batch]:
    loader = DataLoader(ImageFiles(data_dir, files, prep, max_pixels), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None)
    yield from loader


# --- mapper ---------------------------------------------------------------------------------------

class BatchExtractor:
    """Runs the network over a batch in chunks; on CUDA out-of-memory it halves the chunk and retries."""

    def __init__(self, extractor: FeatureExtractor, normalize: bool, chunk: int):
        self.extractor, self.normalize, self.chunk = extractor, normalize, max(1, chunk)

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 shape=(n, 3, H, W) -> float32 shape=(n, dim)."""
        out, start = [], 0
        while start < len(pixels):
            part = pixels[start:start + self.chunk]
            try:
                out.append(embed(self.extractor, part, self.normalize))
            except torch.cuda.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                torch.cuda.empty_cache()
                self.chunk = max(1, self.chunk // 2)
                log.warning("CUDA out of memory: retrying with batches of %d", self.chunk)
                continue
            start += len(part)
        return np.concatenate(out) if out else np.zeros((0, self.extractor.dim), np.float32)


# --- the job --------------------------------------------------------------------------------------

@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """One writer per index folder at a time."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / LOCK_FILE, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another index-images run is updating {index_dir}; wait for it to finish") from None
        yield


def resolve_settings(cfg: JobConfig, stored: IndexSettings | None) -> dict:
    """Choose model/layer/weights/normalize: explicit options must agree with an existing index."""
    data_dir = str(Path(cfg.data_dir).resolve())
    chosen = {}
    for key in ("model", "layer", "weights", "normalize"):
        asked = getattr(cfg, key)
        if stored is None:
            chosen[key] = DEFAULTS[key] if asked is None else asked
            continue
        have = getattr(stored, key)
        if key == "weights" and asked not in (None, "imagenet", "random"):
            asked = str(Path(asked).resolve()) if have not in ("imagenet", "random") else asked
        if asked is not None and asked != have:
            flag = {"normalize": "--normalize/--no-normalize"}.get(key, f"--{key}")
            raise ConfigError(
                f"the index at {cfg.index_dir} was built with {key} {have!r}, not {asked!r} ({flag}); "
                "one index holds one network's features: use another --index-dir for a new index")
        chosen[key] = have
    if stored is not None and stored.data_dir != data_dir:
        raise ConfigError(f"the index at {cfg.index_dir} was built from {stored.data_dir}, not {data_dir}; "
                          "use another --index-dir for another folder")
    if stored is None and chosen["weights"] not in ("imagenet", "random"):
        chosen["weights"] = str(Path(chosen["weights"]).resolve())
    chosen["data_dir"] = data_dir
    return chosen


def run_index(cfg: JobConfig, on_extractor: Callable[[FeatureExtractor], None] | None = None) -> RunReport:
    """Bring the index in cfg.index_dir up to date with cfg.data_dir. Raises ConfigError for user errors."""
    from retrieval.backbones import WeightsUnavailable

    started = time.perf_counter()
    data_dir, index_dir = Path(cfg.data_dir), Path(cfg.index_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist or is not a folder")
    with index_lock(index_dir):
        catalog = Catalog(index_dir, create=True)
        try:
            stored = catalog.settings()
            chosen = resolve_settings(cfg, stored)
            seed = stored.seed if stored else cfg.seed
            try:
                extractor, identity = build_extractor(chosen["model"], chosen["layer"], chosen["weights"], index_dir,
                                                      cfg.device, seed=seed, create=stored is None)
            except WeightsUnavailable as exc:
                raise ConfigError(str(exc)) from exc
            if stored is not None and identity != stored.weights_identity:
                raise ConfigError(f"the weights now at {chosen['weights']!r} differ from the ones this index was built "
                                  f"with ({stored.weights_identity}); use another --index-dir")
            if on_extractor:
                on_extractor(extractor)
            if stored is None:
                p = extractor.preprocessing
                catalog.save_settings(IndexSettings(
                    model=chosen["model"], layer=chosen["layer"], weights=chosen["weights"], weights_identity=identity,
                    seed=seed, dim=extractor.dim, normalize=chosen["normalize"], data_dir=chosen["data_dir"],
                    preprocessing=f"resize={p.resize_size},crop={p.crop_size},mean={list(p.mean)},std={list(p.std)},"
                                  "interpolation=bilinear"))
            return _update(cfg, catalog, extractor, chosen["normalize"], started)
        finally:
            catalog.close()


def _update(cfg: JobConfig, catalog: Catalog, extractor: FeatureExtractor, normalize: bool, started: float) -> RunReport:
    data_dir, faiss_path = Path(cfg.data_dir), Path(cfg.index_dir) / FAISS_FILE
    vectors, dirty = VectorIndex.open_reconciled(faiss_path, catalog, extractor.dim)
    scan = scan_folder(data_dir)
    plan = plan_run(scan.images, scan.skipped, catalog)
    report = RunReport(unchanged=plan.unchanged)

    indexed_paths = catalog.file_states() if plan.refused else {}
    to_remove = plan.remove + [p for p in plan.refused if p in indexed_paths]
    if to_remove:
        removed_ids = catalog.remove_paths(to_remove)
        vectors.remove(removed_ids)
        report.removed = len(removed_ids)
        dirty = True
    if plan.refused:
        known_skips = catalog.skipped_states()
        fresh = [{"path": p, "size": 0, "mtime_ns": 0, "reason": r} for p, r in plan.refused.items() if p not in known_skips]
        if fresh:
            catalog.write_batch([], np.zeros((0, extractor.dim), np.float32), fresh)

    workers = cfg.workers if cfg.workers is not None else default_workers()
    batch_size = resolve_batch_size(cfg.batch_size, extractor)
    mapper = BatchExtractor(extractor, normalize, batch_size)
    bar = tqdm(total=len(plan.todo), unit="img", desc="indexing", dynamic_ncols=True,
               disable=not (cfg.progress and sys.stderr.isatty()) or not plan.todo)
    last_save = time.monotonic()
    try:
        for batch in read_batches(data_dir, plan.todo, extractor.preprocessing, batch_size=batch_size,
                                  workers=workers, max_pixels=cfg.max_pixels,
                                  pin_memory=extractor.device.type == "cuda"):
            feats = mapper(batch.pixels) if batch.pixels is not None else np.zeros((0, extractor.dim), np.float32)
            new_ids, replaced = catalog.write_batch(batch.rows, feats, batch.bad)   # the commit point
            vectors.remove(replaced)
            vectors.add(np.asarray(new_ids, dtype=np.int64), feats)
            dirty = True
            report.indexed += len(batch.rows)
            for b in batch.bad:
                log.info("skipped %s: %s", b["path"], b["reason"])
            bar.update(len(batch.rows) + len(batch.bad))
            if time.monotonic() - last_save > cfg.save_every_s:
                vectors.save(faiss_path)
                last_save = time.monotonic()
    finally:
        bar.close()
        if dirty or not faiss_path.exists():
            vectors.save(faiss_path)
            catalog.touch()

    report.skipped = [{"path": p, "reason": r} for p, r in catalog.skipped()]
    report.total = len(vectors)
    assert report.total == catalog.count(), "FAISS and the catalog disagree after a run"
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_second = round(report.indexed / report.seconds, 2) if report.seconds > 0 else 0.0
    return report


def default_workers() -> int:
    """Decoding processes: one per core, leaving the model the main process (the OS shares the cores)."""
    return max(1, min(8, available_cores()))
