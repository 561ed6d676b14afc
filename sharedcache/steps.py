"""The built-in steps of the phases (sharedcache.phases), each declaring what it reads and provides
of the run's state (sharedcache.run). A step returns None when done, or a Fallback or Takeover for
the orchestrator (sharedcache.instance) to act on.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
import weakref
from typing import TYPE_CHECKING, Iterator

from . import backends
from .errors import (ArenaError, AttachTimeout, ConfigError, EntryOwned, FingerprintMismatch, IntegrityError,
                     ManifestError, OwnerGone, UnsupportedModel)
from .layout import TensorSlot, plan
from .cache import CacheDir
from .manifest import MAX_PARTS, ArenaInfo, Manifest, Owner, PartInfo, differences, head_key, part_key
from .ownership import Claim
from .phases import step
from .progress import Throttle
from .roles import Mode
from .run import Fallback, Part, RunState, Takeover
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
    import dataclasses

    import torch

    from .binding import capture, devices_of
    from .devices import device_id

    s.entry.check_publishable()
    t0 = time.perf_counter()
    s.model = s.source.load()
    s.load_seconds = time.perf_counter() - t0
    try:
        devices = devices_of(s.model)
        if len(devices) > 1 and s.spreads:
            _split(s, devices)
        else:
            s.slots, s.refs = capture(s.model)
    except UnsupportedModel as e:
        if s.settings.on_unsupported == "fallback":
            return Fallback(str(e))
        raise
    device = s.refs[0].get().device if s.refs else torch.device("cpu")
    s.backend = backends.resolve(s.settings.backend, device, s.settings)
    s.fingerprint = s.source.fingerprint(s.model)
    if s.spreads:  # where the engine put it, not the request's first GPU
        base, s.fingerprint = s.fingerprint, dataclasses.replace(s.fingerprint, device=device_id(device))
        for part in s.parts:  # each part's fingerprint names its own device
            part.fingerprint = dataclasses.replace(base, device=device_id(part.device))
    return None


def _split(s: RunState, devices: list[torch.device]) -> None:
    """Save: a model spread over several GPUs becomes one part per device, in the order its modules use
    them; part 0 stays the run's own (the user's key), each other part claims `<key>-part<i>`."""
    import uuid

    import torch

    from .binding import capture

    if any(d.type != "cuda" for d in devices) or len(devices) > MAX_PARTS:
        raise UnsupportedModel(f"the model's tensors lie on {[str(d) for d in devices]}; only a model spread over "
                               f"at most {MAX_PARTS} GPUs is shared (one arena per GPU), not one offloaded to the "
                               "CPU or disk.", hint="Load it onto GPUs only, or set cache.on_unsupported=fallback.")
    number = {d: i for i, d in enumerate(devices)}
    placement = s.source.placement(s.model) or {}
    placed = {}
    for module, where in placement.items():
        where = torch.device(where)
        if where not in number:
            raise UnsupportedModel(f"the device map places {module or 'the model'!r} on {where}, which holds none "
                                   "of its tensors.", hint="Load it with a device map that covers every module, or "
                                   "set cache.on_unsupported=fallback.")
        placed[module] = number[where]
    if not placed:
        raise UnsupportedModel(f"the model lies on {[str(d) for d in devices]}, but {s.source.engine} did not say "
                               "where each module runs, so an attached copy could not run as this one does.",
                               hint="Load it onto one device, or set cache.on_unsupported=fallback.")
    s.placement, s.group = placed, uuid.uuid4().hex
    s.slots, s.refs = capture(s.model, devices[0])
    for i, device in enumerate(devices[1:], 1):
        entry = CacheDir(s.entry.root).entry(part_key(s.settings.key, i))
        entry.check_publishable()
        part = Part(i, entry, device=device)
        part.slots, part.refs = capture(s.model, device)
        try:
            part.claim = Claim.take(entry)
        except EntryOwned as e:
            raise EntryOwned(f"this model's part on {device} needs the key {entry.key!r}, derived from "
                             f"cache.key={s.settings.key!r}, and {e.message}",
                             hint="Choose a cache.key whose -part<i> keys nothing else uses.") from None
        s.claim.parts.append(part.claim)  # given up with the run's own claim, after it
        s.parts.append(part)
    _check_placed(s, [(0, s.refs)] + [(p.index, p.refs) for p in s.parts], devices)


def _check_placed(s: RunState, refs_by_part: list, devices: list[torch.device]) -> None:
    """Every tensor lies where its module runs. One that does not is the same tensor used by modules
    placed on two devices (tied weights split by the device map): an attached copy would run it elsewhere."""
    for index, refs in refs_by_part:
        for ref in refs:
            module = ref.name.rpartition(".")[0]
            where = placed_part(s.placement, ref.name)  # a map may name a tensor itself
            if where is not None and where != index:
                raise UnsupportedModel(
                    f"tensor {ref.name!r} lies on {devices[index]}, but the device map runs {module or 'the model'!r} "
                    f"on {devices[where]}: tied weights split over two devices cannot be shared.",
                    hint="Place the tied modules on one device (device_map='auto' keeps them together), untie them, "
                         "or set cache.on_unsupported=fallback.")


def placed_part(placement: dict[str, int], name: str) -> int | None:
    """The part that runs the module or tensor `name`: the placement of its longest listed prefix (None if
    none is listed)."""
    while True:
        if name in placement:
            return placement[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


@step("align", "save", reads=("refs", "slots", "backend", "settings", "entry", "claim"), provides=("layout", "arena"))
def align_save(s: RunState) -> None:
    with _current_device_kept(bool(s.parts)):
        s.layout, s.arena = _pack(s, s.refs, s.slots, s.entry, s.claim)
        for part in s.parts:
            part.layout, part.arena = _pack(s, part.refs, part.slots, part.entry, part.claim)


@contextlib.contextmanager
def _current_device_kept(several: bool) -> Iterator[None]:
    """A backend makes the device it works on current; over several GPUs, give the caller its own back."""
    import torch

    if not (several and torch.cuda.is_available()):
        yield
        return
    index = torch.cuda.current_device()
    try:
        yield
    finally:
        torch.cuda.set_device(index)


def _pack(s: RunState, refs: list, slots: list, entry: Entry, claim) -> tuple:
    """Plan one device's arena, move its tensors in and rebind them: (layout, arena)."""
    import torch

    from .binding import bind, view_of

    device = refs[0].get().device
    granularity = math.lcm(s.backend.granularity(device), s.settings.alignment)
    layout = plan(slots, alignment=s.settings.alignment, granularity=granularity)
    arena = claim.arena = s.backend.create(entry.dir, layout.size, device)
    specs = layout.by_name()
    by_root: dict[str, list[TensorRef]] = {}
    for ref in refs:
        by_root.setdefault(specs[ref.name].alias_of or ref.name, []).append(ref)
    # tensor by tensor: copy, rebind every ref of it, let the original go - peak stays near one copy
    where = f" on {device}" if s.parts else ""
    shown = Throttle(s.progress, s.role.name, after=1.0, every=0.5)
    done, total = 0, max(layout.payload_bytes, 1)
    with torch.no_grad():
        for root, group in by_root.items():
            spec = specs[root]
            arena.commit(spec.offset + spec.nbytes)
            src = group[0].get()
            view = view_of(arena.base, spec)
            view.copy_(src)
            grad = src.requires_grad
            del src
            bind(group, {root: view}, specs, requires_grad={root: grad})
            done += spec.nbytes
            shown.update(f"packing into the arena{where}", done / 2**30, total / 2**30, "GiB")
    shown.end(f"packing into the arena{where}: done in {shown.elapsed:.1f}s")
    return layout, arena


@step("serialize", "save", reads=("arena", "layout", "fingerprint", "backend", "claim"), provides=("manifest",),
      uses=("checksums",))
def serialize_save(s: RunState) -> None:
    count = len(s.parts) + 1
    info = (lambda i: PartInfo(i, count, s.group, dict(s.placement))) if s.parts else (lambda i: None)
    for part in reversed(s.parts):  # part 0, the user's key, last: whoever sees it finds every part
        part.manifest = _publish(s, part.entry.key, part.fingerprint, part.arena, part.layout, part.claim,
                                 part.checksums, info(part.index))
    s.manifest = _publish(s, s.settings.key, s.fingerprint, s.arena, s.layout, s.claim, s.checksums, info(0))
    log.info("[%s] published %s: %d tensors, %d bytes%s", s.role.name, s.settings.key,
             len(s.manifest.tensors) + sum(len(p.manifest.tensors) for p in s.parts),
             s.manifest.payload_bytes + sum(p.manifest.payload_bytes for p in s.parts),
             f" over {count} devices" if s.parts else "")


def _publish(s: RunState, key: str, fingerprint, arena, layout, claim, checksums, part) -> Manifest:
    arena.sync()  # every byte lands before anyone can attach
    manifest = Manifest(
        key=key, fingerprint=fingerprint, owner=Owner.current(), backend=s.backend.name,
        handle=arena.handle, device=arena.device,
        arena=ArenaInfo(layout.size, layout.granularity, layout.alignment, layout.digest()),
        tensors=layout.tensors, created=time.time(), checksums=checksums, part=part)
    claim.publish(manifest)
    arena.seal()  # from now on an in-place write by the owner faults instead of changing every instance
    return manifest


@step("verify", "save", reads=("arena", "layout"), provides=("checksums",))
def verify_save(s: RunState) -> None:
    s.checksums = _checksums(s.arena.base, s.layout.tensors)
    for part in s.parts:
        part.checksums = _checksums(part.arena.base, part.layout.tensors)


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
        _hold_while_mapped(s.arena, found.hold)
        break
    if not s.owner_alive:
        log.warning("[%s] owner pid %d of %s is gone; attaching to the arena it left", s.role.name,
                    found.manifest.owner.pid, s.settings.key)
    s.manifest = found.manifest
    return None


def _hold_while_mapped(arena, hold: int) -> None:
    """Keep the entry's attach lock `hold` while the mapping lives (gc leaves a held entry alone); with a backend
    that cannot say how long that is, until the process exits."""
    if arena.lifetime is not None:
        weakref.finalize(arena.lifetime, os.close, hold).atexit = False


def _attach_held(s: RunState, manifest: Manifest, deadline: float) -> bool | Fallback:
    """Check and map `manifest` while holding the entry: True when mapped, False when the entry changed
    meanwhile (try the new one), a Fallback or an error when it cannot be used."""
    if manifest.part is not None and manifest.part.index:
        head = head_key(s.settings.key, manifest.part.index)
        raise ConfigError(f"entry {s.settings.key!r} is part {manifest.part.index} of {manifest.part.count} of a "
                          f"model spread over GPUs, published under {head!r}.",
                          hint=f"Attach with cache.key={head}; its other parts come with it.")
    differing = differences(s.fingerprint, manifest, spreads=s.spreads)
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
    with _current_device_kept(manifest.part is not None):  # a spread model's GPUs: the caller's stays current
        try:
            s.arena = backend.attach(s.entry.dir, manifest)
        except ArenaError:  # an owner replaced meanwhile takes its files and handles with it
            if _republished(s.entry, manifest) and time.monotonic() < deadline:
                log.info("[%s] the owner changed while attaching; trying the new entry", s.role.name)
                return False
            raise
        s.backend = backend
        if manifest.part is not None:
            return _attach_parts(s, manifest, backend, deadline)
    s.parts, s.placement = [], None
    return True


def _attach_parts(s: RunState, head: Manifest, backend, deadline: float) -> bool:
    """Map parts 1..n-1 of a spread model whose head (part 0) is mapped: True when all are, False when the
    head was replaced meanwhile (the caller tries the new one). Each part holds its attach lock as long as
    its mapping lives, as the head does."""
    s.parts = []
    for index in range(1, head.part.count):
        entry = CacheDir(s.entry.root).entry(part_key(s.settings.key, index))
        hold = entry.hold_for_attach() if entry.published() else None
        try:
            try:
                manifest = entry.read() if hold is not None else None
            except ManifestError:
                manifest = None
            if manifest is None or manifest.part is None or \
                    (manifest.part.group, manifest.part.index, manifest.part.count) != (head.part.group, index,
                                                                                       head.part.count):
                if _republished(s.entry, head) and time.monotonic() < deadline:
                    if hold is not None:
                        os.close(hold)
                    return False
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
                arena = backend.attach(entry.dir, manifest)
            except ArenaError:  # the owner stopped meanwhile (part 0 goes first): try the new head, as for one
                if _republished(s.entry, head) and time.monotonic() < deadline:
                    os.close(hold)
                    return False
                raise
        except BaseException:
            if hold is not None:
                os.close(hold)
            raise
        _hold_while_mapped(arena, hold)
        s.parts.append(Part(index, entry, fingerprint=manifest.fingerprint, arena=arena, manifest=manifest))
    s.placement = dict(head.part.placement)
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

    specs, views = {}, {}
    for manifest, arena in s.mapped():
        for spec in manifest.tensors:
            if spec.name in specs:
                raise ManifestError(f"tensor {spec.name!r} of entry {s.settings.key!r} is published in two parts.",
                                    hint="Remove the entries with `sharedcache gc` and start the prefill again.")
            specs[spec.name] = spec
            if spec.alias_of is None:
                views[spec.name] = view_of(arena.base, spec)
    check_against(s.refs, s.expected, specs)
    bind(s.refs, views, specs, requires_grad=False)


@step("verify", "load", reads=("arena", "manifest"))
def verify_load(s: RunState) -> None:
    if s.manifest.checksums is None:
        raise ManifestError(f"entry {s.settings.key!r} carries no checksums to verify against.",
                            hint="Add 'verify' before 'serialize' to the prefill role's phases.")
    bad = []
    for manifest, arena in s.mapped():
        ours = _checksums(arena.base, manifest.tensors)
        bad += sorted(n for n, d in ours.items() if (manifest.checksums or {}).get(n) != d)
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
