#!/usr/bin/env bash
# One device call: one setup of one model, one phase, through bench/sglang_serving.py (method v2; bench/README.md,
# "Serving method (v2)"), on one GPU. Setups are never run at the same time: one call each, one after the other.
#   bash bench/device/sglang_serving.sh MODEL SETUP PHASE [sglang_serving.py run arguments...]
#   MODEL: 8b | 14b | 24b    SETUP: shared | unshared | colocated    PHASE: tune | sweep | goodput
#   e.g. bash bench/device/sglang_serving.sh 14b shared sweep --free-gib 77 --splits 65536
# Carry .pdbundle (and, on a fresh machine, .gpubundle and .whl: see setup.sh).
# The checkpoint is generated once per machine as /tmp/llama<MODEL> with the image's transformers; when the disk
# cannot hold it beside the others they are removed first (KEEP_MODELS=1: never).
# Cells already measured are skipped: those of bench/results/<card>-serving-v2.json (committed: it travels with
# the tree) and of this warm machine's earlier calls (/tmp/serving-v2). --wall-s is what is left of the call
# (CALL_S, default 590 s) so that it ends with its files written; --budget-s counts load seconds only.
# Out: serving-v2-part-*.json (this call's cells), <card>-serving-v2.{json,md} (all cells merged, summarised),
# serving-<model>-<setup>-<phase>.log, serving-logs-<model>-<setup>-<phase>.tgz (the servers' logs).
T0=$SECONDS
if [ $# -lt 3 ]; then echo "usage: $0 MODEL SETUP PHASE [run arguments]" >&2; exit 2; fi
model=$1 setup=$2 phase=$3
shift 3
case $model in
  8b) shape=llama-3-8b need=20 ;;
  14b) shape=llama-14b need=33 ;;
  24b) shape=llama-24b need=50 ;;
  *) echo "[serving] MODEL is 8b, 14b or 24b, not '$model'" >&2; exit 2 ;;
esac
M=/tmp/llama$model
if [ ! -f $M/.complete ]; then
  avail=$(df -BG --output=avail /tmp | tail -1 | tr -dc 0-9)
  if [ "${KEEP_MODELS:-0}" != 1 ] && [ "$avail" -lt "$need" ]; then
    for d in /tmp/llama8b /tmp/llama14b /tmp/llama24b; do [ "$d" != "$M" ] && rm -rf "$d"; done
  fi
  python3 bench/make_model.py --out $M --shape $shape || exit 1  # before setup.sh: the image's transformers
fi
export SETUP_MODEL_8B=0
source bench/device/setup.sh || exit 1
W=/tmp/serving-v2
mkdir -p $W/out $W/old
name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${CUDA_VISIBLE_DEVICES:-0}" | head -1)
card=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from serving_results import card_slug; \
print(card_slug(sys.argv[1]))" "$name") || exit 1
earlier=$(ls $W/out/serving-v2-part-*.json 2>/dev/null)
[ -n "$earlier" ] && mv $earlier $W/old/  # an earlier call's parts: known below, not this call's output
known="bench/results/$card-serving-v2.json $W/latest.json $(ls $W/old/serving-v2-part-*.json 2>/dev/null)"
left=$(( ${CALL_S:-590} - (SECONDS - T0) - 25 ))
tag=$model-$setup-$phase
timeout $(( left + 15 )) python3 bench/sglang_serving.py run --model $M --tag $model --setup $setup \
  --phase $phase --out $W/out --results $known --wall-s $left --commit "${COMMIT:-}" "$@" 2>&1 \
  | tee "$OUT/serving-$tag.log"
rc=${PIPESTATUS[0]}
cp $W/out/$card-serving-v2.json $W/latest.json 2>/dev/null
cp $W/out/serving-v2-part-*.json $W/out/$card-serving-v2.json $W/out/$card-serving-v2.md "$OUT"/ 2>/dev/null
tar -C $W/out -czf "$OUT/serving-logs-$tag.tgz" work-$model-$setup 2>/dev/null
exit $rc
