"""`make demo`: make a sample collection if data/ is empty, index it, run a sample search, then serve the gallery."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from retrieval.features.backbones import imagenet_cache_path, load_state_dict
from retrieval.features.weights import IMAGENET, RANDOM, WeightsChoice, WeightsUnavailable
from retrieval.catalog import CATALOG_FILE
from retrieval.images.scan import IMAGE_EXTENSIONS

from retrieval.samples import make_sample_collection

DATA = Path("data")
INDEX = Path("index")
MODEL = "alexnet"


def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def banner(text: str) -> None:
    width = 76
    print("\n" + "=" * width)
    for line in textwrap.dedent(text).strip().splitlines():
        print(f" {line}")
    print("=" * width + "\n", flush=True)


def choose_weights() -> WeightsChoice | None:
    """ImageNet weights when they can be had, else random weights with a plain warning (None: the index's own)."""
    if (INDEX / CATALOG_FILE).exists():
        return None  # an existing index keeps its own network
    try:
        load_state_dict(MODEL, IMAGENET, None)
        return IMAGENET
    except WeightsUnavailable:
        banner(f"""
        ImageNet weights for {MODEL} are not available here (offline, not in the cache).
        The demo goes on with RANDOM weights (seeded, saved in {INDEX}/).

        What that means: random convolutions still group pictures by colour and
        texture, so the generated sample classes come out well, but the features
        know nothing about objects. For real photos, use ImageNet weights: put
        {imagenet_cache_path(MODEL)}
        in place (or pass --weights PATH), then re-index into a fresh --index-dir.
        """)
        return RANDOM


def run(args: list[str]) -> None:
    """Run a console script as the demo shows it; its stdout passed on but for index-images' machine-readable last
    line (`summary {...}`, written where stdout is no terminal: a logged demo showed a 1,000-character JSON line)."""
    print("$ " + " ".join(args), flush=True)
    bindir = Path(sys.executable).parent
    if sys.stdout.isatty():
        subprocess.run([str(bindir / args[0]), *args[1:]], check=True)
        return
    done = subprocess.run([str(bindir / args[0]), *args[1:]], stdout=subprocess.PIPE, text=True)
    sys.stdout.write("".join(line for line in done.stdout.splitlines(keepends=True) if not line.startswith("summary {")))
    sys.stdout.flush()
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, args)


def main() -> None:
    serving = os.environ.get("DEMO_SERVE", "1") != "0" and shutil.which("serve-images", path=str(Path(sys.executable).parent))
    port = os.environ.get("DEMO_PORT", "8000")
    if serving:   # a port in use is said before the indexing, not after it
        from commands.options import UserError
        from commands.serve_images import check_port_free

        try:
            check_port_free("127.0.0.1", int(port))
        except (UserError, ValueError) as exc:
            print(f"error: {exc if isinstance(exc, UserError) else f'DEMO_PORT={port!r} is not a port number'}",
                  file=sys.stderr)
            sys.exit(2)
    if not has_images(DATA):
        state = "is empty" if DATA.is_dir() else "does not exist yet"
        print(f"{DATA}/ {state}: writing a sample collection of generated pictures there.", flush=True)
        make_sample_collection(DATA, per_class=12)
    weights = choose_weights()
    try:
        run(["index-images", str(DATA), "--index-dir", str(INDEX), *(["--weights", str(weights)] if weights else [])])
        query = next(p for p in sorted(DATA.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS)
        print(f"\nSample search: the neighbours of {query}", flush=True)
        run(["search-images", str(query), "-k", "5", "--index-dir", str(INDEX)])
        if serving:
            print(f"\nStarting the gallery server on port {port} (DEMO_PORT=N make demo for another port); it says "
                  "where to open it once it answers.", flush=True)
            serve = ["serve-images", "--index-dir", str(INDEX), "--port", port]
            print("$ " + " ".join(serve), flush=True)
            # the server takes this process's place: Ctrl-C reaches gunicorn itself, which stops its workers in order
            os.execv(str(Path(sys.executable).parent / serve[0]), serve)
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
    except KeyboardInterrupt:
        print("\nstopped.")


if __name__ == "__main__":
    main()
