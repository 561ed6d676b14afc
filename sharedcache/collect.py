"""`sharedcache gc`'s removal policy: which entries nothing can use, and removing them without racing an
owner or an attacher. The CLI prints what `sweep` decided; a dry run decides the same way, on the same files,
and removes nothing.

Removed: an entry whose owner is gone (dead, or from another boot), one whose manifest cannot be read, and
the leftovers of an owner that never published; with the last of an entry's files go its lock files and its
directory (a process that opened a lock file before finds it unlinked once it holds the lock and takes it
again at the path: files.lock_current), and so does a directory left holding nothing but lock files.

Never touched: an entry whose owner lives or that a new owner is claiming (the owner lock), one that an
instance is attached or attaching to (the attach lock, held from before an attacher re-reads the manifest
until its mapping dies), and one whose directory or files are not what sharedcache made (a directory, link,
FIFO or device where it keeps a file: reported, nothing of the entry removed, by gc and its dry run alike).
The slow checks run first; the locks are then taken without waiting and the entry removed only if it did not
change meanwhile.

Host copies (sharedcache.hostcopy) are judged apart (`sweep_host_copies`): one that a later owner of the key
can refill from stays, also when gc removes the stale entry it was copied from; an unfinished or unreadable
one, or one of another model than the entry publishes, goes; `--host-copies` removes every one whose entry no
live owner holds.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .cache import OWNER_FILE, SERVE_LOCK, TEMP_FILE, CacheDir, Entry, EntryState
from .errors import EntryOwned, ManifestError, SharedCacheError, StorageError
from .hostcopy import HOST_FILE, HOST_TEMP, discard, read_host_copy
from .ownership import Claim
from .settle import SETTLED_NAME


@dataclass(frozen=True)
class Verdict:
    """What gc did with one entry directory."""

    key: str
    removed: bool  # removed, or in a dry run: would be
    why: str | None  # why it went; why it was kept where that needs saying (None: in use, or nothing there)
    listed: bool  # `ls` lists it: counted among the kept ones when it stays


@dataclass(frozen=True)
class _Kept:
    """An entry gc meant to remove but could not remove all of."""

    reason: str


def sweep(cache: CacheDir, *, dry_run: bool) -> Iterator[Verdict]:
    """Every entry of `cache` in listing order, removed (dry run: judged) one at a time. One entry that
    cannot be judged or removed is kept and reported; the others are still collected."""
    for entry in cache.entries():
        listed = _shows_in_ls(entry)  # before the entry can go
        try:
            why = _collect(entry, dry_run=dry_run)
        except (SharedCacheError, OSError) as e:
            yield Verdict(entry.key, removed=False, why=str(e), listed=listed)
            continue
        if isinstance(why, _Kept):
            yield Verdict(entry.key, removed=False, why=why.reason, listed=listed)
        else:
            yield Verdict(entry.key, removed=why is not None, why=why, listed=listed)


def _shows_in_ls(entry: Entry) -> bool:
    """Counted as `ls` counts: something published, or an entry whose check fails (listed as refused)."""
    try:
        return entry.published()
    except (SharedCacheError, OSError):
        return True


def _collect(entry: Entry, *, dry_run: bool) -> str | _Kept | None:
    """Remove `entry` if nothing can use it: why it went, None if it is in use, or why it stayed."""
    if not entry.check():  # gone meanwhile; or not what sharedcache made (raises, reported)
        return None
    before = _snapshot(entry)
    why = _collectable(entry)
    if why is None:
        return None
    foreign = _foreign(_planned(entry))  # the dry run and gc judge the same files: both leave such an entry
    if foreign:
        return _Kept(foreign)
    try:
        claim = Claim.take(entry, retry_s=0)  # an owner that publishes nothing: closing it only gives the key up
    except EntryOwned:
        return None  # someone became the owner meanwhile (any other refusal is reported)
    with claim:
        unused = entry.lock_unused()
        if unused is None:
            return None  # an instance is attached, or attaching right now
        try:
            if _snapshot(entry) != before:
                return None
            if dry_run:  # it would go: nothing owns, maps or attaches to it, and it did not change meanwhile
                return why
            with entry.write_lock():
                paths = _planned(entry)
                foreign = _foreign(paths)  # a file swapped meanwhile: removed nothing yet
                left = [foreign] if foreign else [problem for problem in map(_remove, paths) if problem]
                if not left:
                    entry.remove_emptied()
        finally:
            os.close(unused)
    return _Kept("; ".join(left)) if left else why


def _planned(entry: Entry) -> list[Path]:
    """Every file gc removes with an entry (those present)."""
    return [entry.manifest_path, entry.dir / SETTLED_NAME, *_leftovers(entry), *_serve_locks(entry)]


def _foreign(paths: list[Path]) -> str | None:
    """Why the entry is not gc's to remove: the first of its files that is no plain file (or socket) of the
    kind sharedcache writes; None when all are."""
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"cannot inspect {path}: {e.strerror}"
        if stat.S_ISREG(mode) or (stat.S_ISSOCK(mode) and path.suffix == ".sock"):
            continue
        kind = ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device")
        return f"{path} is {kind}, not a file sharedcache made; remove it by hand, then run gc again"
    return None


def _leftovers(entry: Entry) -> list[Path]:
    """Arena files, handle sockets and half-written manifests or marks (an owner killed inside the rename)."""
    try:
        names = os.listdir(entry.dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StorageError.from_os(e, f"listing cache entry directory {entry.dir}") from None
    return [entry.dir / n for n in sorted(names)
            if OWNER_FILE.fullmatch(n) or TEMP_FILE.fullmatch(n) or HOST_TEMP.fullmatch(n)]


def _serve_locks(entry: Entry) -> list[Path]:
    """The serve locks of the entry's arenas (sharedcache.handon): removed along with what gc collects, when
    nothing maps an arena of the entry any more, never as a reason to collect it."""
    try:
        return [entry.dir / n for n in sorted(os.listdir(entry.dir)) if SERVE_LOCK.fullmatch(n)]
    except FileNotFoundError:
        return []


def _remove(path: Path) -> str | None:
    """Unlink one file of an entry (checked by _foreign under the entry's locks)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"cannot remove {path}: {e.strerror}"
    return None


def _snapshot(entry: Entry) -> tuple:
    """What gc decided on: the manifest's identity (never its contents: it may be a FIFO) and the
    leftover files present."""
    try:
        st = os.lstat(entry.manifest_path)
        manifest = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    except OSError:
        manifest = None
    return manifest, [p.name for p in _leftovers(entry)]


def _collectable(entry: Entry) -> str | None:
    """Why the entry can go, or None to keep it."""
    if entry.claimed():
        return None  # a live owner, or one still loading
    if not entry.published():
        if _leftovers(entry):
            return "files left by an owner that never published"
        return "nothing but lock files left" if entry.only_locks() else None
    try:
        m = entry.read()
    except ManifestError as e:
        return f"unreadable manifest ({e})"
    if m.owner.running() or entry.mapped_by(m):
        return None  # a pid that runs again, or a process still mapping the arena: not for gc to judge
    state = entry.state(m)
    if state is EntryState.SERVED:
        return None  # a process that maps the arena hands it on: in use by definition
    if state is EntryState.REBOOTED:
        return "published before the last reboot"
    return f"owner pid {m.owner.pid} is gone ({state.label})"


def sweep_host_copies(cache: CacheDir, *, every: bool, dry_run: bool) -> Iterator[Verdict]:
    """The host copies gc removes (all of those no live owner holds with `every`), one entry at a time."""
    for entry in cache.entries():
        try:
            why = _host_copy_collectable(entry, every=every)
            if why is None:
                continue
            try:
                claim = Claim.take(entry, retry_s=0)  # no owner writes or refills a copy meanwhile
            except EntryOwned:
                yield Verdict(entry.key, removed=False, why="host copy kept: a live owner holds the entry",
                              listed=False)
                continue
            with claim:
                why = _host_copy_collectable(entry, every=every)  # again, now that no owner can write one
                if why is not None and not dry_run:
                    discard(entry.dir)
                    _remove_if_emptied(entry)
        except (SharedCacheError, OSError) as e:
            yield Verdict(entry.key, removed=False, why=f"host copy kept: {e}", listed=False)
            continue
        if why is not None:
            yield Verdict(entry.key, removed=True, why=f"host copy: {why}", listed=False)


def _remove_if_emptied(entry: Entry) -> None:
    """The entry directory, once its last file other than the locks went (the caller holds the claim)."""
    unused = entry.lock_unused()
    if unused is None:
        return
    try:
        with entry.write_lock():
            entry.remove_emptied()
    finally:
        os.close(unused)


def _host_copy_collectable(entry: Entry, *, every: bool) -> str | None:
    """Why the entry's host copy can go, None to keep it (or when there is none)."""
    if not entry.check():
        return None
    try:
        copy = read_host_copy(entry.dir)
    except ManifestError as e:
        return f"unreadable ({e})"
    if copy is None:  # none, or one whose owner died between writing it and its record
        return "unfinished (no record)" if (entry.dir / HOST_FILE).exists() else None
    if every:
        return "removed on request (--host-copies)"
    try:
        published = entry.read() if entry.published() else None
    except ManifestError:
        return None  # the entry's own verdict removes the manifest; the copy may still serve the key's next owner
    if published is not None and not copy.fits(published):
        return "it holds another model or layout than the entry publishes"
    return None
