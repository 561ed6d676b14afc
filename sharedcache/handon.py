"""Handing an arena on after its owner died, with no daemon.

The memory of an fd-handle backend (cpu_memfd; CUDA VMM's POSIX fds behave the same) lives while any
process holds one of its fds or maps it, and a received fd can be passed on after its exporter exited.
So every process that maps such an arena keeps the fds it received, in a Relay. One relay at a time,
elected by the arena's serve lock (`serve-<arena>.lock` in the entry: an exclusive flock the kernel
releases when its holder dies), serves the fds over a Unix socket of its own: the owner from the start,
and once it died the first surviving mapper to take the lock, which then names its socket and itself
(`server`) in the manifest. New attachers and a restarted owner get the memory from whoever serves it,
and the entry stays published with its fingerprint. When the last process holding the memory ends, the
memory goes, and the entry is stale.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import secrets
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from .backends.fdpass import FdServer, receive_fds
from .cache import ARENA_ID, Entry
from .errors import HandoverError, ManifestError, OwnerGone, SharedCacheError
from .files import lock_held, open_lock
from .manifest import MANIFEST_NAME, Manifest, Owner, write_manifest
from .manifest_parse import read_manifest

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often a waiting relay asks for the serve lock: the longest a hand-on waits to start
TAKEOVER_WAIT_S = 1.0  # how long an attach whose server just went away waits for a mapper to take over


def new_arena_id() -> str:
    """A name for a new arena, unique on this machine: its handle's `arena`, its serve lock's name."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def serve_lock(entry_dir: Path, arena: str) -> Path:
    """The arena's turn to serve; gc removes it with the entry (sharedcache.cache.SERVE_LOCK)."""
    return entry_dir / f"serve-{arena}.lock"


def served(entry_dir: Path, arena: str) -> bool:
    """Does a live process hold, and so serve, this arena's memory?"""
    return lock_held(serve_lock(entry_dir, arena))


def orphan_served(entry_dir: Path, manifest: Manifest) -> bool:
    """An fd-handle backend's `orphan_attachable`: does a surviving mapper serve the arena the manifest names?"""
    arena = manifest.handle.get("arena")
    return isinstance(arena, str) and bool(ARENA_ID.fullmatch(arena)) and served(entry_dir, arena)


def receive_served(entry_dir: Path, manifest: Manifest, timeout_s: float) -> tuple[dict, list[int]]:
    """The fds from the socket the manifest names. A server that went away shows, while a surviving mapper
    takes over, as a manifest naming another socket soon after: then a HandoverError, so the attach retries."""
    try:
        return receive_fds(entry_dir / manifest.handle["socket"], timeout_s)
    except OwnerGone:
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(POLL_S / 2)
            try:
                now = read_manifest(entry_dir / MANIFEST_NAME)
            except ManifestError:  # unpublished meanwhile: the attach says what that means
                break
            if now.handle.get("socket") != manifest.handle["socket"]:
                raise HandoverError(f"the arena in {entry_dir} changed hands while attaching.") from None
        raise


class Relay:
    """This process's hold on an fd-handle arena it maps: the fds (the memory lives while they are open), and
    the turn to serve them. The owner's relay serves from the start; an attacher's waits for the serve lock
    and takes over when the process that held it is gone. Close it when the mapping goes (the backend ties
    that to the mapping's lifetime); closing twice is harmless, and a forked child closes nothing.

    The relay owns `fds` (the list itself: an owner whose arena grows chunk by chunk appends to it) and
    serves `header` as it is when asked (so it may hold lists that grow with it)."""

    def __init__(self, entry_dir: Path, arena: str, fds: list[int], header: dict[str, Any], *,
                 owner: bool) -> None:
        self.entry_dir, self.arena, self.header = entry_dir, arena, header
        self.socket: str | None = None  # the socket this relay serves on, while it serves
        self._fds, self._server = fds, None
        self._keep: Manifest | None = None  # a holder's: publish the arena again if its owner unpublished it
        self._stop, self._pid, self._closed = threading.Event(), os.getpid(), False
        self._closing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._lock = open_lock(serve_lock(entry_dir, arena))
        try:
            if owner:  # a new arena: nobody else can hold its lock yet
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.socket = self._serve()
            else:
                self._thread = threading.Thread(target=self._wait_turn, daemon=True,
                                                name=f"sharedcache-relay-{arena}")
                self._thread.start()
        except BaseException:
            os.close(self._lock)
            raise
        _LIVE.add(self)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def keep_published(self, manifest: Manifest) -> None:
        """A holder's relay: when the arena's owner unpublishes it on purpose (a clean stop) and no new owner
        claims the key, publish `manifest` again with this process serving it, so the weights stay reachable
        (a restarted owner takes them over) instead of being held where nobody can find them."""
        self._keep = manifest

    def _serve(self) -> str:
        name = f"arena-{os.getpid()}-{secrets.token_hex(6)}.sock"
        self._server = FdServer(self.entry_dir / name, lambda: (dict(self.header), list(self._fds)))
        return name

    def _wait_turn(self) -> None:
        """Wait for the serve lock; once it is ours, take over, or give the turn back when there is nothing
        to hand on (another mapper may still have a reason to: a holder) or the take-over failed."""
        while not self._stop.wait(POLL_S):
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError:  # closed under us: the relay is going away
                return
            try:
                if self._take_over():
                    return
            except (OSError, SharedCacheError) as e:  # the entry was removed or is not ours to write
                log.warning("could not take over serving arena %s: %s", self.arena, e)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            if self._keep is None:
                return  # nothing to hand on: the mapping stays valid, this process just serves nobody
            self._stop.wait(POLL_S * 5)  # a holder keeps trying while the owner finishes stopping

    def _take_over(self) -> bool:
        """Elected: serve the fds and name this process in the manifest, if the entry still publishes our arena
        (an owner that unpublished on purpose, or a new arena in its place, leaves nothing to hand on; a
        holder's relay publishes the arena again once no owner holds the key). True when serving."""
        entry = Entry(self.entry_dir.parent, self.entry_dir.name)
        with entry.write_lock():
            try:
                manifest = entry.read()
            except ManifestError:
                manifest = self._keep if self._keep is not None and not entry.claimed() else None
            if manifest is None or manifest.handle.get("arena") != self.arena or self._stop.is_set():
                if self._keep is None:
                    log.info("arena %s of %s is no longer published: nothing to hand on", self.arena, entry.key)
                return False
            self.socket = self._serve()
            self._publish(entry, manifest)
        log.info("serving arena %s of %s after its server (pid %d) went away", self.arena, entry.key,
                 (manifest.server or manifest.owner).pid)
        return True

    def republish(self) -> bool:
        """A holder's relay that serves the arena: publish it again if its owner unpublished it on purpose and
        no new owner holds the key (the relay's turn to serve never changed hands, so `_take_over` never ran).
        True when it did."""
        entry = Entry(self.entry_dir.parent, self.entry_dir.name)
        if self._keep is None or not self.serving or entry.published():
            return False
        with entry.write_lock():
            if entry.published() or entry.claimed() or self._stop.is_set():
                return False
            self._publish(entry, self._keep)
        log.info("published arena %s of %s again: its owner unpublished it and no new owner holds the key",
                 self.arena, entry.key)  # _keep's owner may be an earlier one: the last owner adopted the arena
        return True

    def _publish(self, entry: Entry, manifest: Manifest) -> None:
        """`manifest`, naming this relay's socket and this process as its server (under the write lock)."""
        handed = dataclasses.replace(manifest, handle={**manifest.handle, "socket": self.socket},
                                     server=Owner.current())
        write_manifest(entry.manifest_path, handed)

    def close(self) -> None:
        """Stop serving and waiting, give the fds and the lock back (the mapping itself stays valid)."""
        with self._closing:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            if self._server is not None:
                self._server.close()
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()  # in place: an owner's chunk list is this list
            os.close(self._lock)

    def _forget_in_child(self) -> None:
        """In a forked child: close its copies of the fds and of the serve lock (the lock's open file is shared,
        so a child outliving its parent would keep the turn, and the memory, forever); the parent's stay."""
        self._closed = True
        for fd in [*self._fds, self._lock]:
            try:
                os.close(fd)
            except OSError:
                pass


_LIVE: "weakref.WeakSet[Relay]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for relay in list(_LIVE):
        relay._forget_in_child()
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
