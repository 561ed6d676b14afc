"""How fast a host copy refills the GPU (issue 23, item 4; goal >= 20 GB/s on an H100, stretch >= 40).

One cuda_vmm arena of --gib is filled with random bytes and copied into a host copy file in tmpfs, as the
owner's background copy would; then every refill plan (sharedcache.refill.RefillPlan) fills a new cuda_vmm
arena from that file, in turn, --repeats times, each refill checked against the file's content digest.
Each refill runs in a process of its own, one at a time, as a restarted owner refills: its threads and
pinned buffers are new. The default plan runs first and last in every round: the control (ratio 1.00
expected).
GB/s = arena bytes / `host_refill` seconds (staging buffers or page pinning included; the physical
memory's creation, `arena_commit`, and the digest check are timed apart).

    python bench/host_refill.py --out bench/results/h100-host-refill   # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from sharedcache import refill
from sharedcache.backends import get_backend
from sharedcache.hostcopy import content_digest, memory, write_all
from sharedcache.settings import CacheSettings

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PLANS = {  # name -> plan; "default" is refill.PLAN
    "default": refill.PLAN,
    "8 readers, 2 x 256 MiB (the first plan's sizes)": refill.RefillPlan(readers=8, chunk=256 * MIB, buffers=2,
                                                                          piece=32 * MIB),
    "12 readers, 4 x 128 MiB": refill.RefillPlan(readers=12, chunk=128 * MIB, piece=8 * MIB),
    "16 readers, 4 x 128 MiB": refill.RefillPlan(readers=16, chunk=128 * MIB, piece=8 * MIB),
    "24 readers": refill.RefillPlan(readers=24),
}


def settings(cache_dir: Path) -> CacheSettings:
    conf = yaml.safe_load((ROOT / "conf/cache/default.yaml").read_text())
    return CacheSettings.from_mapping({**conf, "dir": str(cache_dir), "key": "refill-bench", "backend": "cuda_vmm"})


def write_copy(base: torch.Tensor, path: Path) -> float:
    """The arena's bytes into `path` through one pinned buffer (as the owner's writer does); seconds."""
    t0, step = time.perf_counter(), 256 * MIB
    staging = torch.empty(step, dtype=torch.uint8, pin_memory=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for off in range(0, base.numel(), step):
            n = min(step, base.numel() - off)
            staging[:n].copy_(base[off:off + n])
            write_all(fd, memory(staging, 0, n), off)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def one_refill(entry_dir: Path, size: int, digest: str, plan: str) -> dict:
    """A process of its own refills a new arena by `plan`; its timings."""
    child = subprocess.run([sys.executable, __file__, "--one", plan, "--entry", str(entry_dir), "--size", str(size),
                            "--digest", digest], capture_output=True, text=True, timeout=300)
    if child.returncode:
        raise SystemExit(f"the refill by {plan!r} failed:\n{child.stdout}{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def refill_here(entry_dir: Path, size: int, digest: str, plan: refill.RefillPlan) -> dict:
    backend = get_backend("cuda_vmm", settings(entry_dir.parent))
    path = entry_dir / "hostcopy.bin"
    device = torch.device("cuda", torch.cuda.current_device())
    arena = backend.create(entry_dir, size, device)
    try:
        timings = refill.fill(path, size, arena, plan)
        t0 = time.perf_counter()
        ok = content_digest(arena.base) == digest
        timings["host_digest"] = time.perf_counter() - t0
    finally:
        arena.release()
        torch.cuda.empty_cache()
    return {**{k: round(v, 6) for k, v in timings.items()}, "digest_ok": ok,
            "gbps": round(size / timings["host_refill"] / 1e9, 2)}


def environment() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()[0].split(", ")
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"card": smi[0], "driver": smi[1], "torch": torch.__version__, "transformers": tf,
            "cpu_count": os.cpu_count(), "host": platform.node(),
            "commit": os.environ.get("COMMIT") or commit.stdout.strip() or None,
            "shm_free_bytes": shutil.disk_usage("/dev/shm").free}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=15.0, help="arena size (15 GiB ~ the Llama-3-8B arena)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plans", nargs="*", default=list(PLANS), help="names from PLANS (default: all)")
    ap.add_argument("--out", type=Path, help="writes <out>.json and <out>.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: one refill by this plan, timings to stdout
    ap.add_argument("--entry", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--digest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(refill_here(args.entry, args.size, args.digest, PLANS[args.one])))
        return
    if args.out is None:
        ap.error("--out is required")
    cache = Path(tempfile.mkdtemp(prefix="sc-refill-", dir="/dev/shm"))
    try:
        run(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args, cache: Path) -> None:
    backend = get_backend("cuda_vmm", settings(cache))
    entry_dir = cache / "refill-bench"
    entry_dir.mkdir(mode=0o700)
    device = torch.device("cuda", torch.cuda.current_device())
    size = int(args.gib * (1 << 30)) // (2 * MIB) * (2 * MIB)
    arena = backend.create(entry_dir, size, device)
    try:
        arena.commit(size)
        for off in range(0, size, 1 << 30):
            arena.base[off:off + (1 << 30)].random_(0, 256)
        torch.cuda.synchronize()
        digest = content_digest(arena.base)
        path = entry_dir / "hostcopy.bin"
        write_seconds = write_copy(arena.base, path)
    finally:
        arena.release()
        torch.cuda.empty_cache()
    order = ["default", *[p for p in args.plans if p != "default"], "default"]
    rounds = []
    for r in range(args.repeats):
        rounds.append([{"plan": name, **one_refill(entry_dir, size, digest, name)} for name in order])
        print(json.dumps(rounds[-1]), flush=True)
    report(args, size, write_seconds, rounds)


def report(args, size: int, write_seconds: float, rounds: list[list[dict]]) -> None:
    by_plan: dict[str, list[float]] = {}
    for rnd in rounds:
        for row in rnd[:-1]:
            by_plan.setdefault(row["plan"], []).append(row["host_refill"])
    first = [rnd[0]["host_refill"] for rnd in rounds]
    last = [rnd[-1]["host_refill"] for rnd in rounds]
    summary = {name: {"host_refill_seconds_median": statistics.median(v),
                      "gbps_median": round(size / statistics.median(v) / 1e9, 2),
                      "gbps_all": [round(size / x / 1e9, 2) for x in v]} for name, v in by_plan.items()}
    result = {
        **environment(), "arena_bytes": size, "repeats": args.repeats,
        "host_copy_write_gbps": round(size / write_seconds / 1e9, 2),
        "host_refill_gbps": summary["default"]["gbps_median"],
        "control_ratio": round(statistics.median(last) / statistics.median(first), 2),
        "all_digests_ok": all(row["digest_ok"] for rnd in rounds for row in rnd),
        "arena_commit_seconds_median": statistics.median(row["arena_commit"] for rnd in rounds for row in rnd),
        "plans": {name: {**summary[name], "plan": vars(PLANS[name])} for name in summary},
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Host copy refill into a new cuda_vmm arena ({size / 1e9:.2f} GB)", "",
             f"{result['card']}, driver {result['driver']}; torch {result['torch']}, transformers "
             f"{result['transformers']}; {result['cpu_count']} CPUs; commit {result['commit']}. "
             f"bench/host_refill.py, {args.repeats} rounds, each refill a process of its own (new threads and pinned "
             f"buffers, as a restarted owner has), medians; every refill checked against the copy's "
             f"content digest (all equal: {result['all_digests_ok']}).", "",
             "| plan | GB/s (median) | GB/s, each round |", "|---|---|---|"]
    lines += [f"| {name} | {s['gbps_median']} | {', '.join(map(str, s['gbps_all']))} |" for name, s in summary.items()]
    lines += ["", f"Control: the default plan again at the end of each round, ratio {result['control_ratio']} "
              f"(1.00 expected). Creating and mapping the arena's physical memory (`arena_commit`, apart): "
              f"{result['arena_commit_seconds_median']:.3f} s median. Writing the host copy (one thread, one "
              f"pinned 256 MiB buffer): {result['host_copy_write_gbps']} GB/s.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
