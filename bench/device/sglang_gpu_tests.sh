#!/usr/bin/env bash
# One device call: the SGLang GPU tests, their log and the servers' logs under $OUT.
#   device run: bash bench/device/sglang_gpu_tests.sh [pytest args, e.g. -k ...]   (carry .gpubundle and .whl)
source bench/device/setup.sh || exit 1
mkdir -p "$OUT/logs"
export SHAREDCACHE_GPU_LOGS=/tmp/sgl-gpu-logs SHAREDCACHE_GPU_SUMMARY=$OUT/sglang-gpu-summary.json
rm -rf $SHAREDCACHE_GPU_LOGS
timeout ${TEST_TIMEOUT:-560} python3 -m pytest -m gpu -x -v -p no:cacheprovider tests/gpu/test_sglang_gpu.py "$@" 2>&1 | tee "$OUT/sglang-gpu-tests.log"
rc=$?
tar -C /tmp -czf "$OUT/logs/server-logs.tgz" sgl-gpu-logs 2>/dev/null
exit $rc
