"""cpu_shm: the arena is one file in the cache directory (tmpfs under /dev/shm by default), mapped
MAP_SHARED read-write by the owner while it fills it (read-only once published), and read-only by every attacher, so that a stray
write in an attached instance faults in that instance instead of changing what every instance computes.

The file outlives its owner, so a decode can attach to an orphaned arena. The price: a process of the
same user that truncates the file kills the instances that map it (SIGBUS on their next access). tmpfs
files cannot be sealed against shrinking (F_ADD_SEALS: EPERM; only memfds can), and a sealed memfd
lives only while some process holds it, which would end orphan attach; the same user could kill those
instances anyway. So the protection is against accidents, not the user: a 0700 directory, 0600 files
named `arena-*.bin` that gc removes only when nothing is attached, and an attach that refuses links."""
from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
import warnings
from pathlib import Path

import torch

from ..cache import ARENA_FILE
from ..errors import ArenaError, EntryError, HandoverError, IntegrityError, OwnerGone, SharedCacheError, StorageError
from ..manifest import Manifest
from .base import Arena, Backend


_CPU = {"type": "cpu", "index": None, "uuid": None}  # the manifest's device record (each arena gets a copy)


class _OwnerArena(Arena):
    """The owner's arena: its file is removed on release (attachers' mappings stay valid), and its
    mapping is made read-only once published."""

    def __init__(self, base: torch.Tensor, mm: mmap.mmap, path: Path) -> None:
        super().__init__(base, {"file": path.name}, dict(_CPU), owned=True, lifetime=mm)
        self._path = path

    def seal(self) -> None:
        protect_read_only(self.base)

    def _drop_claim(self) -> None:
        self._path.unlink(missing_ok=True)


class _AdoptedArena(Arena):
    """An arena a dead owner left, taken over by a new owner: mapped read-only as an attacher maps it (the
    new owner allocated none of it), its file removed on release as the owner's own."""

    def __init__(self, mapped: Arena, path: Path) -> None:
        super().__init__(mapped.base, mapped.handle, mapped.device, owned=False, lifetime=mapped.lifetime)
        self._path = path

    def _drop_claim(self) -> None:
        self._path.unlink(missing_ok=True)


class CpuShmBackend(Backend):
    name = "cpu_shm"
    survives_owner = True  # the file outlives its creator until unlinked
    attach_needs_owner = False
    adopts = True  # the file a dead owner left is there to map: a restarted owner takes it over

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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError.from_os(e, f"creating arena file {path}") from None
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # fail now with ENOSPC, not later with SIGBUS
            except OSError as e:
                raise StorageError.from_os(e, f"reserving {size} bytes for arena file {path}") from None
            base, mm = map_fd(fd, size, path, writable=True)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return _OwnerArena(base, mm, path)

    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena:
        path = _arena_path(entry_dir, manifest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OwnerGone(f"arena file {path} is gone (the owner removed its entry, or the directory was "
                            "cleaned).", hint="Start the prefill (owner) again, then attach.") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR):
                raise EntryError(f"arena file {path} is {'a symbolic link' if e.errno == errno.ELOOP else 'a directory'}"
                                 "; refusing to map it.", hint="Remove the entry and start the prefill again.") from None
            raise StorageError.from_os(e, f"opening arena file {path}") from None
        try:
            _check_arena_file(os.fstat(fd), path, manifest)
            base, mm = map_fd(fd, manifest.arena.size, path, writable=False)
        finally:
            os.close(fd)
        return Arena(base, dict(manifest.handle), dict(_CPU), owned=False, lifetime=mm)

    def adopt(self, entry_dir: Path, manifest: Manifest) -> Arena:
        return _AdoptedArena(self.attach(entry_dir, manifest), _arena_path(entry_dir, manifest))

    @classmethod
    def orphan_attachable(cls, entry_dir: Path, manifest: Manifest) -> bool:
        try:
            path = _arena_path(entry_dir, manifest)
            _check_arena_file(os.lstat(path), path, manifest)
        except (SharedCacheError, OSError):
            return False
        return True


def _check_arena_file(st: os.stat_result, path: Path, manifest: Manifest) -> None:
    """What an attach accepts: one plain file of ours, as large as the manifest says."""
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise EntryError(f"arena file {path} is not a regular file of yours; refusing to map it.",
                         hint="Remove the entry and start the prefill again.")
    if st.st_nlink != 1:  # another name for the same bytes: writes through it would change our weights
        raise EntryError(f"arena file {path} has {st.st_nlink} hard links; an arena has exactly one "
                         "name. Refusing to map it.", hint="Remove the entry and start the prefill again.")
    if st.st_size < manifest.arena.size:
        raise IntegrityError(f"arena file {path} holds {st.st_size} bytes but the manifest says "
                             f"{manifest.arena.size}; it is truncated.",
                             hint="Remove the entry and start the prefill again.")


def _arena_path(entry_dir: Path, manifest: Manifest) -> Path:
    """The arena file named by the manifest; a name that could leave the entry directory is refused."""
    name = manifest.handle.get("file")
    if set(manifest.handle) != {"file"} or not isinstance(name, str) or not ARENA_FILE.fullmatch(name):
        raise HandoverError(f"manifest handle {manifest.handle!r} does not name an arena file inside the entry.",
                            hint="Remove the entry and re-publish it.")
    return entry_dir / name


def map_fd(fd: int, size: int, path: Path, *, writable: bool) -> tuple[torch.Tensor, mmap.mmap]:
    """The tensor viewing the mapping, and the mmap object whose life is the mapping's (the tensor's
    storage holds it: munmap happens when the last view dies)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    except OSError as e:
        raise StorageError.from_os(e, f"mapping {size} bytes of arena file {path}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: torch warns that writing it is undefined
        return torch.frombuffer(mm, dtype=torch.uint8), mm


def protect_read_only(base: torch.Tensor) -> None:
    """mprotect the owner's mapping to PROT_READ (it starts page-aligned and spans whole pages)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    size = -(-base.numel() // mmap.PAGESIZE) * mmap.PAGESIZE
    if libc.mprotect(base.data_ptr(), size, mmap.PROT_READ) != 0:
        err = ctypes.get_errno()
        raise StorageError.from_os(OSError(err, os.strerror(err)), "making the published arena read-only")
