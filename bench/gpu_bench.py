"""The H100 benchmark of issue 3, in one run on one GPU:

    python bench/gpu_bench.py --out DIR [--layers 32] [--instances 8]

(a) plain from_pretrained(device_map="cuda"), page cache warm; (b) prefill with save;
(c) one decode attach; (d) logits parity of a/b/c; (e) N decodes started at once, and N decodes
waiting for an owner that attach the moment it publishes;
(f) how many attached instances fit against plain loads. Every instance is a real
`launch.py` process; GPU memory is read device-wide through NVML by this harness,
which holds no CUDA context. Writes bench.json and bench.md into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


class GpuMemory:
    """Samples device-wide used memory every few ms; `peak_since(mark)` gives the max since a mark."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        self.total = pynvml.nvmlDeviceGetMemoryInfo(self._h).total
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._h).used

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.time(), self.used()))
            time.sleep(0.002)

    def peak_since(self, t0: float) -> int:
        return max(u for t, u in self._samples if t >= t0)

    def peak_between(self, t0: float, t1: float) -> int:
        return max(u for t, u in self._samples if t0 <= t <= t1)

    def settle(self, seconds: float = 1.0) -> int:
        time.sleep(seconds)
        return self.used()

    def info(self) -> dict:
        n = self._nvml
        name = n.nvmlDeviceGetName(self._h)
        drv = n.nvmlSystemGetDriverVersion()
        return {"gpu": name.decode() if isinstance(name, bytes) else name,
                "driver": drv.decode() if isinstance(drv, bytes) else drv, "gpu_memory_bytes": self.total}


class Runner:
    def __init__(self, work: Path, model: Path, cache: Path) -> None:
        self.work, self.model, self.cache = work, model, cache

    def start(self, role: str, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        run_dir = self.work / name
        cmd = [sys.executable, str(ROOT / "launch.py"), f"role={role}", f"model.path={self.model}",
               "engine.device_map=cuda", f"cache.dir={self.cache}", f"hydra.run.dir={run_dir}", *extra]
        log = open(self.work / f"{name}.log", "wb")
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), run_dir

    def report(self, proc: subprocess.Popen, run_dir: Path, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        path = run_dir / "report.json"
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.work / f"{run_dir.name}.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{run_dir.name} ended without a report:\n{log}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def run(self, role: str, name: str, *extra: str) -> dict:
        proc, run_dir = self.start(role, name, *extra)
        rep = self.report(proc, run_dir)
        proc.wait(600)
        return rep


def bare_context_bytes(mem: GpuMemory) -> int:
    """GPU memory of a process with the same imports, CUDA context and cuBLAS, and no model."""
    code = ("import torch, transformers, sys; x = torch.ones(64, 64, device='cuda', dtype=torch.bfloat16); "
            "(x @ x).sum().item(); print('ready', flush=True); sys.stdin.readline()")
    base = mem.settle()
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    used = mem.settle(0.5) - base
    p.communicate("x\n")
    return used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--model-dir", default="/tmp/llama8b")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/sc-bench-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cache = Path("/dev/shm/sc-bench")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(mode=0o700)
    model = Path(a.model_dir)

    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_model.py"), "--out", str(model),
                    "--layers", str(a.layers)], check=True)
    make_s = time.perf_counter() - t
    files = sorted(p for p in model.iterdir() if p.suffix == ".safetensors")
    model_bytes = sum(p.stat().st_size for p in files)
    for p in files:  # page cache warm for every load below
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass

    import torch
    import transformers

    mem = GpuMemory()
    env = {**mem.info(), "cuda": torch.version.cuda, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "host_cpus": os.cpu_count()}
    r = Runner(work, model, cache)
    res: dict = {"env": env, "model": {"shape": "llama-3-8b", "layers": a.layers, "dtype": "bfloat16",
                                       "bytes": model_bytes, "files": len(files), "generate_seconds": make_s}}
    ctx = bare_context_bytes(mem)
    res["bare_process_gpu_bytes"] = ctx

    # (a) plain load
    base = mem.settle()
    t0 = time.time()
    plain = r.run("plain", "a-plain")
    res["a_plain"] = {"load_seconds": plain["load_seconds"], "process_to_first_token_seconds":
                      plain["process_to_first_token_seconds"], "peak_gpu_bytes": mem.peak_since(t0) - base,
                      "weight_bytes_allocated": plain["weight_bytes_allocated"]}

    # (b) prefill with save, held
    base = mem.settle()
    t0 = time.time()
    pre_proc, pre_dir = r.start("prefill", "b-prefill")
    pre = r.report(pre_proc, pre_dir)
    peak = mem.peak_since(t0) - base
    owner_steady = mem.settle() - base
    phase = {p["name"]: p for p in pre["phases"]}
    save_start = phase["align"]["start"]
    save_end = phase["serialize"]["start"] + phase["serialize"]["seconds"]
    save_peak = mem.peak_between(save_start, save_end + 0.01) - base
    load_peak = mem.peak_between(t0, save_start) - base
    added = pre["total_seconds"] - pre["load_seconds"]
    res["b_prefill"] = {"total_seconds": pre["total_seconds"], "load_seconds": pre["load_seconds"],
                        "phases": pre["phases"], "seconds_added": added,
                        "seconds_added_pct_of_plain_load": 100 * added / plain["load_seconds"],
                        "peak_gpu_bytes_whole_process": peak, "peak_gpu_bytes_during_load": load_peak,
                        "peak_gpu_bytes_during_save": save_peak,
                        "save_peak_minus_context_bytes": save_peak - ctx,
                        "peak_over_model": (save_peak - ctx) / model_bytes, "steady_gpu_bytes": owner_steady,
                        "steady_minus_context_over_model": (owner_steady - ctx) / model_bytes,
                        "backend": pre["backend"], "arena_bytes": pre["arena_bytes"]}

    # (c) one decode
    base = mem.settle()
    t0 = time.time()
    dec = r.run("decode", "c-decode")
    res["c_decode"] = {"phases": dec["phases"], "attach_seconds": dec["attach_seconds"],
                       "backend_timings": dec["backend_timings"],
                       "process_to_first_token_seconds": dec["process_to_first_token_seconds"],
                       "weight_bytes_allocated": dec["weight_bytes_allocated"],
                       "weight_bytes_allocated_pct_of_model": 100 * dec["weight_bytes_allocated"] / model_bytes,
                       "peak_gpu_bytes": mem.peak_since(t0) - base, "attach_speedup_over_plain_load":
                       plain["load_seconds"] / dec["attach_seconds"]}

    # (d) parity
    res["d_parity"] = {"logits_equal": plain["logits_sha256"] == pre["logits_sha256"] == dec["logits_sha256"],
                       "tokens_equal": plain["generated_tokens"] == pre["generated_tokens"] == dec["generated_tokens"],
                       "logits_sha256": {"plain": plain["logits_sha256"], "prefill": pre["logits_sha256"],
                                         "decode": dec["logits_sha256"]}}

    # (e) N decodes at once
    base = mem.settle()
    t0 = time.time()
    procs = [r.start("decode", f"e-decode-{i}") for i in range(a.instances)]
    reps = [r.report(p, d) for p, d in procs]
    for p, _ in procs:
        p.wait(600)
    peak_n = mem.peak_since(t0) - base
    per_instance = peak_n / a.instances
    slowest = max(x["attach_seconds"] for x in reps)
    res["e_concurrent"] = {"instances": a.instances, "attach_seconds": [x["attach_seconds"] for x in reps],
                           "phases": [x["phases"] for x in reps], "backend_timings": [x["backend_timings"] for x in reps],
                           "slowest_attach_seconds": slowest, "slowest_over_single": slowest / dec["attach_seconds"],
                           "all_parity": all(x["logits_sha256"] == pre["logits_sha256"] for x in reps),
                           "peak_gpu_bytes_all": peak_n, "per_instance_gpu_bytes": per_instance,
                           "shared_total_gpu_bytes": owner_steady + peak_n,
                           "plain_total_gpu_bytes_computed": a.instances * res["a_plain"]["peak_gpu_bytes"]}

    # (e2) N decodes waiting for an owner attach the moment a holder publishes: their attaches overlap
    # each other only, not the other instances' start-up as in (e)
    procs = [r.start("decode", f"e2-decode-{i}", "cache.key=sc-bench-e2", "cache.wait_timeout_s=600")
             for i in range(a.instances)]
    deadline = time.monotonic() + 600
    while not all("waiting for an owner" in (work / f"e2-decode-{i}.log").read_text(errors="replace")
                  for i in range(a.instances)):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            raise RuntimeError("the (e2) decodes did not all reach their wait for the owner")
        time.sleep(0.1)
    holder_proc, _ = r.start("holder", "e2-holder", "cache.key=sc-bench-e2")
    reps2 = [r.report(p, d) for p, d in procs]
    for p, _ in procs:
        p.wait(600)
    holder_proc.send_signal(signal.SIGTERM)
    holder_proc.wait(120)
    # each attach begins when its wait for the owner ends, inside the serialize phase
    starts = [next(ph["start"] for ph in x["phases"] if ph["name"] == "serialize") + x["wait_seconds"] for x in reps2]
    slowest2 = max(x["attach_seconds"] for x in reps2)
    res["e2_attach_together"] = {
        "instances": a.instances, "attach_seconds": [x["attach_seconds"] for x in reps2],
        "wait_seconds": [x["wait_seconds"] for x in reps2], "phases": [x["phases"] for x in reps2],
        "backend_timings": [x["backend_timings"] for x in reps2], "attach_start_spread_seconds": max(starts) - min(starts),
        "slowest_attach_seconds": slowest2, "slowest_over_single": slowest2 / dec["attach_seconds"],
        "all_parity": all(x["logits_sha256"] == pre["logits_sha256"] for x in reps2)}

    # (f) how many fit: measured per-instance costs, computed against the card's memory
    free_for_decodes = mem.total - owner_steady - base
    res["f_fit"] = {"attached_instances_fit": int(free_for_decodes // per_instance) + 1,
                    "plain_loads_fit": int(mem.total // res["a_plain"]["peak_gpu_bytes"]),
                    "note": "computed from the measured per-instance GPU memory of (a) and (e); "
                            "attached count includes the owner"}

    pre_proc.send_signal(signal.SIGTERM)
    pre_proc.wait(120)
    res["targets"] = {
        "attach_phases_le_0.10s": dec["attach_seconds"] <= 0.10,
        "attach_ge_30x_faster_than_plain": res["c_decode"]["attach_speedup_over_plain_load"] >= 30,
        "decode_alloc_le_0.1pct": res["c_decode"]["weight_bytes_allocated_pct_of_model"] <= 0.1,
        "save_adds_le_5pct": res["b_prefill"]["seconds_added_pct_of_plain_load"] <= 5,
        "save_peak_le_1.05x_model": res["b_prefill"]["peak_over_model"] <= 1.05,
        "concurrent_slowest_le_2x_single": res["e2_attach_together"]["slowest_over_single"] <= 2,
    }
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(markdown(res))
    print(markdown(res))


def markdown(r: dict) -> str:
    e, a, b, c, d, n, f = (r[k] for k in ("env", "a_plain", "b_prefill", "c_decode", "d_parity", "e_concurrent",
                                           "f_fit"))
    n2 = r["e2_attach_together"]
    gb = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    phases = lambda ps: ", ".join(f"{p['name']} {p['seconds'] * 1e3:.1f} ms" for p in ps)  # noqa: E731
    rows = [
        ("model", f"Llama-3-8B shape, {r['model']['layers']} layers, bf16, {gb(r['model']['bytes'])} in "
                  f"{r['model']['files']} safetensors files"),
        ("(a) plain from_pretrained, page cache warm", f"{a['load_seconds']:.2f} s load; peak GPU {gb(a['peak_gpu_bytes'])}; "
                                                     f"start to first token {a['process_to_first_token_seconds']:.1f} s"),
        ("(b) prefill with save", f"{b['total_seconds']:.2f} s total, +{b['seconds_added']:.3f} s "
                                  f"({b['seconds_added_pct_of_plain_load']:.1f}% of (a)); {phases(b['phases'])}"),
        ("(b) GPU memory during the save (align+serialize)", f"peak {gb(b['peak_gpu_bytes_during_save'])} incl. "
                              f"{gb(r['bare_process_gpu_bytes'])} context: {b['peak_over_model']:.3f} x model bytes "
                              f"(backend {b['backend']}); during the normal load before it: "
                              f"{gb(b['peak_gpu_bytes_during_load'])}; held afterwards: {gb(b['steady_gpu_bytes'])}"),
        ("(c) decode attach", f"{c['attach_seconds'] * 1e3:.1f} ms ({phases(c['phases'])}); "
                              f"{c['attach_speedup_over_plain_load']:.0f}x faster than (a)"),
        ("(c) decode process start to first token", f"{c['process_to_first_token_seconds']:.1f} s"),
        ("(c) weight bytes the decode allocated", f"{c['weight_bytes_allocated']} "
                                                  f"({c['weight_bytes_allocated_pct_of_model']:.4f}% of model)"),
        ("(c) decode GPU memory (peak, incl. context)", gb(c["peak_gpu_bytes"])),
        ("(d) parity of logits and greedy tokens a/b/c", f"logits {d['logits_equal']}, tokens {d['tokens_equal']}"),
        (f"(e) {n['instances']} decodes started at once (attaches overlap the others' start-up)",
         f"slowest attach {n['slowest_attach_seconds'] * 1e3:.1f} ms = "
                                                 f"{n['slowest_over_single']:.2f} x single; parity {n['all_parity']}"),
        (f"(e) {n['instances']} decodes waiting for an owner, attaching the moment it publishes",
         f"slowest attach {n2['slowest_attach_seconds'] * 1e3:.1f} ms = {n2['slowest_over_single']:.2f} x single "
         f"(their attaches began within {n2['attach_start_spread_seconds'] * 1e3:.0f} ms); parity {n2['all_parity']}"),
        (f"(e) GPU memory, owner + {n['instances']} decodes", f"{gb(n['shared_total_gpu_bytes'])} shared vs "
                                                            f"{gb(n['plain_total_gpu_bytes_computed'])} for "
                                                            f"{n['instances']} plain loads (computed)"),
        ("(f) instances that fit on the card", f"{f['attached_instances_fit']} sharing one copy vs "
                                               f"{f['plain_loads_fit']} plain loads (computed from measured costs)"),
    ]
    head = (f"Machine: {e['gpu']} ({gb(e['gpu_memory_bytes'])}), driver {e['driver']}, CUDA {e['cuda']}, "
            f"torch {e['torch']}, transformers {e['transformers']}, Python {e['python']}, {e['host_cpus']} CPUs\n\n")
    table = "| measure | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    targets = "\n\nTargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items())
    return head + table + targets + "\n"


if __name__ == "__main__":
    main()
