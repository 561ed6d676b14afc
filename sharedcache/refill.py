"""Refilling a new arena from the entry's host copy (sharedcache.hostcopy) instead of reading the checkpoint.

The copy lies in tmpfs: one thread's copy-out of the page cache runs far below PCIe speed, so readers in
parallel fill pinned staging buffers, each copied to the GPU while the others are read. Then the content
digest, computed on the GPU. bench/host_refill.py measured the plan's sizes; pinning the copy's own pages in
place (cuMemHostRegister) and letting the driver stage pageable memory were 3 and 5 times slower on an H100
(bench/results/h100-host-refill-plans.md).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError
from .hostcopy import HostCopy, content_digest, discard, memory

if TYPE_CHECKING:
    import torch

    from .backends.base import Arena, Backend

@dataclass(frozen=True)
class RefillPlan:
    """How a refill moves the bytes into the GPU."""

    readers: int = 16  # threads reading the copy (one reads ~2 GB/s out of tmpfs on the H100's host)
    chunk: int = 64 << 20  # bytes per GPU copy, and per pinned staging buffer
    buffers: int = 4  # staging buffers in turn
    piece: int = 16 << 20  # bytes per read

    def __post_init__(self) -> None:
        if min(self.readers, self.chunk, self.buffers, self.piece) < 1:
            raise ValueError(f"not a refill plan: {self}")


PLAN = RefillPlan()


def _read_all(fd: int, into: memoryview, offset: int) -> None:
    while into:
        n = os.preadv(fd, [into], offset)
        if n == 0:
            raise IntegrityError(f"the host copy ended at byte {offset}, before the arena's end.",
                                 hint="Remove it with `sharedcache gc --host-copies`.")
        into, offset = into[n:], offset + n


def fill(path: Path, size: int, arena: Arena, plan: RefillPlan = PLAN) -> dict[str, float]:
    """The first `size` bytes of the file at `path` into the new `arena`: {"arena_commit": seconds to back
    the arena with memory, "host_refill": seconds of the copy, staging buffers included}."""
    base = arena.base
    t_commit = time.perf_counter()
    arena.commit(size)  # cuda_vmm: create and map the physical chunks, apart from the copy's time
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with ThreadPoolExecutor(plan.readers, thread_name_prefix="sharedcache-refill") as pool:
            if base.device.type == "cpu":
                _wait_all([pool.submit(_read_all, fd, memory(base, a, min(plan.piece, size - a)), a)
                          for a in range(0, size, plan.piece)])
            else:
                _staged(pool, fd, base, size, plan)
    finally:
        os.close(fd)
    arena.sync()
    return {"arena_commit": t0 - t_commit, "host_refill": time.perf_counter() - t0}


def refill(copy: HostCopy, arena: Arena, plan: RefillPlan = PLAN) -> dict[str, float]:
    """Fill the new owner's `arena` with the host copy and check its digest: fill()'s timings and
    "host_digest", the check's seconds. An IntegrityError when the bytes are not the copied ones."""
    timings = fill(copy.path, copy.size, arena, plan)
    t1 = time.perf_counter()
    if content_digest(arena.base) != copy.digest:
        raise IntegrityError(f"the bytes refilled from {copy.path} do not match its content digest.",
                             hint="The host copy was changed or damaged; it is removed and the model loaded.")
    return {**timings, "host_digest": time.perf_counter() - t1}


def _wait_all(jobs: list[Future]) -> None:
    """Every job finished (none still writes into memory about to be freed); the first failure raised."""
    wait(jobs)
    for job in jobs:
        job.result()


def _staged(pool: ThreadPoolExecutor, fd: int, base: torch.Tensor, size: int, plan: RefillPlan) -> None:
    """`plan.buffers` pinned buffers in turn. The reads of a buffer's next chunk are queued as soon as its
    copy is queued, each first waiting for that copy to land, so the readers never wait for the GPU's turn;
    the first chunk is read while the other buffers are pinned."""
    import torch

    chunks = [(off, min(plan.chunk, size - off)) for off in range(0, size, plan.chunk)]
    turns = min(plan.buffers, len(chunks))
    with torch.cuda.device(base.device):
        stream = torch.cuda.Stream()
        staging: list[torch.Tensor] = []
        reads: dict[int, list[Future]] = {}

        def queue_reads(i: int, after: Any) -> None:
            off, n = chunks[i]
            if len(staging) < turns:
                staging.append(torch.empty(min(plan.chunk, size), dtype=torch.uint8, pin_memory=True))
            buf = staging[i % turns]
            reads[i] = [pool.submit(_read_after, after, fd, memory(buf, a, min(plan.piece, n - a)), off + a)
                        for a in range(0, n, plan.piece)]

        try:
            for i in range(turns):
                queue_reads(i, None)
            with torch.cuda.stream(stream):
                for i, (off, n) in enumerate(chunks):
                    _wait_all(reads.pop(i))
                    base[off:off + n].copy_(staging[i % turns][:n], non_blocking=True)
                    landed = torch.cuda.Event()
                    landed.record(stream)
                    if i + turns < len(chunks):
                        queue_reads(i + turns, landed)
        finally:  # also on a failed read: no read or copy may still run into memory about to be released
            for jobs in reads.values():
                wait(jobs)
            stream.synchronize()


def _read_after(landed: Any, fd: int, into: memoryview, offset: int) -> None:
    if landed is not None:
        landed.synchronize()  # the buffer's previous chunk has reached the GPU
    _read_all(fd, into, offset)


def refilled(backend: Backend, entry_dir: Path, copy: HostCopy, device: torch.device) -> Arena:
    """A new arena of `backend` on `device`, filled from the host copy; nothing is left if that fails (a copy
    that fails its digest is removed)."""
    arena = backend.create(entry_dir, copy.size, device)
    try:
        arena.timings = {**arena.timings, **refill(copy, arena)}
    except BaseException as e:
        arena.release()
        if isinstance(e, IntegrityError):
            discard(entry_dir)
        raise
    return arena
