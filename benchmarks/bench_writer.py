"""Benchmark: the share of an index-images run's wall time that the write stage holds up the network.

Indexes a small synthetic collection (default 200 pictures of 160x120, batch 32, random AlexNet
weights, the default decoding workers) into a fresh index, in this process, several times, and
times three things: the whole run (report.seconds); the time the loop spent inside Writer.write
(with the writer thread, only the wait for room in its queue); and the time the write work itself
took (catalog transaction, FAISS add), wherever it ran. Prints medians and saves JSON under
benchmarks/results/. The first run also loads torch and is left out of the medians.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def timed(owner: type, name: str, spent: list[float]) -> None:
    """Wrap owner.name so each call adds its seconds to spent (from any thread)."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - any method
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)
    setattr(owner, name, wrapper)


def one_run(data: Path, index_dir: Path, batch_size: int, workers: int | None) -> dict:
    from indexer import config, run, write

    waited, work = [], []
    real_write, real_commit = write.Writer.write, write.Writer.commit
    timed(write.Writer, "write", waited)     # what the loop (the network's thread) spends in write()
    timed(write.Writer, "commit", work)      # the write itself: catalog transaction, then FAISS
    try:
        report = run.run_index(config.JobConfig(data_dir=data, index_dir=index_dir, weights="random",
                                             batch_size=batch_size, workers=workers, progress=False))
    finally:
        write.Writer.write, write.Writer.commit = real_write, real_commit
    return {"seconds": report.seconds, "indexed": report.indexed, "write_wait_s": sum(waited), "write_work_s": sum(work),
            "write_wait_share": sum(waited) / report.seconds, "write_work_share": sum(work) / report.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes [default: the run's default]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for the results file (e.g. before, after)")
    args = parser.parse_args()

    from retrieval.samples import SAMPLE_CLASSES, make_sample_collection
    from retrieval.system import available_cores

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_sample_collection(data, per_class=args.images // len(SAMPLE_CLASSES), size=(160, 120), seed=0)
        one_run(data, Path(tmp) / "warm-up", args.batch_size, args.workers)   # imports torch, builds the weights
        runs = []
        for i in range(args.runs):
            runs.append(one_run(data, Path(tmp) / f"index-{i}", args.batch_size, args.workers))
            shutil.rmtree(Path(tmp) / f"index-{i}")
            print(json.dumps(runs[-1]))
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"medians of {args.runs}: run {medians['seconds']:.2f} s; the loop waited in write() "
          f"{medians['write_wait_s'] * 1000:.0f} ms ({100 * medians['write_wait_share']:.1f}%); the writes took "
          f"{medians['write_work_s'] * 1000:.0f} ms ({100 * medians['write_work_share']:.1f}%)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_writer{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cores": available_cores()},
                               "args": vars(args), "runs": runs, "medians": medians}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
