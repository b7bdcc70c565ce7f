"""Benchmark: find-duplicates against idealo's imagededup hashes on real photos, and the grouping's time up to 1M vectors.

Quality, for each seed: a flat folder of real photos (benchmarks/real_photos.py): one 320x240 crop of each of its
19 photos as a distinct original, its 8 edited copies (retrieval/images/edits.py: crop, flip, JPEG 30, brightness,
downscale, 7-degree rotation, greyscale, blur), and DISTRACTORS other crops of the same photos, each overlapping any
other crop of its photo by less than MAX_IOU (so a distractor is no copy of an original, nor of another distractor).
Truth: each original with its copies is one group. The folder is indexed with `index-images --weights random`
(AlexNet fc7, the CPU; --index-options adds index-images options, e.g. "--views flip"), then `find-duplicates
--json` at its defaults (threshold calibrated on the collection; complete-linkage groups) gives groups, and the same
in process with the old rule (grouping="connected": pairs joined through each other, calibrated at F-beta 0.5) for
comparison; imagededup's PHash, DHash, WHash and AHash at their defaults (max_distance_threshold 10) give each
file's duplicates. Scored by pair precision/recall/F1 (a pair: two files in one group; for the hashes, two files
one names as the other's duplicate). find-duplicates' settings (whitening dimension, the calibration's F-beta and
neighbours) were chosen on seed 0: seeds 1.. are held out.

Timing: random unit vectors of the whitened dimension (N of them, a tenth of them planted in groups of 9 near
copies), the grouping step as find-duplicates runs it (FAISS exact range search up to EXACT_MAX vectors, IVF k-NN
above; then the complete-linkage groups; the connected components' time beside it), medians of --repeats runs; and
the whitening's cost per 4096-d vector, so the whole at N is the sum. The grouping alone (the planted pairs
given, no search) is timed up to 1M, each rule (--grouping-sizes).

    python benchmarks/bench_duplicates.py --seeds 0 1 2 --sizes 10000 100000 1000000 --index-options "--views flip"

Threshold rules (--rules): for each seed the set above with 8, 1 and 0 copies of each original, and the `make demo`
drawings (no copies) alone and with 9 planted copies (a byte copy, one copy per edit); each index is calibrated once
and every candidate rule (RULES: the default, the rule before, stricter ones) picks its threshold from the same
distances; groups scored by pair F1, or by the images they hold where there is nothing to find; hashes beside.
--whiten-dims D [D ...] groups each index at each whitening dimension (one row each; default: find-duplicates').

    python benchmarks/bench_duplicates.py --rules --seeds 0 1 2 --index-options "--views flip --input-norm image"

Prints the tables and saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from benchmarks.real_photos import real_photos  # noqa: E402
from retrieval.images.edits import edited_copies  # noqa: E402
from retrieval.system import available_cores  # noqa: E402
from retrieval.vectors.duplicates import (DEFAULT_GROUPING, DEFAULT_WHITEN_DIM, EXACT_MAX, GROUPINGS,  # noqa: E402
                                          close_pairs, pair_scores)
from retrieval.vectors.whitening import learn_whitening, whiten  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
DISTRACTORS = 336       # 19 x 9 + 336 = 507 images
MAX_IOU = 0.4           # a distractor overlaps any other crop of its photo by less than this (intersection / union)
SIZE = (320, 240)
HASHES = ("PHash", "DHash", "WHash", "AHash")
PLANTED_GROUP = 9       # timing: near copies planted per group (an original and its 8 edits)


def _box(photo: Image.Image, rng: random.Random, lo: float, hi: float) -> tuple[int, int, int, int]:
    w, h = photo.size
    f = rng.uniform(lo, hi)
    cw, ch = max(16, int(w * f)), max(16, int(h * f))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return x, y, x + cw, y + ch


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_set(folder: Path, seed: int, distractors: int = DISTRACTORS, copies: int = 8) -> list[list[str]]:
    """Write the seed's originals, copies and distractors into folder (flat) -> the true groups (file names).
    copies: 8, every edit of each original; fewer, that many edits of each (the n-th original's starting at edit
    n); 0, no copies at all (no true groups)."""
    rng = random.Random(seed)
    photos = sorted(real_photos().items())
    folder.mkdir(parents=True, exist_ok=True)
    boxes: dict[str, list[tuple]] = {}
    groups = []
    for name, photo in photos:
        b = _box(photo, rng, 0.4, 0.7)
        boxes[name] = [b]
        original = photo.crop(b).resize(SIZE, Image.BILINEAR)
        original.save(folder / f"orig_{name}.jpg", quality=90)
        group = [f"orig_{name}.jpg"]
        edits = list(edited_copies(original, seed).items())
        for edit, img in (edits if copies >= len(edits) else
                          [edits[(len(groups) + k) % len(edits)] for k in range(copies)]):
            img.save(folder / f"copy_{name}_{edit}.jpg", quality=90)
            group.append(f"copy_{name}_{edit}.jpg")
        groups.append(group)
    for i in range(distractors):
        name, photo = photos[i % len(photos)]
        for _ in range(500):   # the last try is kept when none fits (small photos, many crops)
            b = _box(photo, rng, 0.3, 0.6)
            if all(_iou(b, o) < MAX_IOU for o in boxes[name]):
                break
        boxes[name].append(b)
        photo.crop(b).resize(SIZE, Image.BILINEAR).save(folder / f"other_{name}_{i:03d}.jpg", quality=90)
    return [g for g in groups if len(g) > 1]


def run_find_duplicates(data: Path, index: Path, index_options: list[str],
                        ) -> tuple[list[list[str]], dict, float, float]:
    """index-images --weights random [index_options], then find-duplicates --json -> (groups of file names,
    threshold, seconds to index, seconds to group)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INDEX_IMAGES_", "FIND_DUPLICATES_"))}
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "index-images"), str(data), "--index-dir", str(index), "--weights", "random",
                    *index_options], check=True, capture_output=True, env=env)
    t1 = time.perf_counter()
    out = subprocess.run([str(BIN / "find-duplicates"), "--index-dir", str(index), "--json"], check=True,
                         capture_output=True, text=True, env=env)
    t2 = time.perf_counter()
    doc = json.loads(out.stdout)
    return [[m["path"] for m in g] for g in doc["groups"]], doc["threshold"], t1 - t0, t2 - t1


def run_old_rule(index: Path) -> tuple[list[list[str]], float, float]:
    """find-duplicates' library call with the rule it had before complete linkage (grouping="connected", calibrated
    with that rule's F-beta, by today's calibration) -> (groups of file names, threshold, seconds)."""
    from retrieval.search.duplicates import find_duplicates
    from retrieval.search.index import ImageIndex

    t0 = time.perf_counter()
    opened = ImageIndex(index)
    try:
        result = find_duplicates(opened, grouping="connected")
    finally:
        opened.close()
    return [[m.path for m in g] for g in result.groups], result.threshold.value, time.perf_counter() - t0


def run_hash(method: str, data: Path) -> tuple[list[list[str]], float]:
    """imagededup's method at its defaults -> (its duplicate pairs as two-file groups, seconds)."""
    import imagededup.methods

    t0 = time.perf_counter()
    found = getattr(imagededup.methods, method)(verbose=False).find_duplicates(image_dir=str(data), recursive=True)
    return [[a, b] for a, dups in found.items() for b in dups], time.perf_counter() - t0


def quality(seeds: list[int], index_options: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="bench-dupes-") as tmp:
            data, index = Path(tmp) / "data", Path(tmp) / "index"
            truth = make_set(data, seed)
            files = sorted(p.name for p in data.iterdir())
            number = {name: i for i, name in enumerate(files)}
            as_ids = lambda groups: [[number[n] for n in g] for g in groups]   # noqa: E731
            groups, threshold, index_s, group_s = run_find_duplicates(data, index, index_options)
            score = pair_scores(as_ids(groups), as_ids(truth))
            old_groups, old_threshold, old_s = run_old_rule(index)
            row = {"seed": seed, "held_out": seed != 0, "images": len(files), "true_pairs": score["true_pairs"],
                   "find_duplicates": {**score, "threshold": threshold["value"], "grouping": DEFAULT_GROUPING,
                                       "groups": len(groups), "grouped_images": sum(map(len, groups)),
                                       "index_s": round(index_s, 1), "group_s": round(group_s, 1)},
                   "old_rule": {**pair_scores(as_ids(old_groups), as_ids(truth)), "threshold": old_threshold,
                                "grouping": "connected", "groups": len(old_groups),
                                "grouped_images": sum(map(len, old_groups)), "group_s": round(old_s, 1)}}
            for method in HASHES:
                pairs, seconds = run_hash(method, data)
                row[method] = {**pair_scores(as_ids(pairs), as_ids(truth)), "seconds": round(seconds, 1)}
            best = max(HASHES, key=lambda m: row[m]["f1"])
            row["best_hash"] = best
            row["margin_over_best_hash"] = score["f1"] - row[best]["f1"]
            rows.append(row)
            print(f"seed {seed}: find-duplicates F1 {score['f1']:.3f} (old rule {row['old_rule']['f1']:.3f}), "
                  f"best hash {best} {row[best]['f1']:.3f}", flush=True)
    return rows


PLANTED_EDITS = ("same", "crop", "flip", "jpeg30", "brightness", "downscale", "rotate7", "greyscale", "blur")
FLIP_NORM = "--views flip --input-norm image"


def make_demo(folder: Path, planted: bool) -> list[list[str]]:
    """The `make demo` collection (retrieval.samples, 12 drawings of each of 5 classes; no copies) -> no true groups;
    planted: one copy each of 9 of its drawings (a byte copy, then each edit once) -> those 9 pairs (relative paths)."""
    import shutil

    from retrieval.images.edits import EDITS
    from retrieval.samples import make_sample_collection

    written = sorted(make_sample_collection(folder, per_class=12))
    if not planted:
        return []
    truth = []
    for n, (edit, src) in enumerate(zip(PLANTED_EDITS, random.Random(7).sample(written, len(PLANTED_EDITS)))):
        dst = src.with_name(f"{src.stem}_copy_{edit}.jpg")
        if edit == "same":
            shutil.copyfile(src, dst)
        else:
            with Image.open(src) as img:
                EDITS[edit](img.convert("RGB"), random.Random(n)).save(dst, quality=90)
        truth.append([str(src.relative_to(folder)), str(dst.relative_to(folder))])
    return truth


def collect(data: Path, index: Path, index_options: list[str], dim: int = DEFAULT_WHITEN_DIM) -> dict:
    """Index data (index-images --weights random [index_options]; once: an index already there is reused) and read
    what find-duplicates' threshold is chosen from, its whitening at dim dimensions: the whitened vectors, the made
    copies' distances, and the nearest-neighbour distances of every image (as find-duplicates takes them) and of
    the 24 copied images only (as it took them before)."""
    from retrieval.search.duplicates import (CALIBRATION_IMAGES, CALIBRATION_SEED, NEIGHBOURS, _records,
                                             _sample_records, calibration_distances, collection_vectors,
                                             same_file_rows)
    from retrieval.search.index import ImageIndex
    from retrieval.vectors.duplicates import nearest_distances

    env = {k: v for k, v in os.environ.items() if not k.startswith(("INDEX_IMAGES_", "FIND_DUPLICATES_"))}
    if not index.exists():
        subprocess.run([str(BIN / "index-images"), str(data), "--index-dir", str(index), "--weights", "random",
                        *index_options], check=True, capture_output=True, env=env)
    opened = ImageIndex(index)
    try:
        snap = opened.snapshot()
        vectors = collection_vectors(snap, dim)
        records = _records(snap, vectors.ids)
        by_content = same_file_rows(records, vectors)
        same_file = [g for g in by_content.values() if len(g) > 1]
        _, copy_d, neighbour_rows, sibling_d = calibration_distances(snap, vectors, by_content)
        neighbour_d = neighbour_rows[np.isfinite(neighbour_rows)]
        copied = [vectors.rows[r.id] for r in _sample_records(snap, vectors.ids, CALIBRATION_IMAGES, CALIBRATION_SEED)]
        copied_d = nearest_distances(vectors.white, np.array(copied), NEIGHBOURS, same_file)
    finally:
        opened.close()
    return {"white": vectors.white, "paths": [records[int(i)].path for i in vectors.ids], "same_file": same_file,
            "copy_d": copy_d, "neighbour_d": neighbour_d, "neighbour_rows": neighbour_rows, "sibling_d": sibling_d,
            "copied_neighbour_d": copied_d}


def _cuts(copy_d: np.ndarray, neighbour_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts between the observed distances -> (cuts, copies under each, neighbours under each)."""
    pos, neg = np.sort(copy_d), np.sort(neighbour_d)
    cuts = np.unique(np.concatenate([pos, neg]))
    cuts = (cuts[:-1] + cuts[1:]) / 2
    return cuts, np.searchsorted(pos, cuts, side="right"), np.searchsorted(neg, cuts, side="right")


def rule_before(c: dict) -> float:
    """The calibration before: F1 between the copies and the 24 copied images' neighbours, as if each had 8 copies."""
    cuts, tp, fp = _cuts(c["copy_d"], c["copied_neighbour_d"])
    precision, recall = tp / np.maximum(tp + fp, 1), tp / len(c["copy_d"])
    return float(cuts[int(np.argmax(2 * precision * recall / np.maximum(precision + recall, 1e-12)))])


def rule_strict_when_cautioned(c: dict) -> float:
    """The threshold before, or its strict one (1% of the neighbours under it) when it had more than 5% under it."""
    t = rule_before(c)
    cuts, _, fp = _cuts(c["copy_d"], c["copied_neighbour_d"])
    n = len(c["copied_neighbour_d"])
    if np.mean(c["copied_neighbour_d"] < t) <= 0.05:
        return t
    return min(t, float(cuts[np.flatnonzero(fp <= 0.01 * n)[-1]]))


def rule_share(share: float):
    def rule(c: dict) -> float:
        """The highest cut with at most `share` of every image's nearest-neighbour distances under it."""
        cuts, _, fp = _cuts(c["copy_d"], c["neighbour_d"])
        return float(cuts[np.flatnonzero(fp <= share * len(c["neighbour_d"]))[-1]])
    return rule


def rule_one_copy(c: dict) -> float:
    """F1 with the copies weighed as one of each image's 32 nearest others (one copy per image)."""
    cuts, tp, fp = _cuts(c["copy_d"], c["neighbour_d"])
    w = len(c["neighbour_d"]) / 32 / len(c["copy_d"])
    true, missed = tp * w, (len(c["copy_d"]) - tp) * w
    return float(cuts[int(np.argmax(2 * true / np.maximum(2 * true + fp + missed, 1e-12)))])


def rule_default(c: dict) -> float:
    """find-duplicates' calibration now (choose_threshold: the copy rate the collection seems to hold, the copies'
    distances a mixture with the siblings' where its copies seem to come in groups)."""
    from retrieval.vectors.duplicates import choose_threshold

    return choose_threshold(c["copy_d"], c["neighbour_rows"], sibling_distances=c["sibling_d"]).threshold


def rule_single_copies(c: dict) -> float:
    """The default before copies in groups were noticed: the copy rate, with every copy as close as the made ones."""
    from retrieval.vectors.duplicates import choose_threshold

    return choose_threshold(c["copy_d"], c["neighbour_d"]).threshold


RULES = {"estimated copy rate (default)": rule_default, "copy rate, copies as made": rule_single_copies,
         "before (8 copies each)": rule_before,
         "strict when cautioned": rule_strict_when_cautioned, "neighbour share <= 3%": rule_share(0.03),
         "one copy per image": rule_one_copy}
SETS = ("copies8", "copies1", "copies0")


def _scores(groups: list[list[int]], truth: list[list[int]]) -> dict:
    """Pair scores and what a user sees (images in groups, groups)."""
    out = {"grouped_images": sum(map(len, groups)), "groups": len(groups)}
    if truth:
        s = pair_scores(groups, truth)
        out.update({k: round(s[k], 4) for k in ("precision", "recall", "f1")},
                   found_pairs=round(s["recall"] * s["true_pairs"]), true_pairs=s["true_pairs"])
    return out


def rules(seeds: list[int], index_options: list[str], hashes: bool = True,
          dims: Sequence[int] = (DEFAULT_WHITEN_DIM,)) -> list[dict]:
    """Each candidate threshold rule on the same indexes: the benchmark's sets at each seed with 8, 1 and 0 copies of
    each original, the `make demo` drawings, and the demo drawings with a byte copy and one copy per edit planted;
    each index grouped at each whitening dimension in dims (one row each)."""
    from retrieval.search.duplicates import group_rows

    todo = [(kind, seed) for seed in seeds for kind in SETS] + [("demo", None), ("demo+planted", None)]
    rows = []
    for kind, seed in todo:
        with tempfile.TemporaryDirectory(prefix="bench-dupes-") as tmp:
            data, index = Path(tmp) / "data", Path(tmp) / "index"
            if kind.startswith("demo"):
                truth_names = make_demo(data, planted=kind == "demo+planted")
            else:
                truth_names = make_set(data, seed, copies=int(kind[-1]))
            for dim in dims:
                t0 = time.perf_counter()
                c = collect(data, index, index_options, dim)
                number = {p: i for i, p in enumerate(c["paths"])}
                truth = [[number[n] for n in g] for g in truth_names]
                row = {"set": kind, "seed": seed, "held_out": seed not in (0, None), "whiten_dim": dim,
                       "images": len(c["paths"]), "true_pairs": pair_scores([], truth)["true_pairs"],
                       "collect_s": round(time.perf_counter() - t0, 1), "rules": {}}
                for name, rule in RULES.items():
                    t = rule(c)
                    groups = group_rows(c["white"], t, c["same_file"])
                    row["rules"][name] = {"threshold": round(t, 4), **_scores(groups, truth)}
                if hashes and kind != "copies1" and dim == dims[0]:
                    for method in HASHES:
                        pairs, seconds = run_hash(method, data)
                        groups = [[number[p] for p in g] for g in pairs]
                        row.setdefault("hashes", {})[method] = {
                            **_scores(groups, truth), "grouped_images": len({i for g in groups for i in g}),
                            "groups": None, "seconds": round(seconds, 1)}
                rows.append(row)
                d = row["rules"]["estimated copy rate (default)"]
                print(f"{kind} {seed} ({dim}-d): default threshold {d['threshold']:.3f}, {d['grouped_images']} of "
                      f"{row['images']} grouped" + (f", F1 {d['f1']:.3f}" if truth else ""), flush=True)
    return rows


def print_rules(rows: list[dict]) -> None:
    """One line per set and rule: threshold, images in groups, pair precision/recall/F1 (or found pairs)."""
    print(f"{'set':<13}{'seed':>5}{'dim':>5}  {'rule':<31}{'threshold':>10}{'grouped':>12}{'precision':>10}{'recall':>8}"
          f"{'F1':>7}")
    for row in rows:
        entries = list(row["rules"].items()) + list(row.get("hashes", {}).items())
        for name, r in entries:
            grouped = f"{r['grouped_images']}" + (f" in {r['groups']}" if r.get("groups") is not None else "")
            t = f"{r['threshold']:.3f}" if "threshold" in r else ""
            scores = (f"{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}" if "f1" in r else "")
            if row["set"] == "demo+planted" and "f1" in r:
                scores += f"  found {r['found_pairs']}/{r['true_pairs']}"
            print(f"{row['set']:<13}{'' if row['seed'] is None else row['seed']:>5}{row.get('whiten_dim', ''):>5}  {name:<31}{t:>10}{grouped:>12}"
                  f"{scores}")


def planted(n: int, dim: int, seed: int = 0, group: int = PLANTED_GROUP) -> np.ndarray:
    """n random unit vectors, the last tenth in groups of `group` near copies of one point (an image and its edits:
    the components complete linkage splits). shape=(n, dim) float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    k = n // 10 // group * group
    x[n - k:] = np.repeat(x[n - k::group], group, axis=0) + 0.03 * rng.standard_normal((k, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def planted_pairs(n: int, group: int = PLANTED_GROUP) -> np.ndarray:
    """Every pair within the groups planted(n, ...) makes (the pairs the search finds there, without searching).
    shape=(p, 2) int64."""
    k = n // 10 // group * group
    starts = np.arange(n - k, n, group)
    i, j = np.triu_indices(group, 1)
    return np.stack([(starts[:, None] + i).ravel(), (starts[:, None] + j).ravel()], axis=1).astype(np.int64)


def grouping_alone(sizes: list[int], repeats: int, threshold: float) -> list[dict]:
    """The groups from the planted pairs at each size (no search; cheap up to 1M), each rule, medians."""
    rows = []
    for n in sizes:
        x, pairs = planted(n, DEFAULT_WHITEN_DIM), planted_pairs(n)
        for rule, group in GROUPINGS.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                found = group(x, pairs, threshold)
                times.append(time.perf_counter() - t0)
            rows.append({"vectors": n, "pairs": int(len(pairs)), "grouping": rule, "groups": len(found),
                         "seconds": statistics.median(times), "runs": times})
            print(f"{n:>9} {rule:>9} {statistics.median(times):8.3f} s  {len(pairs)} planted pairs, "
                  f"{len(found)} groups", flush=True)
    return rows


def timing(sizes: list[int], repeats: int, threshold: float, whitening: bool = True) -> dict:
    """The grouping step at each size (medians), exact and IVF side by side where both run, and the whitening."""
    rows = []
    for n in sizes:
        x = planted(n, DEFAULT_WHITEN_DIM)
        for path in ("exact", "ivf"):
            if path == "exact" and n > max(EXACT_MAX, 100_000):
                continue
            exact_max = n if path == "exact" else 0
            times, group_times, pairs = [], {rule: [] for rule in GROUPINGS}, None
            for _ in range(repeats if n <= 100_000 else max(1, repeats - 1)):
                t0 = time.perf_counter()
                p, _ = close_pairs(x, threshold, exact_max=exact_max)
                t1 = time.perf_counter()
                for rule, group in GROUPINGS.items():
                    t2 = time.perf_counter()
                    found = group(x, p, threshold)
                    group_times[rule].append(time.perf_counter() - t2)
                    if rule == DEFAULT_GROUPING:
                        groups = found
                times.append(t1 - t0 + group_times[DEFAULT_GROUPING][-1])
                pairs = p
            rows.append({"vectors": n, "search": path, "seconds": statistics.median(times), "runs": times,
                         "grouping": DEFAULT_GROUPING, "pairs": int(len(pairs)), "groups": len(groups),
                         "group_s": {rule: statistics.median(t) for rule, t in group_times.items()}})
            print(f"{n:>9} {path:>6} {statistics.median(times):8.2f} s  {len(pairs)} pairs; grouping "
                  + ", ".join(f"{rule} {statistics.median(t):.3f} s" for rule, t in group_times.items()), flush=True)
        if n <= 100_000 and any(r["vectors"] == n and r["search"] == "exact" for r in rows):
            ex = next(r for r in rows if r["vectors"] == n and r["search"] == "exact")
            iv = next(r for r in rows if r["vectors"] == n and r["search"] == "ivf")
            iv["pair_recall_vs_exact"] = iv["pairs"] / max(1, ex["pairs"])
            iv["speedup_vs_exact"] = ex["seconds"] / iv["seconds"]
    if not whitening:
        return {"grouping": rows}
    raw = np.random.default_rng(1).random((50_000, 4096), dtype=np.float32)
    t0 = time.perf_counter()
    pca = learn_whitening(raw, DEFAULT_WHITEN_DIM)
    learn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    whiten(pca, raw)
    apply_s = time.perf_counter() - t0
    return {"grouping": rows, "whitening": {"learn_50k_s": learn_s, "apply_per_million_s": apply_s * 20}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-whitening", action="store_true", help="time the grouping step only")
    parser.add_argument("--grouping-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="time the grouping alone (the planted pairs, no search) at these sizes")
    parser.add_argument("--index-options", default="", metavar='"OPTIONS"',
                        help='options passed verbatim to index-images, e.g. "--views flip"')
    parser.add_argument("--rules", action="store_true",
                        help="compare threshold rules on the seeds' sets with 8, 1 and 0 copies per original and on the "
                             "`make demo` drawings (alone, and with copies planted); implies --skip-quality --skip-timing")
    parser.add_argument("--whiten-dims", type=int, nargs="+", default=[DEFAULT_WHITEN_DIM], metavar="D",
                        help="with --rules: group each index at each of these whitening dimensions "
                             f"(find-duplicates uses {DEFAULT_WHITEN_DIM})")
    args = parser.parse_args()
    if args.rules:
        args.skip_quality = args.skip_timing = True
    result: dict = {"machine": {"cores": available_cores(), "cpu": platform.processor() or platform.machine(),
                                "platform": platform.platform()},
                    "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "index_options": args.index_options}
    if not args.skip_quality:
        result["quality"] = quality(args.seeds, shlex.split(args.index_options))
        print(f"\nindex-images --weights random {args.index_options}".rstrip())
        print(f"{'seed':>4} {'images':>6}  {'method':<24}{'threshold':>10}{'groups':>13}{'precision':>10}{'recall':>8}"
              f"{'F1':>7}{'seconds':>9}")
        for row in result["quality"]:
            star = "" if row["held_out"] else "*"
            for name, r in ((f"find-duplicates{star}", row["find_duplicates"]),
                            (f"  old rule (connected){star}", row["old_rule"])):
                groups = f"{r['grouped_images']} in {r['groups']}"
                print(f"{row['seed']:>4} {row['images']:>6}  {name:<24}{r['threshold']:>10.3f}{groups:>13}"
                      f"{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}{r['group_s']:>9.1f}")
            for m in HASHES:
                r = row[m]
                print(f"{'':>4} {'':>6}  {m:<24}{'':>23}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}"
                      f"{r['seconds']:>9.1f}")
        print("* seed 0: the set find-duplicates' settings (grouping rule, F-beta) were chosen on")
    if args.rules:
        result["rules"] = rules(args.seeds, shlex.split(args.index_options), dims=args.whiten_dims)
        print(f"\nindex-images --weights random {args.index_options}".rstrip())
        print_rules(result["rules"])
    if not args.skip_timing:
        result["timing"] = timing(args.sizes, args.repeats, threshold=0.4, whitening=not args.skip_whitening)
        result["timing"]["grouping_alone"] = grouping_alone(args.grouping_sizes, args.repeats, threshold=0.4)
        w = result["timing"].get("whitening")
        if w:
            print(f"\nwhitening: learned on 50,000 4096-d vectors in {w['learn_50k_s']:.1f} s; applied at "
                  f"{w['apply_per_million_s']:.0f} s per million vectors")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_duplicates-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
