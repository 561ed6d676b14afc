"""The built-in steps of a load plan (sharedcache.phases): build the skeleton, wait for the entry and map
each of its device parts, bind the skeleton to views of them, check their bytes. Each step declares the
run-state fields it reads and provides (`parts.<field>` for a Part's; tests/test_phase_declarations.py
holds them to the code). A step returns None when done, or a Fallback or Takeover for the orchestrator.
"""
from __future__ import annotations

import logging
import os
import time
import weakref

from . import backends
from .cache import CacheDir, Entry
from .errors import (ArenaError, ConfigError, FingerprintMismatch, IntegrityError, ManifestError,
                     OwnerGone, UnsupportedModel)
from .fingerprint import differences
from .layout import TensorSlot
from .keys import head_key, part_key
from .manifest import Manifest
from .phases import step
from .roles import Mode
from .run import Fallback, Part, RunState, Takeover
from .steps_save import checksums, current_device_kept
from .waiting import Outcome, timed_out, wait_for_owner, waiting_deadlines

log = logging.getLogger(__name__)


@step("intercept", "load", reads=("source", "settings", "mode"), provides=("model", "parts.refs", "expected"))
def intercept_load(s: RunState) -> Fallback | None:
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
    s.head.refs = tensor_refs(model)  # on the head until align binds each to the part that publishes it
    s.expected = {r.name: TensorSlot(r.name, r.kind, r.persistent, r.get().dtype, tuple(r.get().shape))
                  for r in s.head.refs}
    if s.mode is Mode.PLACEHOLDER:
        _stand_in(s)
    s.model = model
    return None


def _stand_in(s: RunState) -> None:
    """Zero-element tensors on the real device, for engine code that looks at .device before binding."""
    import torch
    from torch import nn

    for ref in s.head.refs:
        t = ref.get()
        empty = torch.empty(0, dtype=t.dtype, device=s.source.device)
        table = ref.module._parameters if ref.kind == "param" else ref.module._buffers
        table[ref.attr] = nn.Parameter(empty, requires_grad=False) if ref.kind == "param" else empty


@step("serialize", "load", reads=("parts.entry", "parts.fingerprint", "settings", "role", "source", "progress",
                                  "wait_seconds"),
      provides=("wait_seconds", "owner_alive", "backend", "placement", "parts", "parts.entry", "parts.fingerprint",
                "parts.arena", "parts.manifest"))
def serialize_load(s: RunState) -> Fallback | Takeover | None:
    deadline, loading_deadline = waiting_deadlines(s.settings)
    while True:
        t0 = time.perf_counter()
        try:
            found = wait_for_owner(s.head.entry, deadline=deadline, loading_deadline=loading_deadline,
                                   role=s.role.name, reclaim=s.role.mode is Mode.AUTO, progress=s.progress)
        finally:
            s.wait_seconds += time.perf_counter() - t0
        if found.outcome is Outcome.CLAIMED:
            log.info("[%s] the key was given up; this auto instance takes it over", s.role.name)
            return Takeover(found.claim)
        if found.outcome is Outcome.TIMED_OUT:
            raise timed_out(found, s.settings, s.head.entry.key, f"entry {s.head.entry.key!r} to be published at "
                                               f"{s.head.entry.manifest_path}", "Start the prefill role with the "
                                               "same cache.dir and cache.key")
        outcome = _attach_holding(s, found.manifest, found.hold, deadline)
        if outcome is not False:
            break
    if isinstance(outcome, Fallback):
        return outcome
    if not s.owner_alive:
        log.warning("[%s] owner pid %d of %s is gone; attaching to the arena it left", s.role.name,
                    found.manifest.owner.pid, s.settings.key)
    s.head.manifest = found.manifest
    return None


def _attach_holding(s: RunState, manifest: Manifest, hold: int, deadline: float) -> bool | Fallback:
    """Attach with the entry's attach lock `hold` (taken before the manifest was read; gc leaves a held entry
    alone): kept while the mapping lives, given back when the attach does not happen."""
    try:
        outcome = _attach_held(s, manifest, deadline)
    except BaseException:
        os.close(hold)
        raise
    if outcome is True:
        _hold_while_mapped(s.head.arena, hold)
    else:
        os.close(hold)
    return outcome


def _hold_while_mapped(arena, hold: int) -> None:
    """Keep the entry's attach lock `hold` while the mapping lives (gc leaves a held entry alone); with a backend
    that cannot say how long that is, until the process exits."""
    if arena.lifetime is not None:
        weakref.finalize(arena.lifetime, os.close, hold).atexit = False


def _check_usable(s: RunState, manifest: Manifest) -> Fallback | None:
    """Refuse a manifest this instance cannot attach to, or fall back where the user allows it."""
    if manifest.part is not None and manifest.part.index:
        head = head_key(s.settings.key, manifest.part.index)
        raise ConfigError(f"entry {s.settings.key!r} is part {manifest.part.index} of {manifest.part.count} of a "
                          f"model spread over GPUs, published under {head!r}.",
                          hint=f"Attach with cache.key={head}; its other parts come with it.")
    differing = differences(s.head.fingerprint, manifest, spreads=s.spreads)
    if differing:
        spread_hint = ("Load with a device map that spreads the model (device_map='auto') with the owner's GPUs "
                       "visible, or set cache.on_mismatch=fallback.") if differing[-1][0] == "devices" else None
        err = FingerprintMismatch(s.settings.key, differing, hint=spread_hint)
        if s.settings.on_mismatch == "fallback":
            return Fallback(str(err))
        raise err
    if s.settings.backend not in ("auto", manifest.backend):
        raise ConfigError(f"entry {s.settings.key!r} was published with backend {manifest.backend!r}, "
                          f"but cache.backend={s.settings.backend!r}.",
                          hint="Use the same cache.backend on both sides, or 'auto'.")
    return None


def _attach_held(s: RunState, manifest: Manifest, deadline: float) -> bool | Fallback:
    """Check and map `manifest` while holding the entry: True when mapped, False when the entry changed
    meanwhile (try the new one), a Fallback or an error when it cannot be used."""
    refused = _check_usable(s, manifest)
    if refused is not None:
        return refused
    if getattr(s.source, "settles", False) and not _wait_settled(s, manifest):
        return False  # the owner changed while settling: check the new one
    if manifest.backend not in backends.known_backends():
        raise ManifestError(f"entry {s.settings.key!r} was published with backend {manifest.backend!r}, which this "
                            f"sharedcache does not know (known: {backends.known_backends()}).",
                            hint="Remove the entry, or use the same sharedcache version on both sides.")
    backend = backends.get_backend(manifest.backend, s.settings)
    s.owner_alive = s.head.entry.owner_alive(manifest)
    if not s.owner_alive and backend.attach_needs_owner and not backend.orphan_attachable(s.head.entry.dir, manifest):
        why = ("its memory died with it" if not backend.survives_owner
               else "only a live owner can hand over its memory handles")
        raise OwnerGone(f"the owner (pid {manifest.owner.pid}) of entry {s.settings.key!r} is dead and "
                        f"backend {backend.name} cannot attach without it: {why}.",
                        hint="Start the prefill again, then attach.")
    del s.parts[1:]  # what an attempt before this one mapped goes with it
    s.placement = None
    with current_device_kept(manifest.part is not None):  # a spread model's GPUs: the caller's stays current
        try:
            s.head.arena = backend.attach(s.head.entry.dir, manifest)
        except ArenaError:  # an owner replaced meanwhile takes its files and handles with it
            if _republished(s.head.entry, manifest) and time.monotonic() < deadline:
                log.info("[%s] the owner changed while attaching; trying the new entry", s.role.name)
                return False
            raise
        s.backend = backend
        if manifest.part is not None:
            return _attach_parts(s, manifest, deadline)
    return True


def _attach_parts(s: RunState, head: Manifest, deadline: float) -> bool:
    """Map parts 1..n-1 of a spread model whose head (part 0) is mapped: True when all are, False when the
    head was replaced meanwhile (the caller tries the new one). Each part holds its attach lock as long as
    its mapping lives, as the head does."""
    for index in range(1, head.part.count):
        entry = CacheDir(s.head.entry.root).entry(part_key(s.settings.key, index))
        hold = entry.hold_for_attach() if entry.published() else None
        try:
            p = _attach_part(s, head, entry, deadline, held=hold is not None)
        except BaseException:
            if hold is not None:
                os.close(hold)
            raise
        if p is None:  # the head was replaced meanwhile
            if hold is not None:
                os.close(hold)
            return False
        _hold_while_mapped(p.arena, hold)
        s.parts.append(p)
    s.placement = dict(head.part.placement)
    return True


def _attach_part(s: RunState, head: Manifest, entry: Entry, deadline: float, *, held: bool) -> Part | None:
    """Map the next part of `head`'s model (`held`: its entry was published when its attach lock was taken)
    after checking it belongs to the same save; None when the head was replaced meanwhile."""
    index = len(s.parts)  # parts 0..index-1 are mapped
    try:
        manifest = entry.read() if held else None
    except ManifestError:
        manifest = None
    if manifest is None or manifest.part is None or \
            (manifest.part.group, manifest.part.index, manifest.part.count) != (head.part.group, index,
                                                                               head.part.count):
        if _republished(s.head.entry, head) and time.monotonic() < deadline:
            return None
        raise ManifestError(f"entry {s.settings.key!r} is part 0 of {head.part.count}, but part {index} "
                            f"({entry.dir}) is missing or from another save.",
                            hint="Start the prefill again so that it publishes every part, or remove the "
                                 "entries with `sharedcache gc`.")
    differing = [d[0] for d in differences(head.fingerprint, manifest, spreads=True)]
    if differing or manifest.backend != head.backend or manifest.owner != head.owner:
        raise ManifestError(f"part {index} of entry {s.settings.key!r} does not match part 0 (differing: "
                            f"{differing or ['backend or owner']}).",
                            hint="Remove the entries with `sharedcache gc` and start the prefill again.")
    try:
        arena = s.backend.attach(entry.dir, manifest)
    except ArenaError:  # the owner stopped meanwhile (part 0 goes first): try the new head, as for one
        if _republished(s.head.entry, head) and time.monotonic() < deadline:
            return None
        raise
    return Part(index, entry=entry, fingerprint=manifest.fingerprint, arena=arena, manifest=manifest)


def _wait_settled(s: RunState, manifest: Manifest) -> bool:
    """Wait (counted as waiting, not attach work) until the owner of `manifest` settled; False when
    another manifest stands in the entry by then."""
    from .settle import wait_settled

    t0 = time.perf_counter()
    try:
        settled = wait_settled(s.head.entry, timeout_s=s.settings.settle_timeout_s, until_published=True,
                               role=s.role.name)
    finally:
        s.wait_seconds += time.perf_counter() - t0
    return settled is not None and settled.handle == manifest.handle


def _republished(entry: Entry, manifest: Manifest) -> bool:
    """Has the entry been removed or replaced since `manifest` was read?"""
    try:
        return entry.read().handle != manifest.handle
    except ManifestError:
        return True


@step("align", "load", reads=("settings", "expected", "parts.manifest", "parts.arena", "parts.refs"),
      provides=("parts.refs",))
def align_load(s: RunState) -> None:
    from .binding import bind, check_against, view_of

    refs, specs, views, holder = s.head.refs, {}, {}, {}
    for p in s.parts:
        for spec in p.manifest.tensors:
            if spec.name in specs:
                raise ManifestError(f"tensor {spec.name!r} of entry {s.settings.key!r} is published in two parts.",
                                    hint="Remove the entries with `sharedcache gc` and start the prefill again.")
            specs[spec.name], holder[spec.name] = spec, p.index
            if spec.alias_of is None:
                views[spec.name] = view_of(p.arena.base, spec)
    check_against(refs, s.expected, specs)
    bind(refs, views, specs, requires_grad=False)
    for p in s.parts:  # each part now holds the tensors it publishes
        p.refs = [r for r in refs if holder[r.name] == p.index]


@step("verify", "load", reads=("settings", "parts.arena", "parts.manifest"))
def verify_load(s: RunState) -> None:
    if s.head.manifest.checksums is None:
        raise ManifestError(f"entry {s.settings.key!r} carries no checksums to verify against.",
                            hint="Add 'verify' before 'serialize' to the prefill role's phases.")
    bad = []
    for p in s.parts:
        ours = checksums(p.arena.base, p.manifest.tensors)
        bad += sorted(n for n, d in ours.items() if (p.manifest.checksums or {}).get(n) != d)
    if bad:
        raise IntegrityError(f"bound bytes differ from the published checksums for {len(bad)} tensors, "
                             f"e.g. {bad[:3]}.", hint="The arena was modified after publishing; restart the prefill.")
