"""What a read-only CUDA VMM mapping gives an attacher: can it be made, do kernels read it at full
speed and bit-identically, and does a write fault instead of landing. One device call:

    python3 bench/device/cuda_readonly_probe.py --out $OUT/cuda-readonly.json

The owner (this process) creates a physical allocation, fills it, exports a POSIX fd; an attacher
(a child process, as a decode is) imports it and maps it twice, read-write and read-only, then times
the same matmuls reading weights through each mapping, compares results, and finally writes through
the read-only mapping in a grandchild (a fault poisons the CUDA context of the process it happens in).
Last, the owner's own mapping timed before and after its seal (read-only once published), alternated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROWS = COLS = 8192  # one 8192 x 8192 bf16 weight: 128 MiB, the size of a Llama-3-8B MLP matrix


def _map(cu, handle, size: int, gran: int, index: int, read_only: bool) -> int:
    ptr = cu.address_reserve(size, gran)
    cu.mem_map(ptr, size, handle)
    cu.set_access(ptr, size, index, read_only=read_only)
    return ptr


def _view(cu, ptr: int, size: int, index: int):
    import torch

    rng = cu.DeviceRange(ptr, size, index, on_release=lambda: None)
    return rng.as_tensor()[: ROWS * COLS * 2].view(torch.bfloat16).view(ROWS, COLS), rng


def attacher(fd: int, size: int, gran: int, write: bool) -> dict:
    import torch

    from sharedcache.backends import cuda_driver as cu

    cu.use_device(0)
    torch.cuda.init()
    handle = cu.import_fd_close_fd(fd)
    out: dict = {}
    try:
        ro_ptr = _map(cu, handle, size, gran, 0, read_only=True)
        out["read_only_map"] = "ok"
    except Exception as e:  # noqa: BLE001 - the finding is whether the driver accepts it
        return {"read_only_map": f"refused: {e}"}
    ro, _keep_ro = _view(cu, ro_ptr, size, 0)
    if write:
        try:
            ro.add_(1)
            torch.cuda.synchronize()
            out["write"] = "landed"
        except Exception as e:  # noqa: BLE001
            out["write"] = f"faulted: {type(e).__name__}: {str(e).splitlines()[0]}"
        return out
    rw_ptr = _map(cu, handle, size, gran, 0, read_only=False)
    rw, _keep_rw = _view(cu, rw_ptr, size, 0)
    x = torch.randn(4096, COLS, dtype=torch.bfloat16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    out["parity"] = bool(torch.equal(x @ ro.T, x @ rw.T)) and bool(torch.equal(ro, rw))
    times = {}
    for name, w in (("read_write", rw), ("read_only", ro), ("read_write_again", rw), ("read_only_again", ro)):
        for _ in range(5):
            x @ w.T
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            x @ w.T
        torch.cuda.synchronize()
        times[name] = round((time.perf_counter() - t0) / 50 * 1e3, 4)
    out["matmul_ms"] = times
    t = torch.empty_like(rw)
    for name, w in (("read_write", rw), ("read_only", ro)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            t.copy_(w)
        torch.cuda.synchronize()
        times_copy = (time.perf_counter() - t0) / 50
        out[f"copy_GBps_{name}"] = round(ROWS * COLS * 2 / times_copy / 1e9, 1)
    return out


def _mean_ms(fn, n: int) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1e3, 4)


def owner_seal(cu, ptr: int, size: int, w) -> dict:
    """The owner's own mapping before and after the seal (cuMemSetAccess to PROT_READ on the same range, as
    cuda_vmm's owner does once published), alternated four times: a prefill-shaped matmul (4096 rows) and
    decode-shaped ones (16 and 1 rows, bound by reading the weight), each the mean of many."""
    import torch

    g = torch.Generator("cuda").manual_seed(2)
    xs = {rows: torch.randn(rows, COLS, dtype=torch.bfloat16, device="cuda", generator=g) for rows in (4096, 16, 1)}
    reference = {rows: x @ w.T for rows, x in xs.items()}
    rounds = []
    for i, read_only in enumerate((False, True, False, True, False, True)):
        cu.set_access(ptr, size, 0, read_only=read_only)
        row = {"mapping": "read_only" if read_only else "read_write", "round": i}
        for rows, x in xs.items():
            row[f"x{rows}_ms"] = _mean_ms(lambda x=x: x @ w.T, 50 if rows == 4096 else 400)
            row[f"x{rows}_equal"] = bool(torch.equal(x @ w.T, reference[rows]))
        rounds.append(row)
    cu.set_access(ptr, size, 0, read_only=False)
    mean = {}
    for mapping in ("read_write", "read_only"):
        rows_of = [r for r in rounds if r["mapping"] == mapping]
        for key in (k for k in rounds[0] if k.endswith("_ms")):
            mean[f"{mapping}_{key}"] = round(sum(r[key] for r in rows_of) / len(rows_of), 4)
    ratios = {k: round(mean[f"read_only_{k}"] / mean[f"read_write_{k}"], 3)
              for k in (k for k in rounds[0] if k.endswith("_ms"))}
    return {"rounds": rounds, "mean": mean, "read_only_over_read_write": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--role", default="owner")
    ap.add_argument("--fd", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--gran", type=int)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    if a.role == "attacher":
        print(json.dumps(attacher(a.fd, a.size, a.gran, a.write)))
        return
    import torch

    from sharedcache.backends import cuda_driver as cu

    cu.use_device(0)
    torch.cuda.init()
    gran = cu.granularity(0)
    size = -(-ROWS * COLS * 2 // gran) * gran
    handle = cu.mem_create(size, 0)
    ptr = _map(cu, handle, size, gran, 0, read_only=False)
    w, _keep = _view(cu, ptr, size, 0)
    w.copy_(torch.randn(ROWS, COLS, dtype=torch.bfloat16, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    torch.cuda.synchronize()
    digest = float(w.float().sum())
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "weight_mib": ROWS * COLS * 2 >> 20}
    for label, extra in (("attacher", []), ("attacher_write", ["--write"])):
        fd = cu.export_fd(handle)
        os.set_inheritable(fd, True)
        res = subprocess.run([sys.executable, __file__, "--out", a.out, "--role", "attacher", "--fd", str(fd),
                              "--size", str(size), "--gran", str(gran), *extra], pass_fds=(fd,),
                             capture_output=True, text=True, timeout=300)
        os.close(fd)
        try:
            results[label] = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            results[label] = {"rc": res.returncode, "stderr": res.stderr[-2000:]}
        results[label]["rc"] = res.returncode
    torch.cuda.synchronize()
    results["owner_bytes_unchanged_after_write_attempt"] = float(w.float().sum()) == digest
    results["owner_seal"] = owner_seal(cu, ptr, size, w)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
