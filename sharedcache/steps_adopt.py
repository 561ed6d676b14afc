"""The built-in steps of an adopt plan: a save that found, under its key, the arena a dead owner published
for the same model takes it over instead of loading a second copy. It runs in the role's save order:
intercept builds the skeleton as an attacher does and maps the arena, align binds the skeleton to it,
serialize publishes it again as this owner's. The orchestrator (sharedcache.instance) chooses this plan
only while it holds the entry's claim, so no other owner can publish there meanwhile.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from . import backends
from .cache import Entry
from .errors import FingerprintMismatch, HandoverError, ManifestError, SharedCacheError
from .fingerprint import Fingerprint, differences
from .manifest import Owner, boot_id
from .phases import step
from .run import Fallback, RunState, spreads
from .settings import CacheSettings
from .steps_load import align_load, intercept_load, verify_load

log = logging.getLogger(__name__)


def adoptable(entry: Entry, fingerprint: Fingerprint, settings: CacheSettings, source: Any) -> bool:
    """Save, holding `entry`'s claim: is the arena published there by a dead owner this model's, for a backend
    that hands it to a new owner, and may this source build the skeleton to bind it? Another model's arena
    there is refused (FingerprintMismatch) unless cache.on_mismatch=fallback lets this save replace it."""
    if not (settings.adopt and getattr(source, "adopts", False)) or spreads(source) or not entry.published():
        return False
    try:
        manifest = entry.read()
        backend = backends.backend_class(manifest.backend)
    except (ManifestError, SharedCacheError):  # unreadable, or a backend we do not know: replace it
        return False
    if manifest.part is not None or manifest.owner.boot_id != boot_id() or not backend.adopts \
            or not backend.orphan_attachable(entry.dir, manifest):
        return False
    differing = differences(fingerprint, manifest, spreads=False)
    if differing and settings.on_mismatch != "fallback":
        raise FingerprintMismatch(entry.key, differing, hint=(
            "The arena a dead owner left under this key holds another model; instances may still map it. "
            "Set cache.on_mismatch=fallback to load and publish this model in its place, use another cache.key, "
            "or remove the entry with `sharedcache gc` once nothing maps it."))
    return not differing


@step("intercept", "adopt", reads=("source", "settings", "mode", "parts.entry"),
      provides=("model", "parts.refs", "expected", "backend", "parts.manifest", "parts.arena"))
def intercept_adopt(s: RunState) -> Fallback | None:
    refused = intercept_load(s)
    if refused is not None:
        return refused
    p = s.head
    p.manifest = p.entry.read()  # what the dead owner published; ours to replace, nobody else's meanwhile
    s.backend = backends.get_backend(p.manifest.backend, s.settings)
    p.arena = s.backend.adopt(p.entry.dir, p.manifest)  # ours to give back only once published again
    return None


step("align", "adopt", reads=("settings", "expected", "parts.manifest", "parts.arena", "parts.refs"),
     provides=("parts.refs",))(align_load)
step("verify", "adopt", reads=("settings", "parts.arena", "parts.manifest"))(verify_load)


@step("serialize", "adopt", reads=("role", "settings", "parts.entry", "parts.manifest", "parts.claim",
                                   "parts.arena"),
      provides=("parts.manifest",))
def serialize_adopt(s: RunState) -> None:
    p = s.head
    dead = p.manifest.owner.pid
    current = p.entry.read()  # a surviving mapper may have taken over serving the arena since intercept read it
    if not current.same_arena(p.manifest):
        raise HandoverError(f"entry {s.settings.key!r} changed while it was being taken over.",
                            hint="Start the prefill again.")
    p.manifest = dataclasses.replace(current, owner=Owner.current(), created=time.time())
    p.claim.publish(p.manifest)  # the same arena, layout and checksums (and its server), under this owner
    p.claim.arena = p.arena  # the owner's from now on: given back (its file removed) when this owner stops
    log.info("[%s] took over %s from its dead owner (pid %d): %d tensors, %d bytes, nothing loaded",
             s.role.name, s.settings.key, len(p.manifest.tensors), p.manifest.payload_bytes, dead)
