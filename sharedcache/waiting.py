"""Waiting for an entry's owner: until it is published, until the key is free to take over, or timeout.

The wait returns what happened instead of raising: the orchestrator decides what a claimed key or a
timeout means for the run (auto mode saves itself; load mode reports the timeout).
"""
from __future__ import annotations

import difflib
import enum
import os
import time
from dataclasses import dataclass

from .cache import CacheDir, Entry, EntryState
from .errors import AttachTimeout, ManifestError, SharedCacheError
from .manifest import Manifest
from .ownership import Claim
from .progress import ProgressFn, Throttle
from .settings import CacheSettings

_POLL_S = 0.05


class Outcome(enum.Enum):
    PUBLISHED = "published"
    CLAIMED = "claimed"  # nobody published or claimed the key any more: it is ours now (auto mode)
    TIMED_OUT = "timed out"


@dataclass
class WaitResult:
    outcome: Outcome
    why: str = ""  # the entry's state when the wait ended, for a timeout's message
    loading: bool = False  # TIMED_OUT: an owner still held the key, loading, when the wait gave up
    manifest: Manifest | None = None
    hold: int | None = None  # PUBLISHED: an fd holding the entry's attach lock (see Entry.hold_for_attach)
    claim: Claim | None = None  # CLAIMED

    def release(self) -> None:
        """Give back what the wait took (the attach hold, or the claim)."""
        hold, self.hold, claim, self.claim = self.hold, None, self.claim, None
        try:
            if hold is not None:
                os.close(hold)
        finally:
            if claim is not None:
                claim.close()


def waiting_deadlines(settings: CacheSettings) -> tuple[float, float]:
    """The monotonic deadlines of a wait starting now: nobody loading the key (cache.wait_timeout_s), and
    an owner loading it (cache.settle_timeout_s, never shorter)."""
    now = time.monotonic()
    return now + settings.wait_timeout_s, now + max(settings.wait_timeout_s, settings.settle_timeout_s)


def timed_out(found: WaitResult, settings: CacheSettings, key: str, what: str, start_hint: str) -> AttachTimeout:
    """The AttachTimeout of a wait that gave up on `what`, saying which deadline ended it (and, where nobody was
    loading `key`, which keys are published beside it: a misspelt cache.key looks just like a missing prefill)."""
    if found.loading:
        return AttachTimeout(f"waited {max(settings.wait_timeout_s, settings.settle_timeout_s):g}s for {what}; "
                             f"{found.why}.", hint="Look at the owner's log for why its load is slow, or raise "
                             "cache.settle_timeout_s.")
    return AttachTimeout(f"waited {settings.wait_timeout_s:g}s for {what}; nobody is loading it: {found.why}.",
                         hint=f"{start_hint}, or raise cache.wait_timeout_s.{keys_beside(settings.dir, key)}")


def keys_beside(root: str, key: str) -> str:
    """' Published there: ...; did you mean cache.key=...?', or that nothing is: the keys of `root` but `key`."""
    keys = []
    try:
        entries = CacheDir(root).entries()
    except (SharedCacheError, OSError):
        return ""  # the timeout's own message stands; this is only a guess at a typo
    for entry in entries:
        try:
            if entry.key != key and entry.published():
                keys.append(entry.key)
        except (SharedCacheError, OSError):
            continue  # an entry that cannot be read is not a key anyone attaches to
    if not keys:
        return f" Nothing is published in {root}."
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    listed = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    return f" Published there: {listed}" + (f"; did you mean cache.key={near[0]}?" if near else ".")


def wait_for_owner(entry: Entry, *, deadline: float, loading_deadline: float, role: str, reclaim: bool,
                   progress: ProgressFn) -> WaitResult:
    """Poll until the entry is published by an owner an attacher may use (a live one, or a dead one that
    nobody is replacing); a present but invalid manifest fails at once. Gives up at the monotonic `deadline`
    when nobody is loading the key, else while an owner holds its claim (alive: the claim is a lock) at
    `loading_deadline`: a decode started beside a slow prefill does not give up on it half-way.
    The attach lock is taken before the manifest is read, so gc cannot remove what the caller is about to
    map. With `reclaim` (auto mode), a key that nobody publishes or claims any more is claimed."""
    shown = Throttle(progress, role, after=0.0, every=1.0)
    while True:
        result = _look(entry, reclaim)
        now = time.monotonic()
        if result.outcome is Outcome.TIMED_OUT and now >= deadline:
            if entry.claimed():
                result.why, result.loading = "an owner holds the key and is still loading it", True
            if not result.loading or now >= loading_deadline:
                shown.end(f"gave up waiting for {entry.key!r} after {shown.elapsed:.0f}s ({result.why})")
                return result
            shown.update(f"waiting for {entry.key!r}: an owner is loading it", shown.elapsed,
                         loading_deadline - now + shown.elapsed, "s")
            time.sleep(_POLL_S)
            continue
        if result.outcome is not Outcome.TIMED_OUT:
            try:  # the callback is the caller's code: what we took must not leak if it raises
                shown.end(f"{entry.key!r} {result.outcome.value} after {shown.elapsed:.1f}s of waiting")
            except BaseException:
                result.release()
                raise
            return result
        shown.update(f"waiting for an owner to publish {entry.key!r} in {entry.root} ({result.why})",
                     shown.elapsed, deadline - now + shown.elapsed, "s")
        time.sleep(_POLL_S)


def _look(entry: Entry, reclaim: bool) -> WaitResult:
    """One look at the entry: PUBLISHED or CLAIMED, else TIMED_OUT with the state that keeps us waiting."""
    why = "no owner has published it yet"
    if not os.path.lexists(entry.root):
        why = f"{entry.root} does not exist yet"
    elif entry.published():
        found = _published(entry)
        if isinstance(found, WaitResult):
            return found
        why = found or why
    if reclaim and not entry.claimed():
        try:
            return WaitResult(Outcome.CLAIMED, claim=Claim.take(entry, retry_s=0))
        except SharedCacheError:
            pass  # someone else took it: keep waiting for their manifest
    return WaitResult(Outcome.TIMED_OUT, why)


def _published(entry: Entry) -> WaitResult | str | None:
    """The usable manifest with its hold, or why the standing one cannot be used yet (None: it vanished)."""
    hold = entry.hold_for_attach()
    try:
        manifest = entry.read()
        # nobody holding it (None) is as good as live here: the attach itself says whether an orphan can be used
        state = entry.liveness(manifest) or EntryState.ORPHANED
        if state.attachable_now:
            result, hold = WaitResult(Outcome.PUBLISHED, manifest=manifest, hold=hold), None
            return result
        if state is EntryState.REBOOTED:  # what gc and `ls` call stale: never attached to
            return "its manifest is from before the last reboot (stale)"
        return f"owner pid {manifest.owner.pid} is gone and a new owner is loading"
    except ManifestError:
        if entry.published():  # not a race with the owner removing it
            raise
        return None
    finally:
        if hold is not None:
            os.close(hold)
