"""Backends registered by name; `resolve` picks one for a device. Importing this
package costs no CUDA initialisation."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, type] = {}
_MODULES = {"cpu_shm": "cpu_shm", "cuda_vmm": "cuda_vmm", "cuda_ipc": "cuda_ipc"}  # name -> module


def register_backend(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def known_backends() -> list[str]:
    return sorted(_MODULES)


def backend_class(name: str) -> type:
    if name not in _MODULES:
        raise ConfigError(f"unknown cache.backend {name!r}; choose 'auto' or one of {known_backends()}.")
    if name not in _REGISTRY:
        importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return _REGISTRY[name]


def get_backend(name: str, settings=None):
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable here: {reason}",
                                 hint="Pick another cache.backend (or 'auto').")
    return cls(settings)


def resolve(name: str, device: torch.device, settings=None):
    """`auto`: cpu_shm for CPU models; cuda_vmm for CUDA models where the driver supports it,
    else cuda_ipc. A named backend must suit the device."""
    if name == "auto":
        if device.type == "cpu":
            return get_backend("cpu_shm", settings)
        if device.type == "cuda":  # one availability probe: get_backend would repeat it
            vmm = backend_class("cuda_vmm")
            return vmm(settings) if vmm.unavailable_reason() is None else get_backend("cuda_ipc", settings)
        raise BackendUnavailable(f"no memory backend holds tensors on {device} (available: {known_backends()}).",
                                 hint="Load the model on the CPU or a CUDA device, or set the role's mode to off.")
    backend = get_backend(name, settings)
    wanted = "cpu" if name == "cpu_shm" else "cuda"
    if device.type != wanted:
        raise ConfigError(f"cache.backend={name} holds {wanted} tensors, but the model is on {device}.",
                          hint="Use cache.backend=auto.")
    return backend


def prepare(device: torch.device) -> None:
    """Process start-up work for a device's backends (importing the driver bindings, making the
    device's context current), so that the timed phases measure attaching, not importing."""
    if device.type == "cuda":
        import torch

        from . import cuda_driver

        if cuda_driver.unavailable_reason() is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda_driver.use_device(index)
