"""One run's state, shared by its steps, and what a step returns when the run must go another way.

A model is a list of device parts: one device is a run with one part, a model spread over N GPUs has
N, part 0 (the head) under the user's key, the others under `<key>-part<i>`. Every per-device field
lives on the Part; every per-device step loops over `RunState.parts` once.
"""
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
    """One device's share of a model: its entry (the user's key for part 0, `<key>-part<index>` for the
    others) and what the steps make of it. A load keeps the skeleton's tensors on part 0 until align binds
    each to the part that publishes it."""

    index: int
    entry: Entry | None  # None only in a run that does not share (mode off)
    device: Any = None  # save: the torch device its tensors lie on
    fingerprint: Fingerprint | None = None
    claim: Claim | None = None  # save: this owner's hold on the part's entry
    refs: list[TensorRef] = field(default_factory=list)
    slots: list[TensorSlot] = field(default_factory=list)
    layout: ArenaLayout | None = None
    arena: Arena | None = None
    manifest: Manifest | None = None
    checksums: dict[str, str] | None = None


@dataclass
class RunState:
    """What the steps of one run share. The orchestrator gives the fields in phases.GIVEN (part 0 with its
    entry, fingerprint and claim among them); the steps provide the rest, as each declares."""

    role: Role
    mode: Mode
    settings: CacheSettings
    source: Any  # a ModelSource (sharedcache.instance)
    parts: list[Part]
    progress: ProgressFn | None = None
    backend: Backend | None = None
    model: nn.Module | None = None
    expected: dict[str, TensorSlot] = field(default_factory=dict)
    owner_alive: bool | None = None
    timings: list[dict[str, Any]] = field(default_factory=list)
    load_seconds: float | None = None
    wait_seconds: float = 0.0  # time spent waiting for an owner (not attach work)
    placement: dict[str, Any] | None = None  # spread: module path -> the part number it runs on
    group: str | None = None  # spread, save: this save's id, in every part's manifest
    adopting: bool = False  # save: taking over the arena a dead owner left (the adopt plan), not loading

    @property
    def head(self) -> Part:
        """Part 0, under the user's key: published last, attached first."""
        return self.parts[0]

    @property
    def several_parts(self) -> bool:
        """Does this run hold more than one device part (a model spread over several devices)?"""
        return len(self.parts) > 1

    @property
    def spreads(self) -> bool:
        return spreads(self.source)

    def claims(self) -> list[Claim]:
        """The claims this run holds, head first."""
        return [p.claim for p in self.parts if p.claim is not None]
