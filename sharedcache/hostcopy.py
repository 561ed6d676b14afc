"""A host copy of a published arena that outlives every process (cache.host_copy, off by default).

GPU memory (and a cpu_memfd) lives only while some process holds it: after a node drain or a restart of
every engine, the next owner would read the checkpoint again at page-cache speed. With a host copy the owner,
once published, copies its arena into the entry directory (tmpfs under the default cache.dir) on a thread of
its own, and a later owner that finds no live arena refills a new one from it: parallel reads into pinned
staging buffers, copied to the GPU while the next chunk is read, then checked against the content digest
(sharedcache.refill).
The cost is host memory equal to the arena's size, for as long as the copy stays (`sharedcache gc
--host-copies` removes every copy no process is reading).

<entry>/hostcopy.bin    the arena's bytes
<entry>/hostcopy.json   the manifest they were published under and their content digest; written last and
                        removed first, so a record always names a complete copy of those bytes
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ManifestError, StorageError
from .files import write_json_atomic
from .fingerprint import Fingerprint, differences
from .manifest import Manifest
from .manifest_parse import parse_manifest

if TYPE_CHECKING:  # torch is imported where bytes are moved: `sharedcache ls` and gc never need it
    import torch

    from .backends.base import Arena

log = logging.getLogger(__name__)
HOST_FILE, HOST_RECORD = "hostcopy.bin", "hostcopy.json"
HOST_TEMP = re.compile(r"^\.hostcopy\.bin\.\d+\.[0-9a-f]+\.tmp$")  # a copy being written
_OUT_CHUNK = 64 << 20  # the background copy's staging buffer
_ROW_WORDS = 4096  # the content digest sums 32 KiB rows of 64-bit words
_BLOCK_WORDS = 8 << 20
_RESERVE_LOCK = ".hostcopy.lock"  # in the cache directory: writers check free space and allocate one at a time


@dataclass(frozen=True)
class HostCopy:
    """A complete host copy in an entry directory, and what it holds."""

    path: Path
    manifest: Manifest  # as published when copied: layout, tensors, checksums, fingerprint, backend
    digest: str  # content_digest of the bytes
    copied_seconds: float

    @property
    def size(self) -> int:
        return self.manifest.arena.size

    def fits(self, manifest: Manifest) -> bool:
        """Does this copy hold `manifest`'s model in `manifest`'s layout?"""
        return (self.manifest.fingerprint.digest() == manifest.fingerprint.digest()
                and self.manifest.arena == manifest.arena)


def read_host_copy(entry_dir: Path) -> HostCopy | None:
    """The entry's host copy, None if there is none; a ManifestError when its record is not one of ours."""
    record, data = entry_dir / HOST_RECORD, None
    try:
        data = json.loads(record.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"host copy record {record} cannot be read: {e}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str) \
            or not isinstance(data.get("copied_seconds"), (int, float)):
        raise ManifestError(f"host copy record {record} is not a sharedcache host copy record.")
    copy = HostCopy(entry_dir / HOST_FILE, parse_manifest(data.get("manifest")), data["digest"],
                    float(data["copied_seconds"]))
    try:
        size = os.lstat(copy.path).st_size
    except FileNotFoundError:
        raise ManifestError(f"host copy record {record} names no {HOST_FILE} beside it.") from None
    if size != copy.size:
        raise ManifestError(f"host copy {copy.path} holds {size} bytes; its record says {copy.size}.")
    return copy


def usable(entry_dir: Path, fingerprint: Fingerprint) -> HostCopy | None:
    """The entry's host copy if it holds this model (one device part only), else None."""
    try:
        copy = read_host_copy(entry_dir)
    except ManifestError as e:
        log.warning("ignoring the host copy in %s: %s", entry_dir, e)
        return None
    if copy is None or copy.manifest.part is not None or differences(fingerprint, copy.manifest, spreads=False):
        return None
    return copy


def content_digest(base: torch.Tensor) -> str:
    """sha256 over the wrapping sums of every 32 KiB row of 64-bit words, computed where the bytes are (a GPU
    reads 16 GB in milliseconds): a changed, lost or moved row changes it. Not a defence against an adversary
    (the directory is private); a check that a refill put back what was copied."""
    import torch

    words = base.view(torch.int64)
    h = hashlib.sha256(f"{base.numel()}:".encode())
    for start in range(0, words.numel(), _BLOCK_WORDS):
        block = words[start:start + _BLOCK_WORDS]
        rows = block.numel() // _ROW_WORDS
        sums = block[:rows * _ROW_WORDS].view(rows, _ROW_WORDS).sum(dim=1)
        if block.numel() % _ROW_WORDS:
            sums = torch.cat([sums, block[rows * _ROW_WORDS:].sum().view(1)])
        h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()


def memory(t: torch.Tensor, offset: int, size: int) -> memoryview:
    """A buffer over `size` bytes of a CPU tensor's memory from `offset`, for the kernel to read or fill."""
    return memoryview((ctypes.c_char * size).from_address(t.data_ptr() + offset)).cast("B")


class HostWriter:
    """The owner's background copy of its published arena into the entry directory. Stopped (and its
    unfinished file removed) when the owner gives the arena up; a copy that already holds these bytes is kept
    as it is. Started at once, or, for an engine that settles (SGLang captures CUDA graphs after loading, and
    any CUDA call of another thread meanwhile invalidates the capture), once the owner marks itself settled."""

    def __init__(self, entry_dir: Path, manifest: Manifest, base: torch.Tensor) -> None:
        self.entry_dir, self.manifest = entry_dir, manifest
        self._base: torch.Tensor | None = base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"sharedcache-hostcopy-{manifest.key}")

    def start(self) -> None:
        if self._thread.ident is None and not self._stop.is_set():
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._base = None

    def _run(self) -> None:
        try:
            self._write()
        except Exception as e:  # noqa: BLE001 - a copy is optional: the owner serves on without it, and says why
            log.warning("no host copy of %s: %s", self.manifest.key, e)
        finally:
            self._base = None

    def _write(self) -> None:
        try:
            current = read_host_copy(self.entry_dir)
        except ManifestError:
            current = None
        if current is not None and current.fits(self.manifest):
            return  # the copy a predecessor made holds these bytes already
        discard(self.entry_dir)  # the record first: it names whatever hostcopy.bin holds
        tmp = self.entry_dir / f".{HOST_FILE}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            t0 = time.perf_counter()
            _reserve(fd, self.entry_dir, self.manifest.arena.size)
            digest = self._copy_out(fd)
            if digest is None or self._stop.is_set():  # stopped: the claim may be another owner's by now
                return
            os.rename(tmp, self.entry_dir / HOST_FILE)
            write_json_atomic(self.entry_dir / HOST_RECORD, {
                "manifest": self.manifest.to_json(), "digest": digest,
                "copied_seconds": round(time.perf_counter() - t0, 6)}, mode=0o600)
            log.info("host copy of %s written: %d bytes in %.2fs", self.manifest.key, self.manifest.arena.size,
                     time.perf_counter() - t0)
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def _copy_out(self, fd: int) -> str | None:
        """Every byte of the arena into `fd`, then its content digest; None when stopped first."""
        import torch

        base, size = self._base, self.manifest.arena.size
        if base.device.type == "cpu":
            for off in range(0, size, _OUT_CHUNK):
                if self._stop.is_set():
                    return None
                write_all(fd, memory(base, off, min(_OUT_CHUNK, size - off)), off)
            return content_digest(base)
        with torch.cuda.device(base.device):
            stream, staging = torch.cuda.Stream(), torch.empty(_OUT_CHUNK, dtype=torch.uint8, pin_memory=True)
            with torch.cuda.stream(stream):  # beside the engine's work, not in its streams
                for off in range(0, size, _OUT_CHUNK):
                    if self._stop.is_set():
                        return None
                    n = min(_OUT_CHUNK, size - off)
                    staging[:n].copy_(base[off:off + n], non_blocking=True)
                    stream.synchronize()
                    write_all(fd, memory(staging, 0, n), off)
                return content_digest(base)


def _reserve(fd: int, entry_dir: Path, size: int) -> None:
    """Allocate the copy's file, leaving the filesystem a margin (a full tmpfs would fail manifest writes and
    the engines' own shared memory); one writer per cache directory at a time decides."""
    lock = os.open(entry_dir.parent / _RESERVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = os.statvfs(entry_dir)
        free, margin = st.f_bavail * st.f_frsize, max(1 << 30, size // 20)
        if free < size + margin:
            raise StorageError(f"{entry_dir} has {free} bytes free; a host copy of {size} bytes needs {margin} "
                               "more to spare.", hint="Free host memory, or set cache.host_copy=false.")
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(lock)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Every byte of `data` into `fd` from `offset` (pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def discard(entry_dir: Path) -> None:
    """Remove the entry's host copy: the record first, so no reader takes a half-removed one."""
    (entry_dir / HOST_RECORD).unlink(missing_ok=True)
    (entry_dir / HOST_FILE).unlink(missing_ok=True)


def sweep(entry_dir: Path, published: Manifest) -> None:
    """On publishing (under the claim, so no writer of another owner lives): remove unfinished copies, and a
    host copy of another model or layout than the one just published."""
    for name in os.listdir(entry_dir):
        if HOST_TEMP.fullmatch(name):
            (entry_dir / name).unlink(missing_ok=True)
    try:
        copy = read_host_copy(entry_dir)
    except ManifestError:
        copy = None
        discard(entry_dir)
    if copy is None:  # a copy whose owner died between its rename and its record: unfinished
        (entry_dir / HOST_FILE).unlink(missing_ok=True)
    if copy is not None and not copy.fits(published):
        log.info("removing the host copy in %s: it holds another model or layout", entry_dir)
        discard(entry_dir)


def keep(settings: Any, claim: Any, manifest: Manifest, arena: Arena, *, now: bool) -> None:
    """After publishing: the host copy, where the entry asks for one and a process death can lose the arena
    (a cpu_shm file outlives every process already); started `now`, else when the owner settles."""
    if not settings.host_copy or manifest.part is not None or manifest.backend == "cpu_shm":
        return
    claim.host_writer = HostWriter(claim.entry.dir, manifest, arena.base)
    if now:
        claim.host_writer.start()
