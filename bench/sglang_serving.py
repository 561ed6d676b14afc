"""Serving benchmark: two SGLang servers on one GPU sharing one copy of the weights, against two servers
that each load their own copy, under the same memory split; SGLang's own bench_serving as the client.

    python bench/sglang_serving.py --model /tmp/llama8b --out $OUT [--mode pd|replicas] [--setups shared,unshared]

Each setup starts two servers through `launch.py engine=sglang` (the first with mem_fraction_static
--first-mem of the free card, the second, once the first is serving, with --second-mem of what is then
free, so both setups split the card the same way). --mode pd (default): a prefill and a decode server in
PD mode (KV over --transfer-backend) behind sglang-router's PD router, driven by one `bench_serving`
client; --mode replicas: two servers without PD, one client each at the same concurrency (the load a
round-robin router would give them). Random token ids, fixed lengths, fixed seed. Recorded per setup:
KV pool tokens per server and in total, max running requests, output tokens/s, TTFT and ITL p50/p99,
each server's start-to-ready time and per-process GPU memory (NVML).
Results are written after every step to <out>/sglang-serving.json, so a run cut short keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = REPO / "bench" / "offline"  # stand-ins for imports bench_serving makes but never uses here
SERVER_FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
                "+engine.extra_args.grammar_backend=none")
# (input, output) tokens; "long-8k" fills the 8,192-token context of Llama-3-8B (and of bench/make_model.py)
WORKLOADS = {"random-1k": (1024, 256), "long-8k": (7680, 512)}

sys.path.insert(0, str(REPO / "tests"))  # one free_port and one SGLang request helper for tests and benchmarks
from helpers import free_port, sglang_healthy, sglang_request  # noqa: E402


class Server:
    """One `launch.py engine=sglang role=<role>` process (an SGLang server, or the PD router)."""

    def __init__(self, role: str, name: str, args, cache_dir: Path, work: Path, *overrides: str,
                 port: int | None = None) -> None:
        self.role, self.name, self.port = role, name, port or free_port()
        self.run_dir, self.log = work / name, work / f"{name}.log"
        (self.run_dir / "report.json").unlink(missing_ok=True)  # an earlier run's would read as ready
        cmd = [sys.executable, str(REPO / "launch.py"), f"role={role}", "engine=sglang", f"model.path={args.model}",
               f"cache.dir={cache_dir}", "cache.key=bench", "cache.wait_timeout_s=900", f"hydra.run.dir={self.run_dir}",
               f"engine.disaggregation.bootstrap_port={args.bootstrap_port}", *args.server_flags.split(), *overrides]
        if role != "router":
            cmd.append(f"engine.port.{role}={self.port}")
            if args.graph_max_bs:
                cmd.append(f"+engine.extra_args.cuda_graph_max_bs_decode={args.graph_max_bs}")
        self.t0 = time.monotonic()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float) -> dict:
        report = self.run_dir / "report.json"
        deadline = time.monotonic() + timeout
        while not report.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not come up:\n" + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        self.ready_s = time.monotonic() - self.t0
        return json.loads(report.read_text())

    def info(self) -> dict:
        data = sglang_request(self.port, "/server_info", timeout=60)
        state = (data.get("internal_states") or [{}])[0]
        return {"kv_pool_tokens": data.get("max_total_num_tokens"),
                "max_running_requests": state.get("effective_max_running_requests_per_dp"),
                "memory_usage_gb": state.get("memory_usage")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nvidia_smi(*query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:  # a CPU smoke run
        return ""


def process_gpu_mib() -> dict[str, int]:
    """pid -> MiB of GPU memory, added up over the GPUs the process uses (nvidia-smi lists one row each)."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    used: dict[str, int] = {}
    for pid, mib in (line.split(", ") for line in out.strip().splitlines() if line):
        used[pid] = used.get(pid, 0) + int(mib)
    return used


def server_gpu_mib(server: Server, used: dict[str, int]) -> int:
    """GPU memory of the processes in this server's process tree."""
    import psutil

    tree = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
    return sum(used.get(str(p), 0) for p in tree)


def bench_client(server: Server, args, inp: int, out: int, conc: int, prompts: int, dest: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", "127.0.0.1",
           "--port", str(server.port), "--model", str(args.model), "--tokenizer", str(args.model),
           "--dataset-name", "random-ids", "--tokenize-prompt", "--random-input-len", str(inp),
           "--random-output-len", str(out), "--random-range-ratio", "1", "--num-prompts", str(prompts),
           "--max-concurrency", str(conc), "--seed", str(args.seed), "--output-file", str(dest),
           "--output-details", "--disable-tqdm", "--ready-check-timeout-sec", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OFFLINE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


BATCH_LINE = re.compile(r"Decode batch, #running-req: (\d+)")
COUNTERS = {"running": "#running-req", "queued": "#queue-req", "in_transfer": "#transfer-req",
            "preallocated": "#prealloc-req"}


def batch_peaks(log_text: str) -> dict[str, int]:
    """The largest decode batch a server ran, and the most requests it held queued, preallocated or in KV
    transfer, from its `Decode batch` log lines: what bench_serving cannot see from outside."""
    peaks: dict[str, int] = {}
    for line in log_text.splitlines():
        if not BATCH_LINE.search(line):
            continue
        for name, label in COUNTERS.items():
            m = re.search(re.escape(label) + r": (\d+)", line)
            if m:
                peaks[name] = max(peaks.get(name, 0), int(m.group(1)))
    return peaks


def run_load(servers: list[Server], args, work: Path, wl: str, conc: int, watch: list[Server]) -> dict:
    """`servers`: what the clients drive, one client each (both replicas, or the PD router); `watch`: the
    model servers whose logs say how many requests they ran at once during the load."""
    inp, out = WORKLOADS[wl]
    prompts = max(conc * args.waves, args.min_prompts)
    files = [work / f"{wl}-c{conc}-{s.name}.jsonl" for s in servers]
    for f in files:
        f.unlink(missing_ok=True)
    offsets = {s.name: s.log.stat().st_size for s in watch}
    t0 = time.monotonic()
    clients = [bench_client(s, args, inp, out, conc, prompts, f) for s, f in zip(servers, files)]
    logs = [c.communicate(timeout=args.client_timeout)[0] for c in clients]
    wall = time.monotonic() - t0
    per = []
    for s, f, log in zip(servers, files, logs):
        if not f.exists():
            raise RuntimeError(f"bench_serving against {s.name} wrote nothing:\n{log[-3000:]}")
        per.append(json.loads(f.read_text().strip().splitlines()[-1]))
    ttfts = [t for r in per for t in r.get("ttfts", []) if t]
    itls = [x for r in per for row in r.get("itls", []) for x in row]
    keep = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "completed",
            "duration", "max_concurrent_requests")
    return {"workload": wl, "input_len": inp, "output_len": out, "concurrency_per_client": conc,
            "clients": len(servers), "prompts_per_client": prompts, "wall_seconds": round(wall, 2),
            "output_throughput": round(sum(r["output_throughput"] for r in per), 1),
            "ttft_ms_p50": pct(ttfts, 50) and round(pct(ttfts, 50) * 1000, 1),
            "ttft_ms_p99": pct(ttfts, 99) and round(pct(ttfts, 99) * 1000, 1),
            "itl_ms_p50": pct(itls, 50) and round(pct(itls, 50) * 1000, 2),
            "itl_ms_p99": pct(itls, 99) and round(pct(itls, 99) * 1000, 2),
            "per_server": {s.name: {k: r.get(k) for k in keep} for s, r in zip(servers, per)},
            "server_log_peaks": {s.name: batch_peaks(read_from(s.log, offsets[s.name])) for s in watch}}


PROBE_IDS = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
PLAIN_TOKENS = REPO / "bench" / "results" / "h200-sglang-gpu-tests.json"  # a plain server's, this checkpoint


def greedy_probe(port: int, timeout: float = 120) -> list[int] | None:
    """The 16 greedy tokens the server (or router) on `port` answers to PROBE_IDS."""
    body = {"input_ids": PROBE_IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    return sglang_request(port, "/generate", body, timeout=timeout).get("output_ids")


def plain_tokens() -> list[int]:
    return json.loads(PLAIN_TOKENS.read_text())["tokens"]


def probe_tokens(server: Server, expected: list[int]) -> dict:
    tokens = greedy_probe(server.port)
    return {"server": server.name, "tokens": tokens, "equal_plain": tokens == expected}


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def transfer_overrides(args) -> tuple[str, ...]:
    out = (f"engine.disaggregation.transfer_backend={args.transfer_backend}",)
    if args.mooncake_protocol:
        out += (f"engine.disaggregation.mooncake_protocol={args.mooncake_protocol}",)
    return out


def start_servers(setup: str, args, cache_dir: Path, work: Path) -> tuple[list[Server], list[dict]]:
    """The setup's two servers, ready. shared: prefill owns the weights, decode attaches (it may start
    at once: it sizes its pool once the owner settled); unshared: both load their own copy, one after
    the other (a plain server sizes from whatever the other has allocated by then)."""
    pd = args.mode == "pd"
    own = () if setup == "shared" else ("role.mode=off", "role.phases=[]")  # the roles' servers, no cache
    roles = ("prefill", "decode") if (pd or setup == "shared") else ("plain", "plain")
    mode = (transfer_overrides(args) if pd else
            ("engine.disaggregation.mode.prefill=null", "engine.disaggregation.mode.decode=null"))

    def server(i: int) -> Server:
        mem = args.first_mem if i == 0 else args.second_mem
        return Server(roles[i], f"{setup}-{i + 1}", args, cache_dir, work, *mode, *own,
                      f"engine.mem_fraction_static.{roles[i]}={mem}")

    first = server(0)
    servers = [first]
    try:
        if setup == "shared":
            servers.append(server(1))
            return servers, [s.wait_ready(args.ready_timeout) for s in servers]
        reports = [first.wait_ready(args.ready_timeout)]
        servers.append(server(1))
        reports.append(servers[1].wait_ready(args.ready_timeout))
        return servers, reports
    except BaseException:
        for s in servers:
            s.stop()
        raise


def start_router(setup: str, args, servers: list[Server], cache_dir: Path, work: Path) -> Server:
    """sglang-router's PD router in front of the setup's prefill and decode servers, once it answers."""
    port = free_port()
    router = Server("router", f"{setup}-router", args, cache_dir, work, *transfer_overrides(args),
                    f"engine.port.prefill={servers[0].port}", f"engine.port.decode={servers[1].port}",
                    f"engine.router.port={port}", port=port)
    router.wait_ready(args.ready_timeout)  # launch.py reports as soon as the router process runs
    deadline = time.monotonic() + args.ready_timeout
    while True:
        if sglang_healthy(port):
            return router
        if router.proc.poll() is not None or time.monotonic() > deadline:
            router.stop()
            raise RuntimeError("the PD router did not come up:\n" + router.log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


class Ballast:
    """A process holding GPU memory until the benchmark ends, so that a larger card offers the servers the
    free memory of a smaller one (--free-gib): the memory split, and where KV capacity binds, then match
    the card the targets were set for, while compute stays this card's."""

    CODE = """
import sys, torch
target = float(sys.argv[1]) * 2**30
held = []
while torch.cuda.mem_get_info()[0] - target >= 2**30:
    held.append(torch.empty(2**30, dtype=torch.uint8, device="cuda"))
rest = int(torch.cuda.mem_get_info()[0] - target) // 2**21 * 2**21
if rest > 0:
    held.append(torch.empty(rest, dtype=torch.uint8, device="cuda"))
free, total = torch.cuda.mem_get_info()
print(f"{free / 2**30:.3f} {total / 2**30:.3f} {sum(t.numel() for t in held) / 2**30:.3f}", flush=True)
sys.stdin.read()
"""

    def __init__(self, free_gib: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(free_gib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 3:
            self.close()
            raise RuntimeError(f"the ballast process could not leave {free_gib} GiB free on the GPU")
        self.free_gib, self.total_gib, self.held_gib = (float(x) for x in line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it exits when its stdin ends
            self.proc.wait(60)


def run_setup(setup: str, args, results: dict, save) -> None:
    work = Path(args.out) / f"work-{setup}"
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/dev/shm"))
    os.chmod(cache_dir, 0o700)
    entry = results["setups"].setdefault(setup, {"servers": {}, "runs": []})
    servers: list[Server] = []
    try:
        servers, reports = start_servers(setup, args, cache_dir, work)
        used = process_gpu_mib()
        for i, (s, rep) in enumerate(zip(servers, reports)):
            rank = (rep.get("ranks") or [{}])[0]
            entry["servers"][s.name] = {
                "role": s.role, "mem_fraction_static": args.first_mem if i == 0 else args.second_mem,
                "start_to_ready_seconds": round(s.ready_s, 1), "gpu_memory_mib": server_gpu_mib(s, used),
                "weight_bytes_allocated": rank.get("weight_bytes_allocated"),
                "attach_seconds": rank.get("attach_seconds"), "baseline_gib": rank.get("baseline_gib"), **s.info()}
        entry["total_kv_pool_tokens"] = sum(v["kv_pool_tokens"] for v in entry["servers"].values())
        save()
        targets, watch = servers, list(servers)
        if args.mode == "pd":
            servers.append(start_router(setup, args, servers, cache_dir, work))
            targets = [servers[-1]]
        # the numbers count only if the setup serves the right tokens: greedy, against a plain server's
        expected = plain_tokens()
        entry["probe"] = [probe_tokens(s, expected) for s in targets]
        save()
        # the long workload first: it is where KV capacity binds, and what the throughput target is set on
        for wl, concs in (("long-8k", args.long_conc), ("random-1k", args.random_conc)):
            for conc in concs:
                if time.monotonic() > args.deadline:
                    entry.setdefault("skipped", []).append(f"{wl} c{conc}: out of time")
                    continue
                entry["runs"].append(run_load(targets, args, work, wl, conc, watch))
                save()
    finally:
        for s in reversed(servers):
            s.stop()
        subprocess.run(["rm", "-rf", str(cache_dir)])


def ratios(results: dict) -> None:
    a, b = results["setups"].get("shared"), results["setups"].get("unshared")
    if not (a and b and "total_kv_pool_tokens" in a and "total_kv_pool_tokens" in b):
        return
    results["total_kv_ratio"] = round(a["total_kv_pool_tokens"] / b["total_kv_pool_tokens"], 3)

    def best(entry, wl):
        runs = [r["output_throughput"] for r in entry["runs"] if r["workload"] == wl]
        return max(runs) if runs else None

    for wl in WORKLOADS:
        if best(a, wl) and best(b, wl):
            results[f"output_throughput_ratio_{wl}"] = round(best(a, wl) / best(b, wl), 3)
    if "output_throughput_ratio_long-8k" in results:  # the target's workload: where KV capacity binds
        results["output_throughput_ratio"] = results["output_throughput_ratio_long-8k"]


def environment() -> dict:
    import torch

    smi = nvidia_smi("--query-gpu=index,name,pci.bus_id,driver_version,memory.total", "--format=csv,noheader")
    versions = {}
    for pkg in ("sglang", "transformers", "flashinfer-python", "sglang-kernel"):
        try:
            import importlib.metadata as m

            versions[pkg] = m.version(pkg)
        except Exception:  # noqa: BLE001 - a package this environment lacks
            versions[pkg] = None
    # which card of a several-GPU machine ran this (nvidia-smi lists them all, whatever is visible)
    return {"gpu": smi, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "torch": torch.__version__, "cuda": torch.version.cuda, **versions,
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--setups", default="shared,unshared")
    ap.add_argument("--mode", choices=("pd", "replicas"), default="pd",
                    help="pd: prefill + decode servers in PD mode behind sglang-router's PD router (one client); "
                         "replicas: two servers without PD, one client each")
    ap.add_argument("--transfer-backend", default="mooncake_tcp", help="PD KV transfer (mooncake_tcp: no RDMA)")
    ap.add_argument("--mooncake-protocol", default=None,
                    help="engine.disaggregation.mooncake_protocol, with --transfer-backend mooncake (nvlink_intra: "
                         "KV copied GPU to GPU through CUDA IPC)")
    ap.add_argument("--first-mem", type=float, default=0.45, help="mem_fraction_static of the first server")
    ap.add_argument("--second-mem", type=float, default=0.80, help="of the second (of what the first left free)")
    ap.add_argument("--random-conc", default="32,128", help="concurrency per client, random-1k workload")
    ap.add_argument("--long-conc", default="16,32,48", help="concurrency per client, long-8k workload (past "
                    "what the unshared decode's KV pool holds, about 17 such requests on an H100)")
    ap.add_argument("--waves", type=int, default=2, help="prompts per server = concurrency x waves")
    ap.add_argument("--min-prompts", type=int, default=32)
    ap.add_argument("--graph-max-bs", type=int, default=128, help="largest decode batch captured (0: SGLang's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--server-flags", default=SERVER_FLAGS, help="launch.py overrides for every server")
    ap.add_argument("--lengths", default="", help="override workload lengths, e.g. random-1k=64:8,long-8k=128:8")
    ap.add_argument("--free-gib", type=float, default=0.0,
                    help="hold GPU memory so that the servers find this much free (a larger card standing in for "
                         "a smaller one; 0: the whole card)")
    ap.add_argument("--bootstrap-port", type=int, default=0, help="PD bootstrap port (0: a free one)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="combine results of runs made apart (e.g. one setup per GPU at once) into --out")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--client-timeout", type=float, default=600)
    ap.add_argument("--budget-s", type=float, default=3600, help="stop starting new load runs after this")
    args = ap.parse_args()
    args.random_conc = [int(x) for x in args.random_conc.split(",") if x]
    args.long_conc = [int(x) for x in args.long_conc.split(",") if x]
    args.deadline = time.monotonic() + args.budget_s
    args.bootstrap_port = args.bootstrap_port or free_port()
    if args.merge:
        return merge(args.merge, Path(args.out))
    for item in filter(None, args.lengths.split(",")):
        name, lens = item.split("=")
        WORKLOADS[name] = tuple(int(x) for x in lens.split(":"))
    context = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings")
    for name, (inp, outp) in WORKLOADS.items():
        if context and inp + outp > context:
            raise SystemExit(f"[bench] workload {name} asks {inp} + {outp} tokens of a model whose context is "
                             f"{context}: the server would reject every request. Use --lengths {name}=IN:OUT.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "deadline"},
               "setups": {}}
    path = out / "sglang-serving.json"

    def save() -> None:
        ratios(results)
        path.write_text(json.dumps(results, indent=2, sort_keys=True))

    ballast = Ballast(args.free_gib) if args.free_gib else None
    if ballast:
        results["ballast"] = {"free_gib": ballast.free_gib, "card_gib": ballast.total_gib, "held_gib": ballast.held_gib}
    try:
        for setup in args.setups.split(","):
            try:
                run_setup(setup, args, results, save)
            except Exception as e:  # noqa: BLE001 - keep the other setup's numbers; the error goes in the JSON
                results["setups"].setdefault(setup, {})["error"] = f"{type(e).__name__}: {e}"[-4000:]
            save()
    finally:
        if ballast:
            ballast.close()
    summarize(results)


def merge(paths: list[str], out: Path) -> None:
    """One result of runs made apart: their setups side by side, the ratios computed across them."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    results = {"environment": runs[0]["environment"], "config": runs[0]["config"], "setups": {},
               "merged_from": [{"path": p, "environment": r["environment"], "setups": sorted(r["setups"]),
                                "ballast": r.get("ballast"), "config": r["config"]} for p, r in zip(paths, runs)]}
    for r in runs:
        clash = set(results["setups"]) & set(r["setups"])
        if clash:
            raise SystemExit(f"[bench] setups {sorted(clash)} appear in more than one of {paths}")
        results["setups"].update(r["setups"])
    ratios(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sglang-serving.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    summarize(results)


def summarize(results: dict) -> None:
    print(json.dumps({k: v for k, v in results.items() if k not in ("setups", "merged_from")}, indent=2))
    for name, entry in results["setups"].items():
        print(name, "KV total", entry.get("total_kv_pool_tokens"), "error" if "error" in entry else "")
        for r in entry.get("runs", []):
            print(f"  {r['workload']:9s} c{r.get('concurrency_per_client', r.get('concurrency', 0)):<4d} out {r['output_throughput']:8.1f} tok/s  "
                  f"ttft p50 {r['ttft_ms_p50']} p99 {r['ttft_ms_p99']}  itl p50 {r['itl_ms_p50']} p99 {r['itl_ms_p99']}")


if __name__ == "__main__":
    main()
