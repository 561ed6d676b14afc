"""What sharedcache trusts on disk (private directories and lock files, checked without following links),
and how it writes a file others read (atomically)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from .errors import EntryError, EntryRemoved, ReportUnwritable, StorageError


def check_private_dir(path: Path, what: str = "cache directory") -> bool:
    """False if `path` does not exist; True if it is a directory of ours that nobody else can enter;
    else an error naming what is wrong. Never follows a symbolic link and never creates anything."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StorageError.from_os(e, f"looking at {what} {path}") from None
    if stat.S_ISLNK(st.st_mode):
        raise EntryError(f"{what} {path} is a symbolic link; refusing to use it.",
                         hint="Point cache.dir at a real directory you own, or remove the link.")
    if not stat.S_ISDIR(st.st_mode):
        raise EntryError(f"{what} {path} is not a directory.", hint="Remove it, or point cache.dir elsewhere.")
    if st.st_uid != os.getuid():
        raise EntryError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}).",
                         hint="Use a cache.dir of your own.")
    if st.st_mode & 0o077:
        if st.st_mode & stat.S_ISVTX or os.path.ismount(path):  # /dev/shm, /tmp, /: shared by everyone
            hint = (f"{path} is a directory the whole system shares; do not change its mode. Point cache.dir "
                    f"at a directory of your own inside it, e.g. {Path(path) / f'sharedcache-{os.getuid()}'}.")
        else:
            hint = f"Run `chmod 700 {path}` or choose another cache.dir."
        raise EntryError(f"{what} {path} is accessible to other users (mode {oct(st.st_mode & 0o777)}).",
                         hint=hint)
    return True


def ensure_private_dir(path: Path, what: str = "cache directory") -> Path:
    """Create `path` 0700 if needed, then check it as check_private_dir does."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling link in its place: named below
    except OSError as e:
        raise StorageError.from_os(e, f"creating {what} {path}") from None
    if not check_private_dir(path, what):
        raise EntryError(f"{what} {path} vanished while being created.", hint="Check what else cleans cache.dir.")
    return path


def lstat_or_none(path: Path) -> os.stat_result | None:
    """os.lstat, None if absent; a path we may not look at is an error, not 'absent'."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError.from_os(e, f"looking at {path}") from None


def exists(path: Path) -> bool:
    return lstat_or_none(path) is not None


LOCK_WAIT_S = 30.0  # the entry's short locks are held for milliseconds; this long means a stopped process


def flock_within(fd: int, op: int, path: Path) -> None:
    """flock, waiting at most LOCK_WAIT_S: a process stopped while holding one of an entry's short locks
    (a gc under Ctrl-Z) must not hang every other instance of the key."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise EntryError(f"{path} has been held by another process for over {LOCK_WAIT_S:g}s; it is "
                                 "held for milliseconds normally, so that process is stopped or stuck.",
                                 hint="Find it with `fuser -v " + str(path) + "` and end or resume it.") from None
            time.sleep(0.01)


def open_lock(path: Path, *, create: bool = True) -> int:
    """A lock file of ours, opened without following links; anything else is an EntryError or StorageError.
    EntryRemoved when its directory is gone (gc removed the emptied entry meanwhile), FileNotFoundError when
    only the file is missing and `create` is False."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if not os.path.lexists(path.parent):
            raise EntryRemoved(f"{path.parent} was removed while opening {path.name} in it (gc removed an "
                               "entry that held only its lock files).",
                               hint="Start the instance again: an owner makes the entry anew.") from None
        if create:  # the directory came back between the two looks: as good as gone for this attempt
            raise EntryRemoved(f"{path.parent} was replaced while opening {path.name} in it.",
                               hint="Start the instance again.") from None
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            kind = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory", errno.ENXIO: "a socket"}[e.errno]
            raise EntryError(f"lock file {path} is {kind}; refusing to use it.",
                             hint=f"Remove {path} (sharedcache recreates its lock files) and start again.") from None
        raise StorageError.from_os(e, f"opening the lock file {path}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
        os.close(fd)
        raise EntryError(f"lock file {path} is not a plain file of yours; refusing to use it.",
                         hint=f"Remove {path} (sharedcache recreates its lock files) and start again.")
    return fd


RELOCK_TRIES = 100  # each retry means a gc removed the file between our open and our lock: a few at most


def lock_current(path: Path, op: int, *, wait: bool) -> int:
    """An fd holding flock `op` on the lock file that is at `path` now (BlockingIOError if `wait` is False
    and it is held). gc unlinks an emptied entry's lock files while it holds them, so a process that opened
    one before gets its lock on a file no longer there: it opens the path again instead of trusting a lock
    nobody else can see."""
    for _ in range(RELOCK_TRIES):
        fd = open_lock(path)
        try:
            if wait:
                flock_within(fd, op, path)
            else:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            if _is_at(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise EntryError(f"{path} was removed {RELOCK_TRIES} times in a row while taking its lock.",
                     hint="Another process keeps removing the entry (a gc in a loop?); stop it and start again.")


def _is_at(fd: int, path: Path) -> bool:
    """The file open as `fd` is still the one linked at `path`."""
    st = os.fstat(fd)
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_nlink > 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def lock_held(path: Path) -> bool:
    """Does some process hold the flock on the lock file `path` exclusively (False when there is no such file)?
    A probe: it takes the lock shared for an instant, never waits, and never creates the file (a probe must
    not keep gc from removing an emptied entry)."""
    try:
        fd = open_lock(path, create=False)
    except (FileNotFoundError, EntryRemoved):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = None, sort_keys: bool = False,
                      mode: int = 0o666, sync_dir: bool = False) -> None:
    """Write `data` as JSON to `path` so that a reader sees the old file or the new one, never part of one.

    A temp file in the same directory (`.<name>.<pid>.<random>.tmp`, which `sharedcache gc` recognises in
    an entry), created exclusively without following links (`mode`, less the umask), flushed to disk,
    then renamed over `path`; `sync_dir` also makes the rename itself survive a crash of the machine.
    Raises OSError, with the temp file removed."""
    path = Path(path)
    body = json.dumps(data, indent=indent, sort_keys=sort_keys).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        try:  # the rename is visible already; this only makes it durable
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def write_report(path: str | os.PathLike, data: Any) -> None:
    """A run's report (report.json), atomically; a path where it cannot be written is one ReportUnwritable,
    not an OSError's traceback."""
    try:
        write_json_atomic(path, data, indent=2, sort_keys=True)
    except OSError as e:
        raise ReportUnwritable.at(path, e) from None
