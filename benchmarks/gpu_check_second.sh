# The second, shorter H200 run of 2026-11-29 (after gpu_check.sh all): index-images end to end with --decode auto
# (JPEGs shared between nvJPEG and the workers) against the workers alone, and two CUDA tests. Same environment.
set -o pipefail
K='end to end|\| (alexnet|vgg16)|FAILED|passed|failed|cosine|retries|Error|skipped'
TAG=-alexnet BENCH_ARGS="--models alexnet --decodes auto,workers --only-end-to-end --startup-images 0 --time-budget 100 $EXTRA" bash benchmarks/gpu_check.sh bench 2>&1 | grep -E "$K"
export PYTHONPATH=${SITE:-/tmp/site}
TAG=-vgg16 BENCH_ARGS="--models vgg16 --decodes auto --only-end-to-end --startup-images 0 --time-budget 50 $EXTRA" bash benchmarks/gpu_check.sh bench 2>&1 | grep -E "$K"
TAG=-final TESTS="tests/test_cuda.py::test_the_gpu_defaults_against_the_cpu tests/test_cuda.py::test_a_real_out_of_memory_batch_is_retried_smaller_with_nothing_lost" bash benchmarks/gpu_check.sh tests 2>&1 | grep -E "$K"
