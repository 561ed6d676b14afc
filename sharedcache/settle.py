"""Settling: when an owner's engine has finished allocating its own memory beside the arena.

An engine that sizes a memory pool from what is free on its device (SGLang sizes its KV pool so)
must measure only once every other process on that device has stopped allocating; otherwise it
counts the owner's KV pool, allocated while it waited, as memory it may not use, or as its own
weights. Two mechanisms, both generic:

- the owner marks its entry *settled* once its engine allocated everything it keeps (pools,
  graphs); an attacher waits for that mark (or for the owner's death) before it measures;
- instances that size memory on one device take turns (`SizingTurn`, an exclusive flock per
  device in the cache root), from their measurement until their own pools are allocated, so two
  decodes starting together do not count each other's pools.

<dir>/<key>/settled.json   {"pid", "start_ticks", "boot_id"} of the owner that published the manifest
<dir>/turn-<device>.lock   flock held by whichever instance is sizing on that device
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import stat
import time
import weakref
from pathlib import Path

from .cache import Entry, EntryState, ensure_private_dir, open_lock
from .errors import AttachTimeout, ManifestError, StorageError
from .files import write_json_atomic
from .manifest import Manifest

SETTLED_NAME = "settled.json"
_POLL_S = 0.05
_LOG_EVERY_S = 10.0
log = logging.getLogger(__name__)


def mark_settled(entry: Entry, manifest: Manifest) -> None:
    """The owner's engine has allocated all it keeps: attachers may measure free memory now."""
    owner = manifest.owner
    data = {"pid": owner.pid, "start_ticks": owner.start_ticks, "boot_id": owner.boot_id, "at": time.time()}
    path = entry.dir / SETTLED_NAME
    with entry.write_lock():
        try:
            write_json_atomic(path, data, mode=0o600)
        except OSError as e:
            raise StorageError.from_os(e, f"writing {path}") from None


def clear_settled(entry: Entry) -> None:
    """Called by the owner going away (under the entry's write lock, with the manifest)."""
    (entry.dir / SETTLED_NAME).unlink(missing_ok=True)


def is_settled(entry: Entry, manifest: Manifest) -> bool:
    """Has the owner that published `manifest` (this very process, not a predecessor) settled?"""
    try:  # never blocks (a FIFO in its place) and never follows a link
        fd = os.open(entry.dir / SETTLED_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            data = json.loads(os.read(fd, 4096))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return False
    owner = manifest.owner
    return isinstance(data, dict) and (data.get("pid"), data.get("start_ticks"), data.get("boot_id")) == \
        (owner.pid, owner.start_ticks, owner.boot_id)


def wait_settled(entry: Entry, *, timeout_s: float, until_published: bool, role: str) -> Manifest | None:
    """Wait until no process will allocate more for this entry: its live owner settled, or the owner
    is dead with nobody loading a replacement (an orphan). Returns that manifest, or None when nobody
    publishes or claims the entry and `until_published` is false (auto mode: it will save itself).
    Raises AttachTimeout after `timeout_s`, naming what it waited for."""
    start = time.monotonic()
    deadline = start + timeout_s
    last_log = None
    while True:
        manifest, state = _settle_state(entry, until_published)
        if state is None:
            if last_log is not None:
                log.info("[%s] %s settled after %.1fs", role, entry.key, time.monotonic() - start)
            return manifest
        now = time.monotonic()
        if now >= deadline:
            raise AttachTimeout(f"waited {timeout_s:g}s for entry {entry.key!r} in {entry.root} to settle; {state}.",
                                hint="Start (or wait for) the prefill with the same cache.dir and cache.key, or "
                                     "raise cache.wait_timeout_s for a slow start.")
        if last_log is None or now - last_log >= _LOG_EVERY_S:
            log.info("[%s] waiting for %s to settle before sizing memory: %s (%.0fs / %gs)", role, entry.key,
                     state, now - start, timeout_s)
            last_log = now
        time.sleep(_POLL_S)


def _settle_state(entry: Entry, until_published: bool) -> tuple[Manifest | None, str | None]:
    """(manifest, None) when done waiting, else (None, what we are waiting for)."""
    if entry.published():
        try:
            manifest = entry.read()
        except ManifestError:
            if entry.published():
                raise
            return None, "its manifest is being replaced"
        held = entry.liveness(manifest)
        if held is EntryState.REBOOTED:  # its owner is gone too: replaced if someone holds the entry
            held = EntryState.REPLACING if entry.claimed() else None
        if held is EntryState.LIVE:
            if is_settled(entry, manifest):
                return manifest, None
            return None, f"owner pid {manifest.owner.pid} is still allocating its engine's memory"
        if held is EntryState.REPLACING:
            return None, f"owner pid {manifest.owner.pid} is gone and a new owner is loading"
        return manifest, None  # orphaned: nobody will allocate more for it
    if entry.claimed():
        return None, "its owner is loading the model"
    if until_published:
        return None, "no owner has published it yet"
    return None, None


class SizingTurn:
    """One instance at a time measures free memory and allocates its pools on a device.
    Acquired before measuring, released once the pools exist (or when the process dies)."""

    def __init__(self, root: str | os.PathLike, device: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", device)
        self.path = ensure_private_dir(Path(root)) / f"turn-{safe}.lock"
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, timeout_s: float, role: str) -> float:
        """Wait for the device's turn; returns the seconds waited."""
        if self._fd is not None:
            return 0.0
        fd = open_lock(self.path)
        start = time.monotonic()
        last_log = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if not math.isfinite(timeout_s) or now - start >= timeout_s:
                        raise AttachTimeout(
                            f"waited {timeout_s:g}s for another instance on this device to finish sizing its "
                            f"memory ({self.path}).", hint="Raise cache.wait_timeout_s if servers start slowly.")
                    if last_log is None or now - last_log >= _LOG_EVERY_S:
                        log.info("[%s] another instance is sizing its memory on this device; waiting (%s)",
                                 role, self.path.name)
                        last_log = now
                    time.sleep(_POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        return time.monotonic() - start

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._fd, self._finalizer = None, None

    def __enter__(self) -> "SizingTurn":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
