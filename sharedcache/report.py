"""The per-instance report: what was shared, what this process allocated, how long each phase took."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .roles import Mode


@dataclass
class Report:
    role: str
    mode: str
    engine: str
    backend: str | None
    model: str
    key: str
    cache_dir: str
    fingerprint: str  # digest
    tensors: int  # parameters and buffers bound to (or packed into) the arena, tied names counted each
    bytes_shared: int  # tensor bytes in the arena
    arena_bytes: int
    weight_bytes_allocated: int  # weight bytes this process allocated itself (0 when attached)
    phases: list[dict[str, Any]]  # {name, seconds, start (epoch seconds)} in the order run
    attach_seconds: float | None  # the attach phases' work, waiting for an owner excluded
    wait_seconds: float  # waiting for an owner to publish (load mode)
    load_seconds: float | None
    total_seconds: float
    owner_pid: int | None
    owner_alive: bool | None
    fallback: str | None
    layout_digest: str | None
    backend_timings: dict[str, float]  # the backend's own steps inside the phases (seconds)
    # a model spread over several devices: one {key, device, tensors, bytes, arena_bytes} per part
    parts: list[dict[str, Any]] = field(default_factory=list)
    adopted: bool = False  # a save that took over the arena its dead predecessor left instead of loading
    refilled: bool = False  # a save that refilled a new arena from the entry's host copy instead of loading
    extra: dict[str, Any] = field(default_factory=dict)  # filled by the launcher (generated text, ...)

    @property
    def attached(self) -> bool:
        """This instance maps a published entry (load or placeholder mode, no fallback)."""
        return self.fallback is None and Mode(self.mode).attaches

    @property
    def owns(self) -> bool:
        """This instance published the entry and owns it (save mode, no fallback)."""
        return self.fallback is None and Mode(self.mode) is Mode.SAVE

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    def summary(self) -> str:
        mb = 1 << 20
        lines = [
            f"role={self.role} mode={self.mode} engine={self.engine} backend={self.backend} key={self.key}",
            f"  tensors bound: {self.tensors}   shared: {self.bytes_shared / mb:.1f} MiB   "
            f"weights allocated by this process: {self.weight_bytes_allocated / mb:.1f} MiB",
            "  phases: " + ", ".join(f"{p['name']} {p['seconds'] * 1e3:.1f} ms" for p in self.phases),
        ]
        if self.parts:
            lines.append(f"  spread over {len(self.parts)} devices: " + ", ".join(
                f"{p['device']} {p['bytes'] / mb:.1f} MiB ({p['key']})" for p in self.parts))
        if self.refilled:
            took = self.backend_timings.get("host_refill", 0.0)
            lines.append(f"  refilled from the host copy in {took:.2f} s ({self.arena_bytes / max(took, 1e-9) / 1e9:.1f} "
                         "GB/s): nothing read from the checkpoint; this instance owns it now")
        elif self.adopted:
            lines.append(f"  took over the arena its dead predecessor left, in {self.attach_seconds * 1e3:.1f} ms: "
                         "nothing loaded; this instance owns it now")
        elif self.attach_seconds is not None:
            lines.append(f"  attach: {self.attach_seconds * 1e3:.1f} ms (owner pid {self.owner_pid}, "
                         f"{'alive' if self.owner_alive else 'gone'})"
                         + (f"; waited {self.wait_seconds:.2f} s for it to publish" if self.wait_seconds >= 0.01 else ""))
        if self.load_seconds is not None:
            lines.append(f"  normal load: {self.load_seconds:.2f} s")
        if self.fallback:
            lines.append(f"  NOT SHARED: {self.fallback}")
        return "\n".join(lines)


def weight_bytes_outside(model: nn.Module, regions: list[tuple[int, int]]) -> int:
    """Bytes of the distinct storages behind the model's tensors that lie outside every one of `regions`
    (the arenas it views; a spread model has one per device)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if any(lo <= ptr and ptr + storage.nbytes() <= hi for lo, hi in regions):
            continue
        total += storage.nbytes()
    return total
