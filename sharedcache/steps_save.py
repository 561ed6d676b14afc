"""The built-in steps of a save plan (sharedcache.phases): capture the loaded model, pack each device part
into an arena, checksum it, publish it. Each step declares the run-state fields it reads and provides
(`parts.<field>` for a Part's; tests/test_phase_declarations.py holds them to the code). A step returns
None when done, or a Fallback for the orchestrator (sharedcache.instance) to act on.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Iterator

from . import backends, hostcopy
from .cache import CacheDir
from .errors import EntryOwned, UnsupportedModel
from .layout import plan
from .keys import part_key
from .manifest import MAX_PARTS, ArenaInfo, Manifest, Owner, PartInfo
from .ownership import Claim
from .phases import step
from .progress import Throttle
from .run import Fallback, Part, RunState

if TYPE_CHECKING:  # torch comes with the first step, so that validating a role's order stays light
    import torch

    from .binding import TensorRef

log = logging.getLogger(__name__)


@step("intercept", "save", reads=("source", "settings", "parts.entry"),
      provides=("model", "load_seconds", "parts", "parts.device", "parts.refs", "parts.slots", "parts.entry",
                "parts.claim", "parts.fingerprint", "backend", "placement", "group"))
def intercept_save(s: RunState) -> Fallback | None:
    import torch

    from .binding import capture, devices_of

    s.head.entry.check_publishable()
    t0 = time.perf_counter()
    s.model = s.source.load()
    s.load_seconds = time.perf_counter() - t0
    try:
        devices = devices_of(s.model)
        if len(devices) > 1 and s.spreads:
            _split(s, devices)
        else:
            s.head.slots, s.head.refs = capture(s.model)
            s.head.device = s.head.refs[0].get().device if s.head.refs else torch.device("cpu")
    except UnsupportedModel as e:
        if s.settings.on_unsupported == "fallback":
            return Fallback(str(e))
        raise
    s.backend = backends.resolve(s.settings.backend, s.head.device, s.settings)
    _fingerprint(s)
    return None


def _fingerprint(s: RunState) -> None:
    """Each part's fingerprint; a spreading request's names the GPU the part landed on, not the request's."""
    import dataclasses

    from .devices import device_id

    base = s.source.fingerprint(s.model)
    for p in s.parts:
        p.fingerprint = dataclasses.replace(base, device=device_id(p.device)) if s.spreads else base


def _split(s: RunState, devices: list[torch.device]) -> None:
    """A model spread over several GPUs becomes one part per device, in the order its modules use them;
    part 0 keeps the user's key, each other part claims `<key>-part<i>`."""
    import uuid

    if any(d.type != "cuda" for d in devices) or len(devices) > MAX_PARTS:
        raise UnsupportedModel(f"the model's tensors lie on {[str(d) for d in devices]}; only a model spread over "
                               f"at most {MAX_PARTS} GPUs is shared (one arena per GPU), not one offloaded to the "
                               "CPU or disk.", hint="Load it onto GPUs only, or set cache.on_unsupported=fallback.")
    s.placement, s.group = _placement(s, devices), uuid.uuid4().hex
    for i, device in enumerate(devices):
        p = s.head if i == 0 else Part(i, entry=CacheDir(s.head.entry.root).entry(part_key(s.settings.key, i)))
        p.device = device
        _capture_part(s, p)
    _check_placed(s)


def _capture_part(s: RunState, p: Part) -> None:
    """Capture the tensors on `p.device`; a part after the head also claims its own key (given up with
    the others, sharedcache.ownership.give_up) and joins the run."""
    from .binding import capture

    p.slots, p.refs = capture(s.model, p.device)
    if p.index == 0:
        return
    p.entry.check_publishable()
    try:
        p.claim = Claim.take(p.entry)
    except EntryOwned as e:
        raise EntryOwned(f"this model's part on {p.device} needs the key {p.entry.key!r}, derived from "
                         f"cache.key={s.settings.key!r}, and {e.message}",
                         hint="Choose a cache.key whose -part<i> keys nothing else uses.") from None
    s.parts.append(p)


def _placement(s: RunState, devices: list[torch.device]) -> dict[str, int]:
    """{module path: part number} from where the engine runs each module."""
    import torch

    number = {d: i for i, d in enumerate(devices)}
    placed = {}
    for module, where in (s.source.placement(s.model) or {}).items():
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
    return placed


def _check_placed(s: RunState) -> None:
    """Every tensor lies where its module runs. One that does not is the same tensor used by modules
    placed on two devices (tied weights split by the device map): an attached copy would run it elsewhere."""
    for p in s.parts:
        for ref in p.refs:
            module = ref.name.rpartition(".")[0]
            where = placed_part(s.placement, ref.name)  # a map may name a tensor itself
            if where is not None and where != p.index:
                raise UnsupportedModel(
                    f"tensor {ref.name!r} lies on {p.device}, but the device map runs {module or 'the model'!r} "
                    f"on {s.parts[where].device}: tied weights split over two devices cannot be shared.",
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


@step("align", "save", reads=("settings", "backend", "progress", "role", "parts.device", "parts.refs",
                              "parts.slots", "parts.entry", "parts.claim"),
      provides=("parts.layout", "parts.arena"))
def align_save(s: RunState) -> None:
    with current_device_kept(s.several_parts):
        for p in s.parts:
            _pack(s, p)


@contextlib.contextmanager
def current_device_kept(several: bool) -> Iterator[None]:
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


def _pack(s: RunState, p: Part) -> None:
    """Plan one part's arena, move its tensors in and rebind them, one tensor at a time: the original goes
    back as soon as its copy landed, so the peak stays near one copy of the model."""
    import torch

    from .binding import bind, view_of

    device = p.device
    granularity = math.lcm(s.backend.granularity(device), s.settings.alignment)
    p.layout = plan(p.slots, alignment=s.settings.alignment, granularity=granularity)
    p.arena = p.claim.arena = s.backend.create(p.entry.dir, p.layout.size, device)
    specs = p.layout.by_name()
    by_root: dict[str, list[TensorRef]] = {}
    for ref in p.refs:
        by_root.setdefault(specs[ref.name].alias_of or ref.name, []).append(ref)
    where = f" on {device}" if s.several_parts else ""
    shown = Throttle(s.progress, s.role.name, after=1.0, every=0.5)
    done, total = 0, max(p.layout.payload_bytes, 1)
    with torch.no_grad():
        for root, group in by_root.items():
            spec = specs[root]
            p.arena.commit(spec.offset + spec.nbytes)
            src = group[0].get()
            view = view_of(p.arena.base, spec)
            view.copy_(src)
            grad = src.requires_grad
            del src
            bind(group, {root: view}, specs, requires_grad={root: grad})
            done += spec.nbytes
            shown.update(f"packing into the arena{where}", done / 2**30, total / 2**30, "GiB")
    shown.end(f"packing into the arena{where}: done in {shown.elapsed:.1f}s")


@step("serialize", "save", reads=("backend", "role", "settings", "source", "group", "placement", "parts.arena",
                                  "parts.layout", "parts.fingerprint", "parts.claim", "parts.entry"),
      provides=("parts.manifest",), uses=("parts.checksums",))
def serialize_save(s: RunState) -> None:
    for p in reversed(s.parts):  # part 0, the user's key, last: whoever sees it finds every part
        _publish(s, p)
    log.info("[%s] published %s: %d tensors, %d bytes%s", s.role.name, s.settings.key,
             sum(len(p.manifest.tensors) for p in s.parts), sum(p.manifest.payload_bytes for p in s.parts),
             f" over {len(s.parts)} devices" if s.several_parts else "")


def _publish(s: RunState, p: Part) -> None:
    p.arena.sync()  # every byte lands before anyone can attach
    part = PartInfo(p.index, len(s.parts), s.group, dict(s.placement)) if s.several_parts else None
    p.manifest = Manifest(
        key=p.entry.key, fingerprint=p.fingerprint, owner=Owner.current(), backend=s.backend.name,
        handle=p.arena.handle, device=p.arena.device,
        arena=ArenaInfo(p.layout.size, p.layout.granularity, p.layout.alignment, p.layout.digest()),
        tensors=p.layout.tensors, created=time.time(), checksums=p.checksums, part=part)
    p.claim.publish(p.manifest)
    p.arena.seal()  # from now on an in-place write by the owner faults instead of changing every instance
    keep_host_copy(s, p)


def keep_host_copy(s: RunState, p: Part) -> None:
    """The host copy of a just-published arena, where asked for: started now, or once an engine that settles
    (SGLang: its CUDA graph capture must not see another thread's CUDA calls) has settled."""
    hostcopy.keep(s.settings, p.claim, p.manifest, p.arena, now=not getattr(s.source, "settles", False))


@step("verify", "save", reads=("parts.arena", "parts.layout"), provides=("parts.checksums",))
def verify_save(s: RunState) -> None:
    for p in s.parts:
        p.checksums = checksums(p.arena.base, p.layout.tensors)


def checksums(base: torch.Tensor, specs) -> dict[str, str]:
    """blake2b of every stored tensor's bytes (aliases share their root's)."""
    out = {}
    for spec in specs:
        if spec.alias_of is None:
            chunk = base.narrow(0, spec.offset, spec.nbytes).cpu().numpy()
            out[spec.name] = hashlib.blake2b(chunk.tobytes(), digest_size=16).hexdigest()
    return out
