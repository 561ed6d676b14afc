"""cuda_vmm: the arena is CUDA VMM physical memory (cuMemCreate, POSIX fd handles) mapped
into one reserved virtual range. The owner serves the fds over a Unix socket; an
attacher imports and maps them. Imported memory outlives the owner: it is freed only
when the last process unmaps it and closes its fds.

Every mapper keeps a copy of the fds it received (sharedcache.handon): when the owner dies, a
surviving mapper serves them to new attachers, and a restarted owner takes the arena over from it
instead of loading a second copy.

Save path: the virtual range is reserved at once, but physical chunks are created and
mapped only as the packing reaches them, after the originals already moved have been
given back to the driver, so the save's peak stays near one copy of the model."""
from __future__ import annotations

import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import ARENA_ID
from ..errors import ArenaError, DriverError, HandoverError
from ..devices import device_index
from ..layout import align_up
from ..manifest import Manifest
from . import cuda_driver as cu
from .base import Arena, Backend

log = logging.getLogger(__name__)
_SOCKET = re.compile(r"^arena-[A-Za-z0-9_.-]{1,64}\.sock$")
_HANDLE_KEYS = {"socket", "arena", "chunks", "chunk_bytes"}
_MAX_CHUNKS = 4096  # each chunk is an fd held by every process that maps the arena


@dataclass
class _OwnerChunks:
    """The owner's side of a VMM arena: what is mapped so far and the fds that export it."""

    ptr: int
    size: int
    index: int
    chunk: int
    handle: dict
    sizes: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        return sum(self.sizes)

    def commit(self, upto: int) -> None:
        while self.mapped < min(upto, self.size):
            if len(self.sizes) >= _MAX_CHUNKS:
                raise ArenaError(f"the arena needs more than {_MAX_CHUNKS} chunks of {self.chunk} bytes.",
                                 hint="Raise cache.vmm_chunk_mib.")
            size = min(self.chunk, self.size - self.mapped)
            torch.cuda.empty_cache()  # hand the originals already moved back to the driver first
            handle = cu.mem_create(size, self.index)
            try:
                cu.mem_map(self.ptr + self.mapped, size, handle)
                try:
                    cu.set_access(self.ptr + self.mapped, size, self.index)
                    fd = cu.export_fd(handle)
                except BaseException:
                    cu.mem_unmap(self.ptr + self.mapped, size)
                    raise
            finally:
                cu.mem_release(handle)  # the mapping and the exported fd keep the memory alive
            self.sizes.append(size)
            self.fds.append(fd)
            self.handle["chunks"] = len(self.sizes)

    def unmap(self) -> None:
        _unmap_chunks(self.index, self.ptr, self.sizes, self.size)


def _unmap_chunks(index: int, ptr: int, sizes: list[int], reserved: int) -> None:
    """Unmap each mapped chunk (an unmap must cover whole mappings), then free the reserved range."""
    cu.quietly(cu.use_device, index)
    offset = 0
    for size in sizes:
        cu.quietly(cu.mem_unmap, ptr + offset, size)
        offset += size
    cu.quietly(cu.address_free, ptr, reserved)


class _OwnerArena(Arena):
    """The owner's arena: chunks mapped as the packing reaches them, their fds (the relay's) served to
    attachers until release. (The unmapping is the DeviceRange's finalizer's, through `chunks`, which holds
    no view: the memory goes with the last view, not with this object.)"""

    def __init__(self, base: torch.Tensor, chunks: _OwnerChunks, relay) -> None:
        super().__init__(base, chunks.handle, cu.device_record(chunks.index), owned=True)
        self._chunks, self._relay = chunks, relay

    def commit(self, upto: int) -> None:
        self._chunks.commit(upto)

    def sync(self) -> None:
        cu.settle(self._chunks.index)

    def seal(self) -> None:
        """Once published, the owner maps the arena read-only as its attachers do: an in-place write by the owner
        (a weight update, a stray kernel) faults in the owner instead of changing what every decode computes.
        A driver that refuses the change costs that protection only, not the published entry: logged, not raised."""
        c = self._chunks
        cu.settle(c.index)  # no write of the save still in flight when the access changes
        try:
            cu.set_access(c.ptr, c.mapped, c.index, read_only=True)
        except DriverError as e:
            log.warning("cuda_vmm: the owner's mapping stays writable (%s); attached instances still map it "
                        "read-only", e)

    def _drop_claim(self) -> None:
        self._relay.close()  # stops serving and closes the fds (a forked child's call does nothing)


class _AdoptedArena(Arena):
    """An arena a dead owner left, taken over by a new owner: mapped as an attacher maps it; on release its
    relay stops serving (the memory lives on in every other holder)."""

    def __init__(self, mapped: Arena, relay) -> None:
        super().__init__(mapped.base, mapped.handle, mapped.device, owned=False, lifetime=mapped.lifetime)
        self.timings, self._relay = mapped.timings, relay

    def _drop_claim(self) -> None:
        self._relay.close()


class CudaVmmBackend(Backend):
    name = "cuda_vmm"
    survives_owner = True
    attach_needs_owner = True  # the fds come from whoever serves them: the owner, or a mapper after it
    adopts = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = cu.unavailable_reason()
        if reason:
            return reason
        for attr in ("CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
                     "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"):
            if not cu.attribute(torch.cuda.current_device(), attr):
                return f"the driver reports {attr} = 0 for this GPU."
        return None

    def granularity(self, device: torch.device) -> int:
        return cu.granularity(device_index(device))

    def create(self, entry_dir: Path, size: int, device: torch.device) -> Arena:
        from ..handon import Relay, new_arena_id

        settings = self.settings
        index = device_index(device)
        cu.use_device(index)
        gran = cu.granularity(index)
        if size % gran:
            raise ArenaError(f"arena size {size} is not a multiple of the granularity {gran}.")
        chunk = align_up(settings.vmm_chunk_mib << 20, gran)
        arena = new_arena_id()
        handle = {"socket": "", "arena": arena, "chunks": 0, "chunk_bytes": chunk}
        ptr = cu.address_reserve(size, gran)
        state = _OwnerChunks(ptr, size, index, chunk, handle)
        rng = cu.DeviceRange(ptr, size, index, on_release=state.unmap)
        relay = Relay(entry_dir, arena, state.fds, {"sizes": state.sizes}, owner=True)  # both lists grow
        try:
            handle["socket"] = relay.socket
            state.commit(1)  # torch views mapped memory only
            return _OwnerArena(rng.as_tensor(), state, relay)
        except BaseException:
            relay.close()
            raise

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
        """Receive the fds from whoever serves them, import and map them read-only, and keep a copy of them
        in a relay that lives as long as the mapping (so this process can hand the arena on)."""
        from ..handon import Relay, receive_served

        h = manifest.handle
        if set(h) != _HANDLE_KEYS or not isinstance(h["socket"], str) or not _SOCKET.fullmatch(h["socket"]) \
                or not ARENA_ID.fullmatch(str(h["arena"])):
            raise HandoverError(f"manifest handle {h!r} does not name an owner socket and arena inside the entry.",
                                hint="Remove the entry and re-publish it.")
        index = cu.local_index(manifest)
        cu.use_device(index)
        t0 = time.perf_counter()
        header, fds = receive_served(entry_dir, manifest, self.settings.handle_timeout_s)
        received = time.perf_counter() - t0
        sizes = header.get("sizes")
        if not (isinstance(sizes, list) and all(type(x) is int and x > 0 for x in sizes)
                and len(sizes) == len(fds) == h["chunks"] and sum(sizes) == manifest.arena.size):
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"the owner sent {len(fds)} chunks of {sizes!r} bytes; the manifest describes "
                                f"{h['chunks']} chunks, {manifest.arena.size} bytes in all.")
        kept = _keep(fds)
        try:
            arena = _import(fds, sizes, manifest, index)
            relay = Relay(entry_dir, h["arena"], kept, {"sizes": list(sizes)}, owner=False)
        except BaseException:
            for fd in kept:
                os.close(fd)
            raise
        weakref.finalize(arena.lifetime, relay.close)  # the fds are kept exactly as long as the mapping
        arena.relay = relay
        arena.timings = {"receive_handles": received, "import_and_map": time.perf_counter() - t0 - received,
                         "connect": header.get("connect_s", 0.0), "owner_answer": header.get("answered_in_s", 0.0)}
        return arena, relay


def _keep(fds: list[int]) -> list[int]:
    """A close-on-exec copy of each received fd (importing consumes the originals); on failure none is left."""
    kept: list[int] = []
    try:
        for fd in fds:
            kept.append(os.dup(fd))  # Python's dup makes the copy non-inheritable
    except BaseException:
        for fd in kept + fds:
            os.close(fd)
        raise
    return kept


def _import(fds: list[int], sizes: list[int], manifest: Manifest, index: int) -> Arena:
    """Import every handle first, then reserve and map; on any failure undo it all."""
    handles, mapped, offset, ptr = [], [], 0, None
    try:
        for i, fd in enumerate(fds):
            fds[i] = -1
            handles.append(cu.import_fd_close_fd(fd))
        ptr = cu.address_reserve(manifest.arena.size, manifest.arena.granularity)
        for handle, size in zip(handles, sizes):
            cu.mem_map(ptr + offset, size, handle)
            mapped.append(size)
            offset += size
        cu.set_access(ptr, manifest.arena.size, index, read_only=True)  # a stray write faults in the attacher
    except BaseException:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if ptr is not None:
            _unmap_chunks(index, ptr, mapped, manifest.arena.size)
        for handle in handles:
            cu.quietly(cu.mem_release, handle)
        raise
    for handle in handles:
        cu.mem_release(handle)  # the mapping keeps the memory

    rng = cu.DeviceRange(ptr, manifest.arena.size, index,
                         on_release=lambda: _unmap_chunks(index, ptr, sizes, manifest.arena.size))
    return Arena(rng.as_tensor(), dict(manifest.handle), cu.device_record(index), owned=False, lifetime=rng)
