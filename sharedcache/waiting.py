"""Waiting for an entry's owner: until it is published, until the key is free to take over, or timeout.

The wait returns what happened instead of raising: the orchestrator decides what a claimed key or a
timeout means for the run (auto mode saves itself; load mode reports the timeout).
"""
from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass

from .cache import Entry, EntryState
from .errors import ManifestError, SharedCacheError
from .manifest import Manifest
from .ownership import Claim
from .progress import ProgressFn, Throttle

_POLL_S = 0.05


class Outcome(enum.Enum):
    PUBLISHED = "published"
    CLAIMED = "claimed"  # nobody published or claimed the key any more: it is ours now (auto mode)
    TIMED_OUT = "timed out"


@dataclass
class WaitResult:
    outcome: Outcome
    why: str = ""  # the entry's state when the wait ended, for a timeout's message
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


def wait_for_owner(entry: Entry, *, deadline: float, timeout_s: float, role: str, reclaim: bool,
                   progress: ProgressFn) -> WaitResult:
    """Poll until the entry is published by an owner an attacher may use (a live one, or a dead one that
    nobody is replacing), until the monotonic `deadline`; a present but invalid manifest fails at once.
    The attach lock is taken before the manifest is read, so gc cannot remove what the caller is about to
    map. With `reclaim` (auto mode), a key that nobody publishes or claims any more is claimed."""
    shown = Throttle(progress, role, after=0.0, every=1.0)
    while True:
        result = _look(entry, reclaim)
        if result.outcome is Outcome.TIMED_OUT and time.monotonic() >= deadline:
            shown.end(f"gave up waiting for {entry.key!r} after {timeout_s:g}s ({result.why})")
            return result
        if result.outcome is not Outcome.TIMED_OUT:
            try:  # the callback is the caller's code: what we took must not leak if it raises
                shown.end(f"{entry.key!r} {result.outcome.value} after {shown.elapsed:.1f}s of waiting")
            except BaseException:
                result.release()
                raise
            return result
        shown.update(f"waiting for an owner to publish {entry.key!r} in {entry.root} ({result.why})",
                     shown.elapsed, timeout_s, "s")
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
