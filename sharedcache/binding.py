"""Walking a module's tensors, and binding a module to arena views all at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BindError, UnsupportedModel
from .layout import ITEMSIZE, TensorSlot, TensorSpec, dtype_name, torch_dtype


@dataclass(frozen=True)
class TensorRef:
    """Where one named tensor hangs in the module tree (a tied tensor has several refs)."""

    name: str
    module: nn.Module
    attr: str
    kind: str  # "param" | "buffer"
    persistent: bool

    def get(self) -> torch.Tensor:
        table = self.module._parameters if self.kind == "param" else self.module._buffers
        return table[self.attr]


def tensor_refs(model: nn.Module) -> list[TensorRef]:
    """Every parameter and buffer, non-persistent ones included, in module order, duplicates kept."""
    refs = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in module._parameters.items():
            if p is not None:
                refs.append(TensorRef(dot + attr, module, attr, "param", True))
        for attr, b in module._buffers.items():
            if b is not None:
                persistent = attr not in module._non_persistent_buffers_set
                refs.append(TensorRef(dot + attr, module, attr, "buffer", persistent))
    return refs


def devices_of(model: nn.Module) -> list[torch.device]:
    """The devices the model's tensors lie on, in the order its modules first use them."""
    seen: dict[torch.device, None] = {}
    for ref in tensor_refs(model):
        seen.setdefault(ref.get().device, None)
    return list(seen)


def capture(model: nn.Module, device: torch.device | None = None) -> tuple[list[TensorSlot], list[TensorRef]]:
    """Slots to plan (tied tensors become aliases by identity) and the refs to rebind; with `device`, only
    the tensors on that device (one part of a model spread over several)."""
    refs = tensor_refs(model)
    if device is not None:
        refs = [r for r in refs if r.get().device == device]
    first_name: dict[int, str] = {}
    slots: list[TensorSlot] = []
    for ref in refs:
        t = ref.get()
        _check_shareable(ref, t)
        root = first_name.setdefault(id(t), ref.name)
        slots.append(TensorSlot(ref.name, ref.kind, ref.persistent, t.dtype, tuple(t.shape),
                                alias_of=None if root == ref.name else root))
    devices = {ref.get().device for ref in refs}
    if len(devices) > 1:
        raise UnsupportedModel(f"the model's tensors lie on several devices {sorted(map(str, devices))}; "
                               "one arena holds one device's tensors.",
                               hint="Load it onto one device (no multi-device device_map), or set "
                                    "cache.on_unsupported=fallback to load it unshared.")
    return slots, refs


def _check_shareable(ref: TensorRef, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise UnsupportedModel(f"tensor {ref.name!r} is on the meta device (offloaded to CPU/disk?); "
                               "offloaded weights cannot be shared.",
                               hint="Load without offload, or set cache.on_unsupported=fallback.")
    if ref.kind == "param" and type(t) is not nn.Parameter:
        raise UnsupportedModel(f"parameter {ref.name!r} is a {type(t).__module__}.{type(t).__name__} "
                               "(quantized, e.g. bitsandbytes); its state cannot be shared as plain bytes.",
                               hint="Use an unquantized or pre-quantized checkpoint, or set cache.on_unsupported=fallback.")
    if str(t.dtype).removeprefix("torch.") not in ITEMSIZE:
        raise UnsupportedModel(f"tensor {ref.name!r} has dtype {t.dtype}, which the arena does not hold.")


def stray_meta_tensors(model: nn.Module) -> list[str]:
    """Plain tensor attributes (not params or buffers) left on meta: binding cannot reach them."""
    found = []
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                found.append(f"{prefix}.{attr}" if prefix else attr)
    return found


def view_of(base: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A typed view of `spec`'s bytes inside the uint8 arena tensor `base`."""
    raw = base.narrow(0, spec.offset, spec.nbytes)
    return raw.view(torch_dtype(spec.dtype)).as_strided(spec.shape, spec.stride)


def check_against(refs: list[TensorRef], expected: dict[str, TensorSlot], specs: dict[str, TensorSpec]) -> None:
    """Every skeleton tensor has a published twin of the same kind, dtype and shape, and nothing extra."""
    names = {r.name for r in refs}
    missing = sorted(names - specs.keys())
    extra = sorted(specs.keys() - names)
    if missing or extra:
        raise BindError(f"model and published entry hold different tensors: missing from the entry "
                        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not in the model "
                        f"{extra[:5]}{'...' if len(extra) > 5 else ''}.",
                        hint="The prefill loaded another model or architecture; start both with the same model.")
    for ref in refs:
        slot, spec = expected[ref.name], specs[ref.name]
        if (ref.kind, tuple(slot.shape), dtype_name(slot.dtype)) != (spec.kind, spec.shape, spec.dtype):
            raise BindError(f"tensor {ref.name!r}: model expects {ref.kind} {tuple(slot.shape)} {slot.dtype}, "
                            f"entry holds {spec.kind} {spec.shape} {spec.dtype}.",
                            hint="Start prefill and decode with the same model, dtype and config.")


def bind(refs: list[TensorRef], views: dict[str, torch.Tensor], specs: dict[str, TensorSpec],
         *, requires_grad: bool | dict[str, bool] = False) -> None:
    """Point every ref at its view; tied refs get the very same Parameter object. Cannot fail halfway:
    all inputs were checked before."""
    params: dict[str, nn.Parameter] = {}
    for ref in refs:
        root = specs[ref.name].alias_of or ref.name
        if ref.kind == "param":
            if root not in params:
                grad = requires_grad if isinstance(requires_grad, bool) else requires_grad.get(root, False)
                params[root] = nn.Parameter(views[root], requires_grad=grad)
            ref.module._parameters[ref.attr] = params[root]
        else:
            ref.module._buffers[ref.attr] = views[root]
