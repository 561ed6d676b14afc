"""The cache directory: one subdirectory per entry key, private to its user.

<dir>/<key>/manifest.json   the published record (atomic rename)
<dir>/<key>/owner.lock      flock held exclusively by the owner for its whole life
<dir>/<key>/write.lock      flock held while a manifest is written or removed
<dir>/<key>/arena-*.bin     cpu_shm arena files
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, EntryOwned
from .manifest import MANIFEST_NAME, Manifest, read_manifest

_CLAIM_RETRY_S = 0.5
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` 0700 if needed; refuse a symlink, another owner, or group/other access."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"cache directory {path} is a symbolic link or not a directory; refusing it.",
                          hint="Point cache.dir at a real directory you own.")
    if st.st_uid != os.getuid():
        raise ConfigError(f"cache directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}).",
                          hint="Use a cache.dir of your own.")
    if st.st_mode & 0o077:
        raise ConfigError(f"cache directory {path} is accessible to other users (mode {oct(st.st_mode & 0o777)}).",
                          hint=f"Run `chmod 700 {path}` or choose another cache.dir.")
    return path


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

    def ensure(self) -> "Entry":
        ensure_private_dir(self.dir)
        return self

    def read(self) -> Manifest:
        return read_manifest(self.manifest_path)

    def published(self) -> bool:
        return self.manifest_path.exists()

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        fd = _open_lock(self.dir / "write.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(self, retry_s: float = _CLAIM_RETRY_S) -> int:
        """Become this entry's owner: an fd whose exclusive flock lives as long as the owner does.
        Liveness probes hold the lock shared for microseconds, so a refusal is retried briefly."""
        self.ensure()
        fd = _open_lock(self.dir / "owner.lock")
        deadline = time.monotonic() + retry_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            os.close(fd)
            raise EntryOwned(f"entry {self.key!r} in {self.root} is owned by another live instance"
                             f"{self._owner_hint()}.",
                             hint="Start this instance with a load role (role=decode) or cache mode auto "
                                  "to attach to it, or use another cache.key.") from None

    def claimed(self) -> bool:
        """True while some process holds the owner lock (an owner, or a saver still loading)."""
        path = self.dir / "owner.lock"
        if not path.exists():
            return False
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def owner_alive(self, manifest: Manifest) -> bool:
        """The process that published `manifest` is running and still holds the entry."""
        return manifest.owner.running() and self.claimed()

    def mapped_by(self, manifest: Manifest) -> list[int] | None:
        """Pids of the processes that map this entry's arena file (cpu_shm); None where the
        backend leaves no trace in /proc (GPU memory)."""
        name = manifest.handle.get("file")
        if not isinstance(name, str):
            return None
        path = os.path.realpath(self.dir / name)  # /proc/<pid>/maps shows resolved paths
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if path in (proc / "maps").read_text():
                    pids.append(int(proc.name))
            except OSError:  # the process ended, or is not ours to read
                continue
        return sorted(pids)

    def _owner_hint(self) -> str:
        try:
            return f" (pid {self.read().owner.pid})"
        except Exception:  # noqa: BLE001 - only decorates a message; the entry may be mid-publish
            return " (still saving, not yet published)"


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class CacheDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Entry:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"cache key {key!r} is not a plain name (letters, digits, '_', '.', '-'; "
                              "at most 128 characters).", hint="Set cache.key to such a name.")
        ensure_private_dir(self.root)
        return Entry(self.root, key)

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        return [Entry(self.root, p.name) for p in sorted(self.root.iterdir())
                if p.is_dir() and not p.is_symlink() and _KEY.fullmatch(p.name)]
