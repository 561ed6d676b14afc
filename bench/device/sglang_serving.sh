#!/usr/bin/env bash
# One device call: bench/sglang_serving.py on the GPU machine, results and server logs under $OUT.
#   device run: bash bench/device/sglang_serving.sh [--mode replicas] ...
# PD mode (the default) needs the transfer engine and router: on a machine where setup.sh already ran
# (an earlier call carried .gpubundle and .whl), carry .pdbundle; see setup.sh.
source bench/device/setup.sh || exit 1
timeout ${BENCH_TIMEOUT:-540} python3 bench/sglang_serving.py --model /tmp/llama8b --out /tmp/serving \
  --budget-s ${BENCH_BUDGET:-380} "$@" 2>&1 | tee "$OUT/sglang-serving.log"
rc=$?
cp /tmp/serving/sglang-serving.json "$OUT/" 2>/dev/null
tar -C /tmp/serving -czf "$OUT/serving-logs.tgz" --exclude='*.jsonl' . 2>/dev/null
exit $rc
