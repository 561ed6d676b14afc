#!/usr/bin/env bash
# One device call (carry .gpubundle and .whl): bench/sglang_recovery.py on the Llama-3-8B-shaped checkpoint.
#   COMMIT=$(git rev-parse --short HEAD) bash bench/device/recovery.sh
# One restart takes about 8 minutes with the set-up (bundle, checkpoint) on an H100: a call's 10-minute limit
# leaves no room for the CUDA tests (bench/device/cuda_tests.sh, a call of their own) or a second restart.
# If the limit cuts the run anyway, its logs come back in recovery-logs.tgz: `python bench/sglang_recovery.py
# --from-logs recovery-logs.tgz --environment ENV.json ...` rebuilds what it measured.
source bench/device/setup.sh || exit 1
timeout ${BENCH_TIMEOUT:-500} python3 bench/sglang_recovery.py --model /tmp/llama8b --out "$OUT" \
  --restarts ${RESTARTS:-1} 2>&1 | tail -40; rc=$?
tar -C /tmp -czf "$OUT/recovery-logs.tgz" $(cd /tmp && ls -d sc-recovery-logs-* 2>/dev/null) 2>/dev/null
echo "exit code: bench $rc"
