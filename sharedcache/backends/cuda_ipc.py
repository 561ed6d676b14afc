"""cuda_ipc (fallback): one cuMemAlloc allocation shared through a legacy CUDA IPC handle
(hex in the manifest). The memory belongs to the owner: importers must not outlive it,
so a dead owner's entry is refused, and nothing can hand it on or take it over after the
owner died (cuda_vmm can: sharedcache.handon)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import HandoverError, IntegrityError
from ..devices import device_index
from ..manifest import Manifest
from . import cuda_driver as cu
from .base import Arena, Backend

_HEX = re.compile(r"^[0-9a-f]{128}$")
_GRANULARITY = 2 << 20
log = logging.getLogger(__name__)


def _release_on(index: int, fn, ptr: int) -> None:
    """Finalizers run on whatever thread drops the last view: make the device current first."""
    cu.quietly(cu.use_device, index)
    cu.quietly(fn, ptr)


class _OwnerArena(Arena):
    """The owner's arena: the allocation is freed when its last view dies (DeviceRange's finalizer), so
    release has nothing to give back; publishing waits for the device's writes."""

    def __init__(self, base: torch.Tensor, handle: dict, index: int) -> None:
        super().__init__(base, handle, cu.device_record(index), owned=True)
        self._index = index

    def sync(self) -> None:
        cu.settle(self._index)


class CudaIpcBackend(Backend):
    name = "cuda_ipc"
    survives_owner = False  # the owner's cuMemFree (or death) frees it under the importers
    attach_needs_owner = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return cu.unavailable_reason()

    def granularity(self, device: torch.device) -> int:
        return _GRANULARITY  # no VMM query: this backend is the fallback where VMM is missing

    def create(self, entry_dir: Path, size: int, device: torch.device) -> Arena:
        log.warning("cache.backend=cuda_ipc: the shared weights die with this process. If it crashes, attached "
                    "instances must stop, none can attach, and a restart loads the model again; cuda_vmm hands "
                    "the arena on and lets a restart take it over (where the driver supports it).")
        index = device_index(device)
        cu.use_device(index)
        ptr = cu.mem_alloc(size)
        try:
            raw = cu.ipc_handle(ptr)
        except BaseException:
            cu.mem_free(ptr)
            raise
        rng = cu.DeviceRange(ptr, size, index, on_release=lambda: _release_on(index, cu.mem_free, ptr))
        return _OwnerArena(rng.as_tensor(), {"ipc": raw.hex()}, index)

    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena:
        h = manifest.handle
        if set(h) != {"ipc"} or not isinstance(h["ipc"], str) or not _HEX.fullmatch(h["ipc"]):
            raise HandoverError(f"manifest handle {h!r} is not a 64-byte CUDA IPC handle in hex.",
                                hint="Remove the entry and re-publish it.")
        index = cu.local_index(manifest)
        cu.use_device(index)
        ptr = cu.ipc_open(bytes.fromhex(h["ipc"]))
        base, size = cu.address_range(ptr)
        if base != ptr or size < manifest.arena.size:
            cu.ipc_close(ptr)
            raise IntegrityError(f"the shared allocation holds {size} bytes but the manifest says "
                                 f"{manifest.arena.size}.", hint="Remove the entry and re-publish it.")
        rng = cu.DeviceRange(ptr, manifest.arena.size, index, on_release=lambda: _release_on(index, cu.ipc_close, ptr))
        return Arena(rng.as_tensor(), dict(h), cu.device_record(index), owned=False, lifetime=rng)
