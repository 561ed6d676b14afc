#!/usr/bin/env bash
# One device call (or one GPU of one): SGLang's own static-batch benchmark (sglang.bench_one_batch, no server,
# no sharedcache) on the Llama-3-8B-shaped checkpoint: the prefill time of one long request and the decode step
# time against the batch size at the long workload's context. These are the terms the serving benchmark's
# throughput ratio is made of (bench/README.md, "Where the time goes").
#   bash bench/device/sglang_one_batch.sh [attention backend, default triton]
# ONE_BATCH_MODEL: another checkpoint, already generated (e.g. /tmp/llama14b by sglang_serving.sh on this warm
# machine); ONE_BATCH_INPUT / ONE_BATCH_OUTPUT / ONE_BATCH_SIZES: the workload (for bench/pd_bound.py at 2k/2k:
# ONE_BATCH_INPUT=1536 ONE_BATCH_SIZES="1 4 8 16 32 48 64 96", the mean input of 2k2k at range ratio 0.5).
# Carry .gpubundle and .whl (or run on a machine where setup.sh already ran).
model=${ONE_BATCH_MODEL:-/tmp/llama8b}
[ "$model" = /tmp/llama8b ] || export SETUP_MODEL_8B=0
source bench/device/setup.sh || exit 1
backend=${1:-triton}
tag=$(basename "$model")-$backend
timeout ${ONE_BATCH_TIMEOUT:-400} python3 -m sglang.bench_one_batch --model-path "$model" \
  --attention-backend "$backend" --sampling-backend pytorch --grammar-backend none \
  --mem-fraction-static ${ONE_BATCH_MEM:-0.6} --cuda-graph-max-bs 64 \
  --batch-size ${ONE_BATCH_SIZES:-1 4 8 16 24 32 48} --input-len ${ONE_BATCH_INPUT:-7680} \
  --output-len ${ONE_BATCH_OUTPUT:-64} --run-name "$backend" --result-filename "$OUT/one-batch-$tag.jsonl" 2>&1 \
  | tee "$OUT/one-batch-$tag.log" \
  | grep -E "Prefill\.|Decode\.|Total\.|skipping|Error|error" | head -60
