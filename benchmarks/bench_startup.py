"""Benchmark: how fast the commands answer when there is little to do.

Times, as whole processes (what a user waits for): `--help` of every command, a usage error, and a
no-op re-run of `index-images` on an unchanged folder of 10,000 images (built once, with random
weights, and reused from the work folder). Prints a table of medians and saves JSON under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

from retrieval.system import available_cores  # noqa: E402 - after the path is set
BIN = Path(sys.executable).parent
COMMANDS = ("index-images", "search-images", "serve-images", "evaluate-index", "model-info")


def timed(cmd: list[str], runs: int, expect: int = 0) -> list[float]:
    """Wall seconds of each of runs runs of cmd, which must exit with status expect."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != expect:
            raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}, not {expect}:\n{done.stderr}")
    return times


def make_folder(folder: Path, n: int) -> Path:
    """n small JPEGs in 5 class folders; reused when already complete."""
    import random

    from retrieval.samples import SAMPLE_CLASSES, draw_sample

    marker = folder / f".complete-{n}"
    if marker.exists():
        return folder
    rng = random.Random(0)
    classes = list(SAMPLE_CLASSES)
    for i in range(n):
        kind = classes[i % len(classes)]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        draw_sample(kind, (64, 48), rng).save(folder / kind / f"{kind}_{i:05d}.jpg", "JPEG", quality=85)
    marker.touch()
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000, help="size of the folder for the no-op re-run")
    ap.add_argument("--runs", type=int, default=5, help="runs of each measurement; medians are reported")
    ap.add_argument("--workdir", type=Path, default=RESULTS / "bench_startup_work")
    args = ap.parse_args()

    rows = {}
    for command in COMMANDS:
        rows[f"{command} --help"] = timed([str(BIN / command), "--help"], args.runs)
    rows["index-images (usage error)"] = timed([str(BIN / "index-images"), str(args.workdir / "no-such-folder")],
                                               args.runs, expect=2)

    data = make_folder(args.workdir / f"data-{args.images}", args.images)
    index_dir = args.workdir / f"index-{args.images}"
    index_cmd = [str(BIN / "index-images"), str(data), "--index-dir", str(index_dir), "--weights", "random", "--json"]
    if not (index_dir / "vectors.faiss").exists():
        print(f"indexing {args.images:,} images once (random weights)...", file=sys.stderr)
        subprocess.run(index_cmd, check=True, capture_output=True)
    rows[f"index-images, unchanged {args.images:,}-image folder"] = timed(index_cmd, args.runs)

    print(f"\nwhole-process wall time, median of {args.runs} runs ({platform.processor() or platform.machine()}, "
          f"{available_cores()} cores)")
    for name, times in rows.items():
        print(f"  {name:<48}{statistics.median(times):>7.2f} s   (range {min(times):.2f}-{max(times):.2f})")
    result = {"benchmark": "bench_startup", "runs": args.runs, "images": args.images,
              "machine": {"python": platform.python_version(), "platform": platform.platform()},
              "seconds": {name: {"median": statistics.median(t), "all": t} for name, t in rows.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
