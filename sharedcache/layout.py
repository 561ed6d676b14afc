"""Arena layout: where every tensor of a model shard lives inside one allocation.

Offsets are a pure function of the tensors' order, dtypes and shapes, so two
processes planning the same model get the same layout and the layout has a digest.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

LAYOUT_VERSION = 1

# dtypes a manifest may name, with their sizes; anything else is refused before a byte is mapped.
# Plain names, so that reading manifests (the CLI) needs no torch.
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def torch_dtype(name: str):
    """The torch dtype of an allowed name (imports torch on first use)."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise ValueError(f"dtype {dtype} cannot be placed in a shared arena")
    return name


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for dim in reversed(shape):
        stride.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(stride))


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the model as it lies in the arena."""

    name: str
    kind: str  # "param" | "buffer"
    persistent: bool
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int
    alias_of: str | None = None  # tied weights: same bytes as another spec, no storage of their own

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "persistent": self.persistent, "dtype": self.dtype,
                "shape": list(self.shape), "stride": list(self.stride), "offset": self.offset,
                "nbytes": self.nbytes, "alias_of": self.alias_of}


@dataclass(frozen=True)
class TensorSlot:
    """What the planner needs to know of one tensor before it has an offset."""

    name: str
    kind: str
    persistent: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    alias_of: str | None = None


@dataclass(frozen=True)
class ArenaLayout:
    tensors: tuple[TensorSpec, ...]
    size: int  # bytes, a multiple of granularity
    alignment: int
    granularity: int

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)

    def digest(self) -> str:
        return layout_digest(self.tensors, self.size, self.alignment)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}


def layout_digest(tensors: Iterable[TensorSpec], size: int, alignment: int) -> str:
    body = json.dumps(
        {"v": LAYOUT_VERSION, "size": size, "alignment": alignment, "tensors": [t.to_json() for t in tensors]},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def plan(slots: Iterable[TensorSlot], *, alignment: int, granularity: int) -> ArenaLayout:
    """Place each non-alias tensor at the next `alignment` boundary, in the given order."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    if granularity <= 0 or granularity % alignment:
        raise ValueError(f"granularity {granularity} must be a positive multiple of alignment {alignment}")
    placed: dict[str, TensorSpec] = {}
    specs: list[TensorSpec] = []
    cursor = 0
    for slot in slots:
        if slot.name in placed:
            raise ValueError(f"tensor name {slot.name!r} appears twice")
        shape = tuple(int(d) for d in slot.shape)
        itemsize = ITEMSIZE[dtype_name(slot.dtype)]
        nbytes = math.prod(shape) * itemsize
        if slot.alias_of is not None:
            target = placed[slot.alias_of]
            spec = TensorSpec(slot.name, slot.kind, slot.persistent, target.dtype, target.shape,
                              target.stride, target.offset, target.nbytes, alias_of=slot.alias_of)
        else:
            cursor = align_up(cursor, alignment)
            spec = TensorSpec(slot.name, slot.kind, slot.persistent, dtype_name(slot.dtype), shape,
                              contiguous_stride(shape), cursor, nbytes)
            cursor += nbytes
        placed[slot.name] = spec
        specs.append(spec)
    size = max(align_up(cursor, granularity), granularity)
    return ArenaLayout(tuple(specs), size, alignment, granularity)
