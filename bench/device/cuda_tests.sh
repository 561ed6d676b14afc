#!/usr/bin/env bash
# One device call (carry .whl): the CUDA tests of the transformers path, tests/gpu/test_cuda.py (in 4
# workers, but the memory-growth test alone, since it reads device-wide memory), then test_cuda_leaks.py
# (without workers, for the same reason) as far as LEAKS_TIMEOUT allows. The image's own transformers (no
# SGLang bundle: its older transformers would shadow it); hydra from .whl. With MAKE_8B=1 the Llama-3-8B-shaped checkpoint for the SGLang tests
# (bench/device/sglang_gpu_tests.sh, the next call on the same warm machine) is generated meanwhile.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hsite .whl/*.whl || exit 1
export PYTHONPATH=/tmp/hsite
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
[ "${MAKE_8B:-0}" = 1 ] && { python3 bench/make_model.py --out /tmp/llama8b > /tmp/make-8b.log 2>&1 & }
log=$OUT/cuda-tests.log
{ echo "# tests/gpu/test_cuda.py and test_cuda_leaks.py at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } | tee "$log"
timeout ${CUDA_TIMEOUT:-300} python3 -m pytest -m gpu -n 4 -v -p no:cacheprovider tests/gpu/test_cuda.py \
  -k 'not grows_by_no_more' 2>&1 | tee -a "$log"; rc1=$?
timeout 120 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_cuda.py -k 'grows_by_no_more' 2>&1 | tee -a "$log"; rc2=$?
timeout ${LEAKS_TIMEOUT:-420} python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_cuda_leaks.py 2>&1 | tee -a "$log"; rc3=$?
wait
echo "exit codes: test_cuda $rc1 / $rc2, test_cuda_leaks $rc3 (124: cut by its timeout)" | tee -a "$log"
[ $rc1 = 0 ] && [ $rc2 = 0 ]
