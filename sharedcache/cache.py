"""The cache directory: one subdirectory per entry key, private to its user.

<dir>/<key>/manifest.json   the published record (atomic rename)
<dir>/<key>/owner.lock      flock held exclusively by the owner for its whole life
<dir>/<key>/write.lock      flock held while a manifest is written or removed
<dir>/<key>/attach.lock     flock held shared by every attacher for as long as it maps the arena
<dir>/<key>/arena-*.bin     cpu_shm arena files
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, EntryError, EntryOwned, EntryRemoved, SharedCacheError, StorageError
from .files import (RELOCK_TRIES, check_private_dir, ensure_private_dir, exists, lock_current, lock_held,
                    lstat_or_none, open_lock)
from .manifest import MANIFEST_NAME, Manifest, boot_id
from .manifest_parse import read_manifest

_CLAIM_RETRY_S = 0.5
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ARENA_FILE = re.compile(r"^arena-[A-Za-z0-9_.-]{1,64}\.bin$")  # cpu_shm arena files; nothing else is one
OWNER_FILE = re.compile(r"^arena-[A-Za-z0-9_.-]{1,64}\.(bin|sock)$")  # what an owner leaves: arenas, fd sockets
ARENA_ID = re.compile(r"^[0-9]{1,10}-[0-9a-f]{12}$")  # an fd-handle arena's id (cpu_memfd, cuda_vmm), in its handle
SERVE_LOCK = re.compile(r"^serve-[0-9]{1,10}-[0-9a-f]{12}\.lock$")  # an arena's turn to serve (sharedcache.handon)
LOCK_FILES = ("owner.lock", "attach.lock", "write.lock")  # every entry's; gc removes them with the last of it
TEMP_FILE = re.compile(r"^\.[a-z]+\.json\.\d+(\.[0-9a-f]+)?\.tmp$")  # a manifest or mark being written


class EntryState(str, enum.Enum):
    """Where a published entry is in its life; `ls`, `gc` and a waiting attacher all read this one."""

    LIVE = "live"  # its owner runs and holds the entry
    REPLACING = "replacing"  # its owner is gone and a new owner is loading
    ORPHANED = "orphaned"  # its owner is gone; the arena can still be attached without it
    SERVED = "served"  # its owner is gone; a process that maps the arena hands it on (sharedcache.handon)
    UNUSABLE = "unusable"  # its owner is gone with what an attach needs (an attach says exactly why)
    REBOOTED = "rebooted"  # published before the last reboot: never attached to

    @property
    def label(self) -> str:
        """What `ls` shows: nothing can attach to an unusable or rebooted entry, both are stale."""
        return "stale" if self in (EntryState.UNUSABLE, EntryState.REBOOTED) else self.value

    @property
    def attachable_now(self) -> bool:
        """A waiting attacher goes ahead (an unusable entry so that its attach names the reason)."""
        return self in (EntryState.LIVE, EntryState.ORPHANED, EntryState.SERVED, EntryState.UNUSABLE)


@dataclass(frozen=True)
class Entry:
    root: Path
    key: str

    @property
    def dir(self) -> Path:
        return self.root / self.key

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    def check(self) -> bool:
        """Refuse a cache root or entry directory that is a link, another user's or open to others, on
        every path that reads through them (attach, ls, gc), not only when creating; True if it exists."""
        return check_private_dir(self.root) and check_private_dir(self.dir, "cache entry directory")

    def ensure(self) -> "Entry":
        ensure_private_dir(self.root)
        ensure_private_dir(self.dir, "cache entry directory")
        return self

    def read(self) -> Manifest:
        self.check()
        return read_manifest(self.manifest_path)

    def published(self) -> bool:
        """A manifest stands in the entry (a link or odd file counts: read() then says what is wrong)."""
        return self.check() and exists(self.manifest_path)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        fd = lock_current(self.dir / "write.lock", fcntl.LOCK_EX, wait=True)
        try:
            yield
        finally:
            os.close(fd)

    def hold_for_attach(self) -> int:
        """An fd holding `attach.lock` shared: kept by an attacher from before it re-reads the manifest until
        its mapping dies, so that gc (which needs the lock exclusively) never removes an entry in use,
        also in the window between reading the manifest and mapping the arena. EntryRemoved (a NoManifest)
        when gc removed the whole entry meanwhile."""
        return lock_current(self.dir / "attach.lock", fcntl.LOCK_SH, wait=True)

    def lock_unused(self) -> int | None:
        """gc: an fd holding `attach.lock` exclusively if no instance is attached or attaching, else None."""
        try:
            return lock_current(self.dir / "attach.lock", fcntl.LOCK_EX, wait=False)
        except BlockingIOError:
            return None

    def claim(self, retry_s: float = _CLAIM_RETRY_S) -> int:
        """Become this entry's owner: an fd whose exclusive flock lives as long as the owner does.
        Liveness probes hold the lock shared for microseconds, so a refusal is retried briefly; a gc that
        removed the emptied entry meanwhile only means making it again."""
        deadline, removed = time.monotonic() + retry_s, 0
        while True:
            try:
                self.ensure()
                os.close(open_lock(self.dir / "attach.lock"))  # every lock file exists from the claim on
                return lock_current(self.dir / "owner.lock", fcntl.LOCK_EX, wait=False)
            except EntryRemoved:
                removed += 1
                if removed < RELOCK_TRIES:
                    continue
                raise
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            raise EntryOwned(f"entry {self.key!r} in {self.root} is owned by another live instance"
                             f"{self._owner_hint()}.",
                             hint="Start this instance with a load role (role=decode) or cache mode auto "
                                  "to attach to it, or use another cache.key.") from None

    def only_locks(self) -> bool:
        """The directory holds its lock files and nothing else: what every entry leaves once gc removed the
        rest, or an owner gave up before it wrote anything."""
        try:
            return set(os.listdir(self.dir)) <= set(LOCK_FILES)
        except FileNotFoundError:
            return False

    def remove_emptied(self) -> bool:
        """gc, holding the owner, attach and write locks: unlink the lock files and the directory when nothing
        else is in it. A process that opened a lock file before finds it unlinked once it has the lock
        (files.lock_current) and starts over on the path; one that made a new file meanwhile keeps the
        directory (rmdir refuses). True when the directory went."""
        if not self.only_locks():
            return False
        for name in LOCK_FILES:
            (self.dir / name).unlink(missing_ok=True)
        try:
            os.rmdir(self.dir)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                return False
            raise StorageError.from_os(e, f"removing the emptied entry directory {self.dir}") from None
        return True

    def check_publishable(self) -> None:
        """Owner, before loading anything: a manifest could be published here (a directory, link or special
        file in its place would only be found after the whole load)."""
        st = lstat_or_none(self.manifest_path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise EntryError(f"{self.manifest_path} is not a file sharedcache wrote (a directory, link or "
                             "special file); nothing could be published there.",
                             hint=f"Remove it (`rm -r {self.manifest_path}`) and start again.")

    def claimed(self) -> bool:
        """True while some process holds the owner lock (an owner, or a saver still loading)."""
        return self.check() and lock_held(self.dir / "owner.lock")

    def owner_alive(self, manifest: Manifest) -> bool:
        """The process that published `manifest` is running and still holds the entry."""
        return self.liveness(manifest) is EntryState.LIVE

    def liveness(self, manifest: Manifest) -> EntryState | None:
        """The owner's side of the state: REBOOTED, LIVE or REPLACING; None when nobody holds the entry
        (whether it can be used without its owner is the backend's question, `state` asks it). One
        probe of the owner lock."""
        if manifest.owner.boot_id != boot_id():
            return EntryState.REBOOTED
        if self.claimed():
            return EntryState.LIVE if manifest.owner.running() else EntryState.REPLACING
        return None

    def state(self, manifest: Manifest) -> EntryState:
        """The lifecycle state of this entry as published by `manifest`."""
        held = self.liveness(manifest)
        if held is not None:
            return held
        from .backends import backend_class

        try:
            backend = backend_class(manifest.backend)
        except SharedCacheError:
            return EntryState.UNUSABLE
        if not backend.orphan_attachable(self.dir, manifest):
            return EntryState.UNUSABLE
        return EntryState.SERVED if backend.attach_needs_owner else EntryState.ORPHANED

    def mapped_by(self, manifest: Manifest) -> list[int] | None:
        """Pids of the processes that map this entry's arena (a cpu_shm file, a cpu_memfd by its name); None
        where the backend leaves no trace in /proc (GPU memory)."""
        name, arena = manifest.handle.get("file"), manifest.handle.get("arena")
        if manifest.backend == "cpu_memfd" and isinstance(arena, str) and ARENA_ID.fullmatch(arena):  # the memfd's name
            path = f" /memfd:sharedcache-{arena} (deleted)".encode()
        elif isinstance(name, str) and ARENA_FILE.fullmatch(name):
            # /proc/<pid>/maps shows resolved paths as bytes, with a newline in a name written as \012
            path = b" " + os.fsencode(os.path.realpath(self.dir / name)).replace(b"\n", b"\\012")
        else:
            return None
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if any(line.endswith(path) for line in (proc / "maps").read_bytes().split(b"\n")):
                    pids.append(int(proc.name))
            except OSError:  # the process ended, or is not ours to read
                continue
        return sorted(pids)

    def _owner_hint(self) -> str:
        try:
            return f" (pid {self.read().owner.pid})"
        except Exception:  # noqa: BLE001 - only decorates a message; the entry may be mid-publish
            return " (still saving, not yet published)"


class CacheDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Entry:
        """The entry for `key`; nothing is created (an owner creates its entry when it claims it), and a
        root that exists must be private."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"cache key {key!r} is not a plain name (letters, digits, '_', '.', '-'; "
                              "at most 128 characters).", hint="Set cache.key to such a name.")
        check_private_dir(self.root)
        return Entry(self.root, key)

    def entries(self) -> list[Entry]:
        """Every entry directory under a private root (none if the root does not exist). Entries whose
        directory is a link, another user's or open to others are listed too: reading them says why not."""
        if not check_private_dir(self.root):
            return []
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            raise StorageError.from_os(e, f"listing cache directory {self.root}") from None
        return [Entry(self.root, n) for n in names if _KEY.fullmatch(n)
                and (os.path.isdir(self.root / n) or os.path.islink(self.root / n))]
