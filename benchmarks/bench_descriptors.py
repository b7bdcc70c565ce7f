"""Benchmark: descriptors beyond fc7 (flip and multi-scale averaging, pooled last-conv layers) on real photos.

Copy search: originals are random crops of the real photos of benchmarks/real_photos.py (1 per photo by default),
each with its 8 edited copies (retrieval.images.edits: crop, flip, JPEG 30, brightness, downscale, 7° rotation,
greyscale, blur) as queries, among distractor crops of the same photos (16 per photo: 304). Recall@1: the share of
edited copies whose nearest indexed image is their original. kNN@10: crop_collection's scene crops (a photo is a
class), train and test drawn with different seeds; the test crop's label by the vote of its 10 nearest train crops
(retrieval.learning.metrics.vote_labels). Every image goes through the product's path: a JPEG file's bytes,
decode_for_model with the layer's preprocessing, FeatureExtractor (seeded random weights; ImageNet weights cannot
be had offline), L2-normalised as index-images does by default, exact L2 search.

Time per image: the extractor's forward pass over a batch of 32 decoded images, median of --repeats runs, and as a
ratio to fc7 measured in the same run. Input sizes of the pooled layers (--sizes): the network's 224 centre crop of
the image resized to 256 ("crop256/224", the fc layers' own), the centre square of the shorter side at S ("square
S"), and, as a reference the pipeline does not offer, the whole image at its own aspect ratio, shorter side S
("aspect S", one image per forward pass) or squashed to S x S ("squash S").

    python benchmarks/bench_descriptors.py                 # AlexNet, every descriptor, input sizes of the pooled ones
    python benchmarks/bench_descriptors.py --model vgg16 --quick

Prints a table and saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path is set
from PIL import Image  # noqa: E402

from benchmarks.real_photos import crop_collection, random_crops, real_photos  # noqa: E402
from retrieval.features.backbones import FeatureExtractor, preprocessing_for, random_state_dict  # noqa: E402
from retrieval.features.descriptors import PooledConv, ViewAverage  # noqa: E402
from retrieval.images.decode import Preprocessing, decode_for_model  # noqa: E402
from retrieval.images.edits import EDITS, edited_copies  # noqa: E402
from retrieval.learning.metrics import pairwise_distances, vote_labels  # noqa: E402
from retrieval.names import POOLED_LAYERS  # noqa: E402
from retrieval.search.snapshot import l2_normalize  # noqa: E402
from retrieval.system import available_cores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KNN_K = 10
BATCH = 32


# --- data ---------------------------------------------------------------------------------------------

def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def copy_set(originals_per_photo: int, distractors_per_photo: int, seed: int) -> dict:
    """{"database": [bytes], "queries": [bytes], "truth": [database row of each query's original],
    "edits": [edit name of each query]}: originals first in the database, then the distractors."""
    rng = random.Random(seed)
    originals, distractors = [], []
    for _, photo in sorted(real_photos().items()):
        crops = random_crops(photo, originals_per_photo + distractors_per_photo, rng)
        originals += crops[:originals_per_photo]
        distractors += crops[originals_per_photo:]
    queries, truth, edits = [], [], []
    for i, original in enumerate(originals):
        for name, copy in edited_copies(original, seed=seed * 10_000 + i).items():
            queries.append(jpeg_bytes(copy))
            truth.append(i)
            edits.append(name)
    return {"database": [jpeg_bytes(img) for img in originals + distractors], "queries": queries,
            "truth": np.array(truth), "edits": edits, "originals": len(originals), "distractors": len(distractors)}


def scene_set(train_per_class: int, test_per_class: int, seed: int) -> dict:
    """crop_collection's train and test scene crops (different seeds) as JPEG bytes with their labels."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part, per_class, s in (("train", train_per_class, seed + 1), ("test", test_per_class, seed + 2)):
            folder = Path(tmp) / part
            crop_collection(folder, per_class, s)
            files = sorted(folder.glob("*/*.jpg"))
            out[part] = ([f.read_bytes() for f in files], [f.parent.name for f in files])
    return out


# --- inputs ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[str, int, int]:
    """"crop256/224" -> ("crop", 256, 224); "square224" -> ("crop", 224, 224); "aspect224", "squash224"."""
    if text.startswith("crop"):
        resize, crop = text[4:].split("/")
        return "crop", int(resize), int(crop)
    for kind in ("square", "aspect", "squash"):
        if text.startswith(kind):
            s = int(text[len(kind):])
            return ("crop", s, s) if kind == "square" else (kind, s, s)
    raise ValueError(f"unknown input size {text!r}")


def decode_all(files: list[bytes], size: str, prep: Preprocessing) -> list[np.ndarray]:
    """JPEG bytes -> uint8 arrays shape=(3, H, W): the product's decode for crops, Pillow for the references."""
    kind, resize, crop = parse_size(size)
    if kind == "crop":
        p = Preprocessing(resize_size=resize, crop_size=crop, mean=prep.mean, std=prep.std)
        return [decode_for_model(data, p).pixels for data in files]
    out = []
    for data in files:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        new = (resize, resize) if kind == "squash" else \
            ((resize, round(h * resize / w)) if w <= h else (round(w * resize / h), resize))
        out.append(np.ascontiguousarray(np.asarray(img.resize(new, Image.BILINEAR)).transpose(2, 0, 1)))
    return out


def embed_all(extractor: FeatureExtractor, pixels: list[np.ndarray], parts: int = 1) -> np.ndarray:
    """-> float32 shape=(n, dim), L2-normalised (each of parts equal slices alone: several poolings side by side);
    batches of BATCH where the images share a shape, else one by one."""
    out, i = [], 0
    while i < len(pixels):
        shape = pixels[i].shape
        j = i
        while j < len(pixels) and j - i < BATCH and pixels[j].shape == shape:
            j += 1
        out.append(extractor(torch.from_numpy(np.stack(pixels[i:j]))).numpy())
        i = j
    v = np.concatenate(out)
    return np.concatenate([l2_normalize(np.ascontiguousarray(p)) for p in np.split(v, parts, axis=1)], axis=1)


def forward_ms(extractor: FeatureExtractor, pixels: list[np.ndarray]) -> float:
    """Milliseconds per image of a forward pass over BATCH images (one by one when their shapes differ)."""
    sample = pixels[:BATCH]
    t0 = time.perf_counter()
    embed_all(extractor, sample)
    return (time.perf_counter() - t0) / len(sample) * 1000


def time_rows(rows: list[dict], timed: list[tuple[FeatureExtractor, list[np.ndarray]]], repeats: int) -> None:
    """Each row's ms_per_image: the median of repeats rounds, each round timing every row in turn (the machine's
    other load falls on all of them alike)."""
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):
        for i, (extractor, pixels) in enumerate(timed):
            times[i].append(forward_ms(extractor, pixels))
    for row, t in zip(rows, times):
        row["ms_per_image"] = statistics.median(t)
        row["ms_per_image_runs"] = [round(x, 2) for x in t]


# --- metrics --------------------------------------------------------------------------------------------

def copy_recall(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, edits: list[str]) -> dict:
    nearest = pairwise_distances(queries, db).argmin(axis=1)                     # (q, n) -> (q,)
    hit = nearest == truth
    per_edit = {name: float(np.mean([h for h, e in zip(hit, edits) if e == name])) for name in EDITS}
    return {"recall@1": float(hit.mean()), "per_edit": per_edit}


def knn_accuracy(train: np.ndarray, train_labels: list[str], test: np.ndarray, test_labels: list[str]) -> float:
    d = pairwise_distances(test, train)                                          # (t, n)
    order = np.argsort(d, axis=1)[:, :KNN_K]
    right = [vote_labels([train_labels[j] for j in row], list(d[i, row]))[0] == test_labels[i]
             for i, row in enumerate(order)]
    return float(np.mean(right))


# --- the run ----------------------------------------------------------------------------------------------

def pooled_extractor(extractor: FeatureExtractor) -> PooledConv:
    """The PooledConv inside a pooled layer's extractor (inside its ViewAverage when views are averaged)."""
    net = extractor.net.net if isinstance(extractor.net, ViewAverage) else extractor.net
    assert isinstance(net, PooledConv), "a pooled layer's extractor"
    return net


def measure(model: str, state: dict, layers: list[str], views: str, size: str, data: dict,
            cache: dict) -> list[tuple[dict, FeatureExtractor, list[np.ndarray]]]:
    """One row per layer of layers, all fc or all pooled: the pooled ones from one pass of the body (PooledConv
    with several poolings), each timed alone."""
    extractors = {layer: FeatureExtractor(model, layer, state, torch.device("cpu"), views=views) for layer in layers}
    first = extractors[layers[0]]
    if size not in cache:
        cache[size] = {part: decode_all(files, size, first.preprocessing) for part, files in
                       (("database", data["copies"]["database"]), ("queries", data["copies"]["queries"]),
                        ("train", data["scenes"]["train"][0]), ("test", data["scenes"]["test"][0]))}
    px = cache[size]
    if len(layers) > 1:
        shared = FeatureExtractor(model, layers[0], state, torch.device("cpu"), views=views)
        pooled_extractor(shared).poolings = tuple(layer.partition("-")[2] for layer in layers)
    else:
        shared = first
    t0 = time.perf_counter()
    vectors = {part: embed_all(shared, px[part], parts=len(layers)) for part in px}   # part -> (n, dim * layers)
    seconds = time.perf_counter() - t0
    rows = []
    for i, layer in enumerate(layers):
        dim = extractors[layer].dim
        v = {part: l2_normalize(np.ascontiguousarray(m[:, i * dim:(i + 1) * dim])) for part, m in vectors.items()}
        copies = copy_recall(v["database"], v["queries"], data["copies"]["truth"], data["copies"]["edits"])
        knn = knn_accuracy(v["train"], data["scenes"]["train"][1], v["test"], data["scenes"]["test"][1])
        rows.append({"layer": layer, "views": views, "input": size, "dim": dim, "bytes_per_vector": dim * 4,
                     "copy_recall@1": copies["recall@1"], "copy_recall@1_per_edit": copies["per_edit"],
                     f"knn@{KNN_K}": knn, "whole_set_seconds_shared": round(seconds, 2), "shared_with": layers,
                     "images": sum(len(p) for p in px.values())})
    return [(row, extractors[row["layer"]], px["database"]) for row in rows]


def configurations(args: argparse.Namespace, default_input: dict[str, str]) -> list[tuple[list[str], str, str]]:
    """([layers], views, input) to measure: fc7 first (the baseline), then the descriptors, then the input sizes
    of the pooled layers."""
    pooled = list(POOLED_LAYERS)
    inputs = sorted({default_input[layer] for layer in pooled})
    assert len(inputs) == 1, "the pooled layers share their input size"
    rows = [(["fc7"], "single", default_input["fc7"]), (["fc7"], "flip", default_input["fc7"])]
    rows += [(pooled, "single", inputs[0]), (pooled, "flip", inputs[0])]
    if not args.quick:
        rows += [(["fc7"], "flip+scales", default_input["fc7"]), (pooled, "flip+scales", inputs[0])]
    rows += [(pooled, "single", size) for size in args.sizes if size != inputs[0]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="alexnet", choices=["alexnet", "vgg16"])
    ap.add_argument("--seed", type=int, default=0, help="random weights' seed and the data's")
    ap.add_argument("--originals-per-photo", type=int, default=1)
    ap.add_argument("--distractors-per-photo", type=int, default=16)
    ap.add_argument("--train-per-class", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=5)
    ap.add_argument("--sizes", nargs="*", default=["crop256/224", "square224", "square288", "squash224", "aspect224"],
                    help="input sizes to try for the pooled layers (single view)")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per configuration (median)")
    ap.add_argument("--quick", action="store_true", help="leave out flip+scales")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch chooses)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    data = {"copies": copy_set(args.originals_per_photo, args.distractors_per_photo, args.seed),
            "scenes": scene_set(args.train_per_class, args.test_per_class, args.seed)}
    state = random_state_dict(args.model, args.seed)
    prep_name = {}
    for layer in ("fc7", *POOLED_LAYERS):
        p = preprocessing_for(args.model, layer)
        prep_name[layer] = f"crop{p.resize_size}/{p.crop_size}" if p.resize_size != p.crop_size else f"square{p.crop_size}"
    rows, timed, cache = [], [], {}
    for layers, views, size in configurations(args, prep_name):
        for row, extractor, pixels in measure(args.model, state, layers, views, size, data, cache):
            rows.append(row)
            timed.append((extractor, pixels))
            print(f"[{len(rows)}] {row['layer']} {views} {size}: recall@1 {row['copy_recall@1']:.3f}, knn@{KNN_K} "
                  f"{row[f'knn@{KNN_K}']:.3f}", file=sys.stderr, flush=True)
    time_rows(rows, timed, args.repeats)
    base = rows[0]
    print(f"\n{args.model}, seeded random weights; copy search: {data['copies']['originals']} originals x 8 edits "
          f"among {data['copies']['distractors']} distractors; kNN@{KNN_K}: {len(data['scenes']['train'][0])} train, "
          f"{len(data['scenes']['test'][0])} test scene crops")
    edits = list(EDITS)
    print(f"{'layer':<11} {'views':<12} {'input':<12} {'dim':>4} {'R@1':>6} {'kNN@10':>7} {'ms/img':>7} {'x fc7':>6}  "
          + " ".join(f"{e[:6]:>6}" for e in edits))
    for r in rows:
        print(f"{r['layer']:<11} {r['views']:<12} {r['input']:<12} {r['dim']:>4} {r['copy_recall@1']:>6.3f} "
              f"{r[f'knn@{KNN_K}']:>7.3f} {r['ms_per_image']:>7.1f} {r['ms_per_image'] / base['ms_per_image']:>6.2f}  "
              + " ".join(f"{r['copy_recall@1_per_edit'][e]:>6.3f}" for e in edits))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"bench_descriptors-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": available_cores(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "load_average_before_after": [load_before[0], os.getloadavg()[0]], "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.perf_counter() - started, 1), "model": args.model, "weights": f"random (seed {args.seed})",
        "copies": {"originals": data["copies"]["originals"], "distractors": data["copies"]["distractors"],
                   "queries": len(data["copies"]["queries"])},
        "scenes": {"train": len(data["scenes"]["train"][0]), "test": len(data["scenes"]["test"][0]),
                   "classes": len(set(data["scenes"]["train"][1]))},
        "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
