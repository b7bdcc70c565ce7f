#!/usr/bin/env bash
# The GPU checks of issue 10 in one run, on a host with a CUDA GPU: the CUDA tests, then bench_index.py's GPU
# measurements and bench_query.py against `serve-images --device cuda`. Results (logs, JSON) land in $OUT.
#
# Written for the lent H200 host (Python 3.12 with torch, torchvision, Pillow, numpy, scikit-learn, pytest,
# nvidia-ml-py; no network): the packages it lacks travel as wheels in .whl/ (faiss-cpu, SQLAlchemy, Flask,
# gunicorn and their needs), installed with --no-deps since the project's pins ask for a newer torch.
#   usage: benchmarks/gpu_check.sh [all|STEP,STEP...]   steps: tests, bench, query (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import faiss, sqlalchemy, flask, gunicorn" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*"; }

what=${1:-all}
shift || true
log "host: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

DEVICE=${DEVICE:-cuda}        # DEVICE=cpu: a dry run of the same steps on a machine without a GPU
WORK=${WORK:-/tmp/gpu-check}
if [[ ",$what," == *,tests,* || $what == all ]]; then
    log "CUDA tests"
    timeout 300 $PY -m pytest -q -s -p no:cacheprovider -o tmp_path_retention_policy=none ${TEST_ARGS:-} \
        ${TESTS:-tests/test_cuda.py tests/test_device_decode.py} 2>&1 | tee "$OUT/tests${TAG:-}.log" | grep -v "^$"
fi
if [[ ",$what," == *,bench,* || $what == all ]]; then
    log "bench_index.py --device $DEVICE"
    # the default sizes: about 4 minutes on the H200 host; BENCH_ARGS adds or overrides options
    timeout 420 $PY benchmarks/bench_index.py --device "$DEVICE" --workdir "$WORK/bench_index" \
        --out "$OUT/bench_index${TAG:-}.json" --small-images 20000 --phone-images 1500 --phone-unique 400 --runs 1 --decodes workers,device \
        --naive-images 300 --naive-seconds 5 --network-seconds 3 --time-budget 270 ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench_index${TAG:-}.log"
fi
if [[ ",$what," == *,query,* || $what == all ]]; then
    log "bench_query.py against serve-images --device $DEVICE"
    timeout 150 $PY benchmarks/bench_query.py --device "$DEVICE" --work-dir "$WORK/bench_query" \
        --out "$OUT/bench_query.json" --images 1000 --duration 5 --runs 1 --warmup 2 --clients 1,8 ${QUERY_ARGS:-} 2>&1 \
        | tee "$OUT/bench_query.log" | tail -30
fi
log "done"
