"""SGLang servers that outlive their prefill, and a host copy that outlives every server (issue 23), on one GPU:

    python bench/sglang_recovery.py --model /tmp/llama8b --out $OUT     (the device call: bench/device/recovery.sh)

Real `launch.py engine=sglang` servers (CUDA graphs on, replicas: no KV transfer engine on one GPU), in order:
  1. a decode and a prefill (cache.host_copy=true) share the checkpoint; the prefill's load is SGLang's loader
     reading the safetensors from the page cache (`safetensors_load_gbps`), and its host copy is written;
  2. a client sends greedy requests to the decode back to back from here to step 4's end;
  3. every process of the prefill's server is SIGKILLed, and a new prefill started at once: the timeline
     (kill, decode serving the arena, new prefill's weights taken over, serving again), its weight load
     (`readopt_load_seconds`) and weight bytes; every answer of the decode must be the first prefill's tokens;
  4. --restarts times over;
  5. every server stopped (the GPU arena is gone); a prefill refills a new arena from the host copy
     (`host_refill_gbps`: bytes over the copy's seconds; the digest check is timed apart);
  6. the host copy removed (`sharedcache gc --host-copies`) and a prefill loads the checkpoint again: the
     control, whose load must read 1.00 against step 1's.
Writes recovery.json and recovery.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from sglang_serving import PROBE_IDS, Server, _commit, environment, free_port, sglang_request  # noqa: E402

FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
         "+engine.extra_args.grammar_backend=none +engine.extra_args.disable_radix_cache=true "
         "engine.disaggregation.mode.prefill=null engine.disaggregation.mode.decode=null")
MEM = {"prefill": "engine.mem_fraction_static.prefill=0.40", "decode": "engine.mem_fraction_static.decode=0.40"}


def greedy(port: int) -> list[int]:
    body = {"input_ids": PROBE_IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    return sglang_request(port, "/generate", body, timeout=120)["output_ids"]


class Client:
    """Greedy requests to one server back to back on a thread: every answer, failure and its time."""

    def __init__(self, port: int, expected: list[int]) -> None:
        self.port, self.expected = port, expected
        self.answers: list[tuple[float, bool]] = []  # (time.time(), the expected tokens?)
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append((time.time(), greedy(self.port) == self.expected))
            except Exception as e:  # noqa: BLE001 - counted: what a client of the decode would see
                self.failures.append((time.time(), repr(e)[:200]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(300)


def rank(report: dict) -> dict:
    return report["ranks"][0]


def weights_end(r: dict) -> float:
    """Wall-clock end of the rank's last sharing phase: its weights bound and published."""
    return max(p["start"] + p["seconds"] for p in r["phases"])


def served_by(entry: Path, pid: int, timeout: float = 60) -> float | None:
    from sharedcache.manifest_parse import read_manifest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = read_manifest(entry / "manifest.json")
            if (m.server or m.owner).pid == pid:
                return time.time()
        except Exception:  # noqa: BLE001 - mid-rewrite: look again
            pass
        time.sleep(0.005)
    return None


def kill_server(server: Server, report: dict) -> None:
    """SIGKILL every process of a server (its scheduler first, as an OOM kill would), then the launcher."""
    os.killpg(os.getpgid(rank(report)["pid"]), signal.SIGKILL)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(60)


def restart(args, n: int, old: tuple[Server, dict], decode: dict, cache: Path, work: Path) -> dict:
    """Kill the prefill, start a new one at once, and time what the decode's clients and the new prefill see."""
    entry = cache / f"{args.key}-tp0"
    killed = time.time()
    kill_server(*old)
    new = Server("prefill", f"prefill-r{n}", args, cache, work, *args.hosted, MEM["prefill"])
    served = served_by(entry, rank(decode)["pid"])
    rep = new.wait_ready(900)
    ready = time.time()
    tokens = greedy(new.port)
    r = rank(rep)
    return {"server": new, "report": rep, "row": {
        "adopted": rep["adopted"], "readopt_load_seconds": r["attach_seconds"],
        "readopt_weight_bytes": rep["weight_bytes_allocated"], "tokens_equal": tokens == args.tokens,
        "timeline_s": {"decode_serves_arena": None if served is None else round(served - killed, 3),
                       "weights_taken_over": round(weights_end(r) - killed, 3),
                       "serving_again": round(ready - killed, 3)},
        "restart_start_to_ready_s": round(new.ready_s, 2)}}


def run(args) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="sc-recovery-", dir="/dev/shm"))
    os.chmod(cache, 0o700)
    work = Path(tempfile.mkdtemp(prefix="sc-recovery-logs-"))
    args.work = work
    decode = Server("decode", "decode", args, cache, work, MEM["decode"])
    prefill = Server("prefill", "prefill", args, cache, work, *args.hosted, MEM["prefill"])
    first, dec = prefill.wait_ready(900), decode.wait_ready(900)
    args.tokens = greedy(prefill.port)
    assert greedy(decode.port) == args.tokens, "the decode answers other tokens than its prefill"
    wait_host_copy(cache / f"{args.key}-tp0")
    out = {"first_load": {"load_seconds": rank(first)["load_seconds"], "bytes": first["bytes_shared"],
                          "arena_bytes": first["arena_bytes"], "start_to_ready_s": prefill.ready_s},
           "decode_start_to_ready_s": decode.ready_s, "restarts": []}
    client, current = Client(decode.port, args.tokens), (prefill, first)
    try:
        for n in range(args.restarts):
            done = restart(args, n, current, dec, cache, work)
            current = (done["server"], done["report"])
            out["restarts"].append(done["row"])
    finally:
        client.stop()
    out["decode_answers"] = len(client.answers)
    out["decode_wrong_answers"] = sum(not ok for _, ok in client.answers)
    out["decode_failures"] = client.failures
    for s in (current[0], decode):  # every process that held the GPU arena goes
        s.stop()
    out["refill"] = one_prefill(args, cache, work, "refill", *args.hosted)
    subprocess.run([sys.executable, "-m", "sharedcache.cli", "gc", "--dir", str(cache), "--host-copies"], check=True)
    out["control"] = one_prefill(args, cache, work, "control")
    return out


def wait_host_copy(entry: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (entry / "hostcopy.json").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no host copy in {entry} after {timeout}s")
        time.sleep(0.1)


def one_prefill(args, cache: Path, work: Path, name: str, *overrides: str) -> dict:
    server = Server("prefill", name, args, cache, work, *overrides, MEM["prefill"])
    try:
        rep = server.wait_ready(900)
        tokens = greedy(server.port)
    finally:
        server.stop()
    r = rank(rep)
    return {"refilled": rep["refilled"], "load_seconds": r["load_seconds"], "backend_timings": r["backend_timings"],
            "phases_seconds": round(sum(p["seconds"] for p in r["phases"]), 3), "start_to_ready_s": server.ready_s,
            "weight_bytes_allocated": rep["weight_bytes_allocated"], "tokens_equal": tokens == args.tokens}


def summarize(raw: dict, env: dict) -> dict:
    size, restarts = raw["first_load"]["arena_bytes"], raw["restarts"]
    refill, first, control = raw["refill"], raw["first_load"], raw["control"]
    took = refill["backend_timings"].get("host_refill")
    return {
        "card": env.get("gpu_name"), "commit": env.get("commit"), "model": str(raw["model"]), "arena_bytes": size,
        "readopt_load_seconds": max(r["readopt_load_seconds"] for r in restarts),
        "readopt_weight_bytes": max(r["readopt_weight_bytes"] for r in restarts),
        "decode_failed_requests_during_restart": len(raw["decode_failures"]) + raw["decode_wrong_answers"],
        "host_refill_gbps": round(size / took / 1e9, 2) if took else None,
        "safetensors_load_gbps": round(first["bytes"] / first["load_seconds"] / 1e9, 2),
        "reload_seconds": first["load_seconds"], "control_load_seconds": control["load_seconds"],
        "control_ratio": round(first["load_seconds"] / control["load_seconds"], 2),
        "refill_digest_seconds": refill["backend_timings"].get("host_digest"),
        "all_adopted": all(r["adopted"] for r in restarts), "refilled": refill["refilled"],
        "tokens_equal": all(r["tokens_equal"] for r in restarts) and refill["tokens_equal"] and control["tokens_equal"],
        "environment": env, "raw": raw}


def markdown(s: dict) -> str:
    env, raw = s["environment"], s["raw"]
    lines = [f"# SGLang prefill restart and host refill ({Path(s['model']).name}, one GPU)", "",
             f"{env.get('gpu_name')}, driver {env.get('driver')}; torch {env.get('torch')}, SGLang {env.get('sglang')}, "
             f"transformers {env.get('transformers')}; commit {s['commit']}. bench/sglang_recovery.py: real "
             "`launch.py engine=sglang` servers, CUDA graphs on.", "",
             "| | seconds | weight bytes allocated |", "|---|---|---|",
             f"| first prefill: SGLang's load from page cache ({s['safetensors_load_gbps']} GB/s) | "
             f"{s['reload_seconds']:.2f} | {s['arena_bytes']} |"]
    for i, r in enumerate(raw["restarts"]):
        lines.append(f"| restart {i + 1}: weights taken over (adopted: {r['adopted']}) | "
                     f"{r['readopt_load_seconds']:.3f} | {r['readopt_weight_bytes']} |")
    refill = raw["refill"]
    lines += [f"| after every server stopped: refill from the host copy ({s['host_refill_gbps']} GB/s, digest "
              f"{s['refill_digest_seconds'] or 0:.3f} s apart) | {refill['backend_timings'].get('host_refill', 0):.3f} | "
              f"{refill['weight_bytes_allocated']} |",
              f"| control: checkpoint load again (ratio to the first: {s['control_ratio']:.2f}) | "
              f"{s['control_load_seconds']:.2f} | {raw['control']['weight_bytes_allocated']} |", "",
              "Timeline of each restart (seconds after the SIGKILL):", "",
              "| restart | decode serves the arena | new prefill's weights taken over | new prefill serving |",
              "|---|---|---|---|"]
    for i, r in enumerate(raw["restarts"]):
        t = r["timeline_s"]
        lines.append(f"| {i + 1} | {t['decode_serves_arena']} | {t['weights_taken_over']} | {t['serving_again']} |")
    lines += ["", f"The decode answered {raw['decode_answers']} greedy requests during the restarts: "
              f"{len(raw['decode_failures'])} failed, {raw['decode_wrong_answers']} with other tokens."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--restarts", type=int, default=2)
    a = ap.parse_args()
    args = SimpleNamespace(model=a.model, tag="recovery", key="bench-recovery", bootstrap_port=free_port(),
                           server_flags=FLAGS, graph_max_bs=16, restarts=a.restarts,
                           hosted=("cache.host_copy=true",), commit=os.environ.get("COMMIT") or _commit(),
                           ballast_info=None)
    a.out.mkdir(parents=True, exist_ok=True)
    raw = {**run(args), "model": str(a.model)}
    summary = summarize(raw, environment(args))
    (a.out / "recovery.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "recovery.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
