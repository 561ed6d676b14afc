#!/usr/bin/env bash
# One device call: PD disaggregation on one GPU through launch.py (prefill, decode, router), KV moved by
# Mooncake over TCP, requests through sglang-router's PD router. Carry .pdbundle (mooncake-transfer-engine-
# cuda13 and sglang-router, unpacked, as tar.xz) on a machine where bench/device/setup.sh already ran.
source bench/device/setup.sh || exit 1
python3 -c "import importlib.metadata as m; from mooncake.engine import TransferEngine; import sglang_router; \
print('mooncake', m.version('mooncake-transfer-engine-cuda13'), 'sglang-router', m.version('sglang-router'))" || exit 1
C="engine=sglang model.path=/tmp/llama8b cache.key=pd8b cache.dir=/dev/shm/sc-pd cache.wait_timeout_s=600
 engine.disaggregation.transfer_backend=mooncake_tcp +engine.extra_args.attention_backend=triton
 +engine.extra_args.sampling_backend=pytorch +engine.extra_args.grammar_backend=none
 +engine.extra_args.cuda_graph_max_bs_decode=16 +engine.extra_args.disable_radix_cache=true"
python3 launch.py role=prefill $C hydra.run.dir=/tmp/pd/prefill > "$OUT/pd-prefill.log" 2>&1 &
python3 launch.py role=decode $C hydra.run.dir=/tmp/pd/decode > "$OUT/pd-decode.log" 2>&1 &
for i in $(seq 1 ${PD_READY_S:-240}); do
  [ -f /tmp/pd/prefill/report.json ] && [ -f /tmp/pd/decode/report.json ] && break; sleep 1; done
python3 launch.py role=router $C hydra.run.dir=/tmp/pd/router > "$OUT/pd-router.log" 2>&1 &
python3 - <<'PY' 2>&1 | tee "$OUT/pd-result.log"
import json, time, urllib.request
ids = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0,
                   "ignore_eos": True}}).encode()
expected = json.load(open("bench/results/h100-sglang-gpu-tests.json"))["tokens"]
out, err = None, None
for _ in range(60):
    try:
        req = urllib.request.Request("http://127.0.0.1:8000/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        break
    except Exception as e:
        err = repr(e); time.sleep(2)
reports = {}
for role in ("prefill", "decode"):
    try:
        reports[role] = json.load(open(f"/tmp/pd/{role}/report.json"))
    except OSError as e:
        reports[role] = {"error": repr(e)}
res = {"router_output_ids": out and out.get("output_ids"), "expected_plain_tokens": expected,
       "equal": bool(out) and out.get("output_ids") == expected, "last_error": err,
       "decode": {k: reports["decode"].get(k) for k in ("mode", "weight_bytes_allocated", "attach_seconds", "pd_mode")},
       "prefill": {k: reports["prefill"].get(k) for k in ("mode", "pd_mode", "backend")},
       "decode_kv_pool_tokens": (reports["decode"].get("ranks") or [{}])[0].get("kv_pool_tokens")}
print(json.dumps(res, indent=2))
json.dump(res, open(__import__("os").environ["OUT"] + "/pd-result.json", "w"), indent=2)
PY
pkill -TERM -f "launch.py role=" ; sleep 15; pkill -KILL -f "sglang" ; true
