"""cpu_memfd: the arena is an anonymous memory file (memfd_create), handed to attachers as an fd over a
Unix socket (SCM_RIGHTS, same uid only), like cuda_vmm's physical memory. It lives exactly as long as
some process holds its fd or maps it: nothing is left in the cache directory to collect, and the owner
seals it against shrinking, growing and new writable mappings once published, so no process of the
user can truncate it under the instances that map it (a cpu_shm file can be).

Every mapper keeps the fd and can hand it on (sharedcache.handon): when the owner dies, a surviving
mapper serves it, and a restarted owner takes the arena over from that mapper instead of loading. When
the last holder ends, the memory is gone and the entry is stale. Choose it with cache.backend=cpu_memfd.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re
import time
import weakref
from pathlib import Path

import torch

from ..cache import ARENA_ID as _ARENA
from ..errors import ArenaError, HandoverError, IntegrityError, StorageError
from ..manifest import Manifest
from .base import Arena, Backend
from .cpu_shm import map_fd, protect_read_only

_CPU = {"type": "cpu", "index": None, "uuid": None}
_SOCKET = re.compile(r"^arena-[A-Za-z0-9_.-]{1,64}\.sock$")
_F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1: no new writable mapping or write(); the owner's own stays


class _OwnerArena(Arena):
    """The owner's memfd: filled through its own writable mapping, sealed once published, handed out by
    its relay until release."""

    def __init__(self, base: torch.Tensor, mm: mmap.mmap, fd: int, relay) -> None:
        super().__init__(base, {"socket": relay.socket, "arena": relay.arena}, dict(_CPU), owned=True, lifetime=mm)
        self._fd, self._relay = fd, relay

    def seal(self) -> None:
        protect_read_only(self.base)
        try:
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | _F_SEAL_FUTURE_WRITE)
        except OSError:  # a kernel before 5.1 knows no future-write seal: the size seals still hold
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

    def _drop_claim(self) -> None:
        self._relay.close()  # closes the fd too: the memory lives on in every mapping of it


class _AdoptedArena(Arena):
    """An arena a dead owner left, taken over by a new owner: mapped as an attacher maps it; on release its
    relay stops serving (the memory lives on in every other holder)."""

    def __init__(self, mapped: Arena, relay) -> None:
        super().__init__(mapped.base, mapped.handle, mapped.device, owned=False, lifetime=mapped.lifetime)
        self._relay = relay

    def _drop_claim(self) -> None:
        self._relay.close()


class CpuMemfdBackend(Backend):
    name = "cpu_memfd"
    survives_owner = True  # the memory lives while any mapper holds it
    attach_needs_owner = True  # the fd comes from whoever serves it: the owner, or a mapper after it
    adopts = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if hasattr(os, "memfd_create") else "this system has no memfd_create (Linux 3.17+ only)."

    def granularity(self, device: torch.device) -> int:
        return mmap.PAGESIZE

    def create(self, entry_dir: Path, size: int, device: torch.device) -> Arena:
        from ..handon import Relay, new_arena_id

        if device.type != "cpu":
            raise ArenaError(f"cpu_memfd holds CPU tensors only, the model is on {device}.")
        arena = new_arena_id()
        fd = os.memfd_create(f"sharedcache-{arena}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # fail now for want of memory, not later with SIGBUS
            except OSError as e:
                raise StorageError.from_os(e, f"reserving {size} bytes of memory for the arena") from None
            base, mm = map_fd(fd, size, entry_dir, writable=True)
            relay = Relay(entry_dir, arena, [fd], {"bytes": size}, owner=True)
        except BaseException:
            os.close(fd)
            raise
        return _OwnerArena(base, mm, fd, relay)

    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena:
        return self._map(entry_dir, manifest)[0]

    def adopt(self, entry_dir: Path, manifest: Manifest) -> Arena:
        mapped, relay = self._map(entry_dir, manifest)
        return _AdoptedArena(mapped, relay)

    @classmethod
    def orphan_attachable(cls, entry_dir: Path, manifest: Manifest) -> bool:
        from ..handon import orphan_served

        return orphan_served(entry_dir, manifest)

    def _map(self, entry_dir: Path, manifest: Manifest) -> tuple[Arena, object]:
        """Receive the fd from whoever serves it, map it read-only, and keep it in a relay that lives as long
        as the mapping."""
        from ..handon import Relay, receive_served

        h = manifest.handle
        if set(h) != {"socket", "arena"} or not _SOCKET.fullmatch(str(h["socket"])) \
                or not _ARENA.fullmatch(str(h["arena"])):
            raise HandoverError(f"manifest handle {h!r} does not name a socket and an arena inside the entry.",
                                hint="Remove the entry and re-publish it.")
        t0 = time.perf_counter()
        header, fds = receive_served(entry_dir, manifest, self.settings.handle_timeout_s)
        try:
            size = manifest.arena.size
            if len(fds) != 1 or header.get("bytes") != size or os.fstat(fds[0]).st_size < size:
                raise IntegrityError(f"the server of {entry_dir} handed over {len(fds)} fds for {header.get('bytes')!r} "
                                     f"bytes; the manifest describes one arena of {size} bytes.",
                                     hint="Remove the entry and start the prefill again.")
            base, mm = map_fd(fds[0], size, entry_dir, writable=False)
            relay = Relay(entry_dir, h["arena"], fds, {"bytes": size}, owner=False)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        weakref.finalize(mm, relay.close)  # the relay (and the fd it keeps) lives as long as the mapping
        arena = Arena(base, dict(h), dict(_CPU), owned=False, lifetime=mm, relay=relay)
        arena.timings = {"receive_handles": time.perf_counter() - t0}
        return arena, relay

