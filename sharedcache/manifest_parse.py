"""Reading a manifest: untrusted JSON, validated field by field before a single byte is mapped.

Every problem is a ManifestError that names the field. The record itself (what a manifest holds, and
writing it) is `sharedcache.manifest`.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, NoReturn

from .errors import ManifestError, NoManifest, short
from .fingerprint import Fingerprint
from .layout import ITEMSIZE, TensorSpec, contiguous_stride, layout_digest
from .manifest import MAX_PARTS, SCHEMA_VERSION, ArenaInfo, Manifest, Owner, PartInfo

MAX_MANIFEST_BYTES = 64 << 20
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_TENSOR_KEYS = {"name", "kind", "persistent", "dtype", "shape", "stride", "offset", "nbytes", "alias_of"}
_TOP_KEYS = {"schema", "key", "fingerprint", "fingerprint_digest", "owner", "backend", "handle", "device",
             "arena", "tensors", "checksums", "created"}
_OPTIONAL_KEYS = {"part", "server"}  # a model spread over devices; an arena a surviving mapper serves
_GROUP = re.compile(r"^[0-9a-f]{32}$")
_MAX_INT = 2**63 - 1  # what the kernel and the drivers take as a size or an offset
_HANDLE_VALUE = re.compile(r"^[A-Za-z0-9_.:/+=-]{1,256}$")


# ---------------------------------------------------------------- the file

def read_manifest(path: Path) -> Manifest:
    """Read and strictly validate; every problem is a ManifestError naming the field."""
    raw = _read_bytes(path)
    try:
        data = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {path} is not valid JSON ({e}); it may be truncated or corrupt.",
                            hint="Remove the entry (or run its prefill again) to re-publish it.") from e
    try:
        return parse_manifest(data)
    except ManifestError as e:
        raise ManifestError(f"manifest {path}: {e.message}", hint=e.hint) from e


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of ours within the size limit: never follows a link and
    never blocks (a FIFO in its place)."""
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
        return os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)


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


# ---------------------------------------------------------------- the record

def parse_manifest(data: Any) -> Manifest:
    """A Manifest from parsed JSON, every field checked (the first problem found is the error)."""
    _need(isinstance(data, dict), "top level must be a JSON object")
    schema = data.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema version {schema!r} is not supported (this sharedcache reads version {SCHEMA_VERSION}).",
            hint="Use the same sharedcache version for owner and attacher, or re-publish the entry.")
    missing, unknown = _TOP_KEYS - set(data), set(data) - _TOP_KEYS - _OPTIONAL_KEYS
    _need(not missing, f"missing fields {sorted(missing)}")
    _need(not unknown, f"unknown fields {sorted(unknown)}")
    fp = _fingerprint(data["fingerprint"], data["fingerprint_digest"])
    owner, arena = _owner(data["owner"]), _arena(data["arena"])
    handle, device = _handle(data["handle"]), _device(data["device"])
    _need(isinstance(data["created"], (int, float)) and not isinstance(data["created"], bool)
          and 0 <= data["created"] < 1e11, "created must be a time in seconds since the epoch")
    tensors = _parse_tensors(data["tensors"], arena.size)
    _need(layout_digest(tensors, arena.size, arena.alignment) == arena.layout_digest,
          "arena.layout_digest does not match the tensor table (edited or corrupt)")
    checksums = _checksums(data["checksums"], tensors)
    part = _part(data["part"]) if "part" in data else None
    server = _owner(data["server"], "server") if "server" in data else None
    return Manifest(key=_str(data["key"], "key"), fingerprint=fp, owner=owner, backend=_str(data["backend"], "backend"),
                    handle=handle, device=device, arena=arena, tensors=tensors,
                    created=float(data["created"]), checksums=checksums, part=part, server=server)


def _fail(what: str) -> NoReturn:
    raise ManifestError(f"invalid manifest: {what}.", hint="Remove the entry and re-publish it.")


def _need(cond: bool, what: str) -> None:
    if not cond:
        _fail(what)


def _is_count(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _MAX_INT


def _int(v: Any, what: str, *, minimum: int = 0) -> int:
    _need(type(v) is int and minimum <= v <= _MAX_INT,
          f"{what} must be an integer in [{minimum}, 2**63), got {short(v)}")
    return v


def _str(v: Any, what: str) -> str:
    _need(isinstance(v, str) and v != "", f"{what} must be a non-empty string, got {v!r}")
    return v


def _fingerprint(raw: Any, digest: Any) -> Fingerprint:
    try:
        fp = Fingerprint.from_json(raw)
        ours = fp.digest()
    except (TypeError, ValueError, RecursionError) as e:
        raise ManifestError(f"invalid manifest: fingerprint: {e}.") from e
    _need(digest == ours, "fingerprint_digest does not match the fingerprint")
    return fp


def _owner(o: Any, what: str = "owner") -> Owner:
    _need(isinstance(o, dict) and set(o) == {"pid", "host", "boot_id", "uid", "start_ticks"},
          f"{what} must have pid, host, boot_id, uid, start_ticks")
    return Owner(_int(o["pid"], f"{what}.pid", minimum=1), _str(o["host"], f"{what}.host"),
                 _str(o["boot_id"], f"{what}.boot_id"), _int(o["uid"], f"{what}.uid"),
                 _int(o["start_ticks"], f"{what}.start_ticks"))


def _arena(a: Any) -> ArenaInfo:
    _need(isinstance(a, dict) and set(a) == {"size", "granularity", "alignment", "layout_digest"},
          "arena must have size, granularity, alignment, layout_digest")
    arena = ArenaInfo(_int(a["size"], "arena.size", minimum=1), _int(a["granularity"], "arena.granularity", minimum=1),
                      _int(a["alignment"], "arena.alignment", minimum=1), _str(a["layout_digest"], "arena.layout_digest"))
    _need(arena.size % arena.granularity == 0, "arena.size must be a multiple of arena.granularity")
    return arena


def _handle(h: Any) -> dict[str, Any]:
    """A backend's handle: names and counts only (each backend checks its own keys)."""
    _need(isinstance(h, dict) and 0 < len(h) <= 8, "handle must be an object of at most 8 fields")
    for k, v in h.items():
        _need(isinstance(k, str) and k.isidentifier() and len(k) <= 32, f"handle key {short(k)} is not a plain name")
        _need((type(v) is int and 0 <= v <= _MAX_INT) or (isinstance(v, str) and _HANDLE_VALUE.fullmatch(v)),
              f"handle.{k} must be a plain name or a non-negative integer, got {short(v)}")
    return h


def _device(d: Any) -> dict[str, Any]:
    _need(isinstance(d, dict) and set(d) == {"type", "index", "uuid"}, "device must have type, index, uuid")
    _need(d["type"] in ("cpu", "cuda"), f"device.type must be 'cpu' or 'cuda', got {short(d['type'])}")
    _need(d["index"] is None or (type(d["index"]) is int and 0 <= d["index"] < 4096),
          f"device.index must be null or a device number, got {short(d['index'])}")
    _need(d["uuid"] is None or (isinstance(d["uuid"], str) and _HANDLE_VALUE.fullmatch(d["uuid"])),
          f"device.uuid must be null or a device id, got {short(d['uuid'])}")
    return d


def _checksums(checksums: Any, tensors: tuple[TensorSpec, ...]) -> dict[str, str] | None:
    if checksums is not None:
        names = {t.name for t in tensors if t.alias_of is None}
        _need(isinstance(checksums, dict) and set(checksums) == names
              and all(isinstance(v, str) for v in checksums.values()),
              "checksums must map every stored tensor name to a hex digest")
    return checksums


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
              f"part.placement key {short(name)} is not a module path")
        _need(type(where) is int and 0 <= where < count, f"part.placement[{name!r}] must be a part number below {count}")
    return PartInfo(index, count, p["group"], placement)


# ---------------------------------------------------------------- the tensor table
# checks written as `if not ...: _fail(...)`: messages are only built for bad input (hot path)

def _parse_tensors(raw: Any, arena_size: int) -> tuple[TensorSpec, ...]:
    _need(isinstance(raw, list) and raw, "tensors must be a non-empty list")
    seen: dict[str, TensorSpec] = {}  # in table order: a name given twice is refused
    for i, t in enumerate(raw):
        spec = _tensor(i, t, seen, arena_size)
        seen[spec.name] = spec
    specs = tuple(seen.values())
    stored = sorted((s for s in specs if s.alias_of is None and s.nbytes), key=lambda s: s.offset)
    for a, b in zip(stored, stored[1:]):
        _need(a.offset + a.nbytes <= b.offset, f"tensors {a.name!r} and {b.name!r} overlap in the arena")
    return specs


def _tensor(i: int, t: Any, seen: dict[str, TensorSpec], arena_size: int) -> TensorSpec:
    """tensors[i], checked alone and against the tensors before it (`seen`)."""
    if not (isinstance(t, dict) and t.keys() == _TENSOR_KEYS):
        _fail(f"tensors[{i}] must have exactly {sorted(_TENSOR_KEYS)}")
    name = t["name"]
    if not (isinstance(name, str) and _NAME.fullmatch(name)
            and not any(part.startswith("__") for part in name.split("."))):
        _fail(f"tensors[{i}].name {name!r} is not a dotted module path")
    if name in seen:
        _fail(f"tensor name {name!r} appears twice")
    kind, persistent, dtype = t["kind"], t["persistent"], t["dtype"]
    if kind not in ("param", "buffer"):
        _fail(f"{name}: kind must be 'param' or 'buffer'")
    if not isinstance(persistent, bool):
        _fail(f"{name}: persistent must be a boolean")
    if not (isinstance(dtype, str) and dtype in ITEMSIZE):
        _fail(f"{name}: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
    shape = _shape(name, t, arena_size)
    offset, nbytes = _extent(name, t, shape, arena_size)
    alias = t["alias_of"]
    if alias is not None:
        if not (isinstance(alias, str) and alias in seen and seen[alias].alias_of is None):
            _fail(f"{name}: alias_of {alias!r} names no earlier stored tensor")
        target = seen[alias]
        if (target.offset, target.nbytes, target.dtype, target.shape) != (offset, nbytes, dtype, shape):
            _fail(f"{name}: alias of {alias!r} must have the same offset, size, dtype and shape")
    return TensorSpec(name, kind, persistent, dtype, shape, tuple(t["stride"]), offset, nbytes, alias)


def _shape(name: str, t: dict[str, Any], arena_size: int) -> tuple[int, ...]:
    """The tensor's shape, with the contiguous stride that layout v1 writes."""
    shape, stride = t["shape"], t["stride"]
    if not (isinstance(shape, list) and len(shape) <= 16 and all(_is_count(d) for d in shape)):
        _fail(f"{name}: shape must be a list of at most 16 non-negative integers, got {shape!r}")
    shape = tuple(shape)
    if math.prod(max(d, 1) for d in shape) > arena_size:  # zero-size tensors may not hide huge dims
        _fail(f"{name}: shape {list(shape)} cannot lie in a {arena_size}-byte arena")
    if not (isinstance(stride, list) and all(type(x) is int for x in stride)
            and tuple(stride) == contiguous_stride(shape)):
        _fail(f"{name}: stride {stride!r} is not the contiguous stride {list(contiguous_stride(shape))} "
              "that layout v1 writes")
    return shape


def _extent(name: str, t: dict[str, Any], shape: tuple[int, ...], arena_size: int) -> tuple[int, int]:
    """(offset, nbytes): the tensor's bytes, whole elements inside the arena."""
    offset, nbytes = t["offset"], t["nbytes"]
    if not (_is_count(offset) and _is_count(nbytes)):
        _fail(f"{name}: offset and nbytes must be non-negative integers, got {offset!r}, {nbytes!r}")
    itemsize = ITEMSIZE[t["dtype"]]
    numel = math.prod(shape)
    if nbytes != numel * itemsize:
        _fail(f"{name}: nbytes {nbytes} != {numel} elements x {itemsize} bytes")
    if offset % itemsize:
        _fail(f"{name}: offset {offset} is not aligned to its {itemsize}-byte elements")
    if offset + nbytes > arena_size:
        _fail(f"{name}: bytes [{offset}, {offset + nbytes}) lie outside the {arena_size}-byte arena")
    return offset, nbytes
