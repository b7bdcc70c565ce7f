"""index-images --ray: the job's read and extract stages as Ray Data operators on a cluster; plan and write stay on the driver."""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval.catalog import Catalog, IndexSettings
from retrieval.images.decode import Preprocessing
from retrieval.images.scan import ImageFile
from retrieval.system import available_cores, terminal_name

from indexer.config import ConfigError, DecoderCrashed, JobConfig, RunReport, finish_report
from indexer.network import load_network
from indexer.plan import Plan
from indexer.write import Writer
from indexer.read import WORKER_NICENESS, read_files

# ray, ray.data and torch are imported inside the functions: this module is imported only for --ray runs,
# and the decoding tasks (read_batch) never import torch.

log = logging.getLogger(__name__)

INSTALL_HINT = ("--ray needs Ray Data, which is not installed here: pip install 'cnn-image-retrieval[ray]' "
                "(from a checkout: pip install '.[ray]'), or pip install 'ray[data]'; or leave out --ray "
                "to index in this process")
FILES_PER_READ_TASK = 16          # files one decoding task reads (a Ray Data block of the input)
MAX_READ_TASKS = 20_000           # blocks of the input at most (a million files: 50 per task)
READ_RETRIES = 3                  # a decoding task whose worker died is run again this often, then the run fails (Ray
                                  # Data's default is forever: a file that crashes its decoder kept a run going for good)
GPU_BATCH = 256                   # images per catalog transaction on GPUs; each actor fits its forward passes
NETWORK_MEMORY = {"alexnet": 1 << 30, "vgg16": 2 << 30}   # heap a network actor reserves (weights, activations)


def require_ray() -> None:
    """Raise ConfigError with the install hint when Ray Data cannot be imported."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """Where the network runs on the cluster."""
    nodes: int
    cpus: int
    gpus: int
    device: str         # "cuda" or "cpu": the actors' device
    actors: int         # network actors (one per GPU, or a share of the CPUs)
    actor_cpus: int     # CPUs each actor reserves
    batch_size: int | str   # images per catalog transaction (and per actor call); "auto" only as an actor's chunk

    def threads_per_actor(self) -> int:
        """torch threads of a CPU actor: the cores of its node shared among the node's actors, as the
        single-process run gives the network every core and lets decoding fill the gaps at a lower priority.
        (Assumes nodes of about equal size; never fewer than the CPUs it reserved.)"""
        per_node = max(1, self.cpus // max(1, self.nodes))
        return max(self.actor_cpus, per_node // max(1, -(-self.actors // max(1, self.nodes))))

    def describe(self) -> str:
        where = (f"{self.actors} actor{'s' * (self.actors > 1)} with a GPU each" if self.device == "cuda" else
                 f"{self.actors} CPU actor{'s' * (self.actors > 1)} of {self.actor_cpus} core{'s' * (self.actor_cpus > 1)}")
        return (f"ray: {self.nodes} node{'s' * (self.nodes > 1)}, {self.cpus} CPUs, {self.gpus} GPUs; "
                f"decoding in CPU tasks, the network in {where}")


def plan_cluster(resources: dict, nodes: int, device: str, batch_size: int | str) -> ClusterPlan:
    """Choose the actor pool from the cluster's resources: one actor per GPU where there are GPUs (and
    device allows), else CPU actors on about half the cores (the other half decodes)."""
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if device == "cuda" and not gpus:
        raise ConfigError("--device cuda was asked for, but the Ray cluster has no GPUs")
    if cpus < 1:
        raise ConfigError("the Ray cluster has no CPUs to decode on")
    if gpus and device != "cpu":
        return ClusterPlan(nodes, cpus, gpus, "cuda", gpus, 1, GPU_BATCH if batch_size == "auto" else batch_size)
    actor_cpus = max(1, min(4, cpus // 2))
    actors = max(1, cpus // (2 * actor_cpus))
    from retrieval.features.batch_size import CPU_BATCH
    return ClusterPlan(nodes, cpus, gpus, "cpu", actors, actor_cpus, CPU_BATCH if batch_size == "auto" else batch_size)


# --- read: decoding tasks -------------------------------------------------------------------------

_lowered = False


def lower_priority() -> None:
    """In a decoding task's worker process, once: yield the CPU to the network, as the single-process run's
    decoding workers do (the network is what the run waits for; decoding fills the cycles it leaves)."""
    global _lowered
    if not _lowered:
        _lowered = True
        try:
            os.nice(WORKER_NICENESS)
        except OSError:
            pass


def read_batch(batch: dict[str, np.ndarray], data_dir: str, prep: Preprocessing, max_pixels: int | None) -> dict:
    """The read stage as a Ray Data batch function: {"i", "path" (bytes)} -> crops and catalog fields.

    The same read_files as the single-process run; a bad file is a row with its reason in "error" (and a
    blank crop), never an exception. -> {"i", "pixels" uint8 shape=(n, 3, crop, crop), "width", "height",
    "sha256", "error"}."""
    lower_priority()
    files = [ImageFile(os.fsdecode(p), None, 0, 0) for p in batch["path"]]
    items = read_files(Path(data_dir), files, prep, max_pixels)
    n, crop = len(items), prep.crop_size
    pixels = np.zeros((n, 3, crop, crop), np.uint8)
    width, height = np.zeros(n, np.int64), np.zeros(n, np.int64)
    sha, error = [""] * n, [""] * n
    for j, item in enumerate(items):
        if "error" in item:
            error[j] = item["error"]
            continue
        d = item["decoded"]
        pixels[j], width[j], height[j], sha[j] = d.pixels, d.width, d.height, d.sha256
    return {"i": batch["i"], "pixels": pixels, "width": width, "height": height,
            "sha256": np.array(sha, dtype=object), "error": np.array(error, dtype=object)}


# --- extract: the network in an actor pool --------------------------------------------------------

class NetworkOnNodeError(RuntimeError):
    """A Ray node could not load the index's network (weights missing there, or other weights)."""


class NetworkActor:
    """The extract stage as a Ray Data actor: loads the index's recorded network once, then embeds batches."""

    def __init__(self, settings: IndexSettings, index_dir: str, device: str, chunk: int | str, threads: int,
                 precision: str = "auto"):
        """threads: torch threads on the CPU (the node's cores shared among its actors; decoding runs niced).
        precision: the driver's (the index's recorded one, or auto's choice there)."""
        import torch

        from retrieval.features.backbones import WeightsUnavailable, build_extractor, precision_for_index, resolve_device

        from retrieval.features.batch_size import resolve_batch_size
        from indexer.extract import BatchExtractor

        if device == "cpu":
            torch.set_num_threads(threads)
        try:
            extractor, identity = build_extractor(settings.model, settings.layer, settings.weights_choice, Path(index_dir),
                                                  device, seed=settings.seed,
                                                  precision=precision_for_index(precision, resolve_device(device)),
                                                  views=settings.views, input_norm=settings.input_norm)
        except WeightsUnavailable as exc:
            raise NetworkOnNodeError(f"node {socket.gethostname()}: {exc} (every node must see the index "
                                     f"folder {index_dir} and the weights at the same paths)") from None
        if identity != settings.weights_identity:
            raise NetworkOnNodeError(f"node {socket.gethostname()}: the weights there ({identity}) are not the "
                                     f"index's ({settings.weights_identity})")
        self.dim = extractor.dim
        self.mapper = BatchExtractor(extractor, settings.normalize, resolve_batch_size(chunk, extractor))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """read_batch's columns -> the same without "pixels", with "vector" float32 shape=(n, dim) (zeros for bad files)."""
        import torch

        good = batch["error"] == ""
        vectors = np.zeros((len(good), self.dim), np.float32)
        if good.any():
            pixels: torch.Tensor = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))   # (g, 3, H, W) uint8
            vectors[good] = self.mapper(pixels)                                                     # -> (g, dim)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        return out


# --- the driver -----------------------------------------------------------------------------------

def connect(address: str) -> bool:
    """Join the cluster at address, or $RAY_ADDRESS when address is "", or start a local one. -> True when
    this call started Ray (and so must shut it down). A process that already joined a cluster keeps it."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS", "")
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            cores = available_cores()
            ray.init(address="local", num_cpus=cores, include_dashboard=False,
                     object_store_memory=min(2 << 30, 256 * 2**20 * max(2, cores)), **quiet)
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster answers at {address!r} ({exc}); start one with `ray start --head`, "
                          "or give --ray no address to start a local one") from exc
    return True


RAY_CURRENT_CLUSTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"   # where `ray start --head` notes it
PROBE_TIMEOUT_S = 5.0


def probe_cluster(address: str) -> None:
    """Fail at once, saying what to do, where ray.init would retry for minutes: an address that is no host:port, or
    one where nothing listens (a mistyped port, a head that died without `ray stop`, which "auto" still finds).
    Raises ConfigError."""
    given = address
    if address == "auto":
        try:
            address = RAY_CURRENT_CLUSTER.read_text().strip()
        except OSError:
            return                     # ray.init says no cluster runs here, at once
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        raise ConfigError(f"--ray {given!r} is no Ray address: give the head's host:port (`ray start --head` prints "
                          "it, e.g. 127.0.0.1:6379), 'auto' for the cluster started on this machine, or no address "
                          "to start a local one (the data folder comes first: index-images DATA_DIR --ray ADDRESS)")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        where = f" (the one {RAY_CURRENT_CLUSTER} names)" if given == "auto" else ""
        raise ConfigError(f"no Ray cluster answers at {address}{where}: {exc.strerror or exc}; start one with "
                          "`ray start --head` (after `ray stop` if a head died), or give --ray no address to start a "
                          "local one") from None


def run_on_ray(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict, plan: Plan,
               started: float, on_cluster: Callable[[str], None] | None) -> RunReport:
    """Index plan.todo on a Ray cluster: read as CPU tasks, extract in an actor pool, write here, batch by batch.

    The cluster is joined first (run_index has probed its address, so one that answers nothing has written nothing),
    then the network is checked (and a new index's settings and random weights written) before the cluster is asked
    for any work."""
    if chosen["regions"]:
        raise ConfigError("regional vectors (--regions) are extracted in this process only, not on Ray yet: "
                          "run index-images without --ray")
    import ray
    import ray.data

    started_here = connect(cfg.ray or "")   # first: an address that answers nothing writes nothing
    try:
        extractor = load_network(cfg, catalog, stored, chosen, "cpu")
        prep, dim, precision = extractor.preprocessing, extractor.dim, extractor.precision
        del extractor   # the actors load their own copy; the driver only writes
        gc.collect()
        settings = catalog.settings()
        assert settings is not None, "load_network records a new index's settings"
        cluster = plan_cluster(ray.cluster_resources(), len([n for n in ray.nodes() if n.get("Alive")]),
                               cfg.device, cfg.batch_size)
        if on_cluster:
            on_cluster(cluster.describe())
        log.info("%s", cluster.describe())
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True   # batches come back in file order: ids as in a single run
        ctx.enable_progress_bars = False              # the driver shows its own (and Ray's line saying how to
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # turn them on again is not said)
        if not log.isEnabledFor(logging.INFO):   # Ray Data's per-dataset lines only with -v
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.WARNING)

        todo = plan.todo
        items = [{"i": i, "path": os.fsencode(f.path)} for i, f in enumerate(todo)]
        blocks = max(1, min(MAX_READ_TASKS, math.ceil(len(items) / FILES_PER_READ_TASK)))
        batch_size = cluster.batch_size if isinstance(cluster.batch_size, int) else GPU_BATCH
        with warnings.catch_warnings():   # max_retries has no named parameter yet (Ray < 2.64, as pyproject.toml pins)
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            read = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                read_batch, batch_format="numpy", num_cpus=1, max_retries=READ_RETRIES,
                fn_kwargs={"data_dir": str(cfg.data_dir), "prep": prep, "max_pixels": cfg.max_pixels})
        ds = (read
              .map_batches(NetworkActor, batch_size=batch_size, batch_format="numpy",
                           compute=ray.data.ActorPoolStrategy(size=cluster.actors),
                           fn_constructor_kwargs={"settings": settings, "index_dir": str(cfg.index_dir),
                                                  "device": cluster.device, "chunk": cfg.batch_size,
                                                  "threads": cluster.threads_per_actor(),
                                                  # CPU actors compute in the driver's precision (probed there)
                                                  "precision": precision if cluster.device == "cpu" else cfg.precision},
                           num_cpus=cluster.actor_cpus, num_gpus=1 if cluster.device == "cuda" else None,
                           # the reservation also keeps Ray from fusing decoding into the actors
                           memory=NETWORK_MEMORY.get(settings.model, 1 << 30)))
        with Writer(cfg, catalog, plan, dim) as writer:   # commits on its thread while the driver takes the next batch
            received = 0   # files answered so far (in file order: preserve_order)
            try:
                for out in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
                    rows, bad, good = _rows(out, todo)
                    writer.write(rows, np.ascontiguousarray(out["vector"][good], dtype=np.float32), bad)
                    received = max(received, int(out["i"].max()) + 1) if len(out["i"]) else received
            except Exception as exc:   # noqa: BLE001 - Ray wraps what a task raised; a node's network problem is the user's to fix
                why = _network_problem(exc)
                if why is not None:
                    raise ConfigError(why) from exc
                if _worker_crashed(exc) and received < len(todo):
                    raise DecoderCrashed(
                        f"a decoding task on the cluster lost its worker process {READ_RETRIES + 1} times in a row (a "
                        f"file that crashes the image decoder, or a node out of memory); the "
                        f"{len(todo) - received:,} files from {terminal_name(str(todo[received].path))} on are not "
                        "indexed yet") from exc
                raise
        return finish_report(writer.report, catalog, len(writer.vectors), started)
    finally:
        if started_here:
            _shutdown(ray)


def _rows(out: dict[str, np.ndarray], todo: list[ImageFile]) -> tuple[list[dict], list[dict], np.ndarray]:
    """A batch from the actors -> (catalog rows, skipped files, mask of the rows' positions in the batch)."""
    good = out["error"] == ""
    rows, bad = [], []
    for j, i in enumerate(out["i"].tolist()):
        f = todo[i]
        if good[j]:
            rows.append({"path": f.path, "label": f.label, "size": f.size, "mtime_ns": f.mtime_ns,
                         "width": int(out["width"][j]), "height": int(out["height"][j]), "sha256": out["sha256"][j]})
        else:
            bad.append({"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "reason": out["error"][j]})
    return rows, bad, good


def _worker_crashed(exc: BaseException) -> bool:
    """Whether what Ray raised is a task whose worker process died (WorkerCrashedError, anywhere in the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "WorkerCrashedError" in type(exc).__name__ or "WorkerCrashedError" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _network_problem(exc: BaseException) -> str | None:
    """The NetworkOnNodeError message inside what Ray raised, if it is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NetworkOnNodeError) or "NetworkOnNodeError" in type(exc).__name__:
            return str(exc).splitlines()[-1].partition("NetworkOnNodeError: ")[2] or str(exc)
        text = str(exc)
        if "NetworkOnNodeError: " in text:
            return text.rpartition("NetworkOnNodeError: ")[2].splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def _shutdown(ray) -> None:  # noqa: ANN001 - the ray module
    """Stop the local cluster this run started (its raylet, GCS and workers), waiting briefly for them."""
    t = time.monotonic()
    ray.shutdown()
    log.debug("ray shut down in %.1f s", time.monotonic() - t)
    sys.stderr.flush()
