#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (carry .whl): the multi-GPU transformers tests, then the benchmark on
# the Llama-3-8B-shaped checkpoint spread over both GPUs. The image's own transformers and accelerate
# (no SGLang bundle: its older transformers would shadow them); hydra from .whl.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hsite .whl/*.whl || exit 1
export PYTHONPATH=/tmp/hsite
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
python3 bench/make_model.py --out /tmp/llama8b >/dev/null || exit 1
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -v -s -p no:cacheprovider tests/gpu/test_hf_multi_device.py 2>&1 \
  | tee "$OUT/hf-multi-device-tests.log"
timeout ${BENCH_TIMEOUT:-240} python3 bench/hf_multi_device.py --model-dir /tmp/llama8b --out "$OUT/h200-hf-multi-device" 2>&1 \
  | tee "$OUT/hf-multi-device-bench.log"
