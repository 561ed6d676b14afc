"""An owner's hold on its entries, from the claim to the last teardown step.

A claim is an exclusive flock on one entry's `owner.lock` that lives as long as the owner. While holding
it the owner may publish one manifest. A model of several device parts holds one claim per part, and
gives them up as a group (`give_up`): every manifest first, the head's before the others (the model
vanishes whole), then every arena's backing, then the locks, the head's last (no new owner of the key
meanwhile). Each step runs even if the one before failed, and a forked child never undoes its parent's
publication.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable

from . import hostcopy
from .cache import TEMP_FILE, Entry
from .errors import ManifestError, SharedCacheError, StorageError
from .manifest import Manifest, process_start_ticks, write_manifest
from .settle import clear_settled

if TYPE_CHECKING:
    from .backends.base import Arena
    from .hostcopy import HostWriter

log = logging.getLogger(__name__)


class Claim:
    """Ownership of one entry. Use as a context manager, or call close(); closing twice is harmless."""

    def __init__(self, entry: Entry, fd: int) -> None:
        self.entry = entry
        self.arena: Arena | None = None  # the arena this owner made, released on close
        self.manifest: Manifest | None = None  # what this owner published, until close
        self.host_writer: HostWriter | None = None  # the background host copy of the arena (sharedcache.hostcopy)
        self._fd: int | None = fd
        self._pid = os.getpid()

    @classmethod
    def take(cls, entry: Entry, *, retry_s: float | None = None) -> "Claim":
        """Become `entry`'s owner (EntryOwned if another live instance is)."""
        return cls(entry, entry.claim() if retry_s is None else entry.claim(retry_s=retry_s))

    @property
    def mine(self) -> bool:
        """False in a forked child: its parent's publication is not the child's to undo."""
        return os.getpid() == self._pid

    @property
    def published(self) -> bool:
        return self.manifest is not None

    def publish(self, manifest: Manifest) -> None:
        """Write `manifest` (atomically, under the entry's write lock), then remove what dead owners left."""
        self.publish_over(lambda _standing: manifest)

    def publish_over(self, change: Callable[[Manifest | None], Manifest]) -> Manifest:
        """Publish what `change` makes of the manifest standing now (None: none, or unreadable), read under the
        write lock: an adopter's, whose arena a surviving mapper may name itself the server of until then."""
        if self._fd is None:
            raise SharedCacheError(f"publishing entry {self.entry.key!r} after its claim was closed.")
        with self.entry.write_lock():
            try:
                standing = self.entry.read() if self.entry.published() else None
            except ManifestError:
                standing = None
            manifest = change(standing)
            try:
                write_manifest(self.entry.manifest_path, manifest)
            except OSError as e:  # the temp file is gone again; nothing was published
                raise StorageError.from_os(e, f"writing manifest {self.entry.manifest_path}") from None
            self.manifest = manifest
            self._sweep(manifest)
        return manifest

    def unpublish(self) -> None:
        """Remove our manifest if it still stands; attached instances keep their mappings."""
        manifest, self.manifest = self.manifest, None
        if manifest is None or not self.mine:
            return
        try:
            with self.entry.write_lock():
                try:
                    current = self.entry.read()
                except ManifestError:
                    current = None
                if current is not None and current.owner.pid == os.getpid() and current.same_arena(manifest):
                    self.entry.manifest_path.unlink(missing_ok=True)
                    clear_settled(self.entry)
        except (OSError, SharedCacheError) as e:  # e.g. the entry directory was removed or replaced meanwhile
            log.warning("could not remove the manifest of %s: %s", self.entry.key, e)

    def close(self) -> None:
        """Unpublish, release the arena, give the key up: each step even if the one before failed."""
        give_up([self])

    def release_arena(self) -> None:
        writer, self.host_writer = self.host_writer, None
        if writer is not None:  # stopped first: it reads the arena
            writer.close()
        arena, self.arena = self.arena, None
        if arena is not None:
            arena.release()

    def release_lock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sweep(self, ours: Manifest) -> None:
        """We hold the owner lock, so earlier owners are dead: remove the arena files and sockets they left
        (also those of an owner that died before publishing), and the half-written manifests and marks of
        any writer that died inside its rename. Attached instances keep their mappings."""
        keep = {v for v in ours.handle.values() if isinstance(v, str)}
        left = [p for p in self.entry.dir.glob("arena-*") if p.name not in keep]
        left += [p for p in self.entry.dir.glob(".*.tmp") if TEMP_FILE.fullmatch(p.name) and not _writing(p.name)]
        for path in left:
            log.info("removing %s, left by a dead process", path)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # a directory in its place is not ours to remove; gc reports it
                log.warning("left %s in place: %s", path, e.strerror)
        hostcopy.sweep(self.entry.dir, ours)


def give_up(claims: list[Claim]) -> None:
    """Undo what the owner of `claims` (one model's parts, head first) made: every manifest, then every
    arena, then every lock, the head's last. Every step runs; one error is raised after the others are
    logged, a Ctrl-C or exit before any error."""
    claims = [c for c in claims if c.mine]  # a forked child running its parent's finalizer: not ours to undo
    steps = [(c, c.unpublish) for c in claims] + [(c, c.release_arena) for c in claims] + \
            [(c, c.release_lock) for c in reversed(claims)]
    failed: tuple[BaseException, str] | None = None
    for claim, undo in steps:
        try:
            undo()
        except BaseException as e:  # noqa: BLE001 - the remaining steps still run; one error is raised after
            this = (e, claim.entry.key)
            if failed is None or (isinstance(failed[0], Exception) and not isinstance(e, Exception)):
                failed, this = this, failed  # a Ctrl-C or exit outranks an error; the other one is logged
            if this is not None:
                log.warning("giving up entry %s: %s", this[1], this[0])
    if failed is not None:
        raise failed[0]


def _writing(temp_name: str) -> bool:
    """Does the process that names itself in a temp file's name (`.<name>.<pid>.<random>.tmp`) still run? A
    relay naming itself in the manifest may be writing one right now; a dead writer's file is left over."""
    return process_start_ticks(int(temp_name.split(".")[3])) >= 0
