"""The serving benchmark's servers: launch.py processes (SGLang prefill, decode, colocated, the PD router)
started per setup and split, the GPU memory ballast that emulates a smaller card, and the greedy probes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # one free_port and one SGLang request helper for tests and benchmarks
from helpers import free_port, sglang_healthy, sglang_request  # noqa: E402
SERVER_FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
                "+engine.extra_args.grammar_backend=none +engine.extra_args.disable_prefill_cuda_graph=true "
                "+engine.extra_args.page_size=64")


# ---------------------------------------------------------------- servers (launch.py), ballast, probes

def launch_overrides(role: str, args, cache_dir: Path, port: int, *overrides: str) -> list[str]:
    """launch.py's overrides for one server of the benchmark (the run directory aside)."""
    cmd = [f"role={role}", "engine=sglang", f"model.path={args.model}", f"cache.dir={cache_dir}",
           f"cache.key=bench-{args.tag}", "cache.wait_timeout_s=900",
           f"engine.disaggregation.bootstrap_port={args.bootstrap_port}", *args.server_flags.split(), *overrides]
    if role != "router":
        cmd.append(f"engine.port.{role}={port}")
        if args.graph_max_bs and role != "prefill":
            cmd.append(f"+engine.extra_args.cuda_graph_max_bs_decode={args.graph_max_bs}")
    return cmd


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)(?::.*)?$")


def failure_cause(log: str) -> str | None:
    """The last line of the log that ends a Python traceback (`torch.OutOfMemoryError: CUDA out of memory...`):
    a server that failed says there what it died of, while its last lines are only its shutdown."""
    return next((line.strip() for line in reversed(log.splitlines()) if EXCEPTION_LINE.match(line.strip())), None)


class Server:
    """One `launch.py engine=sglang role=<role>` process (an SGLang server, or the PD router)."""

    def __init__(self, role: str, name: str, args, cache_dir: Path, work: Path, *overrides: str,
                 port: int | None = None) -> None:
        self.role, self.name, self.port = role, name, port or free_port()
        self.run_dir, self.log = work / name, work / f"{name}.log"
        (self.run_dir / "report.json").unlink(missing_ok=True)  # an earlier run's would read as ready
        self.cmd = [sys.executable, str(REPO / "launch.py"),
                    *launch_overrides(role, args, cache_dir, self.port, *overrides), f"hydra.run.dir={self.run_dir}"]
        self.t0 = time.monotonic()
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float) -> dict:
        """launch.py's report once the server is ready; a server that failed (launch.py reports that too, as
        `"ok": false`), exited or timed out raises with what it died of first, then its log's tail."""
        report = self.run_dir / "report.json"
        deadline = time.monotonic() + timeout
        while not report.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self._not_up(None))
            time.sleep(0.5)
        rep = json.loads(report.read_text())
        if rep.get("ok") is False:
            raise RuntimeError(self._not_up(rep.get("message")))
        self.ready_s = time.monotonic() - self.t0
        return rep

    def _not_up(self, reported: str | None) -> str:
        log = self.log.read_text(errors="replace")
        why = "; ".join(x for x in (failure_cause(log), reported and f"launch.py: {reported}") if x)
        return f"{self.name} did not come up: {why or 'no error in its log'}\n" + log[-3000:]

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


def gpu_index() -> str:
    """The card the servers run on: the first of CUDA_VISIBLE_DEVICES, as nvidia-smi numbers it."""
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]


class GpuFreeSampler:
    """The card's free memory (nvidia-smi, once a period) while a load runs: how much of the headroom that the
    KV pools left the servers took (their allocators keep what they took, so the lowest sample is the peak).
    It never fails the load it watches: no nvidia-smi, or one that hangs, leaves the cell without a value."""

    def __init__(self, period_ms: int = 1000, stop_timeout_s: float = 10.0) -> None:
        self.samples: list[int] = []
        self.stop_timeout_s = stop_timeout_s
        # line-buffered where stdbuf exists: a C program writing to a pipe may hold a whole block of samples
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        try:
            self.proc = subprocess.Popen([*line_buffered, "nvidia-smi", "-i", gpu_index(), "--query-gpu=memory.free",
                                          "--format=csv,noheader,nounits", f"--loop-ms={period_ms}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # a CPU smoke run: no card to sample
            self.proc = None
        self.reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __enter__(self) -> "GpuFreeSampler":
        if self.proc is not None:
            self.reader.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # its loop's own way out ("until Ctrl+C"), flushing what it wrote
        try:
            self.proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # a child still holding the pipe open leaves the daemon thread behind, not the load
        self.reader.join(self.stop_timeout_s)

    def free_min_mib(self) -> int | None:
        return min(self.samples) if self.samples else None


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


PROBE_IDS = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
PLAIN_TOKENS = REPO / "bench" / "results" / "h200-sglang-gpu-tests.json"  # a plain server's, the 8B checkpoint


def greedy_probe(port: int, timeout: float = 120) -> list[int] | None:
    """The 16 greedy tokens the server (or router) on `port` answers to PROBE_IDS."""
    body = {"input_ids": PROBE_IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    return sglang_request(port, "/generate", body, timeout=timeout).get("output_ids")


def plain_tokens() -> list[int]:
    return json.loads(PLAIN_TOKENS.read_text())["tokens"]


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def wait_quiet(paths: list[Path], quiet_s: float = 3, timeout: float = 180) -> float:
    """Seconds until none of the logs grew for quiet_s (the servers finished or dropped the last load's
    requests), at most timeout."""
    t0 = time.monotonic()
    sizes, still = None, 0.0
    while time.monotonic() - t0 < timeout:
        now = [p.stat().st_size if p.exists() else 0 for p in paths]
        still = still + 0.5 if now == sizes else 0.0
        if still >= quiet_s:
            break
        sizes = now
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)


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


def transfer_overrides(args) -> tuple[str, ...]:
    out = (f"engine.disaggregation.transfer_backend={args.transfer_backend}",)
    if args.mooncake_protocol:
        out += (f"engine.disaggregation.mooncake_protocol={args.mooncake_protocol}",)
    return out


def role_overrides(setup: str, role: str, split, args) -> tuple[str, ...]:
    """launch.py overrides of one server of a setup: its cache mode, memory and (prefill) pool size."""
    own = () if setup == "shared" else ("role.mode=off", "role.phases=[]")  # the roles' servers, no cache
    if role == "plain":
        return (*own, f"engine.mem_fraction_static.plain={args.colocated_mem}")
    mem = args.prefill_mem if role == "prefill" else args.decode_mem
    pool = (f"+engine.extra_args.max_total_tokens={split}",) if role == "prefill" and split else ()
    return (*own, *transfer_overrides(args), f"engine.mem_fraction_static.{role}={mem}", *pool)


def start_router(args, servers: list[Server], cache_dir: Path, work: Path, name: str) -> Server:
    """sglang-router's PD router in front of the setup's prefill and decode servers, once it answers."""
    port = free_port()
    router = Server("router", name, args, cache_dir, work, *transfer_overrides(args),
                    f"engine.port.prefill={servers[0].port}", f"engine.port.decode={servers[1].port}",
                    f"engine.router.port={port}", port=port)
    router.wait_ready(args.ready_timeout)  # launch.py reports as soon as the router process runs
    deadline = time.monotonic() + args.ready_timeout
    while not sglang_healthy(port):
        if router.proc.poll() is not None or time.monotonic() > deadline:
            router.stop()
            raise RuntimeError("the PD router did not come up:\n" + router.log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    return router


def start_setup(setup: str, split, args, cache_dir: Path, work: Path, servers: list[Server]) -> list[dict]:
    """The setup's servers, ready, appended to `servers` (the caller stops them). shared: prefill owns the
    weights and the decode attaches, started at once (it sizes its pool once the owner settled); unshared: each
    loads its copy, the decode once the prefill is ready (a plain server sizes from what is free then);
    colocated: one plain server."""
    tag = f"{setup}-{split or 'all'}"
    roles = ("plain",) if setup == "colocated" else ("prefill", "decode")

    def server(role: str) -> Server:
        s = Server(role, f"{tag}-{role}", args, cache_dir, work, *role_overrides(setup, role, split, args))
        servers.append(s)
        return s

    if setup == "shared":
        both = [server(r) for r in roles]
        reports = [s.wait_ready(args.ready_timeout) for s in both]
    else:
        reports = []
        for r in roles:
            reports.append(server(r).wait_ready(args.ready_timeout))
    if setup != "colocated":
        servers.append(start_router(args, servers[-2:], cache_dir, work, f"{tag}-router"))
    return reports


# ---------------------------------------------------------------- the machine

def environment(args) -> dict:
    """The machine a result was measured on: card, driver, versions, commit, the ballast."""
    import torch

    name_uuid = nvidia_smi("-i", gpu_index(), "--query-gpu=name,uuid,driver_version",
                           "--format=csv,noheader").split(", ")
    versions = {}
    for pkg in ("sglang", "transformers", "mooncake-transfer-engine-cuda13", "sglang-router"):
        try:
            import importlib.metadata as m

            versions[pkg] = m.version(pkg)
        except Exception:  # noqa: BLE001 - a package this environment lacks
            versions[pkg] = None
    return {"gpu_name": name_uuid[0] or None, "gpu_uuid": name_uuid[1] if len(name_uuid) > 1 else None,
            "driver": name_uuid[2] if len(name_uuid) > 2 else None, "host": socket.gethostname(),
            "torch": torch.__version__, "cuda": torch.version.cuda, **versions, "date": time.strftime("%Y-%m-%d"),
            "commit": args.commit, "ballast": args.ballast_info}


def head_commit() -> str | None:
    """The checkout's commit, when it is a git checkout (the device machine's copy may not be)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None
