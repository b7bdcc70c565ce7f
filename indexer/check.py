"""`index-images DATA --check`: verify an index without changing what it answers.

What is verified: the catalog file (SQLite's PRAGMA quick_check), every row's vector against its CRC32
(rows written before checksums get one: they are trusted as they are), and the FAISS file against the
catalog (readable; the same ids; for exact Flat the same vectors; its size and digest as last saved).
Rows whose vector fails its checksum are marked (their recorded size set to -1), so the next index-images
run extracts them again; a server leaves them out of its FAISS index meanwhile.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.catalog import Catalog, damaged_message, damaged_reason, db_error_reason
from retrieval.files import leftover_temporaries
from retrieval.names import FAISS_FILE, REGIONS_FILE
from retrieval.system import display_name

SHOWN = 10   # ids and paths named in the text report (the JSON report has them all)


def check_index(data_dir: Path, index_dir: Path, db_url: str | None) -> dict:
    """The report: {"ok", "catalog", "images", "quick_check", "vectors", "faiss", "problems", "actions"}.

    Raises FileNotFoundError (no index), CatalogUnavailable, SQLAlchemyError (a catalog that fails to read),
    ConfigError (an index-images run is writing the index now)."""
    from sqlalchemy.exc import SQLAlchemyError

    from indexer.locks import IndexBusy, writer_running

    if writer_running(index_dir):   # its FAISS file lags its commits until it saves: a check now finds false damage
        raise IndexBusy(f"another index-images run is updating {display_name(str(index_dir))}; check it when that "
                          "run has finished")
    catalog = Catalog(index_dir, url=db_url)
    data = display_name(str(data_dir))
    report: dict = {"ok": True, "catalog": catalog.location, "images": 0, "quick_check": [],
                    "vectors": {"checked": 0, "filled": 0, "bad": []}, "faiss": {}, "problems": [], "actions": []}
    try:
        try:
            report["quick_check"] = catalog.quick_check()
        except SQLAlchemyError as exc:
            report["quick_check"] = [db_error_reason(exc, db_url)]
        if report["quick_check"]:
            reason = damaged_reason(Exception(" ".join(report["quick_check"]))) or report["quick_check"][0]
            report["problems"].append(f"the catalog file fails SQLite's quick_check: {'; '.join(report['quick_check'][:SHOWN])}")
            report["actions"].append(damaged_message(catalog.location, reason, data))
            report["ok"] = False
            return report   # reading every row of a damaged file would only fail further
        settings = catalog.settings()
        if settings is None:
            report["problems"].append("the index is unfinished (no settings)")
            report["actions"].append(f"run index-images {data} --index-dir {display_name(str(index_dir))} again with "
                                     "the options of its first run (--weights, --model, ...): it goes on from there")
            report["ok"] = False
            return report
        report["images"] = catalog.count()
        vectors = catalog.check_vectors()
        bad = sorted(set(vectors["bad"]) | set(catalog.check_region_vectors()))   # an image or one of its regions
        paths = catalog.mark_for_extraction(bad)
        report["vectors"] = {"checked": vectors["checked"], "filled": vectors["filled"],
                             "bad": [{"id": i, "path": display_name(p)} for i, p in zip(bad, paths)]}
        if bad:
            shown = ", ".join(display_name(p) for p in paths[:SHOWN]) + (" ..." if len(paths) > SHOWN else "")
            report["problems"].append(f"{len(bad)} vector(s) fail their checksum (damaged in the catalog): {shown}")
            report["actions"].append(f"they are marked to be extracted again and left out of searches: run "
                                     f"index-images {data} --index-dir {display_name(str(index_dir))}")
        leftovers = leftover_temporaries(index_dir)   # no writer is at work (checked above): a killed run's
        if leftovers:
            size = sum(p.stat().st_size for p in leftovers if p.exists()) / 2**20
            report["problems"].append(f"{len(leftovers)} temporary file(s) an interrupted run left, {size:,.1f} MB: "
                                      + ", ".join(p.name for p in leftovers[:SHOWN]))
            report["actions"].append(f"run index-images {data} --index-dir {display_name(str(index_dir))}: it removes "
                                     "them")
        weights = weights_problem(index_dir, settings)
        if weights is not None:
            report["problems"].append(weights[0])
            report["actions"].append(weights[1].format(data=data, index=display_name(str(index_dir))))
        report["faiss"] = _check_faiss(index_dir / FAISS_FILE, catalog, settings.dim, set(bad))
        if settings.regions:
            report["regions"] = _check_regions(index_dir / REGIONS_FILE, catalog, settings.dim, set(bad))
            report["faiss"]["problems"] += report["regions"]["problems"]
        if report["faiss"]["problems"]:
            report["problems"] += report["faiss"]["problems"]
            report["actions"].append(f"rebuild it from the catalog: index-images {data} --index-dir "
                                     f"{display_name(str(index_dir))} --rebuild-index")
        report["ok"] = not report["problems"]
        return report
    finally:
        catalog.close()


def weights_problem(index_dir: Path, settings) -> tuple[str, str] | None:  # noqa: ANN001 - IndexSettings
    """The weights file queries are computed with (the index's random weights, or a state dict file it was built
    from): there and the one recorded (its SHA-256)? -> (problem, action with {data} and {index}) or None."""
    from retrieval.features.digests import file_sha256

    choice = settings.weights_choice
    path = choice.source_file(index_dir, settings.model)
    if path is None:   # ImageNet weights: known by their name, in torch hub's cache
        return None
    try:
        same = file_sha256(path) == settings.weights_sha256
    except FileNotFoundError:
        if choice.is_random:
            return (f"the index's random weights file {path.name} is missing: no query can be computed",
                    "run index-images {data} --index-dir {index}: it makes the file again from the recorded seed")
        return (f"the weights file {display_name(str(path))} this index was built with is missing: no query can be "
                "computed", "put that file back, or if it moved: index-images {data} --index-dir {index} --weights NEW_PATH "
                "(the same file, checked by its SHA-256)")
    except OSError as exc:
        return (f"the weights file {display_name(str(path))} cannot be read ({exc.strerror or exc})",
                "make it readable, or put the file back from a backup")
    if same:
        return None
    if choice.is_random:
        return (f"the index's random weights file {path.name} is not the one recorded (damaged or replaced)",
                "run index-images {data} --index-dir {index}: it makes the file again from the recorded seed")
    return (f"the weights file {display_name(str(path))} has changed since this index was built with it",
            "put the original back, or index into a new folder with these weights")


def _check_faiss(path: Path, catalog: Catalog, dim: int, bad: set[int]) -> dict:
    """The FAISS file against the catalog: {"file", "readable", "type", "missing", "extra", "different", "problems"}."""
    from retrieval.files import sample_digest
    from retrieval.vectors.faiss_parts import is_exact
    from retrieval.vectors.vector_index import VectorIndex

    import faiss

    found: dict = {"file": display_name(str(path)), "readable": False, "type": None, "missing": 0, "extra": 0,
                   "different": 0, "problems": []}
    want = catalog.ids()
    if not path.exists():
        if len(want):
            found["problems"].append(f"the FAISS file {found['file']} is missing")
        return found
    recorded = catalog.faiss_digest()
    try:
        changed = recorded is not None and sample_digest(path) != recorded
    except OSError as exc:
        found["problems"].append(f"the FAISS file {found['file']} cannot be read: {exc}")
        return found
    index = VectorIndex.load(path, dim, factory=None)
    if index is None:
        found["problems"].append(f"the FAISS file {found['file']} is unreadable")
        return found
    # the type as index-images recorded it (a file read back knows only whether it is exact: "?" for PCAW64,L2norm,Flat)
    found["readable"], found["type"] = True, (catalog.vector_index_record() or {}).get("factory") or index.factory
    if changed:
        found["problems"].append(f"the FAISS file {found['file']} is not the one last saved (size or digest differ)")
    have = index.ids()
    missing, extra = np.setdiff1d(want, have), np.setdiff1d(have, want)
    missing = np.array([i for i in missing.tolist() if i not in bad], dtype=np.int64)   # left out on purpose
    found["missing"], found["extra"] = int(len(missing)), int(len(extra))
    if len(missing) or len(extra):
        found["problems"].append(f"the FAISS file holds other ids than the catalog: {len(missing)} missing, "
                                 f"{len(extra)} not in the catalog")
    if is_exact(index.index) and not (catalog.vector_index_record() or {}).get("dba"):   # DBA stores averages
        flat = faiss.downcast_index(index.index.index)
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * dim).reshape(flat.ntotal, dim)
        position = {int(i): p for p, i in enumerate(have.tolist())}
        different = 0
        for ids, vecs in catalog.vectors():   # rows failing their checksum are left out here
            for i, vec in zip(ids.tolist(), vecs):
                p = position.get(i)
                if p is not None and not np.allclose(stored[p], vec, atol=1e-5):
                    different += 1
        found["different"] = different
        if different:
            found["problems"].append(f"the FAISS file holds other vectors than the catalog for {different} id(s)")
    return found


def _check_regions(path: Path, catalog: Catalog, dim: int, bad: set[int]) -> dict:
    """The regional vectors' FAISS file (index-images --regions) against the catalog: {"file", "readable", "count",
    "missing", "extra", "problems"}: the same images, each with all its regions."""
    from retrieval.vectors.vector_index import VectorIndex

    found: dict = {"file": display_name(str(path)), "readable": False, "count": 0, "missing": 0, "extra": 0,
                   "problems": []}
    want = catalog.region_ids()
    if not path.exists():
        if len(want):
            found["problems"].append(f"the regional vectors' FAISS file {found['file']} is missing")
        return found
    index = VectorIndex.load(path, dim, factory=None)
    if index is None:
        found["problems"].append(f"the regional vectors' FAISS file {found['file']} is unreadable")
        return found
    have = index.ids()
    found["readable"], found["count"] = True, len(have)
    missing = [i for i in np.setdiff1d(want, have).tolist() if i not in bad]
    extra = np.setdiff1d(have, want)
    found["missing"], found["extra"] = len(missing), int(len(extra))
    expected = catalog.region_count()
    if missing or len(extra) or (not bad and len(have) != expected):
        found["problems"].append(f"the regional vectors' FAISS file holds other vectors than the catalog: "
                                 f"{len(have)} vectors ({expected} in the catalog), {len(missing)} images missing, "
                                 f"{len(extra)} not in the catalog")
    return found


def describe(report: dict) -> str:
    """The report as lines for a person: what was verified, what was found, what to do."""
    v, f = report["vectors"], report["faiss"]
    sqlite = not str(report["catalog"]).startswith(("postgresql", "postgres"))   # (a server checks its own pages)
    lines = [f"catalog {report['catalog']}: "
             f"{('quick_check ok' if sqlite else 'answers') if not report['quick_check'] else 'DAMAGED'}"]
    if v["checked"]:
        lines.append(f"vectors: {v['checked']} checked, {len(v['bad'])} failing their checksum"
                     + (f" ({v['filled']} had none yet: checksums added)" if v["filled"] else ""))
    if f:
        state = f"{f['type']}, {'readable' if f['readable'] else 'unreadable'}" if f["readable"] else "unreadable or missing"
        lines.append(f"FAISS file {f['file']}: {state}")
    lines += [f"problem: {p}" for p in report["problems"]]
    lines += [f"to do: {a}" for a in report["actions"]]
    lines.append("ok: the index is sound" if report["ok"] else "the index needs repair (see above)")
    return "\n".join(lines)
