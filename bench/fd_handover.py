"""Where the time of handing CUDA VMM handles to an attacher goes (diagnostic for issue 3, part e).

    python bench/fd_handover.py --out DIR [--chunks 60] [--chunk-mib 256]

Sends the exported fds of `--chunks` VMM allocations over a Unix socket pair with
SCM_RIGHTS, as the owner does, and times sending, receiving, importing and closing them;
the same with as many memfds, so the kernel's cost of passing an fd is separated from the
driver's. Then the real path across processes: an owner process serves the fds with the backend's
FdServer and this process takes them with `receive_fds`, with and without a busy Python
thread on either side (a thread that holds the GIL delays each wake-up by up to the
interpreter's switch interval). Writes fd_handover.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def handover(fds: list[int], rounds: int) -> dict:
    """Median seconds to send and to receive all of `fds` in one SCM_RIGHTS message, and to close them."""
    send, recv, close = [], [], []
    for _ in range(rounds):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        t0 = time.perf_counter()
        socket.send_fds(a, [b"x"], fds)
        t1 = time.perf_counter()
        _msg, got, _flags, _ = socket.recv_fds(b, 16, len(fds))
        t2 = time.perf_counter()
        for fd in got:
            os.close(fd)
        t3 = time.perf_counter()
        a.close()
        b.close()
        send.append(t1 - t0)
        recv.append(t2 - t1)
        close.append(t3 - t2)
    med = statistics.median
    return {"fds": len(fds), "send_s": med(send), "receive_s": med(recv), "close_s": med(close),
            "receive_per_fd_ms": 1e3 * med(recv) / len(fds)}


def _busy(stop: threading.Event | None = None) -> None:
    while stop is None or not stop.is_set():
        pass


def serve(path: Path, chunks: int, busy: bool) -> None:
    """The owner's side: export `chunks` allocations, serve them until stdin closes."""
    import torch

    from sharedcache.backends import cuda_driver as cu
    from sharedcache.backends.fdpass import FdServer

    torch.cuda.init()
    cu.use_device(0)
    handles = [cu.mem_create(2 << 20, 0) for _ in range(chunks)]
    fds = [cu.export_fd(h) for h in handles]
    server = FdServer(path, lambda: ({"sizes": [2 << 20] * chunks}, list(fds)))
    if busy:
        threading.Thread(target=_busy, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()
    server.close()


def across_processes(chunks: int, rounds: int, owner_busy: bool, receiver_busy: bool) -> dict:
    from sharedcache.backends.fdpass import receive_fds

    path = Path(f"/tmp/sc-fd-diag-{os.getpid()}.sock")
    owner = subprocess.Popen([sys.executable, __file__, "--serve", str(path), str(chunks), str(int(owner_busy))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "ready"
    stop = threading.Event()
    if receiver_busy:
        threading.Thread(target=_busy, args=(stop,), daemon=True).start()
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            _header, fds = receive_fds(path, 10)
            times.append(time.perf_counter() - t0)
            for fd in fds:
                os.close(fd)
    finally:
        stop.set()
        owner.communicate("\n", timeout=30)
    return {"owner_busy": owner_busy, "receiver_busy": receiver_busy, "median_s": statistics.median(times),
            "max_s": max(times)}


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        return serve(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--chunk-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    import torch

    from sharedcache.backends import cuda_driver as cu

    torch.cuda.init()
    cu.use_device(0)
    res: dict = {"chunks": a.chunks, "chunk_mib": a.chunk_mib}
    for label, size in (("vmm_small_2mib", 2 << 20), ("vmm_chunk", a.chunk_mib << 20)):
        handles = [cu.mem_create(size, 0) for _ in range(a.chunks)]
        fds = [cu.export_fd(h) for h in handles]
        res[label] = handover(fds, a.rounds)
        # import cost: receive one copy, then import each (the driver's part of attaching)
        x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(x, [b"x"], fds)
        _m, got, _f, _ = socket.recv_fds(y, 16, len(fds))
        t0 = time.perf_counter()
        imported = [cu.import_fd_close_fd(fd) for fd in got]
        res[label]["import_all_s"] = time.perf_counter() - t0
        for h in imported + handles:
            cu.mem_release(h)
        for fd in fds:
            os.close(fd)
        x.close()
        y.close()
    memfds = [os.memfd_create(f"sc-diag-{i}") for i in range(a.chunks)]
    res["memfd"] = handover(memfds, a.rounds)
    for fd in memfds:
        os.close(fd)
    res["across_processes"] = [across_processes(a.chunks, a.rounds, ob, rb)
                               for ob, rb in ((False, False), (True, False), (False, True))]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fd_handover.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
