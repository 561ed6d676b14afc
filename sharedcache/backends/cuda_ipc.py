"""cuda_ipc (fallback): one cuMemAlloc allocation shared through a legacy CUDA IPC handle
(hex in the manifest). The memory belongs to the owner: importers must not outlive it,
so a dead owner's entry is refused."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ArenaError
from ..manifest import Manifest
from . import cuda_driver as cu
from . import register_backend
from .base import Arena, Backend
from .cuda_vmm import _local_index, _quietly, cuda_index, device_record, settle

_HEX = re.compile(r"^[0-9a-f]{128}$")
_GRANULARITY = 2 << 20


def _release_on(index: int, fn, ptr: int) -> None:
    """Finalizers run on whatever thread drops the last view: make the device current first."""
    _quietly(cu.use_device, index)
    _quietly(fn, ptr)


@register_backend
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
        index = cuda_index(device)
        cu.use_device(index)
        ptr = cu.mem_alloc(size)
        try:
            raw = cu.ipc_handle(ptr)
        except BaseException:
            cu.mem_free(ptr)
            raise
        rng = cu.DeviceRange(ptr, size, index, on_release=lambda: _release_on(index, cu.mem_free, ptr))
        return Arena(rng.as_tensor(), {"ipc": raw.hex()}, device_record(index), owned=True,
                     _sync=lambda: settle(index))

    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena:
        h = manifest.handle
        if set(h) != {"ipc"} or not isinstance(h["ipc"], str) or not _HEX.fullmatch(h["ipc"]):
            raise ArenaError(f"manifest handle {h!r} is not a 64-byte CUDA IPC handle in hex.",
                             hint="Remove the entry and re-publish it.")
        index = _local_index(manifest)
        cu.use_device(index)
        ptr = cu.ipc_open(bytes.fromhex(h["ipc"]))
        base, size = cu.address_range(ptr)
        if base != ptr or size < manifest.arena.size:
            cu.ipc_close(ptr)
            raise ArenaError(f"the shared allocation holds {size} bytes but the manifest says {manifest.arena.size}.",
                             hint="Remove the entry and re-publish it.")
        rng = cu.DeviceRange(ptr, manifest.arena.size, index, on_release=lambda: _release_on(index, cu.ipc_close, ptr))
        return Arena(rng.as_tensor(), dict(h), device_record(index), owned=False, lifetime=rng)
