"""The built-in steps of the phases (sharedcache.phases), each declaring what it reads and provides
of the run's state (sharedcache.run). A step returns None when done, or a Fallback or Takeover for
the orchestrator (sharedcache.instance) to act on.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import weakref
from typing import TYPE_CHECKING

from . import backends
from .errors import (ArenaError, AttachTimeout, ConfigError, FingerprintMismatch, IntegrityError, ManifestError,
                     OwnerGone, UnsupportedModel)
from .layout import TensorSlot, plan
from .manifest import ArenaInfo, Manifest, Owner
from .phases import step
from .progress import Throttle
from .roles import Mode
from .run import Fallback, RunState, Takeover
from .waiting import Outcome, wait_for_owner

if TYPE_CHECKING:  # torch comes with the first step, so that validating a role's order stays light
    import torch

    from .binding import TensorRef
    from .cache import Entry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- save

@step("intercept", "save", reads=("source", "entry", "settings"),
      provides=("model", "refs", "slots", "backend", "fingerprint"))
def intercept_save(s: RunState) -> Fallback | None:
    import torch

    from .binding import capture

    s.entry.check_publishable()
    t0 = time.perf_counter()
    s.model = s.source.load()
    s.load_seconds = time.perf_counter() - t0
    try:
        s.slots, s.refs = capture(s.model)
    except UnsupportedModel as e:
        if s.settings.on_unsupported == "fallback":
            return Fallback(str(e))
        raise
    device = s.refs[0].get().device if s.refs else torch.device("cpu")
    s.backend = backends.resolve(s.settings.backend, device, s.settings)
    s.fingerprint = s.source.fingerprint(s.model)
    return None


@step("align", "save", reads=("refs", "slots", "backend", "settings", "entry", "claim"), provides=("layout", "arena"))
def align_save(s: RunState) -> None:
    import torch

    from .binding import bind, view_of

    device = s.refs[0].get().device
    granularity = math.lcm(s.backend.granularity(device), s.settings.alignment)
    s.layout = plan(s.slots, alignment=s.settings.alignment, granularity=granularity)
    s.arena = s.claim.arena = s.backend.create(s.entry.dir, s.layout.size, device)
    specs = s.layout.by_name()
    by_root: dict[str, list[TensorRef]] = {}
    for ref in s.refs:
        by_root.setdefault(specs[ref.name].alias_of or ref.name, []).append(ref)
    # tensor by tensor: copy, rebind every ref of it, let the original go - peak stays near one copy
    shown = Throttle(s.progress, s.role.name, after=1.0, every=0.5)
    done, total = 0, max(s.layout.payload_bytes, 1)
    with torch.no_grad():
        for root, refs in by_root.items():
            spec = specs[root]
            s.arena.commit(spec.offset + spec.nbytes)
            src = refs[0].get()
            view = view_of(s.arena.base, spec)
            view.copy_(src)
            grad = src.requires_grad
            del src
            bind(refs, {root: view}, specs, requires_grad={root: grad})
            done += spec.nbytes
            shown.update("packing into the arena", done / 2**30, total / 2**30, "GiB")
    shown.end(f"packing into the arena: done in {shown.elapsed:.1f}s")


@step("serialize", "save", reads=("arena", "layout", "fingerprint", "backend", "claim"), provides=("manifest",),
      uses=("checksums",))
def serialize_save(s: RunState) -> None:
    s.arena.sync()  # every byte lands before anyone can attach
    manifest = Manifest(
        key=s.settings.key, fingerprint=s.fingerprint, owner=Owner.current(), backend=s.backend.name,
        handle=s.arena.handle, device=s.arena.device,
        arena=ArenaInfo(s.layout.size, s.layout.granularity, s.layout.alignment, s.layout.digest()),
        tensors=s.layout.tensors, created=time.time(), checksums=s.checksums)
    s.claim.publish(manifest)
    s.manifest = manifest
    s.arena.seal()  # from now on an in-place write by the owner faults instead of changing every instance
    log.info("[%s] published %s: %d tensors, %d bytes", s.role.name, s.settings.key,
             len(manifest.tensors), manifest.payload_bytes)


@step("verify", "save", reads=("arena", "layout"), provides=("checksums",))
def verify_save(s: RunState) -> None:
    s.checksums = _checksums(s.arena.base, s.layout.tensors)


# ---------------------------------------------------------------- load

@step("intercept", "load", reads=("source", "settings", "mode"), provides=("model", "refs", "expected"))
def intercept_load(s: RunState) -> Fallback | None:
    import torch
    from torch import nn

    from .binding import stray_meta_tensors, tensor_refs

    try:
        model = s.source.skeleton()
        stray = stray_meta_tensors(model)
        if stray:
            raise UnsupportedModel(f"the skeleton keeps tensors outside its parameters and buffers, which binding "
                                   f"cannot reach: {stray[:5]}.", hint="This model cannot be attached; use mode "
                                   "save/off for it, or set cache.on_unsupported=fallback.")
    except UnsupportedModel as e:  # a model that cannot be attached loads normally where the user allows it
        if s.settings.on_unsupported == "fallback":
            return Fallback(str(e))
        raise
    s.refs = tensor_refs(model)
    s.expected = {r.name: TensorSlot(r.name, r.kind, r.persistent, r.get().dtype, tuple(r.get().shape))
                  for r in s.refs}
    if s.mode is Mode.PLACEHOLDER:
        for ref in s.refs:  # zero-element stand-ins on the real device, for code that looks at .device
            t = ref.get()
            empty = torch.empty(0, dtype=t.dtype, device=s.source.device)
            table = ref.module._parameters if ref.kind == "param" else ref.module._buffers
            table[ref.attr] = nn.Parameter(empty, requires_grad=False) if ref.kind == "param" else empty
    s.model = model
    return None


@step("serialize", "load", reads=("entry", "fingerprint", "settings", "role"),
      provides=("manifest", "arena", "backend"))
def serialize_load(s: RunState) -> Fallback | Takeover | None:
    deadline = time.monotonic() + s.settings.wait_timeout_s
    while True:
        t0 = time.perf_counter()
        try:
            found = wait_for_owner(s.entry, deadline=deadline, timeout_s=s.settings.wait_timeout_s,
                                   role=s.role.name, reclaim=s.role.mode is Mode.AUTO, progress=s.progress)
        finally:
            s.wait_seconds += time.perf_counter() - t0
        if found.outcome is Outcome.CLAIMED:
            log.info("[%s] the key was given up; this auto instance takes it over", s.role.name)
            return Takeover(found.claim)
        if found.outcome is Outcome.TIMED_OUT:
            raise AttachTimeout(
                f"waited {s.settings.wait_timeout_s:g}s for entry {s.entry.key!r} to be published at "
                f"{s.entry.manifest_path}; {found.why}.",
                hint="Start the prefill role with the same cache.dir and cache.key, or raise cache.wait_timeout_s.")
        try:  # `hold`: the entry's attach lock, taken before the manifest was read; gc leaves it alone
            outcome = _attach_held(s, found.manifest, deadline)
        except BaseException:
            os.close(found.hold)
            raise
        if outcome is False:
            os.close(found.hold)
            continue
        if isinstance(outcome, Fallback):
            os.close(found.hold)
            return outcome
        if s.arena.lifetime is not None:  # held while the mapping lives; else (a backend that cannot say) until exit
            weakref.finalize(s.arena.lifetime, os.close, found.hold).atexit = False
        break
    if not s.owner_alive:
        log.warning("[%s] owner pid %d of %s is gone; attaching to the arena it left", s.role.name,
                    found.manifest.owner.pid, s.settings.key)
    s.manifest = found.manifest
    return None


def _attach_held(s: RunState, manifest: Manifest, deadline: float) -> bool | Fallback:
    """Check and map `manifest` while holding the entry: True when mapped, False when the entry changed
    meanwhile (try the new one), a Fallback or an error when it cannot be used."""
    differences = s.fingerprint.diff(manifest.fingerprint)
    if differences:
        err = FingerprintMismatch(s.settings.key, differences)
        if s.settings.on_mismatch == "fallback":
            return Fallback(str(err))
        raise err
    if s.settings.backend not in ("auto", manifest.backend):
        raise ConfigError(f"entry {s.settings.key!r} was published with backend {manifest.backend!r}, "
                          f"but cache.backend={s.settings.backend!r}.",
                          hint="Use the same cache.backend on both sides, or 'auto'.")
    if getattr(s.source, "settles", False) and not _wait_settled(s, manifest):
        return False  # the owner changed while settling: check the new one
    if manifest.backend not in backends.known_backends():
        raise ManifestError(f"entry {s.settings.key!r} was published with backend {manifest.backend!r}, which this "
                            f"sharedcache does not know (known: {backends.known_backends()}).",
                            hint="Remove the entry, or use the same sharedcache version on both sides.")
    backend = backends.get_backend(manifest.backend, s.settings)
    s.owner_alive = s.entry.owner_alive(manifest)
    if not s.owner_alive and backend.attach_needs_owner:
        why = ("its memory died with it" if not backend.survives_owner
               else "only a live owner can hand over its memory handles")
        raise OwnerGone(f"the owner (pid {manifest.owner.pid}) of entry {s.settings.key!r} is dead and "
                        f"backend {backend.name} cannot attach without it: {why}.",
                        hint="Start the prefill again, then attach.")
    try:
        s.arena = backend.attach(s.entry.dir, manifest)
    except ArenaError:  # an owner replaced meanwhile takes its files and handles with it
        if _republished(s.entry, manifest) and time.monotonic() < deadline:
            log.info("[%s] the owner changed while attaching; trying the new entry", s.role.name)
            return False
        raise
    s.backend = backend
    return True


def _wait_settled(s: RunState, manifest: Manifest) -> bool:
    """Wait (counted as waiting, not attach work) until the owner of `manifest` settled; False when
    another manifest stands in the entry by then."""
    from .settle import wait_settled

    t0 = time.perf_counter()
    try:
        settled = wait_settled(s.entry, timeout_s=s.settings.settle_timeout_s, until_published=True, role=s.role.name)
    finally:
        s.wait_seconds += time.perf_counter() - t0
    return settled is not None and settled.handle == manifest.handle


def _republished(entry: Entry, manifest: Manifest) -> bool:
    """Has the entry been removed or replaced since `manifest` was read?"""
    try:
        return entry.read().handle != manifest.handle
    except ManifestError:
        return True


@step("align", "load", reads=("manifest", "arena", "refs", "expected"))
def align_load(s: RunState) -> None:
    from .binding import bind, check_against, view_of

    specs = {t.name: t for t in s.manifest.tensors}
    check_against(s.refs, s.expected, specs)
    views = {name: view_of(s.arena.base, spec) for name, spec in specs.items() if spec.alias_of is None}
    bind(s.refs, views, specs, requires_grad=False)


@step("verify", "load", reads=("arena", "manifest"))
def verify_load(s: RunState) -> None:
    if s.manifest.checksums is None:
        raise ManifestError(f"entry {s.settings.key!r} carries no checksums to verify against.",
                            hint="Add 'verify' before 'serialize' to the prefill role's phases.")
    ours = _checksums(s.arena.base, s.manifest.tensors)
    bad = sorted(n for n, d in ours.items() if s.manifest.checksums.get(n) != d)
    if bad:
        raise IntegrityError(f"bound bytes differ from the published checksums for {len(bad)} tensors, "
                             f"e.g. {bad[:3]}.", hint="The arena was modified after publishing; restart the prefill.")


def _checksums(base: torch.Tensor, specs) -> dict[str, str]:
    out = {}
    for spec in specs:
        if spec.alias_of is None:
            chunk = base.narrow(0, spec.offset, spec.nbytes).cpu().numpy()
            out[spec.name] = hashlib.blake2b(chunk.tobytes(), digest_size=16).hexdigest()
    return out
