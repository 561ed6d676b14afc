"""Which device a tensor or a model lives on, named so that every process means the same one.

torch is imported when a function runs, not with this module (reading the cache needs none).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: "torch.device | str", index: int | None = None) -> "torch.device":
    """`device` with a bare "cuda" made explicit: device `index` when that is a device number (>= 0),
    else the current CUDA device. Any other device comes back as given."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", index if index is not None and index >= 0 else torch.cuda.current_device())
    return device


def device_index(device: "torch.device | str") -> int:
    """The number of the CUDA device that `device` names (the current one for a bare "cuda")."""
    return resolve_device(device).index


def device_id(device: "torch.device | str") -> str:
    """Which physical device `device` names: the same index can be another GPU in another process
    (CUDA_VISIBLE_DEVICES), so CUDA devices are named by UUID ("cuda:<uuid>"); others by type ("cpu")."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_properties(device_index(device)).uuid}"
    return device.type
