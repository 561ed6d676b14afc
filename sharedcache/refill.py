"""Refilling a new arena from the entry's host copy (sharedcache.hostcopy) instead of reading the checkpoint:
parallel reads from the copy (tmpfs: one thread's copy-out of the page cache is far below PCIe speed) into two
pinned staging buffers on CUDA, each copied to the GPU while the next chunk is read; then the content digest.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError
from .hostcopy import HostCopy, content_digest, discard, memory

if TYPE_CHECKING:
    import torch

    from .backends.base import Arena, Backend

_IN_CHUNK = 256 << 20  # each of the two staging buffers
_READERS = 8  # parallel reads per chunk


def _read_all(fd: int, into: memoryview, offset: int) -> None:
    while into:
        n = os.preadv(fd, [into], offset)
        if n == 0:
            raise IntegrityError(f"the host copy ended at byte {offset}, before the arena's end.",
                                 hint="Remove it with `sharedcache gc --host-copies`.")
        into, offset = into[n:], offset + n


def _read_parallel(pool: ThreadPoolExecutor, fd: int, into: torch.Tensor, offset: int, size: int) -> None:
    """`size` bytes of the file from `offset` into the CPU tensor `into`, in _READERS parallel reads."""
    piece = -(-size // _READERS)
    jobs = [pool.submit(_read_all, fd, memory(into, a, min(piece, size - a)), offset + a)
            for a in range(0, size, piece)]
    for job in jobs:
        job.result()


def refill(copy: HostCopy, arena: Arena) -> dict[str, float]:
    """Fill the new owner's `arena` with the host copy and check its digest: {"arena_commit": seconds to back
    the arena with memory, "host_refill": seconds of the copy (pinned buffers included), "host_digest": seconds
    of the check}. An IntegrityError when the bytes are not the copied ones."""
    size, base = copy.size, arena.base
    t_commit = time.perf_counter()
    arena.commit(size)  # cuda_vmm: create and map the physical chunks, apart from the copy's time
    t0 = time.perf_counter()
    fd = os.open(copy.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with ThreadPoolExecutor(_READERS, thread_name_prefix="sharedcache-refill") as pool:
            if base.device.type == "cpu":
                _read_parallel(pool, fd, base, 0, size)
            else:
                _refill_device(pool, fd, base, size)
    finally:
        os.close(fd)
    arena.sync()
    t1 = time.perf_counter()
    if content_digest(base) != copy.digest:
        raise IntegrityError(f"the bytes refilled from {copy.path} do not match its content digest.",
                             hint="The host copy was changed or damaged; it is removed and the model loaded.")
    return {"arena_commit": t0 - t_commit, "host_refill": t1 - t0, "host_digest": time.perf_counter() - t1}


def _refill_device(pool: ThreadPoolExecutor, fd: int, base: torch.Tensor, size: int) -> None:
    """Two pinned buffers: while one is copied to the GPU, the next chunk is read into the other."""
    import torch

    with torch.cuda.device(base.device):
        stream = torch.cuda.Stream()
        staging = [torch.empty(min(_IN_CHUNK, size), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        copied: list[Any] = [None, None]
        try:
            with torch.cuda.stream(stream):
                for i, off in enumerate(range(0, size, _IN_CHUNK)):
                    k, n = i % 2, min(_IN_CHUNK, size - off)
                    if copied[k] is not None:
                        copied[k].synchronize()  # the buffer's last chunk has reached the GPU
                    _read_parallel(pool, fd, staging[k], off, n)
                    base[off:off + n].copy_(staging[k][:n], non_blocking=True)
                    copied[k] = torch.cuda.Event()
                    copied[k].record(stream)
        finally:  # also on a failed read: no copy may still run into an arena about to be released
            stream.synchronize()


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
