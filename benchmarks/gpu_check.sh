#!/usr/bin/env bash
# The GPU checks of issue 10 in one run, on a host with a CUDA GPU: the CUDA tests, then bench_index.py's GPU
# measurements and bench_query.py against `serve-images --device cuda`. Results (logs, JSON) land in $OUT.
#
# Written for the lent H200 host (Python 3.12 with torch, torchvision, Pillow, numpy, scikit-learn, pytest,
# nvidia-ml-py; no network): the packages it lacks travel as wheels in .whl/ (faiss-cpu, SQLAlchemy, Flask,
# gunicorn and their needs), installed with --no-deps since the project's pins ask for a newer torch.
#   usage: benchmarks/gpu_check.sh [tests|bench|query|all] ...   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -d .whl ] && ! python3 -c "import faiss, sqlalchemy, flask, gunicorn" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*"; }

what=${1:-all}
shift || true
log "host: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

if [ "$what" = tests ] || [ "$what" = all ]; then
    log "CUDA tests"
    timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py tests/test_device_decode.py 2>&1 \
        | tee "$OUT/tests.log" | grep -v "^$"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    log "bench_index.py on the GPU"
    python3 benchmarks/bench_index.py --device cuda --out "$OUT/bench_index.json" ${BENCH_ARGS:-} "$@" 2>&1 \
        | tee "$OUT/bench_index.log"
fi
if [ "$what" = query ] || [ "$what" = all ]; then
    log "bench_query.py against serve-images --device cuda"
    python3 benchmarks/bench_query.py --device cuda --out "$OUT/bench_query.json" ${QUERY_ARGS:-} 2>&1 \
        | tee "$OUT/bench_query.log" | tail -30
fi
log "done"
