#!/usr/bin/env bash
# Here (with network): .pdbundle/pd.tar.xz for the GPU machine's PD runs: mooncake-transfer-engine-cuda13
# (KV transfer; TCP works without RDMA) and sglang-router (the PD router), wheels unpacked into one folder and
# compressed hard so that they fit a call's 64 MiB (47 MB). Their Python dependencies are in SGLang's bundle.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
W=${TMPDIR:-/tmp}/pd-bundle
grep -qx '/.pdbundle/' "$root/.git/info/exclude" 2>/dev/null || echo '/.pdbundle/' >> "$root/.git/info/exclude"
rm -rf "$W" && mkdir -p "$W/wheels" "$W/site" "$root/.pdbundle"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$W/wheels" mooncake-transfer-engine-cuda13==0.3.14 sglang-router==0.3.2
for f in "$W"/wheels/*.whl; do unzip -q -o "$f" -d "$W/site"; done
tar -C "$W/site" -cf - . | xz -T0 -9e > "$root/.pdbundle/pd.tar.xz"
ls -la "$root/.pdbundle/pd.tar.xz"
