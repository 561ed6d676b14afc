"""Backends registered by name in one table; `resolve` picks one for a device. Importing this
package costs no CUDA initialisation (nor torch): a backend's module is imported when it is first used."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    import torch

    from ..settings import CacheSettings
    from .base import Backend


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend lives and what it holds; its class (imported on first use) knows the rest."""

    name: str
    module: str  # submodule of sharedcache.backends
    cls: str  # the Backend subclass in it
    device_type: str  # "cpu" | "cuda": the tensors it holds


# `auto` tries a device type's backends in this order
_BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("cpu_shm", "cpu_shm", "CpuShmBackend", "cpu"),
    BackendSpec("cpu_memfd", "cpu_memfd", "CpuMemfdBackend", "cpu"),
    BackendSpec("cuda_vmm", "cuda_vmm", "CudaVmmBackend", "cuda"),
    BackendSpec("cuda_ipc", "cuda_ipc", "CudaIpcBackend", "cuda"),
)}


def known_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    if name not in _BACKENDS:
        raise ConfigError(f"unknown cache.backend {name!r}; choose 'auto' or one of {known_backends()}.")
    return _BACKENDS[name]


def backend_class(name: str) -> type[Backend]:
    spec = backend_spec(name)
    cls = getattr(importlib.import_module(f"{__name__}.{spec.module}"), spec.cls)
    if cls.name != name:
        raise ConfigError(f"backend table says {name!r} is {spec.module}.{spec.cls}, which calls itself {cls.name!r}.")
    return cls


def get_backend(name: str, settings: CacheSettings) -> Backend:
    cls = backend_class(name)
    _refuse_unavailable(name, cls.unavailable_reason())
    return cls(settings)


def _refuse_unavailable(name: str, reason: str | None) -> None:
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable here: {reason}",
                                 hint="Pick another cache.backend (or 'auto').")


def resolve(name: str, device: torch.device, settings: CacheSettings) -> Backend:
    """`auto`: the first available of the device type's backends in table order (cpu_shm for CPU
    models; cuda_vmm for CUDA models where the driver supports it, else cuda_ipc); the last one
    is taken or refused with its own reason. A named backend must suit the device."""
    if name == "auto":
        candidates = [s.name for s in _BACKENDS.values() if s.device_type == device.type]
        if not candidates:
            raise BackendUnavailable(f"no memory backend holds tensors on {device} (available: {known_backends()}).",
                                     hint="Load the model on the CPU or a CUDA device, or set the role's mode to off.")
        for candidate in candidates[:-1]:  # one availability probe each: get_backend would repeat it
            cls = backend_class(candidate)
            if cls.unavailable_reason() is None:
                return cls(settings)
        return get_backend(candidates[-1], settings)
    backend = get_backend(name, settings)
    wanted = _BACKENDS[name].device_type
    if device.type != wanted:
        raise ConfigError(f"cache.backend={name} holds {wanted} tensors, but the model is on {device}.",
                          hint="Use cache.backend=auto.")
    return backend


def check_choice(name: str, device_type: str | None) -> None:
    """A launcher's check before its engine loads anything: a named backend is known, suits the engine's device
    type (where the launcher knows it) and has what it needs on this machine. Creates nothing: no arena, no CUDA
    context (the VMM attributes of the GPU are read when the backend is used)."""
    if name == "auto":
        return
    spec = backend_spec(name)
    if device_type is not None and device_type != spec.device_type:
        raise ConfigError(f"cache.backend={name} holds {spec.device_type} tensors, but the engine runs on "
                          f"{device_type}.", hint="Use cache.backend=auto, or a backend for that device.")
    if spec.device_type == "cuda":  # the driver only: cuda_vmm's own check reads the GPU through a context
        from . import cuda_driver

        _refuse_unavailable(name, cuda_driver.unavailable_reason())
    else:
        _refuse_unavailable(name, backend_class(name).unavailable_reason())


def prepare(device: torch.device) -> None:
    """Process start-up work for a device's backends (importing the driver bindings, making the
    device's context current), so that the timed phases measure attaching, not importing."""
    if device.type == "cuda":
        from ..devices import device_index
        from . import cuda_driver

        if cuda_driver.unavailable_reason() is None:
            cuda_driver.use_device(device_index(device))
