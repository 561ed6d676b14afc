"""Manifest: the JSON record of one published arena (never pickle).

Written atomically under the entry's lock, so a reader sees a whole manifest or none. Reading one, and
validating it field by field before a single byte is mapped, is `sharedcache.manifest_parse`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_json_atomic
from .fingerprint import Fingerprint
from .layout import TensorSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_PARTS = 64


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    boot_id: str
    uid: int
    start_ticks: int  # the process's start time since boot: with boot_id, pid reuse cannot fool us

    @classmethod
    def current(cls) -> "Owner":
        return cls(os.getpid(), os.uname().nodename, boot_id(), os.getuid(), process_start_ticks(os.getpid()))

    def running(self) -> bool:
        """Is the very process that wrote this manifest still running (on this boot)?"""
        return self.boot_id == boot_id() and process_start_ticks(self.pid) == self.start_ticks


def process_start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); -1 if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class ArenaInfo:
    size: int
    granularity: int
    alignment: int
    layout_digest: str


@dataclass(frozen=True)
class PartInfo:
    """This entry is part `index` of `count` of one model spread over several devices, all published by
    one owner in one save (`group`). Part 0 is the entry under the user's key and is published last, so a
    reader that sees it finds the whole group; part i > 0 is `<key>-part<i>`. `placement` maps module
    paths to part numbers: where each module runs, as the owner's engine placed it."""

    index: int
    count: int
    group: str
    placement: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    key: str
    fingerprint: Fingerprint
    owner: Owner
    backend: str
    handle: dict[str, Any]
    device: dict[str, Any]  # {"type", "index", "uuid"}
    arena: ArenaInfo
    tensors: tuple[TensorSpec, ...]
    created: float
    checksums: dict[str, str] | None = None
    part: PartInfo | None = None
    # who serves the arena's handles when not the owner: a surviving mapper that took over after the owner
    # died (sharedcache.handon); None while the owner serves them, or where a backend serves nothing
    server: Owner | None = None
    schema: int = field(default=SCHEMA_VERSION)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.part is None else {"part": vars(self.part).copy()}
        if self.server is not None:
            extra["server"] = vars(self.server).copy()
        return extra | {
            "schema": self.schema,
            "key": self.key,
            "fingerprint": self.fingerprint.to_json(),
            "fingerprint_digest": self.fingerprint.digest(),
            "owner": vars(self.owner).copy(),
            "backend": self.backend,
            "handle": self.handle,
            "device": self.device,
            "arena": vars(self.arena).copy(),
            "tensors": [t.to_json() for t in self.tensors],
            "checksums": self.checksums,
            "created": self.created,
        }

    def same_arena(self, other: "Manifest") -> bool:
        """Do both describe the same arena? A handle that names its arena (`arena`) stays that arena when a
        surviving mapper takes over serving it under another socket."""
        ours, theirs = self.handle.get("arena"), other.handle.get("arena")
        return ours == theirs if ours is not None or theirs is not None else self.handle == other.handle

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- writing

def write_manifest(path: Path, manifest: Manifest) -> None:
    """Atomically and durably: a reader sees no manifest or the whole one (OSError, nothing left, if not)."""
    write_json_atomic(path, manifest.to_json(), indent=1, sort_keys=True, mode=0o600, sync_dir=True)


# ---------------------------------------------------------------- names kept here for their importers
