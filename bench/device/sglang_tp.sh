#!/usr/bin/env bash
# One device call on the 4-GPU machine (nvidia-h200-x4), carrying .gpubundle and .whl:
#   bash bench/device/sglang_tp.sh serve      # then, on the same warm machine:
#   bash bench/device/sglang_tp.sh compare
# The first call generates the 70B-width checkpoint (22 layers, 41.9 GB, random bf16 on GPU 0) while the
# bundle unpacks; a warm machine keeps it in /tmp for the second.
part=${1:?serve or compare}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MODEL=/tmp/llama70w
gen=
if [ ! -f $MODEL/.complete ]; then  # the image's own transformers, before the bundle's shadows it
  python3 bench/make_model.py --shape llama-3-70b --layers 22 --out $MODEL > "$OUT/make-model.log" 2>&1 &
  gen=$!
fi
SETUP_MODEL_8B=0 source bench/device/setup.sh || exit 1
if [ -n "$gen" ]; then wait $gen || { tail -20 "$OUT/make-model.log"; exit 1; }; fi
cat "$OUT/make-model.log" 2>/dev/null
du -sh $MODEL
timeout $((575 - SECONDS)) python3 bench/sglang_tp.py --model $MODEL --out "$OUT" --part "$part"
rc=$?
tar -C "$OUT" -czf "$OUT/tp-$part-logs.tgz" logs && rm -rf "$OUT/logs"
exit $rc
