"""One instance's use of the cache: resolve the mode, run the role's phases, report.

An integration supplies a ModelSource (how to load normally, how to build a
skeleton, how to finish a model) and calls `Instance.run`; it never touches
handles or arenas itself.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from . import backends
from .backends.base import Arena, Backend
from .binding import TensorRef, bind, capture, check_against, stray_meta_tensors, tensor_refs, view_of
from .cache import CacheDir, Entry
from .errors import (ArenaError, AttachTimeout, ConfigError, FingerprintMismatch, ManifestError,
                     SharedCacheError, StorageError, UnsupportedModel)
from .fingerprint import Fingerprint
from .layout import ArenaLayout, TensorSlot, plan
from .manifest import ArenaInfo, Manifest, Owner, boot_id, write_manifest
from .phases import PHASES
from .report import Report, weight_bytes_outside
from .roles import Mode, Role
from .settings import CacheSettings
from .settle import clear_settled

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """What an integration tells the core about the model it is loading."""

    engine: str
    device: torch.device
    # Optional, False when absent: the engine allocates memory after loading that it sizes from what is free
    # (SGLang's KV pool). Its owner marks the entry settled once done (Instance.mark_settled), and an attacher
    # waits for that before attaching, so that it measures free memory only then (sharedcache.settle).
    settles: bool

    def check(self) -> None:
        """Raise UnsupportedModel before anything loads if the request cannot be shared."""

    def fingerprint(self, model: nn.Module | None) -> Fingerprint:
        """The fingerprint of the loaded `model`, or of what a normal load would produce when None."""

    def load(self) -> nn.Module:
        """The framework's own, unshared load."""

    def skeleton(self) -> nn.Module:
        """The model built on the meta device: right names, shapes and dtypes, no weight memory."""

    def finish(self, model: nn.Module, *, attached: bool) -> nn.Module:
        """Framework work after binding or loading (eval(), generation config, ...)."""


class _Fallback(Exception):
    """Internal: give up sharing and load normally, for the reason given."""


class _Reclaim(Exception):
    """Internal: an auto instance waiting for an owner found the key free again; it owns it now."""

    def __init__(self, claim_fd: int) -> None:
        super().__init__("the key was given up; this auto instance takes it over")
        self.claim_fd = claim_fd


@dataclass
class InstanceState:
    role: Role
    mode: Mode
    settings: CacheSettings
    source: ModelSource
    entry: Entry | None
    fingerprint: Fingerprint | None
    backend: Backend | None = None
    model: nn.Module | None = None
    refs: list[TensorRef] = field(default_factory=list)
    slots: list[TensorSlot] = field(default_factory=list)
    expected: dict[str, TensorSlot] = field(default_factory=dict)
    layout: ArenaLayout | None = None
    arena: Arena | None = None
    manifest: Manifest | None = None
    checksums: dict[str, str] | None = None
    claim_fd: int | None = None
    published: bool = False
    owner_alive: bool | None = None
    timings: list[dict[str, Any]] = field(default_factory=list)
    load_seconds: float | None = None
    wait_seconds: float = 0.0  # load mode: time spent waiting for an owner to publish (not attach work)
    fallback: str | None = None


class Instance:
    """Runs one role against one cache entry. Keep it as long as the model: in save mode it
    owns the published entry, which `close()` (or the model's death, or exit) unpublishes."""

    def __init__(self, role: Role, settings: CacheSettings, source: ModelSource) -> None:
        self.role, self.settings, self.source = role, settings, source
        self.report: Report | None = None
        self.arena_region: tuple[int, int] | None = None  # address range of the arena this model views
        self._finalizer: weakref.finalize | None = None
        self._published: tuple[Entry, Manifest] | None = None  # what this owner published, until close()

    # ---------------------------------------------------------------- public
    def run(self) -> nn.Module:
        start = time.perf_counter()
        fallback = None
        mode = self.role.mode
        if mode is not Mode.OFF:
            try:
                self.source.check()
            except UnsupportedModel as e:
                if self.settings.on_unsupported != "fallback":
                    raise
                fallback, mode = str(e), Mode.OFF
                log.warning("[%s] not sharing: %s; loading normally", self.role.name, fallback)
        if mode is Mode.OFF:  # the framework's own path: no fingerprint, no cache directory
            s = InstanceState(self.role, mode, self.settings, self.source, None, None)
            s.model = self._timed_load(s)
        else:
            s = self._run_shared(mode)
            fallback = s.fallback
        result = self.source.finish(s.model, attached=s.mode.attaches and fallback is None)
        model = module_of(result)
        self.report = self._report(s, model, fallback, time.perf_counter() - start)
        if s.arena is not None and fallback is None:
            self.arena_region = s.arena.region()
        if s.published:
            self._finalizer = weakref.finalize(model, _unpublish, s.entry, s.manifest, s.arena, s.claim_fd)
            self._published = (s.entry, s.manifest)
        elif s.claim_fd is not None:
            os.close(s.claim_fd)
        return result

    def close(self) -> None:
        """Unpublish (owner). Attached instances keep their mappings and keep working."""
        if self._finalizer is not None:
            self._finalizer()
        self._published = None

    def mark_settled(self) -> None:
        """Owner: the engine has allocated all the memory it keeps beside the arena (pools, graphs),
        so attachers waiting to size their own memory may measure now (see sharedcache.settle)."""
        if self._published is None:
            raise ConfigError("mark_settled() is for an instance that published an entry and still owns it.")
        from .settle import mark_settled

        mark_settled(*self._published)

    # ---------------------------------------------------------------- internals
    def _run_shared(self, mode: Mode) -> "InstanceState":
        fingerprint = self.source.fingerprint(None)
        entry = CacheDir(self.settings.dir).entry(self.settings.key)
        mode, claim_fd = self._resolve_mode(entry, fingerprint, mode)
        s = InstanceState(self.role, mode, self.settings, self.source, entry, fingerprint, claim_fd=claim_fd)
        try:
            try:
                self._run_phases(s)
            except _Reclaim as r:  # the would-be owner gave up before publishing: save instead
                log.info("[%s] %s", self.role.name, r)
                self._abandon(s)
                s = InstanceState(self.role, Mode.SAVE, self.settings, self.source, entry, fingerprint,
                                  claim_fd=r.claim_fd)
                self._run_phases(s)
        except _Fallback as why:
            s.fallback = str(why)
            log.warning("[%s] not sharing: %s; loading normally", self.role.name, s.fallback)
            self._abandon(s)
            if s.model is None or mode.attaches:
                s.model = self._timed_load(s)
        except BaseException:
            self._abandon(s)
            raise
        return s

    def _resolve_mode(self, entry: Entry, fp: Fingerprint, mode: Mode) -> tuple[Mode, int | None]:
        if mode is Mode.AUTO:
            mode = Mode.LOAD if _compatible_live(entry, fp) else Mode.SAVE
            if mode is Mode.SAVE:
                try:
                    return mode, entry.claim()
                except SharedCacheError:  # another instance became the owner first: attach to it
                    mode = Mode.LOAD
            log.info("[%s] auto mode resolved to %s", self.role.name, mode.value)
            return mode, None
        if mode is Mode.SAVE:
            return mode, entry.claim()
        return mode, None

    def _run_phases(self, s: InstanceState) -> None:
        for name in self.role.phases_for(s.mode):
            step = PHASES[name].steps[s.mode.plan_key]
            fn = globals()[step.run] if isinstance(step.run, str) else step.run  # built-ins live below
            wall, t0 = time.time(), time.perf_counter()
            fn(s)
            s.timings.append({"name": name, "seconds": round(time.perf_counter() - t0, 6), "start": wall})
            log.debug("[%s] phase %s done in %.3fs", self.role.name, name, s.timings[-1]["seconds"])

    def _timed_load(self, s: InstanceState) -> nn.Module:
        t0 = time.perf_counter()
        model = self.source.load()
        s.load_seconds = time.perf_counter() - t0
        return model

    def _abandon(self, s: InstanceState) -> None:
        """Undo what a failed run did: nothing half-published stays behind."""
        try:
            if s.published:
                _unpublish(s.entry, s.manifest, s.arena, None)
                s.published = False
            elif s.arena is not None and s.arena.owned:
                s.arena.release()
        finally:
            if s.claim_fd is not None:
                os.close(s.claim_fd)
                s.claim_fd = None
            s.arena = None

    def _report(self, s: InstanceState, model: nn.Module, fallback: str | None, total: float) -> Report:
        shared = fallback is None and s.mode is not Mode.OFF
        arena = s.arena if shared else None
        region = arena.region() if arena is not None else None
        allocated = weight_bytes_outside(model, region)
        if arena is not None and arena.owned:
            allocated += arena.size
        attaches = shared and s.mode.attaches
        published = s.layout or s.manifest  # what was packed here, or attached to
        return Report(
            role=self.role.name, mode=s.mode.value, engine=self.source.engine,
            backend=s.backend.name if (shared and s.backend) else None,
            model=s.fingerprint.model if s.fingerprint else str(getattr(self.source, "path", "")),
            key=self.settings.key, cache_dir=self.settings.dir,
            fingerprint=s.fingerprint.digest() if s.fingerprint else None,
            tensors=len(s.refs) if shared else 0,
            bytes_shared=published.payload_bytes if shared and published else 0,
            arena_bytes=arena.size if arena is not None else 0,
            weight_bytes_allocated=allocated,
            phases=list(s.timings),
            attach_seconds=round(sum(p["seconds"] for p in s.timings) - s.wait_seconds, 6) if attaches else None,
            wait_seconds=round(s.wait_seconds, 6),
            load_seconds=round(s.load_seconds, 6) if s.load_seconds is not None else None,
            total_seconds=round(total, 6),
            owner_pid=s.manifest.owner.pid if s.manifest else None,
            owner_alive=s.owner_alive,
            fallback=fallback,
            layout_digest=s.manifest.arena.layout_digest if s.manifest else None,
            backend_timings={k: round(v, 6) for k, v in arena.timings.items()} if arena is not None else {},
        )


def module_of(result: Any) -> nn.Module:
    """The model inside what a framework's load returned (some return (model, info) tuples)."""
    if isinstance(result, nn.Module):
        return result
    if isinstance(result, tuple) and result and isinstance(result[0], nn.Module):
        return result[0]
    raise TypeError(f"the load returned {type(result).__name__}, not a torch module")


def _compatible_live(entry: Entry, fp: Fingerprint) -> bool:
    if not entry.published():
        return False
    try:
        manifest = entry.read()
    except ManifestError:
        return False
    return entry.owner_alive(manifest) and not fp.diff(manifest.fingerprint)


def _unpublish(entry: Entry, manifest: Manifest | None, arena: Arena | None, claim_fd: int | None) -> None:
    """Owner going away: remove the manifest if it is still ours, then the arena's backing, then the
    claim; each step runs even if the one before failed (say, the entry directory was removed)."""
    if manifest is not None and manifest.owner.pid != os.getpid():
        return  # a forked child running its parent's finalizer: not ours to undo
    try:
        with entry.write_lock():
            try:
                current = entry.read()
            except ManifestError:
                current = None
            if current is not None and manifest is not None and current.owner.pid == os.getpid() \
                    and current.handle == manifest.handle:
                entry.manifest_path.unlink(missing_ok=True)
                clear_settled(entry)
    except (OSError, SharedCacheError) as e:  # e.g. the entry directory was removed or replaced meanwhile
        log.warning("could not remove the manifest of %s: %s", entry.key, e)
    finally:
        try:
            if arena is not None:
                arena.release()
        finally:
            if claim_fd is not None:
                os.close(claim_fd)


# ---------------------------------------------------------------- phase steps (save)

def intercept_save(s: InstanceState) -> None:
    s.entry.check_publishable()
    t0 = time.perf_counter()
    s.model = s.source.load()
    s.load_seconds = time.perf_counter() - t0
    try:
        s.slots, s.refs = capture(s.model)
    except UnsupportedModel as e:
        if s.settings.on_unsupported == "fallback":
            raise _Fallback(str(e)) from e
        raise
    device = s.refs[0].get().device if s.refs else torch.device("cpu")
    s.backend = backends.resolve(s.settings.backend, device, s.settings)
    s.fingerprint = s.source.fingerprint(s.model)


@torch.no_grad()
def align_save(s: InstanceState) -> None:
    device = s.refs[0].get().device
    granularity = math.lcm(s.backend.granularity(device), s.settings.alignment)
    s.layout = plan(s.slots, alignment=s.settings.alignment, granularity=granularity)
    s.arena = s.backend.create(s.entry.dir, s.layout.size, device)
    specs = s.layout.by_name()
    by_root: dict[str, list[TensorRef]] = {}
    for ref in s.refs:
        by_root.setdefault(specs[ref.name].alias_of or ref.name, []).append(ref)
    # tensor by tensor: copy, rebind every ref of it, let the original go - peak stays near one copy
    progress = _Progress(f"[{s.role.name}] packing into the arena", s.layout.payload_bytes)
    for root, refs in by_root.items():
        spec = specs[root]
        s.arena.commit(spec.offset + spec.nbytes)
        src = refs[0].get()
        view = view_of(s.arena.base, spec)
        view.copy_(src)
        grad = src.requires_grad
        del src
        bind(refs, {root: view}, specs, requires_grad={root: grad})
        progress.advance(spec.nbytes)
    progress.close()


class _Progress:
    """A progress line on stderr for a step that turns out to take more than a second."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, max(total, 1), 0
        self.start = self.last = time.monotonic()
        self.shown = False

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start >= 1.0 and now - self.last >= 0.5:
            self.last, self.shown = now, True
            sys.stderr.write(f"\r{self.what}: {100 * self.done / self.total:5.1f}% "
                             f"({self.done / 2**30:.2f} / {self.total / 2**30:.2f} GiB)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write(f"\r{self.what}: done in {time.monotonic() - self.start:.1f}s{' ' * 20}\n")


def serialize_save(s: InstanceState) -> None:
    s.arena.sync()  # every byte lands before anyone can attach
    manifest = Manifest(
        key=s.settings.key, fingerprint=s.fingerprint, owner=Owner.current(), backend=s.backend.name,
        handle=s.arena.handle, device=s.arena.device,
        arena=ArenaInfo(s.layout.size, s.layout.granularity, s.layout.alignment, s.layout.digest()),
        tensors=s.layout.tensors, created=time.time(), checksums=s.checksums)
    with s.entry.write_lock():
        try:
            write_manifest(s.entry.manifest_path, manifest)
        except OSError as e:  # the temp file is gone again; nothing was published
            raise StorageError.from_os(e, f"writing manifest {s.entry.manifest_path}") from None
        s.manifest, s.published = manifest, True
        _sweep(s.entry, manifest)
    s.arena.seal()  # from now on an in-place write by the owner faults instead of changing every instance
    log.info("[%s] published %s: %d tensors, %d bytes", s.role.name, s.settings.key,
             len(manifest.tensors), manifest.payload_bytes)


def _sweep(entry: Entry, ours: Manifest) -> None:
    """We hold the owner lock, so earlier owners are dead: remove the arena files and sockets they
    left (also those of an owner that died before publishing). Attached instances keep their mappings."""
    keep = {v for v in ours.handle.values() if isinstance(v, str)}
    for path in entry.dir.glob("arena-*"):
        if path.name not in keep:
            log.info("removing %s, left by a dead owner", path)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # a directory in its place is not ours to remove; gc reports it
                log.warning("left %s in place: %s", path, e.strerror)


def verify_save(s: InstanceState) -> None:
    s.checksums = _checksums(s.arena.base, s.layout.tensors)
    if s.published:  # verify placed after serialize: publish the checksums too
        serialize_save(s)


# ---------------------------------------------------------------- phase steps (load)

def intercept_load(s: InstanceState) -> None:
    try:
        model = s.source.skeleton()
        stray = stray_meta_tensors(model)
        if stray:
            raise UnsupportedModel(f"the skeleton keeps tensors outside its parameters and buffers, which binding "
                                   f"cannot reach: {stray[:5]}.", hint="This model cannot be attached; use mode "
                                   "save/off for it, or set cache.on_unsupported=fallback.")
    except UnsupportedModel as e:  # a model that cannot be attached loads normally where the user allows it
        if s.settings.on_unsupported == "fallback":
            raise _Fallback(str(e)) from e
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


def serialize_load(s: InstanceState) -> None:
    deadline = time.monotonic() + s.settings.wait_timeout_s
    reclaim = s.role.mode is Mode.AUTO
    while True:
        t0 = time.perf_counter()
        try:  # `hold`: the entry's attach lock, taken before the manifest was read; gc leaves it alone
            manifest, hold = wait_for_manifest(s.entry, deadline, s.settings.wait_timeout_s, s.role.name,
                                               reclaim=reclaim)
        finally:
            s.wait_seconds += time.perf_counter() - t0
        try:
            attached = _attach_held(s, manifest, deadline)
        except BaseException:
            os.close(hold)
            raise
        if not attached:
            os.close(hold)
            continue
        _hold_while_mapped(s.arena, hold)  # until our mapping dies
        break
    if not s.owner_alive:
        log.warning("[%s] owner pid %d of %s is gone; attaching to the arena it left", s.role.name,
                    manifest.owner.pid, s.settings.key)
    s.manifest = manifest


def _attach_held(s: InstanceState, manifest: Manifest, deadline: float) -> bool:
    """Check and map `manifest` while holding the entry; False when the entry changed meanwhile (try the
    new one), an error when it cannot be used."""
    _check_compatible(s, manifest)
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
        raise ArenaError(f"the owner (pid {manifest.owner.pid}) of entry {s.settings.key!r} is dead and "
                         f"backend {backend.name} cannot attach without it: {why}.",
                         hint="Start the prefill again, then attach.")
    try:
        s.arena = backend.attach(s.entry.dir, manifest)
    except ArenaError:
        if _republished(s.entry, manifest) and time.monotonic() < deadline:
            log.info("[%s] the owner changed while attaching; trying the new entry", s.role.name)
            return False
        raise
    s.backend = backend
    return True


def _hold_while_mapped(arena: Arena, fd: int) -> None:
    """Keep the attacher's hold on its entry exactly as long as the mapping lives."""
    if arena.lifetime is not None:
        weakref.finalize(arena.lifetime, os.close, fd).atexit = False  # exit closes every fd anyway
    else:  # a backend that cannot say: hold it for the process's life rather than too short
        log.debug("backend gives no mapping lifetime; holding %s's attach lock until exit", arena.handle)


def _check_compatible(s: InstanceState, manifest: Manifest) -> None:
    differences = s.fingerprint.diff(manifest.fingerprint)
    if differences:
        err = FingerprintMismatch(s.settings.key, differences)
        if s.settings.on_mismatch == "fallback":
            raise _Fallback(str(err)) from err
        raise err
    if s.settings.backend not in ("auto", manifest.backend):
        raise ConfigError(f"entry {s.settings.key!r} was published with backend {manifest.backend!r}, "
                          f"but cache.backend={s.settings.backend!r}.",
                          hint="Use the same cache.backend on both sides, or 'auto'.")


def _wait_settled(s: InstanceState, manifest: Manifest) -> bool:
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


def align_load(s: InstanceState) -> None:
    specs = {t.name: t for t in s.manifest.tensors}
    check_against(s.refs, s.expected, specs)
    views = {name: view_of(s.arena.base, spec) for name, spec in specs.items() if spec.alias_of is None}
    bind(s.refs, views, specs, requires_grad=False)


def verify_load(s: InstanceState) -> None:
    if s.manifest.checksums is None:
        raise ManifestError(f"entry {s.settings.key!r} carries no checksums to verify against.",
                            hint="Add 'verify' before 'serialize' to the prefill role's phases.")
    ours = _checksums(s.arena.base, s.manifest.tensors)
    bad = sorted(n for n, d in ours.items() if s.manifest.checksums.get(n) != d)
    if bad:
        raise ArenaError(f"bound bytes differ from the published checksums for {len(bad)} tensors, "
                         f"e.g. {bad[:3]}.", hint="The arena was modified after publishing; restart the prefill.")


def _checksums(base: torch.Tensor, specs) -> dict[str, str]:
    import hashlib

    out = {}
    for spec in specs:
        if spec.alias_of is None:
            chunk = base.narrow(0, spec.offset, spec.nbytes).cpu().numpy()
            out[spec.name] = hashlib.blake2b(chunk.tobytes(), digest_size=16).hexdigest()
    return out


def wait_for_manifest(entry: Entry, deadline: float, timeout_s: float, role: str, *,
                      reclaim: bool = False) -> tuple[Manifest, int]:
    """Poll until the entry is published (by a live owner, or orphaned with nobody replacing it),
    until the monotonic `deadline`; a present but invalid manifest fails at once. Returns the manifest
    and an fd holding the entry's attach lock, taken before the manifest was read, which the caller
    keeps while it uses the entry (gc removes nothing held so). With `reclaim` (auto mode), a key that
    nobody publishes or claims any more is claimed (raises _Reclaim)."""
    start = deadline - timeout_s
    last_print = -1.0
    while True:
        state = "no owner has published it yet"
        if not os.path.lexists(entry.root):
            state = f"{entry.root} does not exist yet"
        elif entry.published():
            hold = entry.hold_for_attach()
            try:
                manifest = entry.read()
                if manifest.owner.boot_id != boot_id():  # what gc and `ls` call stale: never attached to
                    state = "its manifest is from before the last reboot (stale)"
                # a dead owner's manifest while someone else holds the claim: a new owner is loading
                elif manifest.owner.running() or not entry.claimed():
                    if last_print >= 0:
                        sys.stderr.write("\n")
                    return manifest, hold
                else:
                    state = f"owner pid {manifest.owner.pid} is gone and a new owner is loading"
                os.close(hold)
            except ManifestError as e:
                os.close(hold)
                if entry.published():  # not a race with the owner removing it
                    raise
                log.debug("manifest vanished while reading: %s", e)
            except BaseException:
                os.close(hold)
                raise
        if reclaim and not entry.claimed():
            try:
                claim = entry.claim(retry_s=0)
            except SharedCacheError:
                pass  # someone else took it: keep waiting for their manifest
            else:
                if last_print >= 0:
                    sys.stderr.write("\n")
                raise _Reclaim(claim)
        waited = time.monotonic() - start
        if time.monotonic() >= deadline:
            if last_print >= 0:
                sys.stderr.write("\n")
            raise AttachTimeout(
                f"waited {timeout_s:g}s for entry {entry.key!r} to be published at {entry.manifest_path}; "
                f"{state}.",
                hint="Start the prefill role with the same cache.dir and cache.key, or raise cache.wait_timeout_s.")
        if waited - last_print >= 1.0:
            sys.stderr.write(f"\r[{role}] waiting for an owner to publish {entry.key!r} in {entry.root} "
                             f"({state}) ... {waited:4.0f}s / {timeout_s:.0f}s")
            sys.stderr.flush()
            last_print = waited
        time.sleep(0.05)
