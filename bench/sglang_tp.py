"""Tensor parallelism: a TP prefill and a TP decode over the same GPUs sharing every rank's weights.

    python bench/sglang_tp.py --model /tmp/llama70w --out $OUT --part serve     # then, on the same machine:
    python bench/sglang_tp.py --model /tmp/llama70w --out $OUT --part compare

Every server is `launch.py engine=sglang engine.tp_size=N` (CUDA graphs on); each rank's scheduler
publishes or attaches `<key>-tp<rank>` on its own GPU through the plugin.
- serve: prefill and decode started together (the decode's ranks wait for theirs to settle); greedy
  tokens of both; per-rank GPU memory from NVML; `sharedcache ls`; the prefill stopped while the
  decode serves, then started again: the decode keeps answering with the same tokens.
- compare: a prefill, then a plain TP server beside it at the decode's mem_fraction_static (its KV
  pool against the decode's, its tokens against the prefill's); then two decodes that must be refused
  as one server, with one message naming the differing field: another TP size, another dtype.
Results go to <out>/sglang-tp-<part>.json after every step; checks are recorded, not asserted, and the
script exits 1 if one failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_servers import REPO, Server, nvidia_smi, process_gpu_mib, server_gpu_mib  # noqa: E402

from sharedcache_integrations.sglang.server import greedy_ids  # noqa: E402

IDS = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
N_TOKENS = 16
FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
         "+engine.extra_args.grammar_backend=none +engine.extra_args.disable_radix_cache=true "
         "engine.disaggregation.mode.prefill=null engine.disaggregation.mode.decode=null")


def tokens(server: Server) -> list[int]:
    return greedy_ids(f"http://127.0.0.1:{server.port}", IDS, N_TOKENS)


def kv_bytes_per_token_per_rank(model: Path, tp: int) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * max(1, cfg["num_key_value_heads"] // tp) * head_dim * 2  # K+V, bf16


class Run:
    def __init__(self, args) -> None:
        self.args = args
        self.cache = Path(tempfile.mkdtemp(prefix="sc-tp-", dir="/dev/shm"))
        os.chmod(self.cache, 0o700)
        self.work = Path(args.out) / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.result: dict = {"part": args.part, "tp_size": args.tp, "model": str(args.model), "checks": {},
                             "mem_fraction_static": args.mem, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "gpus": nvidia_smi("--query-gpu=index,name,driver_version,memory.total",
                                                "--format=csv,noheader").splitlines(),
                             "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                                    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                                    "NVSHMEM_DISABLE_NVLS")}}
        self.servers: list[Server] = []

    def start(self, role: str, name: str, *overrides: str) -> Server:
        server = Server(role, name, self.args, self.cache, self.work, f"engine.tp_size={self.args.tp}",
                        f"engine.mem_fraction_static.{role}={self.args.mem}", "engine.ready_timeout_s=600",
                        *overrides)
        self.servers.append(server)
        return server

    def check(self, name: str, ok: bool, detail=None) -> None:
        self.result["checks"][name] = {"ok": bool(ok), **({"detail": detail} if detail is not None else {})}
        print(f"[tp] {'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail is not None else ""), flush=True)
        self.save()

    def save(self) -> None:
        path = Path(self.args.out) / f"sglang-tp-{self.args.part}.json"
        path.write_text(json.dumps(self.result, indent=2, sort_keys=True))

    def ranks(self, report: dict, used: dict[str, int]) -> list[dict]:
        """Per rank: what it allocated for weights, its KV pool, its GPU memory (NVML) and what is left
        of it once the KV pool is taken out (context, CUDA graphs, activations, and weights if it holds any)."""
        per_token = kv_bytes_per_token_per_rank(Path(self.args.model), self.args.tp)
        out = []
        for r in sorted(report.get("ranks", []), key=lambda r: r["tp_rank"]):
            kv_mib = r["kv_pool_tokens"] * per_token / 2**20
            mib = used.get(str(r["pid"]))
            out.append({"rank": r["tp_rank"], "pid": r["pid"], "key": r["key"], "mode": r["mode"],
                        "fallback": r["fallback"], "arena_bytes": r["arena_bytes"],
                        "weight_bytes_allocated": r["weight_bytes_allocated"], "attach_seconds": r["attach_seconds"],
                        "load_seconds": r["load_seconds"], "wait_seconds": r.get("wait_seconds"),
                        "kv_pool_tokens": r["kv_pool_tokens"], "kv_pool_mib": round(kv_mib),
                        "gpu_mib": mib, "gpu_mib_besides_kv": None if mib is None else round(mib - kv_mib),
                        "baseline_gib": r.get("baseline_gib"), "baseline_gib_at_start": r.get("baseline_gib_at_start")})
        return out

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop()


def part_serve(run: Run) -> None:
    prefill = run.start("prefill", "prefill")
    decode = run.start("decode", "decode")  # at once: each decode rank waits for its prefill rank to settle
    pre, dec = prefill.wait_ready(900), decode.wait_ready(900)
    run.result["start_to_ready_s"] = {"prefill": round(prefill.ready_s, 1), "decode": round(decode.ready_s, 1)}
    used = process_gpu_mib()
    run.result["prefill"], run.result["decode"] = run.ranks(pre, used), run.ranks(dec, used)
    run.result["decode_kv_pool_tokens"] = decode.info()["kv_pool_tokens"]
    run.result["prefill_kv_pool_tokens"] = prefill.info()["kv_pool_tokens"]
    ref = tokens(prefill)
    run.result["tokens"] = ref
    run.check("decode tokens equal the prefill's", tokens(decode) == ref)
    run.check("every prefill rank owns its entry", [r["mode"] for r in run.result["prefill"]] == ["save"] * run.args.tp
              and all(r["fallback"] is None for r in run.result["prefill"]))
    run.check("every decode rank attached and allocated 0 weight bytes",
              all(r["mode"] == "load" and r["fallback"] is None and r["weight_bytes_allocated"] == 0
                  for r in run.result["decode"]) and len(run.result["decode"]) == run.args.tp)
    weights_mib = min(r["arena_bytes"] for r in run.result["prefill"]) / 2**20
    besides = [r["gpu_mib_besides_kv"] for r in run.result["decode"]]
    run.check("no decode rank holds a weight copy (NVML less KV pool, under half the rank's weights)",
              all(b is not None and b < weights_mib / 2 for b in besides),
              {"decode_gpu_mib_besides_kv": besides, "weights_mib_per_rank": round(weights_mib)})
    ls = subprocess.run([sys.executable, "-m", "sharedcache.cli", "ls", "--dir", str(run.cache)], cwd=REPO,
                        capture_output=True, text=True)
    run.result["ls"] = ls.stdout.splitlines()
    run.check("sharedcache ls shows the ranks as one group",
              any(line.startswith(f"bench ({run.args.tp} of {run.args.tp} ranks)") for line in run.result["ls"]))

    t0 = time.monotonic()
    prefill.stop()
    run.result["prefill_stop_s"] = round(time.monotonic() - t0, 1)
    run.check("the decode answers with the same tokens after the prefill stopped", tokens(decode) == ref)
    again = run.start("prefill", "prefill-again")
    again.wait_ready(900)
    run.result["start_to_ready_s"]["prefill_restarted"] = round(again.ready_s, 1)
    run.check("the decode answers with the same tokens beside the restarted prefill",
              tokens(decode) == ref and tokens(again) == ref)


def part_compare(run: Run) -> None:
    prefill = run.start("prefill", "prefill")
    prefill.wait_ready(900)
    ref = tokens(prefill)
    run.result["tokens"] = ref
    plain = run.start("plain", "plain")
    plain.wait_ready(900)
    run.result["start_to_ready_s"] = {"prefill": round(prefill.ready_s, 1), "plain": round(plain.ready_s, 1)}
    used = process_gpu_mib()
    run.result["plain_kv_pool_tokens"] = plain.info()["kv_pool_tokens"]
    run.result["plain_gpu_mib"] = server_gpu_mib(plain, used)
    run.check("plain TP server's tokens equal the prefill's", tokens(plain) == ref)
    plain.stop()

    refusals = {"tp_size": (f"engine.tp_size={run.args.tp // 2}",), "dtype": ("engine.dtype=float16",)}
    started = {}
    for field, overrides in refusals.items():
        server = Server("decode", f"decode-{field}", run.args, run.cache, run.work, *overrides,
                        f"engine.mem_fraction_static.decode={run.args.mem}", "engine.ready_timeout_s=600",
                        *(() if field == "tp_size" else (f"engine.tp_size={run.args.tp}",)))
        run.servers.append(server)
        started[field] = (server, time.monotonic())
    run.result["refusals"] = {}
    for field, (server, t0) in started.items():
        code = server.proc.wait(600)
        log = server.log.read_text(errors="replace")
        line = next((x for x in log.splitlines() if "refused to start" in x), None)
        failed = sorted(p.name for p in (server.run_dir / "ranks").glob("failed-*.json"))
        served = sorted(p.name for p in (server.run_dir / "ranks").glob("report-*.json"))
        run.result["refusals"][field] = {"exit_code": code, "seconds": round(time.monotonic() - t0, 1),
                                         "message": line, "rank_failure_reports": failed, "rank_reports": served}
        # the first rank that refuses stops the server (SGLang then stops its peers): one message, no rank served
        run.check(f"a decode with another {field} is refused as one server, naming the field",
                  code == 2 and line is not None and "differing fields:" in line
                  and field in line.split("differing fields:")[1].split(")")[0]
                  and failed and not served, run.result["refusals"][field])
    run.check("the prefill still answers with the same tokens", tokens(prefill) == ref)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", choices=("serve", "compare"), required=True)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--mem", type=float, default=0.35, help="mem_fraction_static of every server")
    ap.add_argument("--graph-max-bs", dest="graph_max_bs", type=int, default=8)
    a = ap.parse_args()
    a.bootstrap_port, a.server_flags = 8998, FLAGS
    run = Run(a)
    try:
        (part_serve if a.part == "serve" else part_compare)(run)
    except Exception as e:  # noqa: BLE001 - record how far it got
        run.result["error"] = f"{type(e).__name__}: {e}"[-4000:]
        print(f"[tp] error: {run.result['error']}", flush=True)
    finally:
        run.stop_all()
        run.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.save()
    ok = "error" not in run.result and all(c["ok"] for c in run.result["checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
