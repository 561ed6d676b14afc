"""One run's state, shared by its steps, and what a step returns when the run must go another way."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .backends.base import Arena, Backend
    from .binding import TensorRef
    from .cache import Entry
    from .fingerprint import Fingerprint
    from .layout import ArenaLayout, TensorSlot
    from .manifest import Manifest
    from .ownership import Claim
    from .progress import ProgressFn
    from .roles import Mode, Role
    from .settings import CacheSettings


def spreads(source: Any) -> bool:
    """Does the source let its engine spread the model over several GPUs (ModelSource.spreads; optional)?"""
    return bool(getattr(source, "spreads", False))


@dataclass(frozen=True)
class Fallback:
    """Give up sharing and load normally, for `reason`."""

    reason: str


@dataclass(frozen=True)
class Takeover:
    """An auto instance found the key free again and owns it now (`claim`): run the save plan."""

    claim: Claim


@dataclass
class Part:
    """One more device's share of a model spread over several devices (part 0's share is the run's own
    fields): its entry `<key>-part<index>`, and what the steps make of it, as for the run itself."""

    index: int
    entry: Entry
    device: Any = None  # save: the torch device its tensors lie on
    fingerprint: Fingerprint | None = None
    claim: Claim | None = None
    refs: list[TensorRef] = field(default_factory=list)
    slots: list[TensorSlot] = field(default_factory=list)
    layout: ArenaLayout | None = None
    arena: Arena | None = None
    manifest: Manifest | None = None
    checksums: dict[str, str] | None = None


@dataclass
class RunState:
    """What the steps of one run share. The first eight fields are given (phases.GIVEN); the steps
    provide the rest, as each declares."""

    role: Role
    mode: Mode
    settings: CacheSettings
    source: Any  # a ModelSource (sharedcache.instance)
    entry: Entry | None
    fingerprint: Fingerprint | None
    claim: Claim | None = None  # save: this owner's hold on the entry
    progress: ProgressFn | None = None
    backend: Backend | None = None
    model: nn.Module | None = None
    refs: list[TensorRef] = field(default_factory=list)
    slots: list[TensorSlot] = field(default_factory=list)
    expected: dict[str, TensorSlot] = field(default_factory=dict)
    layout: ArenaLayout | None = None
    arena: Arena | None = None
    manifest: Manifest | None = None
    checksums: dict[str, str] | None = None
    owner_alive: bool | None = None
    timings: list[dict[str, Any]] = field(default_factory=list)
    load_seconds: float | None = None
    wait_seconds: float = 0.0  # time spent waiting for an owner (not attach work)
    parts: list[Part] = field(default_factory=list)  # a model spread over several devices: parts 1..n-1
    placement: dict[str, Any] | None = None  # spread: module path -> the part (device) it runs on
    group: str | None = None  # spread, save: this save's id, in every part's manifest

    @property
    def spreads(self) -> bool:
        return spreads(self.source)

    def mapped(self) -> list[tuple[Manifest, Arena]]:
        """(manifest, arena) of every device the run published or attached, its own first."""
        return [(self.manifest, self.arena)] + [(p.manifest, p.arena) for p in self.parts]
