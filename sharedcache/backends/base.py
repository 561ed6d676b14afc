"""The memory-provider interface every backend implements.

A backend makes one arena (owner side) and maps a published one (attacher side),
both exposed as a flat uint8 torch tensor; the phases never see a handle.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..manifest import Manifest

if TYPE_CHECKING:
    from ..settings import CacheSettings


@dataclass
class Arena:
    """A live arena in this process. `base` keeps the mapping alive: the memory is
    unmapped only when `base` and every view of it are gone.

    This class is an attacher's arena: nothing to commit, sync, seal or give back. A backend's owner
    arena subclasses it and overrides `commit`, `sync`, `seal` and `_drop_claim` with its own steps."""

    base: torch.Tensor  # uint8, arena size
    handle: dict[str, Any]  # what goes into the manifest
    device: dict[str, Any]
    owned: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the backend's own steps
    # an object that lives exactly as long as the mapping (torch's views keep it alive): what the core ties
    # the attacher's hold on the entry to; None: the mapping's life cannot be observed
    lifetime: Any = field(default=None, repr=False)
    # fd-handle backends (cpu_memfd, cuda_vmm): the sharedcache.handon.Relay that keeps this mapping's handles
    # and hands them on; None where the backend has nothing to hand on
    relay: Any = field(default=None, repr=False)
    _released: bool = field(default=False, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.base.numel()

    def region(self) -> tuple[int, int]:
        start = self.base.data_ptr()
        return start, start + self.size

    def commit(self, upto: int) -> None:
        """Owner: make bytes [0, upto) writable. Backends that back the arena lazily (cuda_vmm maps
        physical chunks as the originals are freed) do the work here; others have nothing to do."""

    def sync(self) -> None:
        """Owner: wait until every write into the arena has landed, before publishing it."""

    def seal(self) -> None:
        """Owner, once published: make its own mapping read-only where the backend can, so that a write
        into a shared weight faults in the owner instead of silently changing what attachers compute."""

    def release(self) -> None:
        """Drop this process's claim on the backing memory (owner: unpublish it). Views stay valid.
        Idempotent: the backend's part runs at most once, even if it raised the first time."""
        if not self._released:
            self._released = True
            self._drop_claim()

    def _drop_claim(self) -> None:
        """The backend's part of `release` (an owner's: unpublish the memory); nothing for an attacher."""


class Backend(abc.ABC):
    name: ClassVar[str]
    survives_owner: ClassVar[bool]  # do attached instances keep working after the owner dies?
    attach_needs_owner: ClassVar[bool]  # can a new instance attach only while the owner lives?
    adopts: ClassVar[bool] = False  # can a new owner take over the arena a dead owner left (`adopt`)?

    def __init__(self, settings: "CacheSettings") -> None:
        self.settings = settings  # the composed cache group: a backend has no defaults of its own

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when usable here; else why not, in words a user can act on."""

    @abc.abstractmethod
    def granularity(self, device: torch.device) -> int: ...

    @abc.abstractmethod
    def create(self, entry_dir: Path, size: int, device: torch.device) -> Arena: ...

    @abc.abstractmethod
    def attach(self, entry_dir: Path, manifest: Manifest) -> Arena: ...

    def adopt(self, entry_dir: Path, manifest: Manifest) -> Arena:
        """A new owner, holding the entry, takes over the arena its dead predecessor published: mapped as an
        attacher maps it (this process allocates nothing), given back on release as the owner's own."""
        raise NotImplementedError(f"backend {self.name} cannot hand a dead owner's arena to a new owner.")

    @classmethod
    def orphan_attachable(cls, entry_dir: Path, manifest: Manifest) -> bool:
        """Could an instance attach to `manifest`'s arena now, its owner gone? (`ls` and `gc` call such an
        entry orphaned.) Only a backend whose memory outlives its owner without it can say yes."""
        return False
