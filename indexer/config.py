"""The index-images run's configuration and report: options, the settings an index records, decoding workers."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from retrieval.catalog import Catalog, IndexSettings, weights_label
from retrieval.catalog.db import catalog_sqlite_file, mask_url
from retrieval.features.precision import PRECISIONS
from retrieval.features.weights import IMAGENET, WeightsChoice
from retrieval.images.decode import DEFAULT_MAX_PIXELS, Preprocessing
from retrieval.images.preprocessing import REGION_COUNT
from retrieval.images.scan import DEFAULT_MAX_FILE_BYTES
from retrieval.names import (DECODES, DEFAULT_RANDOM_SEED, INPUT_NORMS, LAYERS, MODEL_NAMES, POOLED_INPUT,
                             POOLED_LAYERS, VIEWS, is_device_name)
from retrieval.system import available_cores, display_name, gpu_present
from retrieval.vectors.index_types import IndexTypeConfig

DEFAULTS = {"model": "alexnet", "layer": "fc7", "views": "single", "input_norm": "weights", "weights": IMAGENET,
            "normalize": True, "regions": 0}

MAX_WORKERS_CPU = 8    # decoding processes by default when the network runs on the CPU

MAX_WORKERS_GPU = 32   # ... and on a GPU: a fast one needs every core decoding (an H200 takes 8,000 images/s)

# --decode auto on a GPU: the share of JPEGs decoded there (nvJPEG) at the start; the main loop moves it so that
# neither the workers nor the GPU's decoder waits for the other (extract.DeviceBatches.balance).
AUTO_DEVICE_SHARE = 0.5


class ConfigError(ValueError):
    """A usage or configuration problem the user can fix (exit status 2)."""


class DecoderCrashed(RuntimeError):
    """A decoding task's worker process died every time it was run (--ray: Ray's retries spent); the message says
    where. What was committed before stays (exit status 1)."""



@dataclasses.dataclass
class JobConfig:
    data_dir: Path
    index_dir: Path
    db_url: str | None = None         # the catalog's SQLAlchemy URL; None: SQLite in index_dir (catalog.db)
    model: str | None = None          # None: as recorded in the index, else DEFAULTS
    layer: str | None = None
    views: str | None = None          # the descriptor of the image alone ("single"), or averaged over "flip" or
                                      # "flip+scales" views (retrieval.names.VIEWS)
    input_norm: str | None = None     # the network's input normalised by the weights' mean and std ("weights") or by
                                      # each image's own ("image"; retrieval.names.INPUT_NORMS)
    regions: int | None = None        # regional vectors per image besides its own: 0 (none) or REGION_COUNT
                                      # (--regions: the four corners and the centre, retrieval.images.preprocessing)
    weights: WeightsChoice | str | None = None   # "imagenet", "random" or a state dict path (text: parsed)
    normalize: bool | None = None     # L2-normalise vectors
    seed: int | None = None           # for --weights random; None: DEFAULT_RANDOM_SEED, or the index's
    device: str = "auto"
    precision: str = "auto"           # the network's arithmetic: fp32, bf16 (CUDA; CPUs with bf16 units); auto: the
                                      # index's recorded one, else bf16 on CUDA, the faster one on a bf16 CPU, fp32
    decode: str = "auto"              # JPEGs decoded by the "workers" (Pillow) or on the network's "device"
                                      # (torchvision; nvJPEG on CUDA); auto: both, see device_share()
    batch_size: int | str = "auto"    # images per forward pass (and per catalog transaction); "auto": from free GPU memory, 32 on CPU
    workers: int | None = None        # decoding processes; None: default_workers(device)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES   # larger files are skipped unread; None: no limit
    save_every_s: float = 30.0        # also save the FAISS file this often during long runs
    progress: bool = True             # a tqdm bar on a terminal
    list_changes: bool = False        # RunReport.changes: each path added, changed, moved and removed
    data_moved: bool = False          # the index's data folder is gone and data_dir is it, moved: follow it
    import_sqlite: bool = False       # fill the empty catalog database (db_url) from the index folder's catalog.db
    on_progress: Callable[[int, int], None] | None = None   # on_progress(done, total) after each committed batch
                                      # (on the writer thread; files done, of the run's files to do)
    ray: str | None = None            # None: this process; "": a new local Ray cluster (or $RAY_ADDRESS);
                                      # else the address of a running cluster ("auto", "HOST:PORT", "ray://...")
    vector_index: IndexTypeConfig = dataclasses.field(default_factory=IndexTypeConfig)   # FAISS type, training, recall

    def __post_init__(self) -> None:
        # Absolute once, here where the paths enter: nothing deeper depends on the working directory.
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.index_dir = Path(self.index_dir).expanduser().resolve()
        if self.weights is not None:
            self.weights = WeightsChoice.parse(self.weights)
        if isinstance(self.regions, bool):   # index_folder(..., regions=True): the regions there are
            self.regions = REGION_COUNT if self.regions else 0
        if self.regions not in (None, 0, REGION_COUNT):
            raise ConfigError(f"regions takes 0 (none) or {REGION_COUNT} (four corners and the centre), "
                              f"not {self.regions!r}")
        # what the command line's types check, checked for index_folder(...) too, before any work: a wrong name
        # reached an assert deep in the network's code after the index folder and its weights file were made
        for name, choices in (("model", MODEL_NAMES), ("layer", LAYERS), ("views", VIEWS), ("input_norm", INPUT_NORMS),
                              ("precision", PRECISIONS), ("decode", DECODES)):
            value = getattr(self, name)
            if not (value is None and name in DEFAULTS) and value not in choices:
                raise ConfigError(f"{name} takes one of {', '.join(map(repr, choices))}"
                                  f"{' (None: as recorded, else ' + repr(DEFAULTS[name]) + ')' if name in DEFAULTS else ''}"
                                  f"; not {value!r}")
        if not is_device_name(self.device):
            raise ConfigError(f"device takes 'auto', 'cpu', 'cuda' or 'cuda:N'; not {self.device!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize takes True, False or None (as recorded, else True); not {self.normalize!r}")
        if self.on_progress is not None and not callable(self.on_progress):
            raise ConfigError(f"progress takes a function progress(done, total), or None; not {self.on_progress!r}")
        if self.ray is not None and not isinstance(self.ray, str):
            raise ConfigError(f"ray takes a cluster's address (\"\": a new local one), or None; not {self.ray!r}")
        if isinstance(self.vector_index, str):   # index_folder(..., vector_index="IVF256,Flat"): the FAISS type
            self.vector_index = IndexTypeConfig(index_type=self.vector_index)
        elif not isinstance(self.vector_index, IndexTypeConfig):
            raise ConfigError("vector_index takes a FAISS type (\"auto\", \"Flat\", \"IVF1024,PQ32\", ...) or a "
                              f"retrieval.vectors.index_types.IndexTypeConfig; not {self.vector_index!r}")
        if self.batch_size != "auto":
            _check_whole("batch_size", self.batch_size, 1, also="'auto'", none_ok=False)
        _check_whole("workers", self.workers, 0, also="None (one per core)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed takes a whole number, or None; not {self.seed!r}")
        _check_whole("max_pixels", self.max_pixels, 1, also="None (no limit)")
        _check_whole("max_file_bytes", self.max_file_bytes, 1, also="None (no limit)")
        if isinstance(self.save_every_s, bool) or not isinstance(self.save_every_s, (int, float)) \
                or not self.save_every_s >= 0:
            raise ConfigError(f"save_every_s takes a number of seconds (0: after every batch), not {self.save_every_s!r}")
        self._check_index_type()

    def _check_index_type(self) -> None:
        """The FAISS type asked for ("AUTO" and " auto " are auto) is one FAISS can build, checked before any work, as
        a ConfigError naming --index-type: a typo was refused only once the index folder, its weights file and the
        decoding workers were made."""
        asked = self.vector_index.index_type
        if asked is None:
            return
        if not isinstance(asked, str):
            raise ConfigError(f"the FAISS type (--index-type) is text such as \"IVF1024,PQ32\", not {asked!r}")
        from retrieval.names import feature_dim
        from retrieval.vectors.index_types import AUTO, IndexTypeError, check_factory

        if asked.strip().lower() == AUTO:
            self.vector_index = dataclasses.replace(self.vector_index, index_type=AUTO)
            return
        try:   # the dimension of the features asked for, or the defaults' (an existing index's own is checked later)
            check_factory(asked, feature_dim(self.model or DEFAULTS["model"], self.layer or DEFAULTS["layer"]))
        except IndexTypeError as exc:
            raise ConfigError(f"{exc} (--index-type)") from exc


def _check_whole(name: str, value: object, minimum: int, *, also: str, none_ok: bool = True) -> None:
    """Raise ConfigError unless value is a whole number >= minimum, or None where none_ok (also: the other values
    taken, in words, for the message)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} takes a whole number from {minimum} up, or {also}; not {value!r}")



@dataclasses.dataclass
class RunReport:
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)   # [{"path", "reason"}], all files not indexed
    folders: list[dict] = dataclasses.field(default_factory=list)   # [{"path", "reason"}], folders not looked into
    restamped: int = 0                 # of the unchanged: files with a new time and the same bytes (not extracted again)
    moved: int = 0                     # files moved or renamed, same bytes: kept with their new path and label
    unreadable_formats: dict = dataclasses.field(default_factory=dict)   # ".heic" -> photos in formats not read
    total: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    vector_index: dict | None = None   # the FAISS type, training, search settings and recall (index_builder.describe)
    extraction: dict | None = None     # device, precision, decoding and batch size of this run, and where its time went
    repairs: list[str] = dataclasses.field(default_factory=list)   # what this run found damaged and repaired
    changes: dict | None = None        # with list_changes: {"added", "changed", "removed": [paths], "moved": [[old, new]]}
    network: dict | None = None        # the index's network as recorded: model, layer, views, weights, dim, normalize

    def to_json(self) -> dict:
        return dataclasses.asdict(self)



def resolve_settings(cfg: JobConfig, stored: IndexSettings | None,
                     moved_data_dir_holds: Callable[[Path], bool] | None = None) -> dict:
    """Choose model/layer/views/weights/normalize/seed: explicit options must agree with an existing index.

    -> {"model", "layer", "views", "input_norm", "regions", "weights" (a WeightsChoice, a file's path absolute),
    "normalize", "seed", "data_dir"}, and "moved_data_dir" when the index's data folder is gone and the one given
    holds its images (moved_data_dir_holds(folder) says whether it does)."""
    data_dir = str(Path(cfg.data_dir).resolve())
    chosen = {}
    for key in ("model", "layer", "views", "input_norm", "regions", "weights", "normalize", "seed"):
        asked = getattr(cfg, key)
        if stored is None:
            chosen[key] = ({**DEFAULTS, "seed": DEFAULT_RANDOM_SEED}[key]) if asked is None else asked
            continue
        have = getattr(stored, key)
        if key == "weights" and asked is not None:   # compared as the text the catalog keeps
            asked = str(asked.resolved() if asked.is_file and stored.weights_choice.is_file else asked)
        if key == "seed" and not stored.weights_choice.is_random:
            asked = None   # the seed only matters for random weights
        if key == "weights" and asked is not None and asked != have and _moved_weights(asked, stored):
            chosen["moved_weights"] = asked   # the file it was made with, moved: the index follows it (indexer.run)
            asked = have
        if asked is not None and asked != have:
            raise ConfigError(
                f"the index at {cfg.index_dir} was built with {key} {have!r}, not {asked!r}; "
                "one index holds one network's features: use another index folder for a new index")
        chosen[key] = have
    if stored is not None and stored.data_dir != data_dir:
        gone = not os.path.lexists(stored.data_dir)
        if os.path.realpath(stored.data_dir) == data_dir:   # its recorded path leads here (a symbolic link now)
            data_dir = stored.data_dir
        elif gone and moved_data_dir_holds is not None and moved_data_dir_holds(Path(data_dir)):
            if not cfg.data_moved:   # asked, never assumed: a backup copy beside an unmounted drive holds them too
                raise ConfigError(f"the index at {cfg.index_dir} was built from {stored.data_dir}, which is gone, and "
                                  f"{data_dir} holds its images: if the folder moved here, run again with --data-moved "
                                  "to point the index at it (nothing is extracted again); else use another index "
                                  "folder (--index-dir)")
            chosen["moved_data_dir"] = data_dir   # the folder it was made of, moved: the index follows it (indexer.run)
        else:
            why = (" (which is gone), and this folder does not hold its images (by their paths, sizes, times and "
                   "contents)") if gone else (" (still there: --data-moved is for a folder moved away)"
                                               if cfg.data_moved else "")
            if cfg.db_url is not None and catalog_sqlite_file(cfg.index_dir, cfg.db_url) is None:
                raise ConfigError(f"the catalog database {mask_url(cfg.db_url)} holds the index of {stored.data_dir}"
                                  f"{why}, not of {data_dir}: one database holds one index; use another database "
                                  "for another data folder")
            raise ConfigError(f"the index at {cfg.index_dir} was built from {stored.data_dir}{why}, not "
                              f"{data_dir}; use another index folder for another data folder")
    chosen["weights"] = chosen["weights"].resolved() if stored is None else stored.weights_choice
    chosen["data_dir"] = data_dir
    return chosen


MOVED_SAMPLE = 200   # indexed images looked for in a folder that may be the data folder moved


MOVED_HASHED = 5     # of those found, files whose bytes are checked against their recorded sha256


def holds_indexed_images(catalog: Catalog, folder: Path) -> bool:
    """Whether folder holds the catalog's images: at least 80% of up to MOVED_SAMPLE of them, spread over the catalog,
    at their recorded paths with their recorded sizes and modification times (mv and cp -a keep them), and of those,
    up to MOVED_HASHED with their recorded bytes. What the folder lacks or changed is then indexed as any change is."""
    import numpy as np

    from retrieval.features.digests import files_sha256

    ids = catalog.ids()
    if not len(ids):
        return False
    picked = np.unique(ids[np.linspace(0, len(ids) - 1, min(len(ids), MOVED_SAMPLE)).astype(int)])
    found = []
    for record in catalog.get_many(picked).values():
        try:
            st = (folder / record.path).stat()
        except (OSError, ValueError):
            continue
        if st.st_size == record.size and st.st_mtime_ns == record.mtime_ns:
            found.append(record)
    if len(found) < 0.8 * len(picked):
        return False
    checked = found[:: max(1, len(found) // MOVED_HASHED)][:MOVED_HASHED]
    return files_sha256(folder, [r.path for r in checked]) == [r.sha256 for r in checked]


def _moved_weights(asked: str, stored: IndexSettings) -> bool:
    """Whether the weights file asked for is the index's own moved elsewhere: both files, the recorded one gone, and
    the asked one's bytes the recorded SHA-256."""
    from retrieval.features.digests import file_sha256

    choice = WeightsChoice.parse(asked)
    if not (choice.is_file and stored.weights_choice.is_file) or stored.weights_choice.path.exists():
        return False
    try:
        return file_sha256(choice.path) == stored.weights_sha256
    except OSError:
        return False



def describe_network(settings: IndexSettings | None) -> dict | None:
    """The network an index records, as the run's summary shows it (weights by name and hash, never a path)."""
    if settings is None:
        return None
    return {"model": settings.model, "layer": settings.layer, "views": settings.views,
            "input_norm": settings.input_norm, "regions": settings.regions, "weights": weights_label(settings),
            "dim": settings.dim, "normalize": settings.normalize}



def expected_preprocessing(stored: IndexSettings | None, layer: str | None = None) -> Preprocessing:
    """The decode sizes a run will most likely use, before the network is loaded: the index's recorded ones,
    or for a new index the ImageNet standard (Preprocessing's defaults), or a pooled layer's whole shorter side
    (POOLED_INPUT). The network's own are checked later."""
    if stored is not None:
        try:
            return Preprocessing.from_record(stored.preprocessing)
        except ValueError:
            pass
    if layer in POOLED_LAYERS:
        return Preprocessing(resize_size=POOLED_INPUT, crop_size=POOLED_INPUT)
    return Preprocessing()



def default_workers(device: str) -> int:
    """Decoding processes when --workers is not given: one per core, leaving the model the main process (the OS
    shares the cores). On a GPU (device "cuda", or "auto" with one present) the main process mostly waits on it,
    so up to MAX_WORKERS_GPU; on the CPU up to MAX_WORKERS_CPU. Decided before torch is imported (gpu_present)."""
    on_gpu = device == "cuda" or (device == "auto" and gpu_present())
    return max(1, min(MAX_WORKERS_GPU if on_gpu else MAX_WORKERS_CPU, available_cores()))



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


def finish_report(report: RunReport, catalog: Catalog, total: int, started: float) -> RunReport:
    """The report's totals: skipped files from the catalog, the index size, the time since started."""
    report.skipped = [{"path": display_name(p), "reason": r} for p, r in catalog.skipped()]
    report.total = total
    report.seconds = round(time.perf_counter() - started, 3)
    report.images_per_second = round(report.indexed / report.seconds, 2) if report.seconds > 0 else 0.0
    return report
