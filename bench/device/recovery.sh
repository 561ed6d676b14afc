#!/usr/bin/env bash
# One device call (carry .gpubundle and .whl): the transformers path's CUDA tests (tests/gpu/test_cuda.py, 4
# workers; the memory-growth test alone), then bench/sglang_recovery.py on the Llama-3-8B-shaped checkpoint.
#   COMMIT=$(git rev-parse --short HEAD) bash bench/device/recovery.sh
source bench/device/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hsite .whl/*.whl || exit 1
log=$OUT/cuda-tests.log
{ echo "# tests/gpu/test_cuda.py at ${COMMIT:-?}, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$log"
# the image's own transformers for the transformers path (the bundle's older one would shadow it)
PYTHONPATH=/tmp/hsite timeout ${CUDA_TIMEOUT:-240} python3 -m pytest -m gpu -n 4 -v -p no:cacheprovider \
  tests/gpu/test_cuda.py -k 'not grows_by_no_more' 2>&1 | tee -a "$log"; rc1=$?
PYTHONPATH=/tmp/hsite timeout 120 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_cuda.py \
  -k 'grows_by_no_more' 2>&1 | tee -a "$log"; rc2=$?
timeout ${BENCH_TIMEOUT:-420} python3 bench/sglang_recovery.py --model /tmp/llama8b --out "$OUT" \
  --restarts ${RESTARTS:-2} 2>&1 | tail -40; rc3=$?
tar -C /tmp -czf "$OUT/recovery-logs.tgz" $(cd /tmp && ls -d sc-recovery-logs-* 2>/dev/null) 2>/dev/null
echo "exit codes: test_cuda $rc1 / $rc2, bench $rc3" | tee -a "$log"
