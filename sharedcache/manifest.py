"""Manifest: the JSON record of one published arena (never pickle).

Written atomically under the entry's lock, so a reader sees a whole manifest or
none, and validated field by field before a single byte is mapped.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import ManifestError, NoManifest
from .files import write_json_atomic
from .fingerprint import Fingerprint
from .layout import ITEMSIZE, TensorSpec, contiguous_stride, layout_digest

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_TENSOR_KEYS = {"name", "kind", "persistent", "dtype", "shape", "stride", "offset", "nbytes", "alias_of"}
_TOP_KEYS = {"schema", "key", "fingerprint", "fingerprint_digest", "owner", "backend", "handle", "device",
             "arena", "tensors", "checksums", "created"}
_OPTIONAL_KEYS = {"part"}  # only in the manifests of a model spread over several devices
_GROUP = re.compile(r"^[0-9a-f]{32}$")
MAX_PARTS = 64


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    boot_id: str
    uid: int
    start_ticks: int  # the process's start time since boot: with boot_id, pid reuse cannot fool us

    @classmethod
    def current(cls) -> "Owner":
        return cls(os.getpid(), os.uname().nodename, boot_id(), os.getuid(), process_start_ticks(os.getpid()))

    def running(self) -> bool:
        """Is the very process that wrote this manifest still running (on this boot)?"""
        return self.boot_id == boot_id() and process_start_ticks(self.pid) == self.start_ticks


def process_start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); -1 if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class ArenaInfo:
    size: int
    granularity: int
    alignment: int
    layout_digest: str


@dataclass(frozen=True)
class PartInfo:
    """This entry is part `index` of `count` of one model spread over several devices, all published by
    one owner in one save (`group`). Part 0 is the entry under the user's key and is published last, so a
    reader that sees it finds the whole group; part i > 0 is `<key>-part<i>`. `placement` maps module
    paths to part numbers: where each module runs, as the owner's engine placed it."""

    index: int
    count: int
    group: str
    placement: dict[str, int]


def differences(fingerprint: Fingerprint, manifest: Manifest, *, spreads: bool) -> list[tuple[str, Any, Any]]:
    """What differs between a request's fingerprint and a published head entry (as Fingerprint.diff). A
    request that lets the engine spread the model over GPUs takes the GPUs the owner's model lies on (each
    part is then found on its own GPU by UUID), not a CPU entry; a request for one device cannot use a model
    spread over several ("devices")."""
    theirs = manifest.fingerprint
    on_gpus = spreads and theirs.device.startswith("cuda:")
    found = [d for d in fingerprint.diff(theirs) if not (on_gpus and d[0] == "device")]
    if manifest.part is not None and not spreads:
        found.append(("devices", 1, manifest.part.count))
    return found


def part_key(head_key: str, index: int) -> str:
    """The entry key of part `index` of the model published under `head_key`."""
    return head_key if index == 0 else f"{head_key}-part{index}"


def head_key(key: str, index: int) -> str:
    """The key the model is published under, from the key of its part `index` (part_key's inverse)."""
    return key.removesuffix(f"-part{index}") if index else key


@dataclass(frozen=True)
class Manifest:
    key: str
    fingerprint: Fingerprint
    owner: Owner
    backend: str
    handle: dict[str, Any]
    device: dict[str, Any]  # {"type", "index", "uuid"}
    arena: ArenaInfo
    tensors: tuple[TensorSpec, ...]
    created: float
    checksums: dict[str, str] | None = None
    part: PartInfo | None = None
    schema: int = field(default=SCHEMA_VERSION)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.part is None else {"part": vars(self.part).copy()}
        return extra | {
            "schema": self.schema,
            "key": self.key,
            "fingerprint": self.fingerprint.to_json(),
            "fingerprint_digest": self.fingerprint.digest(),
            "owner": vars(self.owner).copy(),
            "backend": self.backend,
            "handle": self.handle,
            "device": self.device,
            "arena": vars(self.arena).copy(),
            "tensors": [t.to_json() for t in self.tensors],
            "checksums": self.checksums,
            "created": self.created,
        }

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- writing

def write_manifest(path: Path, manifest: Manifest) -> None:
    """Atomically and durably: a reader sees no manifest or the whole one (OSError, nothing left, if not)."""
    write_json_atomic(path, manifest.to_json(), indent=1, sort_keys=True, mode=0o600, sync_dir=True)


# ---------------------------------------------------------------- reading

def read_manifest(path: Path) -> Manifest:
    """Read and strictly validate; every problem is a ManifestError naming the field."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoManifest(f"no manifest at {path}.",
                         hint="Start the prefill (owner) instance first, or check cache.dir and cache.key.") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ManifestError(f"manifest {path} is a symbolic link; refusing to follow it.",
                                hint="Remove it and re-publish.") from e
        what = "it is a socket" if e.errno == errno.ENXIO else e.strerror
        raise ManifestError(f"cannot open manifest {path}: {what}.",
                            hint="Check its permissions, or remove the entry and start the prefill again.") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ManifestError(f"{path} is not a regular file of yours; refusing to read it.",
                                hint="Remove it and re-publish.")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest {path} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit.",
                                hint="Remove it and re-publish.")
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {path} is not valid JSON ({e}); it may be truncated or corrupt.",
                            hint="Remove the entry (or run its prefill again) to re-publish it.") from e
    try:
        return parse_manifest(data)
    except ManifestError as e:
        raise ManifestError(f"manifest {path}: {e.message}", hint=e.hint) from e


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number a manifest may hold")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice would let two readers see two different manifests; refuse it."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


_MAX_INT = 2**63 - 1  # what the kernel and the drivers take as a size or an offset
_HANDLE_VALUE = re.compile(r"^[A-Za-z0-9_.:/+=-]{1,256}$")


def _fail(what: str) -> NoReturn:
    raise ManifestError(f"invalid manifest: {what}.", hint="Remove the entry and re-publish it.")


def _need(cond: bool, what: str) -> None:
    if not cond:
        _fail(what)


def _is_count(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _MAX_INT


def _int(v: Any, what: str, *, minimum: int = 0) -> int:
    _need(type(v) is int and minimum <= v <= _MAX_INT,
          f"{what} must be an integer in [{minimum}, 2**63), got {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _handle(h: Any) -> dict[str, Any]:
    """A backend's handle: names and counts only (each backend checks its own keys)."""
    _need(isinstance(h, dict) and 0 < len(h) <= 8, "handle must be an object of at most 8 fields")
    for k, v in h.items():
        _need(isinstance(k, str) and k.isidentifier() and len(k) <= 32, f"handle key {_short(k)} is not a plain name")
        _need((type(v) is int and 0 <= v <= _MAX_INT) or (isinstance(v, str) and _HANDLE_VALUE.fullmatch(v)),
              f"handle.{k} must be a plain name or a non-negative integer, got {_short(v)}")
    return h


def _device(d: Any) -> dict[str, Any]:
    _need(isinstance(d, dict) and set(d) == {"type", "index", "uuid"}, "device must have type, index, uuid")
    _need(d["type"] in ("cpu", "cuda"), f"device.type must be 'cpu' or 'cuda', got {_short(d['type'])}")
    _need(d["index"] is None or (type(d["index"]) is int and 0 <= d["index"] < 4096),
          f"device.index must be null or a device number, got {_short(d['index'])}")
    _need(d["uuid"] is None or (isinstance(d["uuid"], str) and _HANDLE_VALUE.fullmatch(d["uuid"])),
          f"device.uuid must be null or a device id, got {_short(d['uuid'])}")
    return d


def _str(v: Any, what: str) -> str:
    _need(isinstance(v, str) and v != "", f"{what} must be a non-empty string, got {v!r}")
    return v


def parse_manifest(data: Any) -> Manifest:
    _need(isinstance(data, dict), "top level must be a JSON object")
    schema = data.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema version {schema!r} is not supported (this sharedcache reads version {SCHEMA_VERSION}).",
            hint="Use the same sharedcache version for owner and attacher, or re-publish the entry.")
    missing, unknown = _TOP_KEYS - set(data), set(data) - _TOP_KEYS - _OPTIONAL_KEYS
    _need(not missing, f"missing fields {sorted(missing)}")
    _need(not unknown, f"unknown fields {sorted(unknown)}")
    try:
        fp = Fingerprint.from_json(data["fingerprint"])
        digest = fp.digest()
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestError(f"invalid manifest: fingerprint: {e}.") from e
    _need(data["fingerprint_digest"] == digest, "fingerprint_digest does not match the fingerprint")
    o = data["owner"]
    _need(isinstance(o, dict) and set(o) == {"pid", "host", "boot_id", "uid", "start_ticks"},
          "owner must have pid, host, boot_id, uid, start_ticks")
    owner = Owner(_int(o["pid"], "owner.pid", minimum=1), _str(o["host"], "owner.host"),
                  _str(o["boot_id"], "owner.boot_id"), _int(o["uid"], "owner.uid"),
                  _int(o["start_ticks"], "owner.start_ticks"))
    a = data["arena"]
    _need(isinstance(a, dict) and set(a) == {"size", "granularity", "alignment", "layout_digest"},
          "arena must have size, granularity, alignment, layout_digest")
    arena = ArenaInfo(_int(a["size"], "arena.size", minimum=1), _int(a["granularity"], "arena.granularity", minimum=1),
                      _int(a["alignment"], "arena.alignment", minimum=1), _str(a["layout_digest"], "arena.layout_digest"))
    _need(arena.size % arena.granularity == 0, "arena.size must be a multiple of arena.granularity")
    handle, device = _handle(data["handle"]), _device(data["device"])
    _need(isinstance(data["created"], (int, float)) and not isinstance(data["created"], bool)
          and 0 <= data["created"] < 1e11, "created must be a time in seconds since the epoch")
    tensors = _parse_tensors(data["tensors"], arena.size)
    _need(layout_digest(tensors, arena.size, arena.alignment) == arena.layout_digest,
          "arena.layout_digest does not match the tensor table (edited or corrupt)")
    checksums = data["checksums"]
    if checksums is not None:
        names = {t.name for t in tensors if t.alias_of is None}
        _need(isinstance(checksums, dict) and set(checksums) == names
              and all(isinstance(v, str) for v in checksums.values()),
              "checksums must map every stored tensor name to a hex digest")
    part = _part(data["part"]) if "part" in data else None
    return Manifest(key=_str(data["key"], "key"), fingerprint=fp, owner=owner, backend=_str(data["backend"], "backend"),
                    handle=handle, device=device, arena=arena, tensors=tensors,
                    created=float(data["created"]), checksums=checksums, part=part)


def _part(p: Any) -> PartInfo:
    _need(isinstance(p, dict) and set(p) == {"index", "count", "group", "placement"},
          "part must have index, count, group, placement")
    count = _int(p["count"], "part.count", minimum=2)
    _need(count <= MAX_PARTS, f"part.count must be at most {MAX_PARTS}, got {count}")
    index = _int(p["index"], "part.index")
    _need(index < count, f"part.index {index} must be below part.count {count}")
    _need(isinstance(p["group"], str) and _GROUP.fullmatch(p["group"]), "part.group must be 32 hex digits")
    placement = p["placement"]
    _need(isinstance(placement, dict) and 0 < len(placement) <= 1 << 16, "part.placement must be a non-empty object")
    for name, where in placement.items():
        _need(name == "" or (isinstance(name, str) and _NAME.fullmatch(name)),
              f"part.placement key {_short(name)} is not a module path")
        _need(type(where) is int and 0 <= where < count, f"part.placement[{name!r}] must be a part number below {count}")
    return PartInfo(index, count, p["group"], placement)


def _parse_tensors(raw: Any, arena_size: int) -> tuple[TensorSpec, ...]:
    _need(isinstance(raw, list) and raw, "tensors must be a non-empty list")
    specs: list[TensorSpec] = []
    seen: dict[str, TensorSpec] = {}
    for i, t in enumerate(raw):
        # checks written as `if not ...: _fail(...)`: messages are only built for bad input (hot path)
        if not (isinstance(t, dict) and t.keys() == _TENSOR_KEYS):
            _fail(f"tensors[{i}] must have exactly {sorted(_TENSOR_KEYS)}")
        name = t["name"]
        if not (isinstance(name, str) and _NAME.fullmatch(name)
                and not any(part.startswith("__") for part in name.split("."))):
            _fail(f"tensors[{i}].name {name!r} is not a dotted module path")
        if name in seen:
            _fail(f"tensor name {name!r} appears twice")
        kind, persistent, dtype, shape, stride = t["kind"], t["persistent"], t["dtype"], t["shape"], t["stride"]
        if kind not in ("param", "buffer"):
            _fail(f"{name}: kind must be 'param' or 'buffer'")
        if not isinstance(persistent, bool):
            _fail(f"{name}: persistent must be a boolean")
        if not (isinstance(dtype, str) and dtype in ITEMSIZE):
            _fail(f"{name}: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
        if not (isinstance(shape, list) and len(shape) <= 16 and all(_is_count(d) for d in shape)):
            _fail(f"{name}: shape must be a list of at most 16 non-negative integers, got {shape!r}")
        shape = tuple(shape)
        if math.prod(max(d, 1) for d in shape) > arena_size:  # zero-size tensors may not hide huge dims
            _fail(f"{name}: shape {list(shape)} cannot lie in a {arena_size}-byte arena")
        if not (isinstance(stride, list) and all(type(x) is int for x in stride)
                and tuple(stride) == contiguous_stride(shape)):
            _fail(f"{name}: stride {stride!r} is not the contiguous stride {list(contiguous_stride(shape))} "
                  "that layout v1 writes")
        offset, nbytes = t["offset"], t["nbytes"]
        if not (_is_count(offset) and _is_count(nbytes)):
            _fail(f"{name}: offset and nbytes must be non-negative integers, got {offset!r}, {nbytes!r}")
        itemsize = ITEMSIZE[dtype]
        numel = math.prod(shape)
        if nbytes != numel * itemsize:
            _fail(f"{name}: nbytes {nbytes} != {numel} elements x {itemsize} bytes")
        if offset % itemsize:
            _fail(f"{name}: offset {offset} is not aligned to its {itemsize}-byte elements")
        if offset + nbytes > arena_size:
            _fail(f"{name}: bytes [{offset}, {offset + nbytes}) lie outside the {arena_size}-byte arena")
        alias = t["alias_of"]
        if alias is not None:
            if not (isinstance(alias, str) and alias in seen and seen[alias].alias_of is None):
                _fail(f"{name}: alias_of {alias!r} names no earlier stored tensor")
            target = seen[alias]
            if (target.offset, target.nbytes, target.dtype, target.shape) != (offset, nbytes, dtype, shape):
                _fail(f"{name}: alias of {alias!r} must have the same offset, size, dtype and shape")
        spec = TensorSpec(name, kind, persistent, dtype, shape, tuple(stride), offset, nbytes, alias)
        seen[name] = spec
        specs.append(spec)
    stored = sorted((s for s in specs if s.alias_of is None and s.nbytes), key=lambda s: s.offset)
    for a, b in zip(stored, stored[1:]):
        _need(a.offset + a.nbytes <= b.offset, f"tensors {a.name!r} and {b.name!r} overlap in the arena")
    return tuple(specs)
