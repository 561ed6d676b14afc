"""Keeping published arenas resident with no model and no engine: an arena holder.

An engine that owns its weights (an SGLang prefill: its own loader post-processes them) publishes them in its
rank processes; a holder maps each rank's arena as an attacher would, holding the entry's attach lock, and keeps
it. With a backend whose memory outlives its owner and is handed on by its mappers (cuda_vmm, cpu_memfd), the
weights then stay while the holder lives, whatever happens to the engines: when the owner stops or dies the
holder (or another mapper) serves the arena, a restarted owner takes it over, and new instances of any role
attach, so restarting every engine costs their own start-up, not a weight load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import backends
from .backends.base import Arena
from .cache import CacheDir
from .errors import ConfigError, ManifestError
from .manifest import Manifest
from .progress import ProgressFn, log_progress
from .settings import CacheSettings
from .waiting import Outcome, timed_out, wait_for_owner, waiting_deadlines


@dataclass
class Held:
    """One entry's arena, mapped and kept by this process."""

    root: str  # the cache directory
    key: str
    manifest: Manifest
    arena: Arena | None
    _hold: int | None  # the entry's attach lock, kept while the arena is held (gc leaves a held entry alone)

    def close(self) -> None:
        """Stop holding: the attach lock goes now, the mapping and its handles with the last view of it."""
        hold, self._hold, self.arena = self._hold, None, None
        if hold is not None:
            os.close(hold)


def hold(settings: CacheSettings, key: str, *, progress: ProgressFn = log_progress) -> Held:
    """Wait (up to cache.wait_timeout_s) for `key` to be published, then map and keep its arena."""
    entry = CacheDir(settings.dir).entry(key)
    deadline, loading_deadline = waiting_deadlines(settings)
    found = wait_for_owner(entry, deadline=deadline, loading_deadline=loading_deadline, role="holder",
                           reclaim=False, progress=progress)
    if found.outcome is not Outcome.PUBLISHED:
        raise timed_out(found, settings, key, f"entry {key!r} to be published in {settings.dir}",
                        "Start the engine that owns the weights (role=prefill) with the same cache.dir and model")
    try:
        arena = backends.get_backend(found.manifest.backend, settings).attach(entry.dir, found.manifest)
        if arena.relay is None:
            raise ConfigError(f"entry {key!r} was published with backend {found.manifest.backend!r}, which has no "
                              "handles to hand on: its owner removes the arena on a clean stop, so a holder cannot "
                              "keep it reachable.",
                              hint="Publish it with cache.backend=cuda_vmm (GPU) or cpu_memfd (CPU).")
    except BaseException:
        found.release()
        raise
    arena.relay.keep_published(found.manifest)  # a clean stop of the owner leaves the weights published, here
    return Held(settings.dir, key, found.manifest, arena, found.hold)


def superseded(held: Held) -> bool:
    """Does the entry now publish another arena than the one held (a new owner loaded its own)? The held
    one then only takes memory: let it go and hold the new one."""
    entry = CacheDir(held.root).entry(held.key)
    try:
        current = entry.read()
    except ManifestError:
        return False  # nothing published: a clean stop this holder's relay publishes again, or a new owner loading
    return not current.same_arena(held.manifest)
