"""Exception classes: every failure a user can act on has its own type.

Messages read "[component] what happened. What to do." so that a log line alone is
enough to fix the problem.
"""
from __future__ import annotations

import errno


class ExitCode:
    """What `sharedcache` and `launch.py` exit with, by what the operator should do (README: Exit codes)."""

    OK = 0
    FAILED = 1  # anything else: a bug, or an error of the framework underneath
    CONFIG = 2  # fix the configuration or the command line (wrong model, key, backend, unsupported model)
    RETRY = 3  # try again: no owner yet, owner gone, key owned by another live instance
    INTEGRITY = 4  # the entry is not usable as published: remove it (`sharedcache gc`) and publish again
    SYSTEM = 5  # the system refused (disk full, permissions, address space, GPU driver)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM (e.g. `kill`, a container stop)


MESSAGE_LIMIT = 2000  # characters of a message, and of a hint: a log line, not a dump of what was read


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def short(value: object, limit: int = 80) -> str:
    """repr(value), shortened to about `limit` characters: how a message quotes what it read."""
    return _clip(repr(value), limit)


class SharedCacheError(Exception):
    """Base class of every error sharedcache raises on purpose."""

    component = "sharedcache"
    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # whatever a message quoted: one bounded line
        message, hint = _clip(message, MESSAGE_LIMIT), hint and _clip(hint, MESSAGE_LIMIT)
        self.message, self.hint = message, hint  # apart, for callers that re-word or re-raise them
        text = f"[{self.component}] {message}"
        if hint:
            text += f" {hint}"
        super().__init__(text)

    def as_report(self) -> dict:
        """What a failed run's report says about it (launch.py's report.json, an SGLang rank's failure file)."""
        return {"ok": False, "error": type(self).__name__, "message": self.message, "hint": self.hint,
                "exit_code": int(self.exit_code)}


class ConfigError(SharedCacheError):
    """The composed configuration cannot work (unknown mode, impossible phase order...)."""

    component = "sharedcache.config"
    exit_code = ExitCode.CONFIG


class ManifestError(SharedCacheError):
    """A manifest is missing, unreadable or inconsistent; nothing was mapped."""

    component = "sharedcache.manifest"
    exit_code = ExitCode.INTEGRITY


class NoManifest(ManifestError):
    """Nothing is published under the key (yet): a wrong key or directory, or an owner not started."""

    exit_code = ExitCode.CONFIG


class EntryRemoved(NoManifest):
    """The entry's directory went while a lock file in it was being opened: gc removed an emptied entry. An
    owner makes it again; an attacher goes on waiting for a manifest."""


class ArenaError(SharedCacheError):
    """The arena's memory cannot be created, imported or mapped as the manifest says."""

    component = "sharedcache.arena"


class OwnerGone(ArenaError):
    """The entry's owner died, or left while handing over, and the backend cannot attach without it."""

    exit_code = ExitCode.RETRY


class HandoverError(ArenaError):
    """The owner and the attacher disagree on the handover of memory handles (a protocol fault)."""

    exit_code = ExitCode.INTEGRITY


class DriverError(ArenaError):
    """A driver or system call behind the arena failed; `call` and `code` name it."""

    exit_code = ExitCode.SYSTEM

    def __init__(self, message: str, *, call: str, code: int | str | None = None, hint: str | None = None) -> None:
        self.call, self.code = call, code
        super().__init__(message, hint=hint)


class IntegrityError(ArenaError):
    """The mapped bytes are not the bytes that were published (size, checksum)."""

    exit_code = ExitCode.INTEGRITY


class BindError(SharedCacheError):
    """The model skeleton and the published tensors do not fit together; the model was not touched."""

    component = "sharedcache.bind"
    exit_code = ExitCode.INTEGRITY


class FingerprintMismatch(SharedCacheError):
    """The published entry was made from another model, dtype, device or engine."""

    component = "sharedcache.fingerprint"
    exit_code = ExitCode.CONFIG

    def __init__(self, key: str, differences: list[tuple[str, object, object]], hint: str | None = None) -> None:
        self.differences = differences
        fields = ", ".join(name for name, _, _ in differences)
        detail = "; ".join(f"{n}: ours={short(o)} published={short(p)}" for n, o, p in differences)
        super().__init__(
            f"entry {key!r} was published for another model (differing fields: {fields}). {detail}.",
            hint=hint or "Start the decode with the same model/dtype as the prefill, use another cache.key, "
            "or set cache.on_mismatch=fallback to load normally instead.",
        )


class AttachTimeout(SharedCacheError):
    """No owner published the entry within cache.wait_timeout_s."""

    component = "sharedcache.attach"
    exit_code = ExitCode.RETRY


class EntryOwned(SharedCacheError):
    """Another live instance owns (or is saving) this entry."""

    component = "sharedcache.owner"
    exit_code = ExitCode.RETRY


class BackendUnavailable(SharedCacheError):
    """The requested memory backend cannot run on this machine."""

    component = "sharedcache.backend"
    exit_code = ExitCode.CONFIG


class UnsupportedModel(SharedCacheError):
    """The model uses a feature that cannot be shared (quantized params, offload, PEFT, ...)."""

    component = "sharedcache.model"
    exit_code = ExitCode.CONFIG


class EntryError(ConfigError):
    """A cache directory or a file inside an entry is not what sharedcache made (a symbolic link, another
    user's, open to others, the wrong type, hard-linked); nothing was read or mapped through it."""

    component = "sharedcache.entry"
    exit_code = ExitCode.CONFIG  # fix the directory's ownership or permissions (a ConfigError by kind)


class StorageError(SharedCacheError):
    """The system refused a file or memory operation (disk full, read-only, permission, name too long,
    out of address space); what the operation had begun was undone."""

    component = "sharedcache.storage"
    exit_code = ExitCode.SYSTEM

    _HINTS = {
        errno.ENOSPC: "The filesystem holding it is full (space or inodes: `df -h`, `df -i`); free some or point "
                      "cache.dir at another filesystem. In a container /dev/shm is small by default (Docker: 64 MB): "
                      "start it with --shm-size (or --ipc=host), or mount a larger tmpfs for cache.dir.",
        errno.EDQUOT: "Your disk quota is exhausted; free some or point cache.dir at another filesystem.",
        errno.EROFS: "It is on a read-only filesystem; point cache.dir at a writable one (e.g. under /dev/shm).",
        errno.EACCES: "Check the permissions on the path (cache.dir must be a directory of yours, mode 700).",
        errno.EPERM: "Check the permissions and attributes on the path (cache.dir must be a directory of yours).",
        errno.ENAMETOOLONG: "Shorten cache.dir or cache.key.",
        errno.ENOMEM: "Not enough memory or address space (see `ulimit -v`) to map it; raise the limit or free memory.",
        errno.EMFILE: "Too many open files in this process; raise `ulimit -n`.",
        errno.ENOTDIR: "A component of the path is not a directory; check cache.dir.",
        errno.EISDIR: "A directory stands where sharedcache keeps a file; remove it and start again.",
        errno.ENXIO: "A socket or device stands where sharedcache keeps a file; remove it and start again.",
    }

    @classmethod
    def from_os(cls, e: OSError, doing: str) -> "StorageError":
        """`doing`: what was attempted, e.g. 'writing the manifest /dev/shm/x/k/manifest.json'."""
        why = e.strerror or str(e)
        return cls(f"{doing} failed: {why}.", hint=cls._HINTS.get(e.errno, "Check cache.dir."))


class ReportUnwritable(StorageError):
    """The run's report could not be written (its run directory is full, read-only, or holds something else
    under its name): the run ends, and no second report of that failure is attempted."""

    @classmethod
    def at(cls, path: object, e: OSError) -> "ReportUnwritable":
        return cls(f"writing the run's report {path} failed: {e.strerror or e}.",
                   hint="Make room in the run directory or fix what stands at that path, or give the run another "
                        "directory (hydra.run.dir=...).")


class Interrupted(SharedCacheError):
    """A run stopped by a signal (Ctrl-C: SIGINT; SIGTERM) before it finished: one line, a report that says so,
    and the shell's code for that signal (128 + its number)."""

    component = "sharedcache.launch"
    exit_code = ExitCode.INTERRUPTED

    def __init__(self, signum: int, detail: str = "nothing this run published stays behind (attached instances keep "
                                                  "their mapping).") -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}: {detail}")
        self.exit_code = 128 + signum
