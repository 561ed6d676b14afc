#!/usr/bin/env bash
# One device call: bench/sglang_serving.py on the GPU machine, results and server logs under $OUT.
#   device run: bash bench/device/sglang_serving.sh [--free-gib 77.8] [--mode replicas] ...
# PD mode (the default) needs the transfer engine and router: on a machine where setup.sh already ran
# (an earlier call carried .gpubundle and .whl), carry .pdbundle; see setup.sh.
# With two GPUs the setups run at once, shared on GPU 0 and unshared on GPU 1, and are merged: one call
# holds both, on identical cards that do not contend. SHARED_GPU=1 swaps the cards, to tell a card's
# speed from the setup's; UNSHARED_GPU picks the other card (default: the other of its pair, 0-1 or 2-3), so a four-GPU
# machine can hold two such pairs at once. With one GPU they run one after the other.
source bench/device/setup.sh || exit 1
run() {  # run <out> <extra args...>
  local out=$1; shift
  timeout ${BENCH_TIMEOUT:-540} python3 bench/sglang_serving.py --model /tmp/llama8b --out "$out" \
    --budget-s ${BENCH_BUDGET:-380} "$@"
}
T=${TAG:+-$TAG}  # TAG: this pair's folders and outputs, when two pairs run at once
W=/tmp/serving$T
rm -rf $W $W-shared $W-unshared  # an earlier call's run on a warm machine
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  shared_gpu=${SHARED_GPU:-0}
  CUDA_VISIBLE_DEVICES=$shared_gpu run $W-shared --setups shared "$@" > "$OUT/sglang-serving$T-shared.log" 2>&1 &
  a=$!
  CUDA_VISIBLE_DEVICES=${UNSHARED_GPU:-$((shared_gpu ^ 1))} run $W-unshared --setups unshared "$@" \
    > "$OUT/sglang-serving$T-unshared.log" 2>&1 &
  b=$!
  wait $a; ra=$?
  wait $b; rb=$?
  tail -n 20 "$OUT"/sglang-serving$T-*.log
  python3 bench/sglang_serving.py --model /tmp/llama8b --out $W \
    --merge $W-shared/sglang-serving.json $W-unshared/sglang-serving.json 2>&1 | tee "$OUT/sglang-serving$T.log"
  rc=$(( ra || rb ))
  for d in shared unshared; do
    cp $W-$d/sglang-serving.json "$OUT/sglang-serving$T-$d.json" 2>/dev/null
    tar -C $W-$d -czf "$OUT/serving-logs$T-$d.tgz" --exclude='*.jsonl' . 2>/dev/null
  done
else
  run $W "$@" 2>&1 | tee "$OUT/sglang-serving$T.log"
  rc=$?
  tar -C $W -czf "$OUT/serving-logs$T.tgz" --exclude='*.jsonl' . 2>/dev/null
fi
cp $W/sglang-serving.json "$OUT/sglang-serving$T.json" 2>/dev/null
exit $rc
