#!/usr/bin/env bash
# One device call: bench/sglang_serving.py on the GPU machine, results and server logs under $OUT.
#   device run: bash bench/device/sglang_serving.sh [--free-gib 77.8] [--mode replicas] ...
# PD mode (the default) needs the transfer engine and router: on a machine where setup.sh already ran
# (an earlier call carried .gpubundle and .whl), carry .pdbundle; see setup.sh.
# With two GPUs the setups run at once, shared on GPU 0 and unshared on GPU 1, and are merged: one call
# holds both, on identical cards that do not contend. SHARED_GPU=1 swaps the cards, to tell a card's
# speed from the setup's. With one GPU they run one after the other.
source bench/device/setup.sh || exit 1
run() {  # run <out> <extra args...>
  local out=$1; shift
  timeout ${BENCH_TIMEOUT:-540} python3 bench/sglang_serving.py --model /tmp/llama8b --out "$out" \
    --budget-s ${BENCH_BUDGET:-380} "$@"
}
rm -rf /tmp/serving /tmp/serving-shared /tmp/serving-unshared  # an earlier call's run on a warm machine
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  shared_gpu=${SHARED_GPU:-0}
  CUDA_VISIBLE_DEVICES=$shared_gpu run /tmp/serving-shared --setups shared "$@" > "$OUT/sglang-serving-shared.log" 2>&1 &
  a=$!
  CUDA_VISIBLE_DEVICES=$((1 - shared_gpu)) run /tmp/serving-unshared --setups unshared "$@" > "$OUT/sglang-serving-unshared.log" 2>&1 &
  b=$!
  wait $a; ra=$?
  wait $b; rb=$?
  tail -n 20 "$OUT"/sglang-serving-*.log
  python3 bench/sglang_serving.py --model /tmp/llama8b --out /tmp/serving \
    --merge /tmp/serving-shared/sglang-serving.json /tmp/serving-unshared/sglang-serving.json 2>&1 | tee "$OUT/sglang-serving.log"
  rc=$(( ra || rb ))
  for d in shared unshared; do
    cp /tmp/serving-$d/sglang-serving.json "$OUT/sglang-serving-$d.json" 2>/dev/null
    tar -C /tmp/serving-$d -czf "$OUT/serving-logs-$d.tgz" --exclude='*.jsonl' . 2>/dev/null
  done
else
  run /tmp/serving "$@" 2>&1 | tee "$OUT/sglang-serving.log"
  rc=$?
  tar -C /tmp/serving -czf "$OUT/serving-logs.tgz" --exclude='*.jsonl' . 2>/dev/null
fi
cp /tmp/serving/sglang-serving.json "$OUT/" 2>/dev/null
exit $rc
