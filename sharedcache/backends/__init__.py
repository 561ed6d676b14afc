"""Backends registered by name; `resolve` picks one for a device. Importing this
package costs no CUDA initialisation."""
from __future__ import annotations

import importlib

import torch

from ..errors import BackendUnavailable, ConfigError

_REGISTRY: dict[str, type] = {}
_MODULES = {"cpu_shm": "cpu_shm"}  # backend name -> module that registers it


def register_backend(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def known_backends() -> list[str]:
    return sorted(_MODULES)


def get_backend(name: str):
    if name not in _MODULES:
        raise ConfigError(f"unknown cache.backend {name!r}; choose 'auto' or one of {known_backends()}.")
    if name not in _REGISTRY:
        importlib.import_module(f"{__name__}.{_MODULES[name]}")
    cls = _REGISTRY[name]
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable here: {reason}")
    return cls()


def resolve(name: str, device: torch.device):
    """`auto` picks by the model's device; a named backend must suit it."""
    if name == "auto":
        if device.type == "cpu":
            return get_backend("cpu_shm")
        raise BackendUnavailable(f"no memory backend of this build holds tensors on {device} "
                                 f"(available: {known_backends()}).",
                                 hint="Load the model on the CPU, or set cache mode off for this device.")
    return get_backend(name)
