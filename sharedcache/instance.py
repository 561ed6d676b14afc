"""One instance's use of the cache: resolve the mode, run the role's phases, report.

An integration supplies a ModelSource (how to load normally, how to build a
skeleton, how to finish a model) and calls `Instance.run`; it never touches
handles or arenas itself.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Protocol

import torch
from torch import nn

from .cache import CacheDir, Entry
from .errors import ConfigError, ManifestError, SharedCacheError, UnsupportedModel
from .fingerprint import Fingerprint, differences
from .ownership import Claim, give_up
from .phases import steps_for
from .progress import ProgressFn, log_progress
from .report import Report, weight_bytes_outside
from .roles import Mode, Role
from .settings import CacheSettings
from .keys import part_key
from .run import Fallback, Part, RunState, Takeover, spreads
from .steps_adopt import adoptable

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """What an integration tells the core about the model it is loading."""

    engine: str
    device: torch.device
    # Optional, False when absent: the engine allocates memory after loading that it sizes from what is free
    # (SGLang's KV pool). Its owner marks the entry settled once done (Instance.mark_settled), and an attacher
    # waits for that before attaching, so that it measures free memory only then (sharedcache.settle).
    settles: bool
    # Optional, False when absent: the request lets the engine spread the model over several GPUs. A save whose
    # tensors land on several devices publishes one entry per device (sharedcache.manifest.PartInfo), and asks
    # `placement(model)` where each module runs ({module path: device}); an attach maps every part and hands
    # the owner's placement, with this process's devices, to `finish`.
    spreads: bool
    # Optional, False when absent: a save may take over the arena its dead predecessor left under the key
    # (sharedcache.steps_adopt) by building the skeleton and binding it, as an attach does; `finish` then
    # gets attached=True.
    adopts: bool

    def check(self) -> None:
        """Raise UnsupportedModel before anything loads if the request cannot be shared."""

    def fingerprint(self, model: nn.Module | None) -> Fingerprint:
        """The fingerprint of the loaded `model`, or of what a normal load would produce when None."""

    def load(self) -> nn.Module:
        """The framework's own, unshared load."""

    def skeleton(self) -> nn.Module:
        """The model built on the meta device: right names, shapes and dtypes, no weight memory."""

    def finish(self, model: nn.Module, *, attached: bool) -> nn.Module:
        """Framework work after binding or loading (eval(), generation config, ...); returns the model.
        A spreading source's finish also takes `placement`: {module path: torch device} of an attached
        spread model (its modules' tensors already lie there), None otherwise."""


class Instance:
    """Runs one role against one cache entry. Keep it as long as the model: in save mode it
    owns the published entry, which `close()` (or the model's death, or exit) unpublishes.
    `progress` receives the slow steps' progress (default: log lines)."""

    def __init__(self, role: Role, settings: CacheSettings, source: ModelSource, *,
                 progress: ProgressFn = log_progress) -> None:
        self.role, self.settings, self.source, self.progress = role, settings, source, progress
        self.report: Report | None = None
        self.arena_region: tuple[int, int] | None = None  # address range of the arena this model views
        self._finalizer: weakref.finalize | None = None
        self._claim: Claim | None = None  # the head's claim: what this owner published, until close()

    # ---------------------------------------------------------------- public
    def run(self) -> nn.Module:
        start = time.perf_counter()
        mode, fallback = self._shareable(self.role.mode)
        if mode is Mode.OFF:  # the framework's own path: no fingerprint, no cache directory
            s = self._state(mode, None, None)
            s.model = self._timed_load(s)
        else:
            s, fallback = self._run_shared(mode)
        try:
            attached = (s.mode.attaches or s.adopting) and fallback is None  # a model built as a skeleton
            placed = {"placement": _placement(s) if attached else None} if s.spreads else {}
            model = self.source.finish(s.model, attached=attached, **placed)
            if not isinstance(model, nn.Module):
                raise TypeError(f"{type(self.source).__name__}.finish returned {type(model).__name__}, "
                                "not a torch module")
            self.report = self._report(s, model, fallback, time.perf_counter() - start)
        except BaseException:
            self._abandon(s)  # no model comes out, so nothing stays published for it
            raise
        if s.head.arena is not None and fallback is None:
            self.arena_region = s.head.arena.region()
        claims = s.claims()
        if claims:  # a save that published (a failed or fallen-back one has no claim left)
            self._finalizer = weakref.finalize(model, give_up, claims)
            self._claim = claims[0]
        _BY_MODEL[model] = self
        return model

    def close(self) -> None:
        """Unpublish (owner). Attached instances keep their mappings and keep working."""
        if self._finalizer is not None:
            self._finalizer()
        self._claim = None

    def mark_settled(self) -> None:
        """Owner: the engine has allocated all the memory it keeps beside the arena (pools, graphs),
        so attachers waiting to size their own memory may measure now (see sharedcache.settle)."""
        if self._claim is None or not self._claim.published:
            raise ConfigError("mark_settled() is for an instance that published an entry and still owns it.")
        from .settle import mark_settled

        mark_settled(self._claim.entry, self._claim.manifest)
        if self._claim.host_writer is not None:  # the engine's CUDA graphs exist: copying cannot disturb them
            self._claim.host_writer.start()

    # ---------------------------------------------------------------- internals
    def _shareable(self, mode: Mode) -> tuple[Mode, str | None]:
        """OFF and the reason when the source says its model cannot be shared and the user allows that."""
        if mode is Mode.OFF:
            return mode, None
        try:
            self.source.check()
        except UnsupportedModel as e:
            if self.settings.on_unsupported != "fallback":
                raise
            log.warning("[%s] not sharing: %s; loading normally", self.role.name, e)
            return Mode.OFF, str(e)
        return mode, None

    def _state(self, mode: Mode, entry: Entry | None, fingerprint: Fingerprint | None,
               claim: Claim | None = None) -> RunState:
        head = Part(0, entry=entry, fingerprint=fingerprint, claim=claim)
        return RunState(self.role, mode, self.settings, self.source, [head], progress=self.progress)

    def _run_shared(self, mode: Mode) -> tuple[RunState, str | None]:
        fingerprint = self.source.fingerprint(None)
        entry = CacheDir(self.settings.dir).entry(self.settings.key)
        if spreads(self.source) and not mode.attaches:  # before anything loads: the parts' keys
            try:
                CacheDir(self.settings.dir).entry(part_key(self.settings.key, max(torch.cuda.device_count() - 1, 1)))
            except ConfigError:
                raise ConfigError(f"cache key {self.settings.key!r} is too long for a model spread over GPUs: its "
                                  f"parts are keyed {part_key(self.settings.key, 1)!r} and so on, at most 128 "
                                  "characters.", hint="Set a shorter cache.key.") from None
        mode, claim = self._resolve_mode(entry, fingerprint, mode)
        s = self._state(mode, entry, fingerprint, claim)
        try:
            s.adopting = claim is not None and adoptable(entry, fingerprint, self.settings, self.source)
            outcome = self._run_plan(s)
            if s.adopting and isinstance(outcome, Fallback):  # the skeleton cannot be bound: load as a save does
                log.warning("[%s] not taking over the arena left under %s: %s; loading", self.role.name,
                            entry.key, outcome.reason)
                s = self._resaved(s)
                outcome = self._run_plan(s)
            if isinstance(outcome, Takeover):  # the would-be owner gave up before publishing: save instead
                self._abandon(s)
                s = self._state(Mode.SAVE, entry, fingerprint, outcome.claim)
                outcome = self._run_plan(s)
        except BaseException:
            self._abandon(s)
            raise
        if not isinstance(outcome, Fallback):
            return s, None
        log.warning("[%s] not sharing: %s; loading normally", self.role.name, outcome.reason)
        self._abandon(s)
        if s.model is None or mode.attaches:
            s.model = self._timed_load(s)
        return s, outcome.reason

    def _resolve_mode(self, entry: Entry, fp: Fingerprint, mode: Mode) -> tuple[Mode, Claim | None]:
        if mode is Mode.AUTO:
            if _compatible_live(entry, fp, spreads(self.source)):
                mode = Mode.LOAD
            else:
                try:
                    return Mode.SAVE, Claim.take(entry)
                except SharedCacheError:  # another instance became the owner first: attach to it
                    mode = Mode.LOAD
            log.info("[%s] auto mode resolved to %s", self.role.name, mode.value)
            return mode, None
        if mode is Mode.SAVE:
            return mode, Claim.take(entry)
        return mode, None

    def _run_plan(self, s: RunState) -> Fallback | Takeover | None:
        """Run the role's steps for `s.mode` in order; stop at the first that redirects the run."""
        plan = "adopt" if s.adopting else s.mode.plan_key  # an adopt runs the save order with its own steps
        for st in steps_for(plan, self.role.phases_for(s.mode)):
            wall, t0 = time.time(), time.perf_counter()
            outcome = st.run(s)
            if outcome is not None:  # the step did not complete: the run goes another way
                return outcome
            s.timings.append({"name": st.phase, "seconds": round(time.perf_counter() - t0, 6), "start": wall})
            log.debug("[%s] phase %s done in %.3fs", self.role.name, st.phase, s.timings[-1]["seconds"])
        return None

    def _timed_load(self, s: RunState) -> nn.Module:
        t0 = time.perf_counter()
        model = self.source.load()
        s.load_seconds = time.perf_counter() - t0
        return model

    def _resaved(self, s: RunState) -> RunState:
        """A fresh save run that keeps `s`'s claim, after what `s` did is undone."""
        claim, s.head.claim = s.head.claim, None
        self._abandon(s)
        return self._state(Mode.SAVE, s.head.entry, s.head.fingerprint, claim)

    @staticmethod
    def _abandon(s: RunState) -> None:
        """Undo what a failed or redirected run did: nothing half-published stays behind."""
        claims = s.claims()
        arenas = [p.arena for p in s.parts if p.claim is None and p.arena is not None and p.arena.owned]
        for p in s.parts:
            p.claim = p.arena = None
        try:
            give_up(claims)  # the manifests if published, the arenas they made, the keys
        finally:
            for arena in arenas:
                arena.release()

    def _report(self, s: RunState, model: nn.Module, fallback: str | None, total: float) -> Report:
        shared = fallback is None and s.mode is not Mode.OFF
        arena = s.head.arena if shared else None
        arenas = [p.arena for p in s.parts] if arena is not None else []
        allocated = weight_bytes_outside(model, [a.region() for a in arenas])
        allocated += sum(a.size for a in arenas if a.owned)
        attaches = shared and (s.mode.attaches or s.adopting)
        parts = [_part_row(p) for p in s.parts] if shared else []
        manifest = s.head.manifest
        return Report(
            role=self.role.name, mode=s.mode.value, engine=self.source.engine,
            backend=s.backend.name if (shared and s.backend) else None,
            model=s.head.fingerprint.model if s.head.fingerprint else str(getattr(self.source, "path", "")),
            key=self.settings.key, cache_dir=self.settings.dir,
            fingerprint=s.head.fingerprint.digest() if s.head.fingerprint else None,
            tensors=sum(len(p.refs) for p in s.parts) if shared else 0,
            bytes_shared=sum(p["bytes"] for p in parts),
            arena_bytes=sum(a.size for a in arenas),
            weight_bytes_allocated=allocated,
            phases=list(s.timings),
            attach_seconds=round(sum(p["seconds"] for p in s.timings) - s.wait_seconds, 6) if attaches else None,
            wait_seconds=round(s.wait_seconds, 6),
            load_seconds=round(s.load_seconds, 6) if s.load_seconds is not None else None,
            total_seconds=round(total, 6),
            owner_pid=manifest.owner.pid if manifest else None,
            owner_alive=s.owner_alive,
            fallback=fallback,
            layout_digest=manifest.arena.layout_digest if manifest else None,
            backend_timings={k: round(v, 6) for k, v in arena.timings.items()} if arena is not None else {},
            parts=parts if s.several_parts else [],
            adopted=shared and s.adopting and not arena.owned,
            refilled=shared and s.adopting and arena.owned,  # a new arena, filled from the host copy
        )


def _part_row(p: Part) -> dict:
    """One device's share of a model, for the report."""
    published = p.layout or p.manifest  # what was packed here, or attached to
    return {"key": p.entry.key, "device": str(p.arena.base.device) if p.arena is not None else None,
            "tensors": len(published.tensors) if published is not None else 0,
            "bytes": published.payload_bytes if published is not None else 0,
            "arena_bytes": p.arena.size if p.arena is not None else 0}


_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, Instance]" = weakref.WeakKeyDictionary()


def instance_of(model: nn.Module) -> Instance | None:
    """The Instance whose run produced `model` (its `.report`, its `.close()`), or None."""
    return _BY_MODEL.get(model)


def _compatible_live(entry: Entry, fp: Fingerprint, spreads: bool) -> bool:
    if not entry.published():
        return False
    try:
        manifest = entry.read()
    except ManifestError:
        return False
    return entry.owner_alive(manifest) and not differences(fp, manifest, spreads=spreads)


def _placement(s: RunState) -> dict[str, torch.device] | None:
    """An attached spread model's placement on this process's devices (part numbers become the devices
    its arenas were mapped on, which CUDA_VISIBLE_DEVICES may number otherwise than the owner's)."""
    if s.placement is None:
        return None
    devices = [p.arena.base.device for p in s.parts]
    return {module: devices[part] for module, part in s.placement.items()}
