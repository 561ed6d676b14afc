"""Every CUDA driver call the backends make, one small wrapper each, through NVIDIA's
`cuda-bindings`. Imported only by the CUDA backends, and only when they are used."""
from __future__ import annotations

import ctypes
import logging
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import ArenaError, BackendUnavailable, DriverError, HandoverError

if TYPE_CHECKING:
    from ..manifest import Manifest

log = logging.getLogger(__name__)


def driver():
    try:
        from cuda.bindings import driver as drv
    except ImportError as e:
        raise BackendUnavailable("NVIDIA's cuda-bindings are not installed.",
                                 hint="pip install 'sharedcache[cuda]' (cuda-bindings matching your driver).") from e
    return drv


def check(result: Any, what: str) -> Any:
    """cuda-bindings return (CUresult, *values): raise DriverError on error (`call`: the driver
    function, `code`: the CUresult's name), return the values. `what`: the call as the message shows it."""
    drv = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(err)
        raise DriverError(f"CUDA driver call {what} failed: {name}.", call=what.partition("(")[0], code=name)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def unavailable_reason() -> str | None:
    try:
        driver()
    except BackendUnavailable as e:
        return str(e)
    if not torch.cuda.is_available():
        return "torch sees no CUDA device on this machine."
    return None


_PRIMARY: dict[int, Any] = {}  # device index -> its primary context, retained once per process


def use_device(index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread; release
    callbacks call it too, as they may run on any thread."""
    drv = driver()
    if index not in _PRIMARY:
        torch.cuda.init()
        dev = check(drv.cuDeviceGet(index), "cuDeviceGet")
        _PRIMARY[index] = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv.cuCtxSetCurrent(_PRIMARY[index]), "cuCtxSetCurrent")


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_index_of(uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def device_record(index: int) -> dict:
    return {"type": "cuda", "index": index, "uuid": device_uuid(index)}


def local_index(manifest: Manifest) -> int:
    """This process's index of the GPU the entry lives on (found by UUID)."""
    uuid = manifest.device.get("uuid")
    if not isinstance(uuid, str) or manifest.fingerprint.device != f"cuda:{uuid}":
        raise ArenaError(f"entry {manifest.key!r}: its device record {manifest.device!r} does not match its "
                         f"fingerprint's device {manifest.fingerprint.device!r}.", hint="Re-publish the entry.")
    index = device_index_of(uuid)
    if index is None:
        raise ArenaError(f"entry {manifest.key!r} lives on GPU {uuid!r}, which this process cannot see.",
                         hint="Attach from a process on the same GPU (check CUDA_VISIBLE_DEVICES).")
    return index


def settle(index: int) -> None:
    """Owner, before publishing: all copies landed, and the last originals go back to the driver."""
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()


def quietly(fn, *args) -> None:
    """Releases run from finalizers, possibly at interpreter exit: log, never raise."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a finalizer must not raise; the failure is logged
        log.warning("CUDA release %s failed: %s", fn.__name__, e)


def attribute(index: int, name: str) -> int:
    drv = driver()
    return check(drv.cuDeviceGetAttribute(getattr(drv.CUdevice_attribute, name), index), "cuDeviceGetAttribute")


# ---------------------------------------------------------------- VMM

def _prop(index: int):
    drv = driver()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


def granularity(index: int) -> int:
    drv = driver()
    flag = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return int(check(drv.cuMemGetAllocationGranularity(_prop(index), flag), "cuMemGetAllocationGranularity"))


def mem_create(size: int, index: int):
    return check(driver().cuMemCreate(size, _prop(index), 0), f"cuMemCreate({size})")


def mem_release(handle) -> None:
    check(driver().cuMemRelease(handle), "cuMemRelease")


def export_fd(handle) -> int:
    """An fd for the allocation, close-on-exec so that children started by the owner do not pin it."""
    drv = driver()
    fd = int(check(drv.cuMemExportToShareableHandle(
        handle, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        "cuMemExportToShareableHandle"))
    os.set_inheritable(fd, False)
    return fd


def import_fd_close_fd(fd: int):
    """Import an allocation from a received fd; the fd is closed whatever happens."""
    drv = driver()
    try:
        return check(drv.cuMemImportFromShareableHandle(
            fd, drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle")
    finally:
        os.close(fd)


def address_reserve(size: int, alignment: int) -> int:
    return int(check(driver().cuMemAddressReserve(size, alignment, 0, 0), f"cuMemAddressReserve({size})"))


def address_free(ptr: int, size: int) -> None:
    check(driver().cuMemAddressFree(ptr, size), "cuMemAddressFree")


def mem_map(ptr: int, size: int, handle) -> None:
    check(driver().cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")


def mem_unmap(ptr: int, size: int) -> None:
    check(driver().cuMemUnmap(ptr, size), "cuMemUnmap")


def set_access(ptr: int, size: int, index: int, *, read_only: bool = False) -> None:
    drv = driver()
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = index
    flags = drv.CUmemAccess_flags
    desc.flags = flags.CU_MEM_ACCESS_FLAGS_PROT_READ if read_only else flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    check(drv.cuMemSetAccess(ptr, size, [desc], 1), "cuMemSetAccess")


# ---------------------------------------------------------------- legacy IPC

_IPC_HANDLE_BYTES = 64

def mem_alloc(size: int) -> int:
    return int(check(driver().cuMemAlloc(size), f"cuMemAlloc({size})"))


def mem_free(ptr: int) -> None:
    check(driver().cuMemFree(ptr), "cuMemFree")


def ipc_handle(ptr: int) -> bytes:
    handle = check(driver().cuIpcGetMemHandle(ptr), "cuIpcGetMemHandle")
    return ctypes.string_at(handle.getPtr(), _IPC_HANDLE_BYTES)  # the struct's raw 64 bytes


def ipc_open(raw: bytes) -> int:
    drv = driver()
    if len(raw) != _IPC_HANDLE_BYTES:
        raise HandoverError(f"a CUDA IPC handle has {_IPC_HANDLE_BYTES} bytes, the manifest gives {len(raw)}.")
    handle = drv.CUipcMemHandle()
    ctypes.memmove(handle.getPtr(), raw, _IPC_HANDLE_BYTES)
    flag = drv.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
    return int(check(drv.cuIpcOpenMemHandle(handle, flag), "cuIpcOpenMemHandle"))


def ipc_close(ptr: int) -> None:
    check(driver().cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")


def address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation that holds `ptr`."""
    base, size = check(driver().cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
    return int(base), int(size)


# ---------------------------------------------------------------- device memory as a torch tensor

class DeviceRange:
    """A range of device memory that torch can view through __cuda_array_interface__.
    torch keeps this object alive while any view exists; when the last one dies,
    `on_release` (unmap / free / close) runs exactly once."""

    def __init__(self, ptr: int, size: int, index: int, on_release: Callable[[], None]) -> None:
        self.ptr, self.size, self.index = ptr, size, index
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
            "stream": None,
        }
        self._finalizer = weakref.finalize(self, on_release)
        # at interpreter exit the driver frees everything anyway; unmapping earlier could pull
        # memory from under kernels still queued or threads still running
        self._finalizer.atexit = False

    def as_tensor(self) -> torch.Tensor:
        t = torch.as_tensor(self, device=torch.device("cuda", self.index))
        if t.data_ptr() != self.ptr or t.numel() != self.size:  # a copy would silently unshare
            raise ArenaError("torch copied the shared range instead of viewing it; this torch is not supported.",
                             hint="Use torch >= 2.4 with numpy installed.")
        return t
