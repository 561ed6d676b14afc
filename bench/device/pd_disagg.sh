#!/usr/bin/env bash
# One device call: PD disaggregation on one GPU through launch.py (prefill, decode, router), KV moved by
# Mooncake over TCP, requests through sglang-router's PD router. Carry .pdbundle (mooncake-transfer-engine-
# cuda13 and sglang-router, unpacked, as tar.xz) on a machine where bench/device/setup.sh already ran.
# PD_EXTRA: more launch.py overrides (e.g. "engine.disaggregation.transfer_backend=mooncake
# engine.disaggregation.mooncake_protocol=nvlink_intra"); PD_TAG names this run's outputs. It stops only the
# processes it started, so it may run beside another benchmark on another GPU (the caller sets
# CUDA_VISIBLE_DEVICES). Two of these at once also need their own ports in PD_EXTRA (engine.port.prefill,
# engine.port.decode, engine.router.port, engine.disaggregation.bootstrap_port): the probe below asks :8000.
# PD_MODEL: the checkpoint (default /tmp/llama8b; others from bench/make_model.py, e.g. by sglang_serving.sh): the
# tokens are compared with the committed plain server's only for the 8B one. Issue 22 item 5 (transfers falling
# behind): PD_EXTRA="engine.disaggregation.transfer_backend=mooncake engine.disaggregation.mooncake_protocol=
# nvlink_intra +engine.extra_args.page_size=16" (or 64) runs the same recipe with another KV page size.
source bench/device/setup.sh || exit 1
python3 -c "import importlib.metadata as m; from mooncake.engine import TransferEngine; import sglang_router; \
print('mooncake', m.version('mooncake-transfer-engine-cuda13'), 'sglang-router', m.version('sglang-router'))" || exit 1
P=pd${PD_TAG:+-$PD_TAG}; export PD_RUN=/tmp/$P PD_OUT=$OUT/$P
export PD_MODEL=${PD_MODEL:-/tmp/llama8b}
C="engine=sglang model.path=$PD_MODEL cache.key=pd-$(basename $PD_MODEL) cache.dir=/dev/shm/sc-$P cache.wait_timeout_s=600
 engine.disaggregation.transfer_backend=mooncake_tcp +engine.extra_args.attention_backend=triton
 +engine.extra_args.sampling_backend=pytorch +engine.extra_args.grammar_backend=none
 +engine.extra_args.cuda_graph_max_bs_decode=16 +engine.extra_args.disable_radix_cache=true $PD_EXTRA"
rm -rf $PD_RUN
python3 launch.py role=prefill $C hydra.run.dir=$PD_RUN/prefill > "$PD_OUT-prefill.log" 2>&1 &
pids=$!
python3 launch.py role=decode $C hydra.run.dir=$PD_RUN/decode > "$PD_OUT-decode.log" 2>&1 &
pids="$pids $!"
for i in $(seq 1 ${PD_READY_S:-240}); do
  [ -f $PD_RUN/prefill/report.json ] && [ -f $PD_RUN/decode/report.json ] && break; sleep 1; done
python3 launch.py role=router $C hydra.run.dir=$PD_RUN/router > "$PD_OUT-router.log" 2>&1 &
pids="$pids $!"
python3 - <<'PY' 2>&1 | tee "$PD_OUT-result.log"
import json, os, sys, time
sys.path.insert(0, "bench")
from serving_servers import greedy_probe, plain_tokens  # the serving benchmark's probe and reference
expected = plain_tokens() if os.environ["PD_MODEL"] == "/tmp/llama8b" else None  # the 8B's reference only
tokens, err = None, None
for _ in range(60):  # the router answers once both servers registered
    try:
        tokens = greedy_probe(8000)
        break
    except Exception as e:
        err = repr(e); time.sleep(2)
reports = {}
for role in ("prefill", "decode"):
    try:
        reports[role] = json.load(open(f"{os.environ['PD_RUN']}/{role}/report.json"))
    except OSError as e:
        reports[role] = {"error": repr(e)}
res = {"router_output_ids": tokens, "expected_plain_tokens": expected,
       "equal": bool(tokens) and tokens == expected if expected else None, "last_error": err,
       "decode": {k: reports["decode"].get(k) for k in ("mode", "weight_bytes_allocated", "attach_seconds", "pd_mode")},
       "prefill": {k: reports["prefill"].get(k) for k in ("mode", "pd_mode", "backend")},
       "decode_kv_pool_tokens": (reports["decode"].get("ranks") or [{}])[0].get("kv_pool_tokens")}
print(json.dumps(res, indent=2))
json.dump(res, open(os.environ["PD_OUT"] + "-result.json", "w"), indent=2)
PY
kill -TERM $pids 2>/dev/null  # each launch.py stops its own server
for i in $(seq 1 60); do kill -0 $pids 2>/dev/null || break; sleep 1; done
true
