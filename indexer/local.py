"""This process's wiring of the stages: read (decoding workers) -> extract (the network, on its own thread) ->
write (the writer thread). indexer/ray_job.py wires the same stages on a Ray cluster."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from retrieval.catalog import Catalog, IndexSettings
from retrieval.features.digests import hash_ahead
from retrieval.system import collector_paused
from retrieval.vectors.regions import regions_type_error

from indexer.config import ConfigError, JobConfig, RunReport, default_workers, device_share, expected_preprocessing, finish_report
from indexer.network import device_label, load_network, weights_file
from indexer.plan import Plan
from indexer.read import Reader
from indexer.stage_thread import StageThread
from indexer.write import Writer

if TYPE_CHECKING:   # torch, torchvision and FAISS are imported only when there is work for the network
    from retrieval.features.backbones import FeatureExtractor


def run_local(cfg: JobConfig, catalog: Catalog, stored: IndexSettings | None, chosen: dict, plan: Plan,
              started: float, on_extractor: Callable[[FeatureExtractor], None] | None) -> RunReport:
    """Run the planned work in this process: decoding starts at once, in workers forked before torch is
    imported, while the network loads."""
    workers = cfg.workers if cfg.workers is not None else default_workers(cfg.device)
    regions = chosen["regions"]   # regions are cropped by the workers from their decode: no JPEG left for the device
    if regions and (refused := regions_type_error(cfg.vector_index.index_type)):   # before the network is loaded
        raise ConfigError(f"{refused} (--index-type)")
    if regions and cfg.decode == "device":
        raise ConfigError("an index with regional vectors (--regions) has its images decoded by the workers, which "
                          "crop the regions: use --decode auto or --decode workers")
    with Reader(cfg.data_dir, plan.todo, workers=workers,
                prep=dataclasses.replace(expected_preprocessing(stored, cfg.layer), regions=regions),
                max_pixels=cfg.max_pixels, device_share=None if regions else device_share(cfg)) as reader:
        return _update(cfg, catalog, stored, chosen, plan, reader, started, on_extractor)


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
            pixels, rows, bad, region_pixels = item
            with clock("network"):
                feats = mapper(pixels) if pixels is not None else np.zeros((0, extractor.dim), np.float32)
                regions = None if region_pixels is None else \
                    mapper(region_pixels).reshape(len(rows), -1, extractor.dim)   # (n * R, dim) -> (n, R, dim)
            with clock("write"):             # waits only while the writer thread is still on the batch before last
                writer.write(rows, feats, bad, regions)   # committed on the writer thread while the next batch runs

        prep = dataclasses.replace(extractor.preprocessing, regions=chosen["regions"])
        batches = clock.timed("wait for decoding", reader.read(prep, batch_size,
                                                               pin_memory=extractor.device.type == "cuda"))
        loop_started = time.perf_counter()
        network = StageThread(extract, name="index-network")
        try:
            for batch in batches:
                to_device.balance(clock)              # --decode auto: who waited for whom, and the share moved
                with clock("device decoding"):
                    item = (*to_device(batch), batch.region_pixels)   # JPEGs left by the workers decoded on the device
                with clock("wait for the network"):
                    network.put(item)
        finally:
            network.close()                           # the batches handed over are extracted and written
        network.raise_failure()
        loop_seconds = time.perf_counter() - loop_started
    report = finish_report(writer.report, catalog, len(writer.vectors), started)
    probe = extractor.probe   # auto on a CPU with bf16 units: the timings it chose by, measured now or remembered
    report.extraction = {"device": device_label(extractor), "precision": extractor.precision,
                         "precision_probe": None if probe is None else {
                             "fp32_ms": probe["fp32_ms"], "bf16_ms": probe["bf16_ms"], "remembered": "probed" in probe},
                         "decode": to_device.decode, "device_decoded": to_device.decoded,
                         "device_share": to_device.shares(),
                         "batch_size": batch_size, "workers": reader.workers, "stage_seconds": clock.seconds(),
                         # the images' own rate, start-up (imports, network, first CUDA calls) and final save left out
                         "loop_seconds": round(loop_seconds, 3),
                         "loop_images_per_second": round(report.indexed / loop_seconds, 1) if loop_seconds else 0.0}
    return report
