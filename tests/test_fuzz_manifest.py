"""Property-based fuzzing of the manifest loader and the cpu_shm attach path.

Mutated manifests of a real published entry (a real arena file) are fed to read_manifest:
truncated, wrong types, huge or negative sizes, overlapping tensors, offsets past the arena,
names with path separators or dunders, aliases in cycles, bad arena handles, deep nesting,
random bytes. Every case must end in a SharedCacheError subclass, never another exception,
an out-of-bounds view or a hang. A manifest the loader accepts is attached with the cpu_shm
backend and every tensor is viewed; each view must lie inside the mapped arena.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from sharedcache import CacheSettings
from sharedcache.backends.cpu_shm import CpuShmBackend
from sharedcache.binding import view_of
from sharedcache.cache import CacheDir
from sharedcache.conf import compose
from sharedcache.errors import ManifestError, SharedCacheError
from sharedcache.fingerprint import Fingerprint
from sharedcache.layout import ITEMSIZE, TensorSlot, TensorSpec, contiguous_stride, layout_digest, plan
from sharedcache.manifest import ArenaInfo, Manifest, Owner, write_manifest
from sharedcache.manifest_parse import read_manifest

SETTINGS = CacheSettings.from_mapping(compose([])["cache"])  # backends take the packaged defaults, none of their own

# hypothesis's shrinker may repr the (large) JSON-value strategy while inverting a value; harmless
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")

# ---------------------------------------------------------------- the published entry

SLOTS = [
    TensorSlot("a.weight", "param", True, torch.float32, (3, 5)),
    TensorSlot("b.bias", "param", True, torch.bfloat16, (7,)),
    TensorSlot("c.inv_freq", "buffer", False, torch.float16, (4,)),
    TensorSlot("d.weight", "param", True, torch.float32, (3, 5), alias_of="a.weight"),  # tied
    TensorSlot("e.scale", "buffer", True, torch.int8, ()),  # 0-dim
    TensorSlot("f.empty", "buffer", True, torch.int64, (0, 3)),  # zero-size
    TensorSlot("g.mask", "buffer", True, torch.bool, (2, 2)),
    TensorSlot("h.idx", "buffer", True, torch.int32, (2, 3)),
]
FP = Fingerprint("test", "1", "/m", None, "c" * 64, (("model.safetensors", 10, 1),), "float32", None, "cpu", 0, 1)

# files next to the real arena that a mutated handle may name (all must be refused by attach)
DECOYS = ("arena-short.bin", "arena-empty.bin", "arena-dir.bin", "arena-link.bin", "arena-fifo.bin")


@dataclass(repr=False)
class Published:
    entry_dir: Path
    manifest_path: Path
    arena_file: str
    good: "Good"  # the manifest as JSON, as write_manifest wrote it

    def __repr__(self) -> str:
        return f"Published({self.entry_dir})"


class Good(dict):
    """The valid manifest; a short repr keeps hypothesis's reports readable."""

    def __repr__(self) -> str:
        return "<the published manifest>"


@pytest.fixture(scope="module")
def published():
    root = Path(tempfile.mkdtemp(prefix="sc-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.chmod(root, 0o700)
    arena = None
    try:
        entry = CacheDir(root).entry("k").ensure()
        lay = plan(SLOTS, alignment=256, granularity=4096)
        arena = CpuShmBackend(SETTINGS).create(entry.dir, lay.size, torch.device("cpu"))
        for spec in lay.tensors:
            if spec.alias_of is None and spec.nbytes:
                v = view_of(arena.base, spec)
                v.copy_(torch.arange(v.numel()).reshape(v.shape).to(v.dtype))
        m = Manifest("k", FP, Owner.current(), "cpu_shm", arena.handle, arena.device,
                     ArenaInfo(lay.size, lay.granularity, lay.alignment, lay.digest()), lay.tensors, 1.0)
        write_manifest(entry.manifest_path, m)
        assert read_manifest(entry.manifest_path) == m
        good = Good(json.loads(entry.manifest_path.read_bytes()))
        d = entry.dir
        (d / "arena-short.bin").write_bytes(b"\0" * 100)
        (d / "arena-empty.bin").write_bytes(b"")
        (d / "arena-dir.bin").mkdir(mode=0o700)
        (d / "arena-link.bin").symlink_to(d / arena.handle["file"])
        os.mkfifo(d / "arena-fifo.bin", 0o600)
        (root / "outside.bin").write_bytes(b"\0" * 8192)  # what "../outside.bin" would reach
        yield Published(d, entry.manifest_path, arena.handle["file"], good)
    finally:
        if arena is not None:
            arena.release()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- building blocks

NASTY_STRINGS = [
    "", " ", "../x", "/etc/passwd", "../../etc/passwd", "__class__", "__init__", "a/b", "a\\b", "a.__dict__",
    "a.__class__.b", "a..b", ".a", "a.", "a\x00b", "a\nb", "a.weight\n", "é", "\U0001d518", "null", "NaN", "1",
    "a" * 300, "manifest.json", "arena-x.bin/../../y", "float32", "param", "buffer", "a.weight", "d.weight",
]
BIG_INTS = [0, 1, -1, 2, 3, 7, 255, 256, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1,
            2**63, 2**64, 2**70, -(2**63), -(2**70), 10**30]
FLOATS = [0.0, -0.0, 0.5, 1.0, 5.0, 4096.0, 1e11, 1e308, math.nan, math.inf, -math.inf]
KNOWN_KEYS = ["schema", "key", "fingerprint", "fingerprint_digest", "owner", "backend", "handle", "device",
              "arena", "tensors", "checksums", "created", "name", "kind", "persistent", "dtype", "shape", "stride",
              "offset", "nbytes", "alias_of", "file", "size", "granularity", "alignment", "layout_digest",
              "__class__", "__proto__", "../x", ""]

# A value nested `depth` levels deep is put in the document as this marker string and expanded
# only in the serialized text (json.dumps itself would refuse the depth).
_DEEP = "\ue000deep"
_DEEP_RE = re.compile(r'"\\ue000deep:(\d+):(list|dict)"')


def _expand_deep(text: str) -> str:
    def sub(m: re.Match) -> str:
        depth = int(m.group(1))
        return "[" * depth + "0" + "]" * depth if m.group(2) == "list" else '{"a":' * depth + "0" + "}" * depth
    return _DEEP_RE.sub(sub, text)


# fixed depths (not a range): how deep Python's recursion limit bites depends on the stack depth at
# the call, so a shrinker hunting for the exact boundary would only find flaky examples.
deep_values = st.builds(lambda depth, kind: f"{_DEEP}:{depth}:{kind}",
                        st.sampled_from([10, 100, 300, 500, 700, 900, 1000, 1100, 5000, 100_000]),
                        st.sampled_from(["list", "dict"]))
json_leaves = (st.none() | st.booleans() | st.sampled_from(BIG_INTS) | st.integers() | st.sampled_from(FLOATS)
               | st.floats() | st.sampled_from(NASTY_STRINGS) | st.text(max_size=12))
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=8,
) | deep_values


def _child_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (key/index tuples) of every value below `node`, at any depth."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_child_paths(v, prefix + (k,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _redigest(doc: Any) -> None:
    """Recompute arena.layout_digest from the (mutated) tensor table, so the mutation gets
    past the digest check and reaches the deeper ones. A table that is not even a list of
    tensor-shaped objects is left alone (it is refused before the digest is looked at)."""
    try:
        a = doc["arena"]
        specs = [TensorSpec(**t) for t in doc["tensors"]]
        a["layout_digest"] = layout_digest(specs, a["size"], a["alignment"])
    except Exception:
        pass


def _refingerprint(doc: Any) -> None:
    try:
        doc["fingerprint_digest"] = Fingerprint.from_json(doc["fingerprint"]).digest()
    except Exception:
        pass


def _tensors(doc: Any) -> list[dict] | None:
    """The tensor table if it is still a non-empty list of objects, else None."""
    t = doc.get("tensors") if isinstance(doc, dict) else None
    if isinstance(t, list) and t and all(isinstance(x, dict) for x in t):
        return t
    return None


def _arena_size(doc: Any) -> int:
    try:
        size = doc["arena"]["size"]
    except Exception:
        return 4096
    return size if type(size) is int else 4096


def _itemsize(t: dict) -> int:
    return ITEMSIZE.get(t.get("dtype"), 1) if isinstance(t.get("dtype"), str) else 1


def _pick(draw, seq: list) -> Any:
    """draw(st.sampled_from(seq)), without `seq` in a strategy's repr (it may hold huge values)."""
    return seq[draw(st.integers(0, len(seq) - 1))]


# ---------------------------------------------------------------- mutations
# Each takes (draw, doc), mutates doc in place and returns a description for the report.

Mutation = Callable[[Callable, Any], str]


def _draw_tensor(draw, doc) -> tuple[int, dict] | None:
    """One tensor entry of the manifest (and its index), or None if there is no tensor table."""
    tensors = _tensors(doc)
    if tensors is None:
        return None
    i = draw(st.integers(0, len(tensors) - 1))
    return i, tensors[i]


def m_replace_any(draw, doc) -> str:
    paths = _child_paths(doc)
    if not paths or draw(st.integers(0, 30)) == 0:
        value = draw(json_values)
        doc.clear()
        doc["__root__"] = value  # marker: the serializer writes `value` as the whole document
        return f"root := {value!r}"
    path = _pick(draw, paths)
    value = draw(json_values)
    _get(doc, path[:-1])[path[-1]] = value
    return f"{path} := {value!r}"


def m_delete_any(draw, doc) -> str:
    paths = _child_paths(doc)
    if not paths:
        return "nothing to delete"
    path = _pick(draw, paths)
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return f"del {path}"


def m_add_key(draw, doc) -> str:
    dicts = [p for p in [()] + _child_paths(doc) if isinstance(_get(doc, p), dict)]
    path = _pick(draw, dicts)
    key = draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6))
    value = draw(json_values)
    _get(doc, path)[key] = value
    return f"{path + (key,)} := {value!r} (added)"


def m_duplicate_item(draw, doc) -> str:
    lists = [p for p in _child_paths(doc) if isinstance(_get(doc, p), list) and _get(doc, p)]
    if not lists:
        return "no list to duplicate into"
    path = _pick(draw, lists)
    lst = _get(doc, path)
    i = draw(st.integers(0, len(lst) - 1))
    lst.insert(draw(st.integers(0, len(lst))), copy.deepcopy(lst[i]))
    return f"{path}[{i}] duplicated"


def _tensor_field_values(doc: Any, tensors: list[dict], t: dict, key: str):
    size, itemsize = _arena_size(doc), _itemsize(t)
    names = [x.get("name") for x in tensors]
    offset = t.get("offset") if type(t.get("offset")) is int else 0
    nbytes = t.get("nbytes") if type(t.get("nbytes")) is int else 0
    shape = t.get("shape") if isinstance(t.get("shape"), list) else []
    targeted: dict[str, list] = {
        "offset": [size, size - 1, size - itemsize, size - nbytes, size - nbytes + itemsize, size + 4096,
                   offset + 1, offset - itemsize, -itemsize, 2**63 - itemsize, 2**64, 2**70, -(2**70), 4096.0,
                   float(offset), True, str(offset)],
        "nbytes": [nbytes + itemsize, nbytes - itemsize, 0, size, size + 1, 2**63, 2**70, -nbytes, -1,
                   float(nbytes), str(nbytes), True],
        "shape": [[], [0], [2**70], [-1], [-3, -5], shape[::-1], shape + [1], shape + [0], shape + [2**63],
                  [1] * 17, [0] * 16, [1.0] * len(shape), [True] * len(shape), [d * 2 for d in shape],
                  [2**64, 0], [0, 2**64], [str(d) for d in shape], None, 3],
        "stride": [list(contiguous_stride(tuple(d for d in shape if type(d) is int))),
                   [float(s) for s in contiguous_stride(tuple(d for d in shape if type(d) is int))],
                   [bool(s) for s in contiguous_stride(tuple(d for d in shape if type(d) is int))],
                   [0] * len(shape), [-1] * len(shape), [2**63] * len(shape), [1] * (len(shape) + 1), [], None],
        "dtype": sorted(ITEMSIZE) + ["float", "torch.float32", "complex64", "FLOAT32", "object", "", 5, None],
        "name": NASTY_STRINGS + names,
        "alias_of": names + [t.get("name"), "missing.weight", "", 0, ["a.weight"]],
        "kind": ["parameter", "buffers", "", "PARAM", None, 0, ["param"]],
        "persistent": [0, 1, "true", None, [], "false"],
    }
    return targeted.get(key, [None])


def _draw_value(draw, targeted: list):
    """Three times in four a value aimed at the field, else any JSON value."""
    return _pick(draw, targeted) if draw(st.integers(0, 3)) else draw(json_values)


def m_tensor_field(draw, doc) -> str:
    picked = _draw_tensor(draw, doc)
    if picked is None:
        return "no tensor table"
    i, t = picked
    key = _pick(draw, sorted(t) or ["name"])
    value = _draw_value(draw, _tensor_field_values(doc, _tensors(doc), t, key))
    t[key] = value
    return f"tensors[{i}].{key} := {value!r}"


def m_reshape(draw, doc) -> str:
    """A new shape (possibly huge, negative, >16 dims or zero-sized with huge dims) with a matching
    stride and nbytes, so only the shape itself is on trial."""
    picked = _draw_tensor(draw, doc)
    if picked is None:
        return "no tensor table"
    i, t = picked
    if draw(st.booleans()):
        t["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE)))
    if draw(st.booleans()):  # zero-sized: nbytes is 0 whatever the other dims are
        huge = draw(st.lists(st.sampled_from([3, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70]), min_size=1, max_size=3))
        shape = draw(st.permutations([0] + huge))
    else:
        dim = (st.sampled_from([0, 1, 2, 3, 7, 64, 1024, 2**31, 2**32, 2**62, 2**63, 2**64, 2**70, -1])
               | st.integers(0, 9))
        shape = draw(st.lists(dim, max_size=draw(st.sampled_from([2, 4, 16, 18]))))
    t["shape"] = shape
    t["stride"] = list(contiguous_stride(tuple(shape)))
    t["nbytes"] = math.prod(shape) * _itemsize(t)
    return f"tensors[{i}] reshaped to {t.get('dtype')} {shape} ({t['nbytes']} bytes)"


def m_stride(draw, doc) -> str:
    """Strides that are not the contiguous int stride but may compare equal to it."""
    picked = _draw_tensor(draw, doc)
    if picked is None:
        return "no tensor table"
    i, t = picked
    shape = t.get("shape") if isinstance(t.get("shape"), list) else []
    cs = list(contiguous_stride(tuple(d for d in shape if type(d) is int)))
    variants = {
        "floats": [float(x) for x in cs],
        "last float": cs[:-1] + [float(x) for x in cs[-1:]],
        "bools": [bool(x) for x in cs],
        "strings": [str(x) for x in cs],
        "nested": [[x] for x in cs],
        "longer": cs + [1],
        "shorter": cs[:-1],
        "reversed": cs[::-1],
        "zeros": [0] * len(cs),
        "negated": [-x for x in cs],
        "wrapped": [x + 2**64 for x in cs],
        "exponent": [float(f"{x}e0") for x in cs],
    }
    name = draw(st.sampled_from(sorted(variants)))
    t["stride"] = variants[name]
    return f"tensors[{i}].stride := {variants[name]!r} ({name})"


def m_move(draw, doc) -> str:
    picked = _draw_tensor(draw, doc)
    if picked is None:
        return "no tensor table"
    i, t = picked
    size, itemsize = _arena_size(doc), _itemsize(t)
    nbytes = t.get("nbytes") if type(t.get("nbytes")) is int else 0
    choices = [size - nbytes, size - nbytes + itemsize, size, size + itemsize, size * 2, 2**63 - itemsize,
               2**64, 2**70, 0, -itemsize, -(2**70)]
    choices += [x["offset"] for x in _tensors(doc) if type(x.get("offset")) is int]
    offset = _pick(draw, choices) if draw(st.integers(0, 3)) else draw(st.integers(-(2**66), 2**66))
    offset -= offset % itemsize if draw(st.booleans()) else 0
    t["offset"] = offset
    return f"tensors[{i}].offset := {offset}"


def m_overlap(draw, doc) -> str:
    """Move one stored tensor into another's bytes (offset aligned to its own element size)."""
    tensors = _tensors(doc)
    if tensors is None or len(tensors) < 2:
        return "no tensor table"
    i, j = draw(st.lists(st.integers(0, len(tensors) - 1), min_size=2, max_size=2, unique=True))
    a, b = tensors[i], tensors[j]
    b_off = b.get("offset") if type(b.get("offset")) is int else 0
    b_len = b.get("nbytes") if type(b.get("nbytes")) is int else 1
    delta = draw(st.integers(0, max(b_len - 1, 0)))
    off = b_off + delta
    off -= off % _itemsize(a)
    a["offset"] = off
    if draw(st.booleans()):
        a["alias_of"] = None
    return f"tensors[{i}] moved to {off}, inside tensors[{j}] [{b_off}, {b_off + b_len})"


def m_alias(draw, doc) -> str:
    """Alias cycles (a->b, b->a), self-aliases, forward aliases and alias chains, with the alias's
    geometry copied from its target so only the alias relation itself is on trial."""
    tensors = _tensors(doc)
    if tensors is None:
        return "no tensor table"
    n = len(tensors)
    kind = draw(st.sampled_from(["cycle", "self", "forward", "chain", "3-cycle", "drift"]))
    i = draw(st.integers(0, n - 1))
    j = draw(st.integers(0, n - 1))
    k = draw(st.integers(0, n - 1))
    geometry = ("dtype", "shape", "stride", "offset", "nbytes")

    def tie(src: dict, dst: dict) -> None:
        if draw(st.booleans()):
            for g in geometry:
                if g in dst:
                    src[g] = copy.deepcopy(dst[g])
        src["alias_of"] = dst.get("name")

    if kind == "cycle":
        tie(tensors[i], tensors[j])
        tie(tensors[j], tensors[i])
    elif kind == "3-cycle":
        tie(tensors[i], tensors[j])
        tie(tensors[j], tensors[k])
        tie(tensors[k], tensors[i])
    elif kind == "self":
        tensors[i]["alias_of"] = tensors[i].get("name")
    elif kind == "forward":
        lo, hi = sorted((i, j))
        tie(tensors[lo], tensors[hi])
    elif kind == "chain":
        tie(tensors[j], tensors[i])
        tie(tensors[k], tensors[j])
    else:  # drift: a valid alias whose geometry then differs
        tie(tensors[i], tensors[j])
        key = draw(st.sampled_from(geometry))
        tensors[i][key] = _draw_value(draw, _tensor_field_values(doc, tensors, tensors[i], key))
    return f"alias {kind} over tensors {i}, {j}, {k}"


def m_names(draw, doc) -> str:
    """Duplicate names, path separators, dunders; aliases may follow the renamed tensor."""
    tensors = _tensors(doc)
    if tensors is None:
        return "no tensor table"
    i = draw(st.integers(0, len(tensors) - 1))
    j = draw(st.integers(0, len(tensors) - 1))
    old = tensors[i].get("name")
    if draw(st.integers(0, 2)):
        new = _pick(draw, NASTY_STRINGS + [tensors[j].get("name"), "a.b/c", "x.__globals__", "__", "_._",
                                          "a.weight.__class__", "a" * 64, "a" * 10_000])
    else:
        new = draw(st.text(alphabet="ab_./\\\x00\n_.", min_size=0, max_size=12))
    tensors[i]["name"] = new
    if draw(st.booleans()):
        for t in tensors:
            if t.get("alias_of") == old:
                t["alias_of"] = new
    return f"tensors[{i}].name {old!r} := {new!r}"


def m_table(draw, doc) -> str:
    """Reorder, drop, duplicate or empty the tensor table."""
    tensors = _tensors(doc)
    if tensors is None:
        return "no tensor table"
    op = draw(st.sampled_from(["shuffle", "drop", "dup", "clear", "reverse"]))
    if op == "shuffle":
        doc["tensors"] = [tensors[k] for k in draw(st.permutations(range(len(tensors))))]
    elif op == "reverse":
        tensors.reverse()
    elif op == "drop":
        tensors.pop(draw(st.integers(0, len(tensors) - 1)))
    elif op == "dup":
        tensors.append(copy.deepcopy(tensors[draw(st.integers(0, len(tensors) - 1))]))
    else:
        tensors.clear()
    return f"tensor table {op}"


def m_arena(draw, doc) -> str:
    a = doc.get("arena") if isinstance(doc, dict) else None
    if not isinstance(a, dict):
        return "no arena"
    key = draw(st.sampled_from(["size", "granularity", "alignment", "size+granularity"]))
    values = st.sampled_from([0, 1, 3, 256, 1024, 2048, 4095, 4096, 4097, 8192, 2**20, 2**62, 2**63, 2**64, 2**70,
                              -4096, -1, 4096.0, True, "4096", None]) | json_values
    if key == "size+granularity":
        g = draw(st.sampled_from([1, 256, 1024, 2048, 4096, 8192, 2**40]))
        a["granularity"] = g
        a["size"] = g * draw(st.sampled_from([0, 1, 2, 3, 2**30, 2**60]) | st.integers(0, 8))
        return f"arena.size := {a['size']}, arena.granularity := {g}"
    a[key] = draw(values)
    return f"arena.{key} := {a[key]!r}"


def m_handle(draw, doc, real_file: str) -> str:
    choices = [
        {"file": "../../etc/passwd"}, {"file": "/etc/passwd"}, {"file": "arena-x.bin/../../y"},
        {"file": "../outside.bin"}, {"file": "arena-../../outside.bin"}, {"file": "arena-..bin"},
        {"file": real_file, "extra": 1}, {"file": real_file, "offset": 4096}, {"File": real_file},
        {"file": real_file + "\n"}, {"file": real_file + "/"}, {"file": "./" + real_file},
        {"file": "arena-missing.bin"},
        {"file": None}, {"file": 1}, {"file": [real_file]}, {"file": ""}, {}, {"file": "manifest.json"},
        {"file": "arena-" + "x" * 65 + ".bin"}, {"file": "arena-x.bin\x00"},
    ] + [{"file": name} for name in DECOYS]
    value = _pick(draw, choices) if draw(st.integers(0, 3)) else draw(json_values)
    doc["handle"] = value
    return f"handle := {value!r}"


def m_fingerprint(draw, doc) -> str:
    """Change a fingerprint field (deep values included) and re-sign it, to reach what follows."""
    fp = doc.get("fingerprint") if isinstance(doc, dict) else None
    if not isinstance(fp, dict) or not fp:
        return "no fingerprint"
    key = _pick(draw, sorted(fp))
    fp[key] = draw(st.sampled_from([None, "", [], {}, ["x", 1, 2], [["x", 1]], "abc", ["abc"], 2**70]) | json_values)
    _refingerprint(doc)
    return f"fingerprint.{key} := {fp[key]!r} (re-signed)"


def m_top(draw, doc) -> str:
    """Targeted values for the scalar top-level fields and the checksums table."""
    if not isinstance(doc, dict):
        return "no document"
    key = draw(st.sampled_from(["schema", "created", "key", "backend", "checksums", "owner", "device"]))
    table = [t for t in (_tensors(doc) or []) if isinstance(t.get("name"), str)]
    names = [t["name"] for t in table]
    stored = [t["name"] for t in table if t.get("alias_of") is None]
    targeted = {
        "schema": [0, 2, True, 1.0, "1", None, -1, 2**70],
        "created": [math.nan, math.inf, -math.inf, -1, 1e11, 1e300, True, "1.0", 2**70, None],
        "key": ["", None, 1, "../k", "k/../x"],
        "backend": ["", None, "cuda_vmm", "../cpu_shm"],
        "checksums": [{}, {n: "ab" for n in stored}, {n: "ab" for n in names}, {n: 1 for n in stored},
                      {n: "ab" for n in stored[1:]}, [], "ab", {**{n: "ab" for n in stored}, "zz": "ab"}],
        "owner": [{}, None, {"pid": 0, "host": "h", "boot_id": "b", "uid": 0, "start_ticks": 0},
                  {"pid": -1, "host": "h", "boot_id": "b", "uid": -1, "start_ticks": -1},
                  {"pid": 2**70, "host": "", "boot_id": "", "uid": 2**70, "start_ticks": 2**70},
                  {"pid": True, "host": 1, "boot_id": None, "uid": 1.0, "start_ticks": "0"}],
        "device": [None, [], {"type": "cuda", "index": 0, "uuid": "x"}, "cpu"],
    }
    doc[key] = _pick(draw, targeted[key]) if draw(st.integers(0, 3)) else draw(json_values)
    return f"{key} := {doc[key]!r}"


GENERIC: list[Mutation] = [m_replace_any, m_delete_any, m_add_key, m_duplicate_item]
TABLE: list[Mutation] = [m_tensor_field, m_reshape, m_stride, m_move, m_overlap, m_alias, m_names, m_table]
OTHER: list[Mutation] = [m_arena, m_fingerprint, m_top]


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    steps: list[str]
    body: bytes

    def __repr__(self) -> str:
        body = re.sub(rb'(\[|\]|\{"a":|\})\1{15,}',  # deep nesting, abridged
                      lambda r: r.group(1) * 3 + b"<x%d>" % (len(r.group(0)) // len(r.group(1))), self.body)
        body = body if len(body) <= 4000 else body[:4000] + b"...(%d bytes)" % len(body)
        steps = [s if len(s) <= 300 else s[:300] + f"...({len(s)} chars)" for s in self.steps]
        return "Case(\n  steps=[\n" + "".join(f"    {s!r},\n" for s in steps) + f"  ],\n  body={body!r})"


def _serialize(draw, doc) -> bytes:
    if isinstance(doc, dict) and set(doc) == {"__root__"}:
        doc = doc["__root__"]
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1])), sort_keys=draw(st.booleans()))
    return _expand_deep(text).encode()


@st.composite
def doc_cases(draw, good: dict, families: list[Mutation], redigest_p: int, handle_file: str | None = None) -> Case:
    """Apply 1-4 mutations from `families` to the valid manifest; re-sign the layout with
    probability redigest_p/10 so deeper checks are reached."""
    doc = copy.deepcopy(dict(good))
    steps = []
    pool = list(families)
    if handle_file is not None:
        pool.append(lambda draw_, doc_: m_handle(draw_, doc_, handle_file))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        mutate = draw(st.sampled_from(pool))
        steps.append(mutate(draw, doc))
    if draw(st.integers(0, 9)) < redigest_p:
        _redigest(doc)
        steps.append("layout_digest re-signed")
    return Case(steps, _serialize(draw, doc))


@st.composite
def byte_cases(draw, good: dict) -> Case:
    """A valid (or lightly mutated) manifest, corrupted at the byte level."""
    doc = copy.deepcopy(dict(good))
    steps = []
    if draw(st.booleans()):
        steps.append(draw(st.sampled_from(TABLE + OTHER))(draw, doc))
        _redigest(doc)
    body = _serialize(draw, doc)
    op = draw(st.sampled_from(["truncate", "flip", "drop", "insert", "replace", "random", "bom", "utf16", "utf32",
                               "latin1", "trailing", "empty", "nul", "repeat"]))
    n = len(body)
    if op == "truncate":
        body = body[:draw(st.integers(0, n - 1))]
    elif op == "flip":
        i, bit = draw(st.integers(0, n - 1)), draw(st.integers(0, 7))
        body = body[:i] + bytes([body[i] ^ (1 << bit)]) + body[i + 1:]
    elif op == "drop":
        i = draw(st.integers(0, n - 1))
        body = body[:i] + body[i + draw(st.integers(1, 16)):]
    elif op == "insert":
        i = draw(st.integers(0, n))
        body = body[:i] + draw(st.binary(min_size=1, max_size=16)) + body[i:]
    elif op == "replace":
        i = draw(st.integers(0, n - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        body = body[:i] + chunk + body[i + len(chunk):]
    elif op == "random":
        body = draw(st.binary(max_size=256))
    elif op == "bom":
        body = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"])) + body
    elif op in ("utf16", "utf32", "latin1"):
        text = body.decode() + draw(st.sampled_from(["", " \u00e9", "\ud800"]))
        body = text.encode({"utf16": "utf-16", "utf32": "utf-32", "latin1": "latin-1"}[op], errors="surrogatepass"
                           if op != "latin1" else "replace")
    elif op == "trailing":
        body = body + draw(st.sampled_from([b"x", b"{}", b"\x00", b" ,", b"\xff"]))
    elif op == "empty":
        body = draw(st.sampled_from([b"", b" ", b"\n", b"null", b"0", b"[]", b"{}", b'""']))
    elif op == "nul":
        body = body.replace(b'"', b"\x00", draw(st.integers(1, 3)))
    else:
        body = body * 2
    steps.append(f"bytes: {op}")
    return Case(steps, body)


# ---------------------------------------------------------------- the oracle

HANG_S = 20  # a real hang is interrupted here; slowness is caught by the hypothesis deadline


class Hang(Exception):
    """Not a SharedCacheError: fails the test."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _write(path: Path, body: bytes) -> None:
    """A fresh regular file of ours at `path` (the arena lives in the same fixed directory)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)


def _check_accepted(m: Manifest) -> None:
    """What an accepted manifest promises before a byte is mapped."""
    size = m.arena.size
    seen: dict[str, Any] = {}
    for t in m.tensors:
        assert isinstance(t.name, str) and t.name, t
        parts = t.name.split(".")
        assert all(parts) and not any(p.startswith("__") for p in parts), f"accepted a dunder/empty name {t.name!r}"
        assert not set(t.name) & {"/", "\\", "\x00"}, f"accepted a name with a path separator {t.name!r}"
        assert t.name not in seen, f"accepted a duplicate name {t.name!r}"
        assert t.dtype in ITEMSIZE, t
        assert all(type(d) is int and d >= 0 for d in t.shape), t
        assert t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype], t
        assert type(t.offset) is int and 0 <= t.offset and t.offset + t.nbytes <= size, f"outside the arena: {t}"
        if t.alias_of is not None:
            target = seen.get(t.alias_of)
            assert target is not None and target.alias_of is None, f"alias to nothing stored before it: {t}"
            assert (target.offset, target.nbytes, target.dtype, target.shape) == \
                   (t.offset, t.nbytes, t.dtype, t.shape), f"alias geometry differs: {t}"
        seen[t.name] = t
    stored = sorted((t for t in m.tensors if t.alias_of is None and t.nbytes), key=lambda t: t.offset)
    for a, b in zip(stored, stored[1:]):
        assert a.offset + a.nbytes <= b.offset, f"accepted overlapping tensors {a} and {b}"


def _check_views(arena, m: Manifest, views: list[torch.Tensor], file_size: int) -> None:
    """Every view lies inside [0, arena size) of the mapped base, exactly where its spec says."""
    base = arena.base
    assert base.dtype == torch.uint8 and base.dim() == 1
    size = base.numel()
    assert size == m.arena.size and size <= file_size
    base_ptr = base.data_ptr()
    for spec, v in zip(m.tensors, views, strict=True):
        assert v.dtype == getattr(torch, spec.dtype) and tuple(v.shape) == spec.shape, (spec, v.dtype, v.shape)
        assert v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr(), \
            f"{spec.name}: not a view of the arena"
        # byte offset from the storage (data_ptr() of an empty tensor is 0 in torch, so not used there)
        start = v.storage_offset() * v.element_size() - base.storage_offset()
        if v.numel() == 0:
            assert 0 <= start <= size, f"{spec.name}: empty view starts at {start}, outside [0, {size}]"
            continue
        assert all(s >= 0 for s in v.stride()), (spec, v.stride())
        extent = (sum((d - 1) * s for d, s in zip(v.shape, v.stride())) + 1) * v.element_size()
        assert 0 <= start and start + extent <= size, \
            f"{spec.name}: view covers bytes [{start}, {start + extent}) of a {size}-byte arena"
        assert v.data_ptr() - base_ptr == start, (spec, v.data_ptr() - base_ptr, start)
        assert (start, extent) == (spec.offset, spec.nbytes), (spec, start, extent)
        v.clone()  # touch every byte


def _event(what: str) -> None:
    if currently_in_test_context():
        event(what)


_UNEXPECTED: dict[tuple, type] = {}


def _unexpected(stage: str, e: BaseException) -> AssertionError:
    """The failure to report for an exception that is not a SharedCacheError. Raised outside the
    `except` block with a class per (stage, type, sharedcache line, message shape), so hypothesis
    sees a stable origin even for a RecursionError (whose innermost line varies) and reports
    distinct bugs separately."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}sharedcache{os.sep}" in f.filename]
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    shape = re.sub(r"\d+", "N", str(e))[:60]
    key = (stage, type(e).__name__, where, shape)
    if key not in _UNEXPECTED:
        _UNEXPECTED[key] = type(f"{type(e).__name__}In{stage.title().replace('_', '')}", (AssertionError,), {})
    shown = frames[-12:] if not isinstance(e, RecursionError) else ours[-3:]
    tb = "".join(traceback.format_list(shown))
    first = (str(e).splitlines() or [""])[0][:300]
    return _UNEXPECTED[key](f"{stage} raised {type(e).__name__} (not a SharedCacheError) at {where}: {first}\n{tb}")


def _exercise(pub: Published, case: Case) -> None:
    _write(pub.manifest_path, case.body)
    failure = None
    with _time_limit(HANG_S):
        try:
            m = read_manifest(pub.manifest_path)
        except SharedCacheError as e:
            signature = "fingerprint_digest" in str(e) or "layout_digest does not match" in str(e)
            _event(f"rejected by the loader: {type(e).__name__}"
                   f"{' (a digest check)' if signature else ''}")
            return
        except Exception as e:  # noqa: BLE001 - reported below, outside this block
            failure = _unexpected("read_manifest", e)
        if failure is not None:
            raise failure
        _check_accepted(m)
        try:
            arena = CpuShmBackend(SETTINGS).attach(pub.entry_dir, m)
        except SharedCacheError as e:
            _event(f"rejected by attach: {type(e).__name__}")
            return
        except Exception as e:  # noqa: BLE001
            failure = _unexpected("attach", e)
        if failure is not None:
            raise failure
        views: list[torch.Tensor] = []
        try:
            for spec in m.tensors:
                views.append(view_of(arena.base, spec))
        except SharedCacheError as e:
            _event(f"rejected by view_of: {type(e).__name__}")
            return
        except Exception as e:  # noqa: BLE001
            failure = _unexpected("view_of", e)
        if failure is not None:
            raise failure
        _check_views(arena, m, views, (pub.entry_dir / m.handle["file"]).stat().st_size)
        _event("accepted and mapped in bounds")


FUZZ = settings(
    deadline=2000,  # ms per example: a slow path fails the test
    derandomize=True,  # the same cases on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)

# The four property tests below run 1,500 + 1,200 + 500 + 800 = 4,000 cases per run (at least 2,000 required).


@settings(FUZZ, max_examples=1500)
@given(data=st.data())
@pytest.mark.slow
def test_mutated_tensor_table_ends_in_a_sharedcache_error(published, data):
    """Overlaps, offsets past the arena, huge/negative/zero-sized shapes, bad strides, alias cycles,
    bad names, reordered or duplicated entries; the layout digest is mostly re-signed."""
    _exercise(published, data.draw(doc_cases(published.good, TABLE, redigest_p=9), label="case"))


@settings(FUZZ, max_examples=1200)
@given(data=st.data())
@pytest.mark.slow
def test_mutated_fields_at_any_depth_end_in_a_sharedcache_error(published, data):
    """Keys deleted, added or replaced with any JSON value (deep nesting included), mixed with
    targeted arena, fingerprint, handle and top-level mutations."""
    case = data.draw(doc_cases(published.good, GENERIC + OTHER + TABLE, redigest_p=5,
                               handle_file=published.arena_file), label="case")
    _exercise(published, case)


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_bad_arena_handles_and_sizes_end_in_a_sharedcache_error(published, data):
    """Handles naming files outside the entry, decoys (short, empty, directory, symlink, FIFO) or
    carrying extra keys; arena sizes larger than the file, huge, or inconsistent with the table."""
    case = data.draw(doc_cases(published.good, [m_arena], redigest_p=9, handle_file=published.arena_file),
                     label="case")
    _exercise(published, case)


@settings(FUZZ, max_examples=800)
@given(data=st.data())
def test_corrupted_bytes_end_in_a_sharedcache_error(published, data):
    """Truncated at any point, bit flips, inserted/removed bytes, other encodings, random bytes."""
    _exercise(published, data.draw(byte_cases(published.good), label="case"))


def test_the_unmutated_manifest_attaches(published):
    """The oracle itself: the valid manifest parses, attaches and maps every tensor in bounds."""
    _exercise(published, Case([], json.dumps(published.good).encode()))
    m = read_manifest(published.manifest_path)
    arena = CpuShmBackend(SETTINGS).attach(published.entry_dir, m)
    by_name = {t.name: view_of(arena.base, t) for t in m.tensors}
    assert torch.equal(by_name["a.weight"], torch.arange(15, dtype=torch.float32).reshape(3, 5))
    assert by_name["d.weight"].data_ptr() == by_name["a.weight"].data_ptr()
    assert by_name["e.scale"].shape == () and by_name["f.empty"].numel() == 0


@pytest.mark.parametrize("body", [
    b"\xff\xfe\xfd garbage \x80\x81",  # not UTF-8
    b"\x80{\"schema\": 1}",  # invalid UTF-8 lead byte before JSON
    b"not json at all",
    b"{\"schema\": 1, ",  # truncated
    b"",
    bytes(range(256)),
])
def test_garbage_manifest_is_a_manifest_error(cache_dir, body):
    path = cache_dir / "manifest.json"
    path.write_bytes(body)
    with pytest.raises(ManifestError, match="not valid JSON|top level|schema"):
        read_manifest(path)


def test_the_reader_and_the_record_import_in_either_order():
    """manifest_parse imports the record, which knows nothing of the reader: either imports first, torch-free."""
    code = ("import sys, sharedcache.{first}; "
            "from sharedcache import manifest, manifest_parse; "
            "assert manifest_parse.Manifest is manifest.Manifest and not hasattr(manifest, 'read_manifest'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    for first in ("manifest_parse", "manifest"):
        out = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
