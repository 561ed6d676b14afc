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
Writes recovery.json and recovery.md into --out, and recovery-partial.json after each step. A run cut short
(a device call's time limit) leaves its run directory behind: `--from-logs DIR` rebuilds what it measured from
the servers' own reports and logs (SGLang's access log counts the decode's answers; the client's per-answer
token check lives only in a finished run).
"""
from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from serving_servers import Server, environment, greedy_probe, head_commit  # noqa: E402
from helpers import Asking, free_port  # noqa: E402  (serving_servers put tests/ on the path)

FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
         "+engine.extra_args.grammar_backend=none +engine.extra_args.disable_radix_cache=true "
         "engine.disaggregation.mode.prefill=null engine.disaggregation.mode.decode=null")
MEM = {"prefill": "engine.mem_fraction_static.prefill=0.40", "decode": "engine.mem_fraction_static.decode=0.40"}


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
    tokens = greedy_probe(new.port)
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
    args.tokens = greedy_probe(prefill.port)
    assert greedy_probe(decode.port) == args.tokens, "the decode answers other tokens than its prefill"
    wait_host_copy(cache / f"{args.key}-tp0")
    out = {"first_load": {"load_seconds": rank(first)["load_seconds"], "bytes": first["bytes_shared"],
                          "arena_bytes": first["arena_bytes"], "start_to_ready_s": prefill.ready_s},
           "decode_start_to_ready_s": decode.ready_s, "restarts": []}
    client = Asking(lambda: greedy_probe(decode.port) == args.tokens)
    current = (prefill, first)
    try:
        for n in range(args.restarts):
            done = restart(args, n, current, dec, cache, work)
            current = (done["server"], done["report"])
            out["restarts"].append(done["row"])
            partial(args, out)
    finally:
        client.stop()
    out["decode_answers"] = len(client.answers)
    out["decode_wrong_answers"] = sum(not ok for _, ok in client.answers)
    out["decode_failures"] = client.failures
    for s in (current[0], decode):  # every process that held the GPU arena goes
        s.stop()
    out["refill"] = one_prefill(args, cache, work, "refill", *args.hosted)
    partial(args, out)
    subprocess.run([sys.executable, "-m", "sharedcache.cli", "gc", "--dir", str(cache), "--host-copies"], check=True)
    out["control"] = one_prefill(args, cache, work, "control")
    return out


def partial(args, out: dict) -> None:
    (args.out / "recovery-partial.json").write_text(json.dumps(out, indent=1, default=str) + "\n")


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
        tokens = greedy_probe(server.port)
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
        "decode_failed_requests_during_restart": len(raw["decode_failures"]) + (raw["decode_wrong_answers"] or 0),
        "host_refill_gbps": round(size / took / 1e9, 2) if took else None,
        "safetensors_load_gbps": round(first["bytes"] / first["load_seconds"] / 1e9, 2),
        "reload_seconds": first["load_seconds"], "control_load_seconds": control["load_seconds"],
        "control_ratio": round(first["load_seconds"] / control["load_seconds"], 2),
        "refill_digest_seconds": refill["backend_timings"].get("host_digest"),
        "all_adopted": all(r["adopted"] for r in restarts), "refilled": refill["refilled"],
        "tokens_equal": _all([r["tokens_equal"] for r in restarts] + [refill["tokens_equal"], control["tokens_equal"]]),
        "environment": env, "raw": raw}


def _all(checks: list) -> bool | None:
    """True when every check passed; None when some were not recorded (a run rebuilt from its logs)."""
    return None if None in checks else all(checks)


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
    wrong = raw["decode_wrong_answers"]
    lines += ["", f"The decode answered {raw['decode_answers']} greedy requests during the restarts: "
              f"{len(raw['decode_failures'])} failed, " + (f"{wrong} with other tokens." if wrong is not None else
                                                           "tokens per answer not recorded (see below).")]
    if raw.get("from_logs"):
        lines += ["", "Rebuilt from the run's own logs and reports (`--from-logs`): the device call's time limit cut "
                  "the run during the control's start, after the control's rank had reported. The decode's answers "
                  "are its SGLang access log's `POST /generate` lines between the kill and the restarted prefill's "
                  "readiness (HTTP 200; no 5xx); the timeline has the logs' 1 s resolution, the kill taken at the "
                  "decode's log line of taking over the arena; SGLang's own weight load: "
                  f"{raw['first_sglang_weight_load_s']} s first, {raw['restarts'][0]['sglang_weight_load_s']} s "
                  f"restarted, {raw['refill']['sglang_weight_load_s']} s refilled, "
                  f"{raw['control']['sglang_weight_load_s']} s control."]
    return "\n".join(lines) + "\n"


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")


def _stamps(log: Path, text: str) -> list[float]:
    """Epoch seconds (1 s resolution) of the log lines holding `text`; SGLang logs the machine's local time,
    which on the device machine is UTC."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m and text in line:
            out.append(calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")))
    return out


def from_logs(work: Path) -> dict:
    """The raw record of a run from its directory: the servers' reports, SGLang's own logs for the restart's
    timeline (kill: the decode's log line of taking over the arena) and the decode's access log."""
    def report(name: str) -> dict | None:
        path = work / name / "report.json"
        if path.exists():
            return json.loads(path.read_text())
        ranks = sorted((work / name / "ranks").glob("report-*.json"))  # ready, then cut before the launcher wrote it
        return {"ranks": [json.loads(p.read_text()) for p in ranks], **json.loads(ranks[0].read_text())} if ranks else None

    first, r0, refill, control = (report(n) for n in ("prefill", "prefill-r0", "refill", "control"))
    killed = _stamps(work / "decode.log", "after its server")[0]
    ready = _stamps(work / "prefill-r0.log", "fired up")[0]
    during = lambda text: [t for t in _stamps(work / "decode.log", text) if killed - 1 <= t <= ready + 2]  # noqa: E731
    answers, failed = during('"POST /generate HTTP/1.1" 200'), during('"POST /generate HTTP/1.1" 5')
    row = lambda r: {"refilled": r.get("refilled"), "load_seconds": rank(r)["load_seconds"],  # noqa: E731
                     "backend_timings": rank(r)["backend_timings"], "weight_bytes_allocated": r["weight_bytes_allocated"],
                     "tokens_equal": None, "phases_seconds": round(sum(p["seconds"] for p in rank(r)["phases"]), 3)}
    r = rank(r0)
    return {"first_load": {"load_seconds": rank(first)["load_seconds"], "bytes": first["bytes_shared"],
                           "arena_bytes": first["arena_bytes"]},
            "restarts": [{"adopted": r0["adopted"], "readopt_load_seconds": r["attach_seconds"],
                          "readopt_weight_bytes": r0["weight_bytes_allocated"], "tokens_equal": None,
                          "timeline_s": {"decode_serves_arena": 0.0, "weights_taken_over": round(weights_end(r) - killed, 1),
                                         "serving_again": round(ready - killed, 1)},
                          "sglang_weight_load_s": _sglang_load(work / "prefill-r0.log")}],
            "decode_answers": len(answers), "decode_wrong_answers": None, "decode_failures": failed,
            "refill": {**row(refill), "sglang_weight_load_s": _sglang_load(work / "refill.log")},
            "control": {**row(control), "sglang_weight_load_s": _sglang_load(work / "control.log")},
            "from_logs": str(work), "first_sglang_weight_load_s": _sglang_load(work / "prefill.log")}


@contextlib.contextmanager
def unpacked(path: Path) -> Iterator[Path]:
    """A run directory, or the one run directory inside a .tgz of it (what the device call brings back),
    extracted for as long as the block reads it."""
    if path.is_dir():
        yield path
        return
    import tarfile

    with tempfile.TemporaryDirectory(prefix="sc-recovery-from-") as into:
        with tarfile.open(path) as tar:
            tar.extractall(into, filter="data")
        runs = sorted(Path(into).glob("sc-recovery-logs-*"))
        if len(runs) != 1:
            raise SystemExit(f"{path} holds {len(runs)} run directories; give one.")
        yield runs[0]


def _sglang_load(log: Path) -> float | None:
    """SGLang's own 'Load weight end. elapsed=...' for one server."""
    m = re.search(r"Load weight end\. elapsed=([0-9.]+) s", log.read_text(errors="replace"))
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--from-logs", type=Path, help="rebuild the results of a cut run from its run directory (or .tgz)")
    ap.add_argument("--environment", type=Path, help="with --from-logs: a JSON of the run's machine and versions")
    a = ap.parse_args()
    args = SimpleNamespace(model=a.model, tag="recovery", key="bench-recovery", bootstrap_port=free_port(),
                           server_flags=FLAGS, graph_max_bs=16, restarts=a.restarts,
                           hosted=("cache.host_copy=true",), commit=os.environ.get("COMMIT") or head_commit(),
                           ballast_info=None)
    a.out.mkdir(parents=True, exist_ok=True)
    args.out = a.out
    if a.from_logs:
        with unpacked(a.from_logs) as logs:
            raw = {**from_logs(logs), "from_logs": str(a.from_logs), "model": str(a.model)}
        env = json.loads(a.environment.read_text())
    else:
        raw, env = {**run(args), "model": str(a.model)}, environment(args)
    summary = summarize(raw, env)
    (a.out / "recovery.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "recovery.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
