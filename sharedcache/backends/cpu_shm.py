"""cpu_shm: the arena is one file in the cache directory (tmpfs under /dev/shm by default),
memory-mapped MAP_SHARED by the owner and every attacher."""
from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import stat
import warnings
from pathlib import Path

import torch

from ..errors import ArenaError
from ..manifest import Manifest
from . import register_backend
from .base import Arena, Backend

_FILE = re.compile(r"^arena-[A-Za-z0-9_.-]{1,64}\.bin$")


@register_backend
class CpuShmBackend(Backend):
    name = "cpu_shm"
    survives_owner = True  # the file outlives its creator until unlinked
    attach_needs_owner = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def granularity(self, device: torch.device) -> int:
        return mmap.PAGESIZE

    def create(self, entry_dir: Path, size: int, device: torch.device) -> Arena:
        if device.type != "cpu":
            raise ArenaError(f"cpu_shm holds CPU tensors only, the model is on {device}.")
        name = f"arena-{os.getpid()}-{secrets.token_hex(6)}.bin"
        path = entry_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # fail now with ENOSPC, not later with SIGBUS
            except OSError as e:
                raise ArenaError(f"cannot reserve {size} bytes for {path}: {e.strerror}.",
                                 hint="Free memory in that filesystem (df -h) or point cache.dir elsewhere.") from e
            base = _map(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return Arena(base, {"file": name}, {"type": "cpu", "index": None, "uuid": None}, owned=True,
                     _release=lambda: path.unlink(missing_ok=True))

    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena:
        path = _arena_path(entry_dir, manifest)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArenaError(f"arena file {path} is gone (the owner removed its entry, or the directory was "
                             "cleaned).", hint="Start the prefill (owner) again, then attach.") from None
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise ArenaError(f"cannot open arena file {path}: {why}.") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise ArenaError(f"arena file {path} is not a regular file of yours; refusing to map it.")
            if st.st_size < manifest.arena.size:
                raise ArenaError(f"arena file {path} holds {st.st_size} bytes but the manifest says "
                                 f"{manifest.arena.size}; it is truncated.",
                                 hint="Remove the entry and start the prefill again.")
            base = _map(fd, manifest.arena.size)
        finally:
            os.close(fd)
        return Arena(base, dict(manifest.handle), {"type": "cpu", "index": None, "uuid": None}, owned=False)


def _arena_path(entry_dir: Path, manifest: Manifest) -> Path:
    """The arena file named by the manifest; a name that could leave the entry directory is refused."""
    name = manifest.handle.get("file")
    if set(manifest.handle) != {"file"} or not isinstance(name, str) or not _FILE.fullmatch(name):
        raise ArenaError(f"manifest handle {manifest.handle!r} does not name an arena file inside the entry.",
                         hint="Remove the entry and re-publish it.")
    return entry_dir / name


def _map(fd: int, size: int) -> torch.Tensor:
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the tensor holds the mmap object: munmap happens when the last view dies
        return torch.frombuffer(mm, dtype=torch.uint8)
