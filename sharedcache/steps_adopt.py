"""The built-in steps of an adopt plan: a save that found, under its key, the arena a dead owner published
for the same model takes it over instead of loading a second copy; or, where that arena went with the last
process that held it, refills a new one from the entry's host copy (sharedcache.hostcopy) instead of reading
the checkpoint. It runs in the role's save order: intercept builds the skeleton as an attacher does and maps
(or refills) the arena, align binds the skeleton to it, serialize publishes it as this owner's. The
orchestrator (sharedcache.instance) chooses this plan only while it holds the entry's claim, so no other
owner can publish there meanwhile.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from . import backends, hostcopy, refill
from .cache import Entry
from .errors import FingerprintMismatch, HandoverError, IntegrityError, ManifestError, SharedCacheError
from .fingerprint import Fingerprint, differences
from .manifest import Manifest, Owner, boot_id
from .phases import step
from .run import Fallback, RunState, spreads
from .settings import CacheSettings
from .steps_load import align_load, intercept_load, verify_load
from .steps_save import keep_host_copy

log = logging.getLogger(__name__)


def adoptable(entry: Entry, fingerprint: Fingerprint, settings: CacheSettings, source: Any) -> bool:
    """Save, holding `entry`'s claim: is the arena published there by a dead owner this model's, for a backend
    that hands it to a new owner, or does the entry keep a host copy of this model, and may this source build
    the skeleton to bind it? Another model's live arena there is refused (FingerprintMismatch) unless
    cache.on_mismatch=fallback lets this save replace it."""
    if not (settings.adopt and getattr(source, "adopts", False)) or spreads(source):
        return False
    return _orphan(entry, fingerprint, settings) is not None or hostcopy.usable(entry.dir, fingerprint) is not None


def _orphan(entry: Entry, fingerprint: Fingerprint, settings: CacheSettings) -> Manifest | None:
    """The manifest of a dead owner's arena under `entry` that this model can take over, if there is one."""
    if not entry.published():
        return None
    try:
        manifest = entry.read()
        backend = backends.backend_class(manifest.backend)
    except (ManifestError, SharedCacheError):  # unreadable, or a backend we do not know: replace it
        return None
    if manifest.part is not None or manifest.owner.boot_id != boot_id() or not backend.adopts \
            or not backend.orphan_attachable(entry.dir, manifest):
        return None
    differing = differences(fingerprint, manifest, spreads=False)
    if differing and settings.on_mismatch != "fallback":
        raise FingerprintMismatch(entry.key, differing, hint=(
            "The arena a dead owner left under this key holds another model; instances may still map it. "
            "Set cache.on_mismatch=fallback to load and publish this model in its place, use another cache.key, "
            "or remove the entry with `sharedcache gc` once nothing maps it."))
    return None if differing else manifest


@step("intercept", "adopt", reads=("source", "settings", "mode", "parts.entry", "parts.fingerprint", "parts.claim"),
      provides=("model", "parts.refs", "expected", "backend", "parts.manifest", "parts.arena"))
def intercept_adopt(s: RunState) -> Fallback | None:
    refused = intercept_load(s)
    if refused is not None:
        return refused
    p = s.head
    orphan = _orphan(p.entry, p.fingerprint, s.settings)  # ours to replace, nobody else's meanwhile
    if orphan is not None:
        p.manifest = orphan
        s.backend = backends.get_backend(orphan.backend, s.settings)
        p.arena = s.backend.adopt(p.entry.dir, orphan)  # ours to give back only once published again
        return None
    copy = hostcopy.usable(p.entry.dir, p.fingerprint)
    if copy is None:
        return Fallback("the arena its dead owner left went away meanwhile, and the entry keeps no host copy")
    s.backend = backends.get_backend(copy.manifest.backend, s.settings)
    try:
        p.arena = refill.refilled(s.backend, p.entry.dir, copy, s.source.device)
    except IntegrityError as e:  # the copy is removed: load the checkpoint
        return Fallback(str(e))
    p.claim.arena = p.arena  # this owner's own new arena: given back with the claim if anything below fails
    p.manifest = copy.manifest
    return None


step("align", "adopt", reads=("settings", "expected", "parts.manifest", "parts.arena", "parts.refs"),
     provides=("parts.refs",))(align_load)
step("verify", "adopt", reads=("settings", "parts.arena", "parts.manifest"))(verify_load)


@step("serialize", "adopt", reads=("role", "settings", "source", "parts.manifest", "parts.claim",
                                   "parts.arena"),
      provides=("parts.manifest",))
def serialize_adopt(s: RunState) -> None:
    p = s.head
    if p.arena.owned:  # refilled from the host copy: a new arena, published as a save publishes one
        _publish_refilled(s)
        return
    dead = p.manifest.owner.pid

    def adopted(standing: Manifest | None) -> Manifest:
        """The same arena, layout and checksums (and its server), under this owner; read under the write lock,
        since a surviving mapper may name itself the arena's server until then."""
        if standing is None or not standing.same_arena(p.manifest):
            raise HandoverError(f"entry {s.settings.key!r} changed while it was being taken over.",
                                hint="Start the prefill again.")
        return dataclasses.replace(standing, owner=Owner.current(), created=time.time())

    p.manifest = p.claim.publish_over(adopted)
    p.claim.arena = p.arena  # the owner's from now on: given back (its file removed) when this owner stops
    keep_host_copy(s, p)
    log.info("[%s] took over %s from its dead owner (pid %d): %d tensors, %d bytes, nothing loaded",
             s.role.name, s.settings.key, dead, len(p.manifest.tensors), p.manifest.payload_bytes)


def _publish_refilled(s: RunState) -> None:
    p = s.head
    p.arena.sync()
    p.manifest = dataclasses.replace(p.manifest, owner=Owner.current(), created=time.time(), server=None,
                                     handle=p.arena.handle, device=p.arena.device)
    p.claim.publish(p.manifest)
    p.claim.arena = p.arena
    p.arena.seal()
    keep_host_copy(s, p)
    took = p.arena.timings.get("host_refill", 0.0)
    log.info("[%s] refilled %s from its host copy: %d bytes in %.2fs (%.1f GB/s), nothing read from the checkpoint",
             s.role.name, s.settings.key, p.manifest.arena.size, took, p.manifest.arena.size / max(took, 1e-9) / 1e9)
