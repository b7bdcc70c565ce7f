"""Benchmark: index-images against the naive one-image-at-a-time loop, same network and device, same run.

Generates a collection (half 500x375 JPEGs, half 4000x3000 phone-size JPEGs), then alternates
(a) the loop a user would write: Pillow open, the weights' transforms, one forward per image, and
(b) `index-images` on a fresh index, as a subprocess.
Both use the same random AlexNet weights (copied into each fresh index). Prints images/s, the ratio,
and the peak memory (PSS) of each process tree (workers included); saves JSON under
benchmarks/results/. Quote the medians.

With --ray it compares instead `index-images` in one process with `index-images --ray` on a local Ray
cluster (started once by this script), same files, weights and CPU (see ray_main).

With --device cuda|cpu it measures instead, for each model and image size (collections of one size each), the
end-to-end rate of index-images with the GPU's utilisation, the naive loop on that device, and the ceilings set
by decoding alone and by the network alone, and names the bottleneck (see benchmarks/index_throughput.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.photo_collections import SIZES  # noqa: E402 - after the path is set; torch-free

RESULTS = ROOT / "benchmarks" / "results"
INDEX_IMAGES = "from commands.index_images import index_images_entry; index_images_entry()"   # this checkout's, not an installed one


def make_collection(folder: Path, n: int) -> Path:
    """n JPEGs, half small and half phone-size, in class folders; reused when already there."""
    import random

    from retrieval.samples import SAMPLE_CLASSES, draw_sample

    marker = folder / f".complete-{n}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(0)
    classes = list(SAMPLE_CLASSES)
    for i in range(n):
        kind = classes[i % len(classes)]
        size = SIZES["small"] if i % 2 == 0 else SIZES["phone"]
        (folder / kind).mkdir(parents=True, exist_ok=True)
        # draw small and upscale: the phone-size files still have real photo-sized JPEG payloads
        img = draw_sample(kind, (400, 300), rng).resize(size)
        img.save(folder / kind / f"{kind}_{i:04d}.jpg", "JPEG", quality=90)
    marker.touch()
    return folder


def peak_memory_of_tree(proc: subprocess.Popen) -> tuple[subprocess.Popen, list[int]]:
    """Sample the summed PSS of proc and its children every 50 ms until it exits.

    PSS (proportional set size) splits pages shared between forked workers among them, so the sum
    over the tree is the memory the job really holds; summed RSS would count shared pages per worker.
    """
    peak = [0]

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    procs = [p, *p.children(recursive=True)]
                    total = sum(q.memory_full_info().pss for q in procs)
                except psutil.Error:
                    total = 0
                peak[0] = max(peak[0], total)
                time.sleep(0.05)
        except psutil.Error:
            pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return proc, peak


def run_measured(cmd: list[str], memory: bool = False) -> tuple[dict, float, int]:
    """-> (the command's JSON output, wall seconds, peak tree PSS bytes, or 0 when memory is False).

    Sampling PSS reads every process's smaps each 50 ms, which costs CPU on a small machine: runs that
    are timed do not sample; memory is measured in runs of its own."""
    from benchmarks.index_probes import child_env

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    peak = [0]
    if memory:
        proc, peak = peak_memory_of_tree(proc)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak[0]


def naive_loop(data: Path, weights_file: Path, model: str, device: str = "cpu", limit: int | None = None,
               seconds: float | None = None) -> None:
    """The loop a user would write; prints {"images", "seconds"} as JSON. Runs in a child process.

    On another device than the CPU each image is sent there alone (.to(device)), in fp32, and the clock stops after
    a synchronize; one forward pass of zeros first takes CUDA's one-time set-up out of the timing.
    limit: only the first `limit` files; seconds: stop after the image that passes this many seconds."""
    import inspect

    import torch
    from PIL import Image

    from retrieval.features.backbones import MODELS, FeatureExtractor

    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    dev = torch.device(device)
    fp32 = {"precision": "fp32"} if "precision" in inspect.signature(FeatureExtractor).parameters else {}
    extractor = FeatureExtractor(model, "fc7", state, dev, **fp32)
    from torchvision.models import get_weight   # what a user's loop imports: torchvision and its transforms

    transform = get_weight(MODELS[model].imagenet.name).transforms()
    files = sorted(p for p in data.rglob("*.jpg"))[:limit]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type != "cpu":
        with torch.inference_mode():
            extractor.net(torch.zeros(1, 3, 224, 224, device=dev))
        sync()
    done = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            img = Image.open(path).convert("RGB")
            x = transform(img).unsqueeze(0).to(dev)            # (1, 3, 224, 224)
            extractor.net(x)                                   # (1, 4096)
            done += 1
            if seconds is not None and time.perf_counter() - started > seconds:
                break
    sync()
    print(json.dumps({"images": done, "seconds": time.perf_counter() - started}))


def random_weights(work: Path, model: str) -> Path:
    """The seeded random weights both runs use, saved once under work."""
    from retrieval.features.backbones import load_state_dict, random_weights_file

    weights_home = work / f"weights-{model}"
    weights_home.mkdir(parents=True, exist_ok=True)
    load_state_dict(model, "random", weights_home, create=True)
    return random_weights_file(weights_home, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120, help="collection size (half small, half phone-size)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each, alternating; medians are reported")
    ap.add_argument("--model", default="alexnet", choices=["alexnet", "vgg16"])
    ap.add_argument("--workdir", type=Path, default=RESULTS / "bench_index_work")
    ap.add_argument("--index-args", default="", help="extra index-images options, e.g. '--workers 1'")
    ap.add_argument("--ray", action="store_true",
                    help="compare `index-images --ray` (on a local Ray cluster started once) with the single-process "
                         "run instead of the naive loop")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file [default: benchmarks/results/bench_index*-TIME.json]")
    device = ap.add_argument_group("--device mode (benchmarks/index_throughput.py)")
    device.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="measure each model x image size on this device: index-images end to end (with the GPU's "
                             "utilisation), the naive loop, and the decode and network ceilings")
    device.add_argument("--models", default="alexnet,vgg16", help="comma-separated: alexnet,vgg16")
    device.add_argument("--sizes", default="small,phone", help="comma-separated: small (500x375), phone (4000x3000)")
    device.add_argument("--only-end-to-end", action="store_true",
                        help="measure index-images alone (no ceilings, start-up or naive loop): a second run")
    device.add_argument("--decodes", default="auto",
                        help="comma-separated index-images --decode values to run end to end: auto, workers, device")
    device.add_argument("--small-images", type=int, default=20_000, help="files in the 500x375 collection")
    device.add_argument("--phone-images", type=int, default=1_500, help="files in the 4000x3000 collection")
    device.add_argument("--phone-unique", type=int, default=400,
                        help="distinct 4000x3000 files drawn; the rest are hard links to them (0: all distinct)")
    device.add_argument("--grain", type=int, default=24,
                        help="levels of noise added to every pixel, for a photo's file size and decoding cost (0: none)")
    device.add_argument("--naive-images", type=int, default=500, help="the naive loop runs on the first N files ...")
    device.add_argument("--naive-seconds", type=float, default=20.0, help="... for at most this many seconds")
    device.add_argument("--network-seconds", type=float, default=3.0, help="timed forward passes per precision")
    device.add_argument("--startup-images", type=int, default=32,
                        help="also time index-images on this many files, to give the end-to-end rate less start-up "
                             "(0: not)")
    device.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds after which the measurements left are skipped (and recorded so) (0: none)")
    device.add_argument("--generate-processes", type=int, default=0, help="processes drawing the collections (0: one per CPU)")
    ap.add_argument("--naive-child", nargs=2, metavar=("DATA", "WEIGHTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_child:
        if args.device:
            naive_loop(Path(args.naive_child[0]), Path(args.naive_child[1]), args.model, args.device,
                       args.naive_images, args.naive_seconds)
        else:
            naive_loop(Path(args.naive_child[0]), Path(args.naive_child[1]), args.model)
        return
    if args.device:
        if args.ray:
            ap.error("--ray and --device are separate modes")
        from benchmarks.index_throughput import device_main

        device_main(args)
        return
    given = [a.option_strings[0] for a in device._group_actions if getattr(args, a.dest) != a.default]
    if given:
        ap.error(f"{', '.join(given)} only apply with --device")
    if args.ray:
        ray_main(args)
        return

    from retrieval.features.backbones import random_weights_file

    work = args.workdir
    data = make_collection(work / f"data-{args.images}", args.images)
    weights = random_weights(work, args.model)

    naive_cmd = [sys.executable, __file__, "--model", args.model, "--naive-child", str(data), str(weights)]

    def ours_cmd() -> list[str]:
        index_dir = work / "index"
        shutil.rmtree(index_dir, ignore_errors=True)
        index_dir.mkdir(parents=True)
        shutil.copy(weights, random_weights_file(index_dir, args.model))
        return [sys.executable, "-c", INDEX_IMAGES, str(data), "--index-dir", str(index_dir),
                "--model", args.model, "--weights", "random", "--device", "cpu", "--json", *args.index_args.split()]

    # A user cache folder of the benchmark's own, empty at the start: the first index-images run probes bf16 against
    # fp32 as a user's first new index on this machine does; later runs take its verdict when it chose bf16.
    cache = work / "user-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)
    naive, ours = [], []
    for run in range(args.runs + 1):
        memory = run == args.runs          # the last pair of runs measures memory, and is not timed
        out, wall, peak = run_measured(naive_cmd, memory)
        if memory:
            naive_peak = peak
        else:
            naive.append({"images_per_second": out["images"] / out["seconds"],
                          "wall_images_per_second": out["images"] / wall})
        out, wall, peak = run_measured(ours_cmd(), memory)
        assert out["indexed"] == args.images, out
        if memory:
            ours_peak = peak
            continue
        probe = out["extraction"].get("precision_probe")
        ours.append({"images_per_second": out["images_per_second"], "wall_images_per_second": args.images / wall,
                     "precision": out["extraction"]["precision"], "load_average": os.getloadavg()[0],
                     "precision_probe": None if probe is None else ("remembered" if probe["remembered"] else "timed")})
        print(f"run {run + 1}: naive {naive[-1]['wall_images_per_second']:.1f} img/s, "
              f"index-images {ours[-1]['wall_images_per_second']:.1f} img/s (whole processes, "
              f"{ours[-1]['precision']}, probe {ours[-1]['precision_probe'] or 'none'}; "
              f"load average {ours[-1]['load_average']:.1f}): "
              f"{ours[-1]['wall_images_per_second'] / naive[-1]['wall_images_per_second']:.2f}x", file=sys.stderr)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    result = {
        "benchmark": "bench_index", "model": args.model, "device": "cpu", "images": args.images,
        "sizes": {k: list(v) for k, v in SIZES.items()}, "runs": args.runs, "index_args": args.index_args,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "naive": {"runs": naive, "median_images_per_second": med(naive, "images_per_second"),
                  "median_wall_images_per_second": med(naive, "wall_images_per_second"),
                  "peak_memory_mb": naive_peak / 2**20},
        "index_images": {"runs": ours, "median_images_per_second": med(ours, "images_per_second"),
                         "median_wall_images_per_second": med(ours, "wall_images_per_second"),
                         "peak_memory_mb": ours_peak / 2**20},
    }
    result["speedup"] = result["index_images"]["median_images_per_second"] / result["naive"]["median_images_per_second"]
    result["speedup_wall"] = (result["index_images"]["median_wall_images_per_second"]
                              / result["naive"]["median_wall_images_per_second"])   # whole process against whole process

    print(f"\n{args.images} JPEGs (half 500x375, half 4000x3000), {args.model} fc7, CPU, median of {args.runs} runs")
    print(f"{'':34}{'images/s':>10}{'peak memory':>14}")
    print(f"{'naive loop (one image at a time)':34}{result['naive']['median_images_per_second']:>10.1f}"
          f"{result['naive']['peak_memory_mb']:>11.0f} MB")
    print(f"{'index-images':34}{result['index_images']['median_images_per_second']:>10.1f}"
          f"{result['index_images']['peak_memory_mb']:>11.0f} MB")
    print(f"{'naive loop, whole process':34}{result['naive']['median_wall_images_per_second']:>10.1f}")
    print(f"{'index-images, whole process':34}{result['index_images']['median_wall_images_per_second']:>10.1f}")
    print(f"speed-up: {result['speedup']:.2f}x (whole process against whole process: {result['speedup_wall']:.2f}x)")
    out_file = args.out or RESULTS / f"bench_index-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    print(f"saved {out_file}")


def ray_main(args: argparse.Namespace) -> None:
    """index-images in one process against index-images --ray on the same files, weights and CPU, same run.

    The Ray runs join a local cluster that this script starts once (as `ray start --head` would), so each
    run pays for its job (actors loading the network included) but not for starting Ray; that start is
    timed once, apart. Runs alternate; medians are reported; JSON lands in benchmarks/results/."""
    import os
    import tempfile

    import ray

    from retrieval.features.backbones import random_weights_file
    from retrieval.system import available_cores

    work = args.workdir
    data = make_collection(work / f"data-{args.images}", args.images)
    weights = random_weights(work, args.model)

    temp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")   # short: Ray's socket paths must fit in 107 bytes
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=available_cores(), include_dashboard=False, _temp_dir=temp,
             log_to_driver=False, configure_logging=False)
    cluster_start_s = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address

    def command(ray_address: str | None) -> list[str]:
        index_dir = work / "index"
        shutil.rmtree(index_dir, ignore_errors=True)
        index_dir.mkdir(parents=True)
        shutil.copy(weights, random_weights_file(index_dir, args.model))
        cmd = [sys.executable, "-c", INDEX_IMAGES, str(data),
               "--index-dir", str(index_dir), "--model", args.model, "--weights", "random", "--device", "cpu",
               "--json", *args.index_args.split()]
        return cmd + (["--ray", ray_address] if ray_address else [])

    single, on_ray = [], []
    try:
        for run in range(args.runs):
            for rows, ray_address in ((single, None), (on_ray, address)):
                out, wall, _ = run_measured(command(ray_address))
                assert out["indexed"] == args.images, out
                rows.append({"images_per_second": out["images_per_second"], "wall_images_per_second": args.images / wall,
                             "wall_s": wall})
            print(f"run {run + 1}: single process {single[-1]['wall_images_per_second']:.1f} img/s, "
                  f"--ray {on_ray[-1]['wall_images_per_second']:.1f} img/s (whole processes)", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    result = {
        "benchmark": "bench_index --ray", "model": args.model, "device": "cpu", "images": args.images,
        "sizes": {k: list(v) for k, v in SIZES.items()}, "runs": args.runs, "index_args": args.index_args,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
        "ray": {"version": ray.__version__, "cluster": "local, one node", "cluster_start_s": cluster_start_s},
        "single_process": {"runs": single, "median_images_per_second": med(single, "images_per_second"),
                           "median_wall_images_per_second": med(single, "wall_images_per_second")},
        "ray_run": {"runs": on_ray, "median_images_per_second": med(on_ray, "images_per_second"),
                    "median_wall_images_per_second": med(on_ray, "wall_images_per_second")},
    }
    result["ratio"] = (result["ray_run"]["median_images_per_second"]
                       / result["single_process"]["median_images_per_second"])
    result["ratio_wall"] = (result["ray_run"]["median_wall_images_per_second"]
                            / result["single_process"]["median_wall_images_per_second"])

    print(f"\n{args.images} JPEGs (half 500x375, half 4000x3000), {args.model} fc7, CPU, median of {args.runs} runs")
    print(f"{'':40}{'images/s (run)':>16}{'images/s (process)':>20}")
    for name, key in (("index-images, one process", "single_process"), ("index-images --ray (local cluster)", "ray_run")):
        print(f"{name:40}{result[key]['median_images_per_second']:>16.1f}"
              f"{result[key]['median_wall_images_per_second']:>20.1f}")
    print(f"--ray / one process: {result['ratio']:.2f}x (whole processes: {result['ratio_wall']:.2f}x); "
          f"starting the local Ray cluster took {cluster_start_s:.1f} s (once, not in the runs)")
    out_file = args.out or RESULTS / f"bench_index_ray-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    print(f"saved {out_file}")


if __name__ == "__main__":
    main()
