# Source on the GPU machine (the `device` tool's machine: no network, no sglang, no hydra), from the
# repo root, in a call that carries .gpubundle (../shared/sglang-gpu-bundle.sh) and .whl
# (../shared/prepare-gpu-wheels.sh). Idempotent: a warm machine keeps /tmp/site between calls.
# PD needs a KV transfer engine and the router too, which do not fit beside SGLang in one call's 64 MiB:
# a later call on the warm machine carries .pdbundle/pd.tar.xz (mooncake-transfer-engine-cuda13 0.3.14
# and sglang-router 0.3.2 wheels unpacked into one folder, tar | xz -9e: 47 MB), unpacked to /tmp/pdsite.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# NVLink multicast stays off on shared machines (the device tool's KINDS.md says why)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
_sc_restore() {  # NAME DIR: .tritoncache/NAME.tgz unpacked into DIR, once per machine (the mark beside DIR)
  local mark="$(dirname "$2")/.sharedcache-restored-$1"
  [ -f .tritoncache/$1.tgz ] && [ ! -f "$mark" ] || return 0
  mkdir -p "$2" && tar -xzf .tritoncache/$1.tgz -C "$2" && touch "$mark"
}
_sc_install() {  # each step once per machine (and the checkout once per path); markers only after success
  if [ ! -f /tmp/site/.sharedcache-ready ]; then
    mkdir -p /tmp/site
    tar -xJf .gpubundle/sglang-site.tar.xz -C /tmp/site || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    touch /tmp/site/.sharedcache-ready
  fi
  # the bundle holds no bytecode: compiled here on all cores, not by the first server start, one file at a time
  if [ ! -f /tmp/site/.sharedcache-compiled ]; then
    python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1; touch /tmp/site/.sharedcache-compiled
  fi
  # kernels built by an earlier session's servers (sglang_serving.sh hands them back; carried as .tritoncache/):
  # Triton's, which the first start on a fresh machine spent 73 s compiling, and SGLang's JIT ones (nvcc through
  # tvm-ffi, the built libraries), which its first prefill otherwise builds in its first forward (44-67 s)
  _sc_restore triton-cache ~/.triton/cache
  _sc_restore jit-cache "${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}"
  # the checkpoint is generated with the image's own transformers, before the bundle's shadows it
  # (SETUP_MODEL_8B=0: a call that needs another model generates its own)
  if [ "${SETUP_MODEL_8B:-1}" = 1 ]; then python3 bench/make_model.py --out /tmp/llama8b || return 1; fi
  if [ -f .pdbundle/pd.tar.xz ] && [ ! -f /tmp/pdsite/.ready ]; then
    mkdir -p /tmp/pdsite && tar -xJf .pdbundle/pd.tar.xz -C /tmp/pdsite && touch /tmp/pdsite/.ready || return 1
  fi
  if [ "$(cat /tmp/site/.sharedcache-editable 2>/dev/null)" != "$PWD" ]; then
    PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/sc-pip.log 2>&1 \
      || { cat /tmp/sc-pip.log; return 1; }
    echo "$PWD" > /tmp/site/.sharedcache-editable
  fi
}
# a detached serving run (sglang_serving.sh --detach) holds the GPU and runs sharedcache installed from its own
# copy of the tree: nothing else may start on the machine, or re-point that install, until it ended
_sc_run=${SERVING_DIR:-/tmp/serving-v2}
if bash bench/device/detached.sh going $_sc_run; then
  echo "[setup] a detached serving run is going on this machine: bash bench/device/sglang_serving.sh --wait" >&2
  return 1
fi
# scripts started at once in one call each source this file: the first installs, the others wait for it
exec 9>/tmp/sc-setup.lock
flock 9
_sc_install; _sc_rc=$?
flock -u 9
[ $_sc_rc = 0 ] || return 1
export PYTHONPATH=/tmp/site
[ -f /tmp/pdsite/.ready ] && export PYTHONPATH=/tmp/site:/tmp/pdsite
python3 - <<'PY' || return 1
import importlib.metadata as m, torch
assert any(e.name == "sharedcache" for e in m.entry_points(group="sglang.srt.plugins")), "plugin entry point missing"
print("sglang", m.version("sglang"), "torch", torch.__version__, "gpu", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
