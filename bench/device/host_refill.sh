#!/usr/bin/env bash
# One device call (carry .whl): bench/host_refill.py into $OUT (~2-3 minutes for 15 GiB, 3 rounds).
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hsite .whl/*.whl || exit 1
export PYTHONPATH=/tmp/hsite
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
timeout ${REFILL_TIMEOUT:-400} python3 bench/host_refill.py --out "$OUT/host-refill" "$@" 2>&1 | tee "$OUT/host-refill.log"
