"""The plan stage: scan the data folder and diff it against the catalog (torch-free: an unchanged folder
re-indexes without importing torch, FAISS or the network)."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retrieval.catalog import CATALOG_FILE, Catalog
from retrieval.features.digests import files_sha256
from retrieval.images.scan import ImageFile, may_read_later, scan_folder

from indexer.config import JobConfig

@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run has to do, from the folder scan and the catalog."""
    todo: list[ImageFile]                 # new or changed
    remove: list[str]                     # paths gone from the folder
    refused: dict[str, str]               # found but refused before decoding (path -> reason)
    unchanged: int
    found: int = 0                        # image files the folder holds now, refused ones included
    folders: dict[str, str] = dataclasses.field(default_factory=dict)   # folders not looked into -> why (the scan's),
                                                                        # with what the index keeps of them
    unlisted_root: str | None = None      # why the data folder itself cannot be listed (None: it can)
    was_indexed: frozenset[str] = frozenset()   # the todo files the index holds (changed since): one that cannot be
                                                # read now leaves the index, and is counted as removed
    same_size: frozenset[str] = frozenset()     # those of them whose size is as indexed (their time changed)
    restamp: list[ImageFile] = dataclasses.field(default_factory=list)   # indexed files whose time changed but not
                                                # their bytes (a touch, a copy without its times): kept as they are
    unreadable_formats: dict[str, int] = dataclasses.field(default_factory=dict)   # the scan's: ".heic" -> files
    moves: list[tuple[str, ImageFile]] = dataclasses.field(default_factory=list)   # (indexed path, the file now there):
                                                # moved or renamed (same size, time and bytes): kept, path and label new


HASH_THREADS = 4   # files hashed at once to see whether a touched file's bytes changed (reads, mostly)


def _under(path: str, folders: frozenset[str]) -> bool:
    """Whether a relative path lies in one of these folders (relative paths; "." the data folder)."""
    return "." in folders or any(path.startswith(f + "/") for f in folders)


def plan_run(scan_images: list[ImageFile], refused: dict[str, str], catalog: Catalog,
             folders: dict[str, str] | None = None, unlisted: frozenset[str] = frozenset()) -> Plan:
    """unlisted: folders the scan could not list: the index keeps what it has of them, unchanged (a folder that
    cannot be read now is no folder emptied)."""
    known = catalog.file_states()
    known_skipped = catalog.skipped_states()
    present = {f.path for f in scan_images} | set(refused)
    folders = dict(folders or {})
    unlisted_root = folders.get(".") if "." in unlisted else None
    kept = [p for p in known if p not in present and _under(p, unlisted)] if unlisted else []
    for folder in unlisted:
        n = sum(1 for p in kept if _under(p, frozenset({folder})))
        if n:
            folders[folder] += f"; the {n} image{'' if n == 1 else 's'} indexed from it stay in the index as they were"
    present |= set(kept) | ({p for p in known_skipped if _under(p, unlisted)} if unlisted else set())
    todo, unchanged = [], len(kept)
    for f in scan_images:
        state = known.get(f.path)
        if state is not None and state[1:] == (f.size, f.mtime_ns):
            unchanged += 1
            continue
        skipped = known_skipped.get(f.path)
        if state is None and skipped is not None and skipped[:2] == (f.size, f.mtime_ns) \
                and not may_read_later(skipped[2]):
            continue  # still the same bad file: no need to decode it again
        todo.append(f)
    remove = sorted((set(known) | set(known_skipped)) - present)
    return Plan(todo, remove, refused, unchanged, len(present) - len(kept), folders, unlisted_root,
                frozenset(f.path for f in todo if f.path in known),
                frozenset(f.path for f in todo if f.path in known and known[f.path][1] == f.size))



def plan(cfg: JobConfig, catalog: Catalog) -> Plan:
    """The plan stage: scan the data folder and diff it against the catalog (torch-free)."""
    scan = scan_folder(cfg.data_dir, exclude=[cfg.index_dir], skip_folders_holding=CATALOG_FILE,
                       max_file_bytes=cfg.max_file_bytes)
    planned = plan_run(scan.images, scan.skipped, catalog, scan.folders, scan.unlisted)
    planned = same_content_kept(dataclasses.replace(planned, unreadable_formats=scan.unreadable_formats), cfg.data_dir,
                                catalog)
    return moves_kept(planned, cfg.data_dir, catalog)


def pending_changes(data_dir: Path, index_dir: Path, catalog: Catalog) -> tuple[int, int]:
    """What index-images would find to do in data_dir now, without doing it: -> (files new or changed since they were
    indexed, files gone). For the commands that read an index and should say when it lags its folder."""
    scan = scan_folder(data_dir, exclude=[index_dir], skip_folders_holding=CATALOG_FILE)
    planned = moves_kept(same_content_kept(plan_run(scan.images, scan.skipped, catalog, scan.folders, scan.unlisted),
                                           data_dir, catalog), data_dir, catalog)
    return len(planned.todo) + len(planned.moves), len(planned.remove)   # a move changes a path, maybe a label


def same_content_kept(planned: Plan, data_dir: Path, catalog: Catalog) -> Plan:
    """The plan less the files whose time changed but not their bytes (hashed against the catalog's sha256: a touch,
    a restore or a copy that did not keep the times would otherwise extract every one again, each under a new id);
    they are counted unchanged and listed to restamp."""
    if not planned.same_size:
        return planned
    recorded = catalog.recorded_contents(planned.same_size)
    candidates = [f for f in planned.todo if f.path in recorded]
    same = {f.path for f, digest in zip(candidates, _digests(data_dir, candidates)) if digest == recorded[f.path][2]}
    if not same:
        return planned
    return dataclasses.replace(planned, todo=[f for f in planned.todo if f.path not in same],
                               unchanged=planned.unchanged + len(same),
                               restamp=[f for f in planned.todo if f.path in same])



def moves_kept(planned: Plan, data_dir: Path, catalog: Catalog) -> Plan:
    """The plan less the files that were moved or renamed in the folder (a class folder renamed): a new path whose
    size and modification time are those of an indexed path gone from the folder, and whose bytes hash to its sha256,
    keeps that image's id and vector with its new path and label (each was extracted again, under a new id: a
    review's renamed folder of 262 photos went through the network again). Listed in moves."""
    if not planned.remove or not planned.todo:   # nothing gone, or nothing new: no move (and no catalog read)
        return planned
    recorded = catalog.recorded_contents(planned.remove)   # the indexed paths gone (a skipped one is none)
    gone: dict[tuple[int, int], list[str]] = {}
    for path, (size, mtime_ns, _sha) in recorded.items():
        gone.setdefault((size, mtime_ns), []).append(path)
    candidates = [f for f in planned.todo if f.path not in planned.was_indexed and (f.size, f.mtime_ns) in gone]
    if not candidates:
        return planned
    moves, taken = [], set()
    for f, digest in zip(candidates, _digests(data_dir, candidates)):
        old = next((p for p in gone[(f.size, f.mtime_ns)] if p not in taken and recorded[p][2] == digest), None)
        if digest is not None and old is not None:   # one indexed image for one new path (byte copies moved too)
            taken.add(old)
            moves.append((old, f))
    if not moves:
        return planned
    moved = {f.path for _old, f in moves}
    return dataclasses.replace(planned, todo=[f for f in planned.todo if f.path not in moved],
                               remove=[p for p in planned.remove if p not in taken], moves=moves)


def _digests(data_dir: Path, files: list[ImageFile]) -> list[str | None]:
    """The sha256 of each file (None: unreadable now; the decode will say why), a few at a time."""
    if not files:
        return []
    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(files)))) as pool:   # hashlib lets go of the GIL
        return list(pool.map(lambda f: files_sha256(data_dir, [f.path])[0], files))


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
