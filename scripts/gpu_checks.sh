#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, for a short lease of one:
#   1. the tests that run natively there (CUDA graphs against eager; each Triton kernel against
#      its PyTorch reference, slow gradient checks included), which skip or run in Triton's
#      interpreter elsewhere;
#   2. the bench at the three standard shapes, every case in one process (--in-process: a
#      subprocess per case costs more than its measurement there), with the LRU-NTM writing an
#      add vector (the Omniglot preset's form) as an extra row.
# Everything goes to OUTPUT_DIR (default gpu-checks/): the device, the test logs, the bench's
# log and JSON. Each step has a time limit, so that a cut-off lease still leaves what was done.
#
#   scripts/gpu_checks.sh [OUTPUT_DIR]
#   BENCH_SHAPES="64x784x1x100" BENCH_SECONDS=300 scripts/gpu_checks.sh
set -u
PYTHON=${PYTHON:-python3}  # the interpreter with torch (a venv's, or python3 on a GPU image)
cd "$(dirname "$0")/.."
out=${1:-gpu-checks}
mkdir -p "$out"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" \
  || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/device.txt"

echo "== tests that run natively on CUDA"
timeout "${TEST_SECONDS:-300}" "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
  -k "test_cuda_graphs or test_fused_kernels or ((triton or cuda) and not cpu)" \
  tests/test_cuda_graphs.py tests/test_fused_kernels.py tests/test_bn_lstm.py \
  tests/test_irnn.py tests/test_fast_weights.py > "$out/tests.log" 2>&1
echo "tests: exit $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -n 20

echo "== bench"
# shellcheck disable=SC2086  # the shapes are words
timeout "${BENCH_SECONDS:-600}" "$PYTHON" scripts/bench.py --device cuda --in-process \
  --min-time 0.25 ${BENCH_SHAPES:+--shapes $BENCH_SHAPES} --variants lru_ntm:write_vector=add \
  --json "$out/bench-cuda.json" \
  > "$out/bench.log" 2>&1
echo "bench: exit $? (its JSON holds every case measured, also when cut off)"
grep -v "ms/iter" "$out/bench.log" | tail -n 45
