"""The plan stage: scan the data folder and diff it against the catalog (torch-free: an unchanged folder
re-indexes without importing torch, FAISS or the network)."""
from __future__ import annotations

import dataclasses

import numpy as np

from retrieval.catalog import CATALOG_FILE, Catalog
from retrieval.images.scan import ImageFile, scan_folder

from indexer.config import JobConfig

@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run has to do, from the folder scan and the catalog."""
    todo: list[ImageFile]                 # new or changed
    remove: list[str]                     # paths gone from the folder
    refused: dict[str, str]               # found but refused before decoding (path -> reason)
    unchanged: int
    found: int = 0                        # image files the folder holds now, refused ones included



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
    return Plan(todo, remove, refused, unchanged, len(present))



def plan(cfg: JobConfig, catalog: Catalog) -> Plan:
    """The plan stage: scan the data folder and diff it against the catalog (torch-free)."""
    scan = scan_folder(cfg.data_dir, exclude=[cfg.index_dir], skip_folders_holding=CATALOG_FILE,
                       max_file_bytes=cfg.max_file_bytes)
    return plan_run(scan.images, scan.skipped, catalog)



def removals(plan: Plan, catalog: Catalog) -> list[str]:
    """Paths to take out of the index: gone from the folder, or indexed and now refused before decoding."""
    indexed_paths = catalog.file_states() if plan.refused else {}
    return plan.remove + [p for p in plan.refused if p in indexed_paths]


def record_refused(plan: Plan, catalog: Catalog) -> None:
    """Record files refused before decoding (too large, symlinks out) that the catalog does not list yet."""
    if not plan.refused:
        return
    known = catalog.skipped_states()
    fresh = [{"path": p, "size": 0, "mtime_ns": 0, "reason": r} for p, r in plan.refused.items() if p not in known]
    if fresh:
        catalog.write_batch([], np.zeros((0, 0), np.float32), fresh)
