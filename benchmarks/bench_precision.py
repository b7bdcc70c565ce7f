"""Benchmark: bf16 against fp32 on this CPU: forward-pass time (one image, a batch) and the agreement of the features.

For each model, the extractor in fp32 and in bf16 (bfloat16 weights; the CPU needs AVX512-BF16 or AMX-BF16), timed
alternately on batches of 1 and --batch images (medians of --runs), and the features of the 19 real photos of
benchmarks/real_photos.py and of --crops random crops of each: the cosine of each image's bf16 vector to its fp32 one,
and whether each crop's nearest photo (its source) and nearest crops are the same in both. Weights: ImageNet's when
they are in the torch hub cache, else seeded random ones (said in the output). Saves JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="alexnet", help="comma-separated: alexnet,vgg16")
    parser.add_argument("--batch", type=int, default=32, help="the batch timed besides one image")
    parser.add_argument("--runs", type=int, default=7, help="timed forward passes of each, alternating")
    parser.add_argument("--crops", type=int, default=5, help="random crops of each real photo, as queries")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from benchmarks.bench_query import cpu_model
    from benchmarks.real_photos import random_crops, real_photos
    from retrieval.features.backbones import FeatureExtractor, imagenet_cache_path, load_state_dict, preprocessing_for
    from retrieval.features.precision import cpu_bf16_instructions
    from retrieval.images.decode import decode_for_model

    if cpu_bf16_instructions() is None:
        raise SystemExit("this CPU has no bf16 instructions (AVX512-BF16 or AMX-BF16): bf16 is refused here")
    photos = real_photos()
    rng = random.Random(0)
    images = list(photos.values()) + [c for p in photos.values() for c in random_crops(p, args.crops, rng)]
    report = {"benchmark": "bench_precision", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_model(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    for model in args.models.split(","):
        cached = imagenet_cache_path(model).exists()
        with tempfile.TemporaryDirectory() as tmp:
            state, identity = load_state_dict(model, "imagenet" if cached else "random", Path(tmp), create=True)
        prep = preprocessing_for(model)

        def crop(image):  # noqa: ANN001, ANN202 - PIL image -> uint8 (3, 224, 224) as queries are decoded
            out = io.BytesIO()
            image.save(out, "JPEG", quality=95)
            return torch.from_numpy(decode_for_model(out.getvalue(), prep).pixels)

        pixels = torch.stack([crop(im) for im in images])                       # (P + P*crops, 3, 224, 224)
        nets = {p: FeatureExtractor(model, "fc7", state, torch.device("cpu"), p) for p in ("fp32", "bf16")}
        feats = {p: torch.cat([net(pixels[i:i + 16]) for i in range(0, len(pixels), 16)]).numpy()
                 for p, net in nets.items()}
        a, b = feats["fp32"], feats["bf16"]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        n_photos = len(photos)
        unit = {p: f / np.linalg.norm(f, axis=1, keepdims=True) for p, f in feats.items()}
        # each crop's 5 nearest other images, in each precision: the same set?
        top = {p: np.argsort(-(u @ u.T) + 2 * np.eye(len(u)), axis=1)[n_photos:, :5] for p, u in unit.items()}
        same_first = float(np.mean(top["fp32"][:, 0] == top["bf16"][:, 0]))
        overlap5 = float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top["fp32"], top["bf16"])]))
        timing: dict[str, dict[str, list[float]]] = {str(n): {"fp32": [], "bf16": []} for n in (1, args.batch)}
        for n in (1, args.batch):
            x = pixels[:1].repeat(n, 1, 1, 1)
            for r in range(args.runs + 1):
                for p, net in nets.items():
                    started = time.perf_counter()
                    net(x)
                    if r:
                        timing[str(n)][p].append((time.perf_counter() - started) * 1000.0)
        medians = {n: {p: round(statistics.median(t), 1) for p, t in by.items()} for n, by in timing.items()}
        report["models"][model] = {
            "weights": identity.split(":")[0], "images": len(images), "photos": n_photos,
            "cosine": {"min": round(float(cosine.min()), 6), "median": round(float(np.median(cosine)), 6),
                       "photos_min": round(float(cosine[:n_photos].min()), 6)},
            "same_nearest": round(same_first, 4), "top5_overlap": round(overlap5, 4),
            "forward_ms": medians, "load_average": os.getloadavg()}
        m = report["models"][model]
        print(f"{model} ({m['weights']} weights), {len(images)} images ({n_photos} real photos and their crops): "
              f"cosine bf16 to fp32 min {m['cosine']['min']:.6f}, median {m['cosine']['median']:.6f}; "
              f"same nearest {same_first:.3f}, top-5 overlap {overlap5:.3f}")
        for n, by in medians.items():
            print(f"  forward, {n} image(s): fp32 {by['fp32']} ms, bf16 {by['bf16']} ms: "
                  f"{by['fp32'] / by['bf16']:.2f}x")
    print(f"{report['cpu']}, torch {torch.__version__}, {report['threads']} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    out = args.out or RESULTS / f"bench_precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
