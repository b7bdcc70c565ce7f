"""bench_index --device: indexing throughput per model and image size, against the decode and network ceilings.

For each model in --models and each size in --sizes (one collection per size: "small" 500x375 JPEGs,
"phone" 4000x3000 JPEGs), on --device:
  end to end  `index-images --json` on a fresh index, as a subprocess: its own images/s (which includes its
              start-up: torch, the network, the CUDA context) and images / the process's wall time; the GPU's
              utilisation is sampled with NVML every 100 ms meanwhile (null without pynvml or a GPU). With
              --startup-images, index-images is also timed on that many files, and the end-to-end rate is
              given less that start-up too.
  naive loop  one image at a time: Pillow, the weights' transforms, .to(device), fp32 (the first --naive-images
              files, at most --naive-seconds).
  decode      indexer.read.Reader on every core (os.cpu_count() workers) over every file, no network; on CUDA
              also with pinned batches, and with index-images' own number of workers (pinned on CUDA).
  network     the extractor alone on uint8 batches already on the device, of the size `--batch-size auto`
              picks, after warm-up: fp32, and bf16 on CUDA (what index-images uses there).
  bottleneck  end to end against min(decode on every core, network at the product's precision).
Every measurement runs in a process of its own (so the GPU memory is free for the next one), --runs times
(medians are reported). The JSON is rewritten after each measurement; once --time-budget seconds have
passed, the measurements left are recorded as skipped, so the run always ends with its JSON.
The child processes are in index_probes.py; the collections are drawn by photo_collections.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.index_probes import MeasurementError, child_cmd, run_child  # noqa: E402 - after the path is set
from benchmarks.photo_collections import SIZES, link_subset, make_size_collection  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL_CHOICES = ("alexnet", "vgg16")
CHILD_GRACE_S = 60.0         # a child may run this long past the time budget before it is killed
INDEX_IMAGES = "from commands.index_images import index_images_entry; index_images_entry()"
STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr: wall-clock time and seconds since the benchmark started."""
    print(f"{time.strftime('%H:%M:%S')} [{time.monotonic() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# --- the session: measurements, budget, JSON ---------------------------------------------------------

RATE_KEYS = ("images_per_second", "wall_images_per_second", "images_per_second_less_startup", "loop_images_per_second")


def summarise(entry: dict) -> None:
    """Medians of the runs' rates into entry: median_KEY, and for nested per-precision rows entry[precision]."""
    runs = entry["runs"]
    for key in RATE_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            entry[f"median_{key}"] = statistics.median(values)
    for key in {k for r in runs for k, v in r.items() if isinstance(v, dict) and "images_per_second" in v}:
        values = [r[key]["images_per_second"] for r in runs if key in r]
        entry[key] = {"median_images_per_second": statistics.median(values)}


class Session:
    """The run's report, its time budget, and the JSON file rewritten after every measurement."""

    def __init__(self, args: argparse.Namespace, out_file: Path):
        self.args, self.out_file = args, out_file
        self.budget = args.time_budget or None
        self.report: dict = {
            "benchmark": "bench_index --device", "device": args.device,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("naive_child", "images", "model", "ray")},   # those belong to the other modes
            "machine": None, "collections": {}, "weights": {}, "network": {}, "startup": {}, "decode": {},
            "end_to_end": {}, "naive": {}, "bottleneck": {}, "skipped": [], "errors": [],
            "notes": NOTES,
        }

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def over_budget(self) -> bool:
        return self.budget is not None and self.elapsed() > self.budget

    def timeout(self) -> float | None:
        return None if self.budget is None else max(0.0, self.budget - self.elapsed()) + CHILD_GRACE_S

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        self.report["bottleneck"] = bottlenecks(self.report)
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_file.with_name(self.out_file.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2))
        os.replace(tmp, self.out_file)

    def skip(self, where: dict, key: str, label: str) -> bool:
        """Record where[key] as skipped when the budget has passed; -> whether it was."""
        if not self.over_budget():
            return False
        where[key] = {"skipped": f"the time budget ({self.budget:g} s) had passed"}
        self.report["skipped"].append(label)
        log(f"{label}: skipped (time budget)")
        self.save()
        return True

    def measure(self, where: dict, key: str, label: str, once: Callable[[], dict], runs: int) -> dict:
        """where[key] = {"runs": [once() ...], medians}, `runs` times, saving after each; a failure ends its runs."""
        if self.skip(where, key, label):
            return where[key]
        entry = where[key] = {"runs": []}
        for run in range(runs):
            if run and self.over_budget():
                entry["runs_skipped"] = runs - run
                break
            log(f"{label}: run {run + 1}/{runs} ...")
            try:
                row = once()
            except MeasurementError as exc:
                entry["error"] = str(exc)
                self.report["errors"].append(f"{label}: {str(exc)[:300]}")
                log(f"{label}: FAILED {str(exc)[-1500:]}")
                self.save()
                break
            entry["runs"].append(row)
            summarise(entry)
            self.save()
            log(f"{label}: {describe(row)}")
        return entry


def describe(row: dict) -> str:
    parts = [f"{row['images_per_second']:.1f} img/s"] if "images_per_second" in row else []
    parts += [f"{k} {v['images_per_second']:.1f} img/s" for k, v in row.items()
              if isinstance(v, dict) and "images_per_second" in v]
    if row.get("wall_images_per_second") is not None:
        parts.append(f"whole process {row['wall_images_per_second']:.1f} img/s")
    if row.get("loop_images_per_second") is not None:
        x = row["extraction"]
        parts.append(f"batch loop {row['loop_images_per_second']:.1f} img/s (batch {x['batch_size']}, {x['workers']} "
                     f"workers, decode {x['decode']}; " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                                  x["stage_seconds"].items()) + ")")
    gpu = row.get("gpu")
    if gpu and gpu.get("util_mean") is not None:
        parts.append(f"GPU util mean {gpu['util_mean']}% (busy window {gpu['util_mean_busy_window']}%), "
                     f"max {gpu['util_max']}%, {gpu['samples']} samples")
    return ", ".join(parts) or json.dumps(row)[:200]


def median_of(entry: dict | None, key: str = "median_images_per_second") -> float | None:
    return entry.get(key) if isinstance(entry, dict) else None


def bottlenecks(report: dict) -> dict:
    """For each model x size: end-to-end images/s against min(decode ceiling, network ceiling), and which is lower.

    The decode ceiling is Reader on every core (unpinned); the network ceiling is at the product's precision
    (bf16 on CUDA, fp32 on the CPU)."""
    precision = "bf16" if report["device"] == "cuda" else "fp32"
    out: dict = {}
    for model, sizes in report["end_to_end"].items():
        network = median_of((report["network"].get(model) or {}).get(precision))
        for key, e2e in sizes.items():
            size, _, decoding = key.partition(" decode=")
            ceiling = "device" if decoding == "device" else "all_cores"
            decode = median_of((report["decode"].get(size) or {}).get(ceiling))
            rate = median_of(e2e)
            ceilings = {k: v for k, v in (("decode", decode), ("network", network)) if v}
            row = {"end_to_end": rate, "end_to_end_less_startup": median_of(e2e, "median_images_per_second_less_startup"),
                   "decode_ceiling": decode, "network_ceiling": network, "network_precision": precision}
            if ceilings and rate:
                lower = min(ceilings, key=ceilings.get)
                row.update(lower_ceiling=lower, ratio=round(rate / ceilings[lower], 3),
                           decode_over_network=round(decode / network, 3) if decode and network else None)
                if row["end_to_end_less_startup"]:
                    row["ratio_less_startup"] = round(row["end_to_end_less_startup"] / ceilings[lower], 3)
            row["loop"] = median_of(e2e, "median_loop_images_per_second")
            if ceilings and row["loop"]:
                row["loop_ratio"] = round(row["loop"] / min(ceilings.values()), 3)
            out.setdefault(model, {})[key] = row
    return out


NOTES = {
    "end_to_end.images_per_second": "index-images' own JSON: images indexed / seconds from its start (the interpreter "
                                    "and imports before it excepted), so it includes loading torch and the network",
    "end_to_end.wall_images_per_second": "images / the wall time of the whole index-images process",
    "end_to_end.images_per_second_less_startup": "(images - startup images) / (seconds - startup seconds): the rate "
                                                 "once started, with start-up timed on --startup-images files",
    "decode.all_cores": "indexer.read.Reader with os.cpu_count() workers, no network, unpinned",
    "decode.index_images_workers": "the same with index-images' default number of workers, pinned on CUDA as it does",
    "network": "FeatureExtractor on device-resident uint8 batches of the --batch-size auto size, features copied back",
    "gpu": "NVML utilisation.gpu (% of time a kernel ran) every 100 ms; null without pynvml or a GPU",
}


# --- the run ---------------------------------------------------------------------------------------------

def device_main(args: argparse.Namespace) -> None:
    """bench_index --device: see this module's docstring."""
    global STARTED
    STARTED = time.monotonic()
    models = [m for m in args.models.split(",") if m]
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [m for m in models if m not in MODEL_CHOICES] + [s for s in sizes if s not in SIZES]
    if bad or not models or not sizes:
        raise SystemExit(f"--models takes {','.join(MODEL_CHOICES)} and --sizes {','.join(SIZES)}; not {bad}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_file = (args.out.resolve() if args.out else RESULTS / f"bench_index_device-{args.device}-{stamp}.json")
    work = args.workdir.resolve()
    session = Session(args, out_file)
    report = session.report
    log(f"bench_index --device {args.device}: models {models}, sizes {sizes}, runs {args.runs}, "
        f"time budget {args.time_budget or 'none'}; JSON: {out_file}")

    try:
        report["machine"], _, _ = run_child(child_cmd("info", device=args.device), timeout=300, sample_gpu=False)
    except MeasurementError as exc:
        report["machine"] = {"error": str(exc), "cpus": os.cpu_count()}
    machine = report["machine"]
    session.save()
    log(f"machine: {machine.get('cpus')} CPUs ({machine.get('processor')}), GPU {machine.get('gpu')}, torch "
        f"{machine.get('torch')}, torchvision {machine.get('torchvision')}, NVML {machine.get('pynvml')}")
    if machine.get("missing_modules"):
        log(f"WARNING: missing modules {machine['missing_modules']}: index-images (faiss, sqlalchemy, click, tqdm) "
            "will fail; the ceilings do not need them")
    if args.device == "cuda" and not machine.get("cuda_available"):
        report["errors"].append("--device cuda: PyTorch sees no CUDA GPU")
        session.save()
        raise SystemExit(f"--device cuda: PyTorch sees no CUDA GPU here (JSON: {out_file})")

    weights: dict[str, Path] = {}
    log(f"weights: the seeded random weights of {', '.join(models)}, made once under {work} ...")
    try:
        report["weights"], _, _ = run_child(child_cmd("weights", models=models, work=str(work)),
                                            timeout=session.timeout(), sample_gpu=False)
        weights = {model: Path(w["file"]) for model, w in report["weights"].items()}
    except MeasurementError as exc:
        report["weights"] = {"error": str(exc)}
        report["errors"].append(f"weights: {exc}")
        log(f"weights: FAILED {exc}")
    session.save()

    cuda = args.device == "cuda"
    default_batch = 512 if cuda else 32   # what --batch-size auto gives on an empty H200 / on the CPU
    counts = {"small": args.small_images, "phone": args.phone_images}
    uniques = {"small": 0, "phone": args.phone_unique}
    collections: dict[str, Path] = {}
    startup_data: Path | None = None
    processes = args.generate_processes or os.cpu_count() or 1

    for size in sizes:
        label = f"collection {size} ({counts[size]} x {SIZES[size][0]}x{SIZES[size][1]})"
        if session.skip(report["collections"], size, label):
            continue
        log(f"{label}: drawing in {processes} processes ...")
        unique = uniques[size] if 0 < uniques[size] < counts[size] else "all"
        folder = work / f"collection-{size}-{counts[size]}-u{unique}-g{args.grain}"
        stats = make_size_collection(folder, size, counts[size], uniques[size], args.grain, processes)
        report["collections"][size] = {**stats, "folder": str(folder)}
        collections[size] = folder
        log(f"{label}: {'reused, ' if stats['reused'] else ''}made in {stats['generation_s']} s + {stats['link_s']} s of "
            f"links ({stats['unique_files']} unique, mean {stats['mean_file_bytes'] / 1e3:.0f} kB, "
            f"{stats['core_ms_per_unique_file']} core-ms per unique file)")
        if startup_data is None and args.startup_images:
            startup_data = link_subset(folder, work / f"startup-{args.startup_images}", args.startup_images)
        session.save()

        for model in models:
            if model not in weights:
                continue
            if model not in report["network"] and not args.only_end_to_end:
                session.measure(report["network"], model, f"network ceiling {model}",
                                lambda: network_once(model, weights[model], args, session), args.runs)
            if startup_data is not None and model not in report["startup"] and not args.only_end_to_end:
                session.measure(report["startup"], model, f"start-up {model} ({args.startup_images} files)",
                                lambda: end_to_end_once(model, startup_data, weights[model], args, session, None),
                                args.runs)
            n_files = counts[size]
            for decode in [d for d in args.decodes.split(",") if d]:
                key = size if decode == "auto" else f"{size} decode={decode}"
                session.measure(report["end_to_end"].setdefault(model, {}), key, f"end to end {model} {key}",
                                lambda: end_to_end_once(model, collections[size], weights[model], args, session,
                                                        report["startup"].get(model), n_files, decode), args.runs)

        # the batch --batch-size auto chose for the first model measured (the decode sizes are the same for both)
        batch = next((report["network"][m]["runs"][0]["batch_size"] for m in models
                      if (report["network"].get(m) or {}).get("runs")), default_batch)
        variants = [("all_cores", os.cpu_count() or 1, False, None)]
        if cuda:   # the workers hash and check each JPEG, nvJPEG decodes it, and it is resized on the GPU
            variants.append(("device", os.cpu_count() or 1, True, "cuda"))
        if machine.get("index_images_workers") and machine["index_images_workers"] != (os.cpu_count() or 1):
            variants.append(("index_images_workers", machine["index_images_workers"], cuda, None))
        for name, workers, pin, on_device in ([] if args.only_end_to_end else variants):
            session.measure(report["decode"].setdefault(size, {}), name,
                            f"decode ceiling {size} ({workers} workers{', pinned' if pin else ''}"
                            f"{', nvJPEG' if on_device else ''})",
                            lambda: run_child(child_cmd("decode", data=str(collections[size]), workers=workers,
                                                        pin_memory=pin, batch_size=batch, device=on_device),
                                              session.timeout())[0], args.runs)

    for size, folder in ([] if args.only_end_to_end else collections.items()):
        for model in models:
            if model in weights:
                session.measure(report["naive"].setdefault(model, {}), size, f"naive loop {model} {size}",
                                lambda: naive_once(model, folder, weights[model], args, session), args.runs)

    session.save()
    print_tables(report, args)
    print(f"saved {out_file}")


def network_once(model: str, weights: Path, args: argparse.Namespace, session: Session) -> dict:
    out, _, _ = run_child(child_cmd("network", model=model, weights=str(weights), device=args.device,
                                    seconds=args.network_seconds), session.timeout(), sample_gpu=False)
    return out


def end_to_end_once(model: str, data: Path, weights: Path, args: argparse.Namespace, session: Session,
                    startup: dict | None, n_files: int | None = None, decode: str = "auto") -> dict:
    """index-images on a fresh index (the seeded random weights copied in), as a subprocess; -> its rates.

    weights: the file retrieval.features.backbones.random_weights_file names in the weights folder; the copy gets the same
    name in the index folder, where index-images looks for it (this process never imports torch)."""
    index_dir = args.workdir.resolve() / "index-e2e"
    shutil.rmtree(index_dir, ignore_errors=True)
    index_dir.mkdir(parents=True)
    shutil.copy(weights, index_dir / weights.name)
    cmd = [sys.executable, "-c", INDEX_IMAGES, str(data), "--index-dir", str(index_dir), "--model", model,
           "--weights", "random", "--device", args.device, "--json", "--decode", decode, *args.index_args.split()]
    try:
        out, wall, gpu = run_child(cmd, session.timeout())
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    if n_files is not None and out["indexed"] != n_files:
        raise MeasurementError(f"indexed {out['indexed']} of {n_files} files; skipped: {out['skipped'][:3]}")
    row = {"images": out["indexed"], "seconds": out["seconds"], "wall_s": round(wall, 3),
           "images_per_second": out["images_per_second"], "wall_images_per_second": out["indexed"] / wall, "gpu": gpu,
           # index-images' own account: the batch loop's rate, and where its time went (extraction in the summary)
           "loop_images_per_second": (out.get("extraction") or {}).get("loop_images_per_second"),
           "extraction": out.get("extraction")}
    runs = (startup or {}).get("runs") or []
    if runs and n_files is not None:
        t0 = statistics.median(r["seconds"] for r in runs)
        n0 = runs[0]["images"]
        row["startup_seconds"] = t0
        steady = out["seconds"] - t0      # too short a remainder gives noise, not a rate: then none
        row["images_per_second_less_startup"] = ((out["indexed"] - n0) / steady
                                                 if steady >= max(1.0, 0.25 * out["seconds"]) and out["indexed"] > n0
                                                 else None)
    return row


def naive_once(model: str, data: Path, weights: Path, args: argparse.Namespace, session: Session) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_index.py"), "--model", model, "--device", args.device,
           "--naive-images", str(args.naive_images), "--naive-seconds", str(args.naive_seconds),
           "--naive-child", str(data), str(weights)]
    out, wall, gpu = run_child(cmd, session.timeout())
    return {"images": out["images"], "seconds": round(out["seconds"], 3),
            "images_per_second": out["images"] / out["seconds"], "wall_s": round(wall, 3), "gpu": gpu}


# --- the tables ------------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int | None = None) -> str:
    """A rate for the table: whole numbers from 100 up, one decimal below (digits: fixed)."""
    if value is None:
        return "–"
    return f"{value:,.{digits if digits is not None else (0 if value >= 100 else 1)}f}"


def cell(entry: dict | None, key: str = "median_images_per_second") -> str:
    if not isinstance(entry, dict):
        return "–"
    if "skipped" in entry:
        return "skipped"
    if entry.get(key) is None and "error" in entry:
        return "FAILED"
    return fmt(entry.get(key))


def print_tables(report: dict, args: argparse.Namespace) -> None:
    m = report["machine"] or {}
    precision = "bf16" if report["device"] == "cuda" else "fp32"
    print(f"\nindex-images throughput on {report['device']} ({m.get('gpu') or m.get('processor')}), {m.get('cpus')} CPUs, "
          f"torch {m.get('torch')}, {report['date']}; images/s, medians of {args.runs} run(s)")
    fp32_too = precision != "fp32"
    print("| model | size | files | end to end | whole process | less start-up | batch loop | naive loop | decode ceiling | "
          f"network {precision} |{' network fp32 |' if fp32_too else ''} e2e / min ceiling | lower ceiling "
          "| GPU util mean (busy) / max |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if fp32_too else "") + "--:|---|--:|")
    for model, sizes in report["end_to_end"].items():
        for size, e2e in sizes.items():
            b = report["bottleneck"].get(model, {}).get(size, {})
            network = report["network"].get(model) or {}
            gpus = [r["gpu"] for r in e2e.get("runs", []) if r.get("gpu")]
            util = (f"{statistics.median(g['util_mean'] for g in gpus):.0f}% "
                    f"({statistics.median(g['util_mean_busy_window'] or 0 for g in gpus):.0f}%) / "
                    f"{max(g['util_max'] for g in gpus)}%") if gpus and gpus[0]["util_mean"] is not None else "–"
            size, _, decoding = size.partition(" decode=")
            files = (report["collections"].get(size) or {}).get("files")
            print(f"| {model} | {size}{' (' + decoding + ' decode)' if decoding else ''} | {files} | {cell(e2e)} | {cell(e2e, 'median_wall_images_per_second')} "
                  f"| {cell(e2e, 'median_images_per_second_less_startup')} "
                  f"| {cell(e2e, 'median_loop_images_per_second')} "
                  f"| {cell((report['naive'].get(model) or {}).get(size))} "
                  f"| {cell((report['decode'].get(size) or {}).get('device' if decoding == 'device' else 'all_cores'))} "
                  f"| {cell(network.get(precision) or network)} "
                  + (f"| {cell(network.get('fp32') or network)} " if fp32_too else "") +
                  f"| {fmt(b.get('ratio'), 2)} | {b.get('lower_ceiling', '–')} | {util} |")
    if report["decode"]:
        print("\n| decode ceiling | " + " | ".join(report["decode"]) + " |")
        print("|---|" + "--:|" * len(report["decode"]))
        names = sorted({n for d in report["decode"].values() for n in d}, key=["all_cores", "device", "all_cores_pinned",
                                                                            "index_images_workers"].index)
        for name in names:
            workers = next((r["runs"][0]["workers"] for r in (d.get(name) for d in report["decode"].values())
                            if r and r.get("runs")), "?")
            print(f"| {name} ({workers} workers) | "
                  + " | ".join(cell(d.get(name)) for d in report["decode"].values()) + " |")
    starts = {k: v for k, v in report["startup"].items() if v.get("runs")}
    if starts:
        print("\nstart-up (index-images on " + f"{args.startup_images} files, seconds): "
              + ", ".join(f"{k} {statistics.median(r['seconds'] for r in v['runs']):.1f} s" for k, v in starts.items()))
    for name in ("skipped", "errors"):
        if report[name]:
            print(f"{name}: " + "; ".join(x.splitlines()[0] for x in report[name]))
