"""Fingerprint: everything that must match for two instances to share bytes."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .layout import LAYOUT_VERSION

if TYPE_CHECKING:  # a type only: the manifest module imports this one
    from .manifest import Manifest

# files whose bytes are weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Fingerprint:
    engine: str
    engine_version: str
    model: str
    revision: str | None
    config_sha256: str
    weights: tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns)
    dtype: str
    quantization: str | None
    device: str  # "cpu" or "cuda:<uuid>"
    tp_rank: int
    tp_size: int
    layout_version: int = LAYOUT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = [list(w) for w in self.weights]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Fingerprint":
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"fingerprint must have exactly the fields {sorted(names)}, got {got}")
        for f in fields(cls):
            if f.name != "weights" and not _is_a(data[f.name], _TYPES[f.name]):
                raise ValueError(f"fingerprint.{f.name} must be {_TYPES[f.name]}, got {type(data[f.name]).__name__}")
        raw = data["weights"]
        if not (isinstance(raw, list) and all(isinstance(w, list) and len(w) == 3 and isinstance(w[0], str)
                                              and type(w[1]) is int and type(w[2]) is int for w in raw)):
            raise ValueError("fingerprint.weights must be [name, size, mtime_ns] triples")
        return cls(**{**data, "weights": tuple(tuple(w) for w in raw)})

    def digest(self) -> str:
        body = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()

    def diff(self, other: "Fingerprint") -> list[tuple[str, Any, Any]]:
        """Fields that differ, as (name, ours, theirs); empty when the entries are compatible."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def differences(fingerprint: Fingerprint, manifest: Manifest, *, spreads: bool) -> list[tuple[str, Any, Any]]:
    """What differs between a request's fingerprint and a published head entry (as Fingerprint.diff): the
    one rule for which fields may differ between an attacher and a manifest. A request that lets the engine
    spread the model over GPUs takes the GPUs the owner's model lies on (each part is then found on its own
    GPU by UUID), not a CPU entry; a request for one device cannot use a model spread over several
    ("devices")."""
    theirs = manifest.fingerprint
    on_gpus = spreads and theirs.device.startswith("cuda:")
    found = [d for d in fingerprint.diff(theirs) if not (on_gpus and d[0] == "device")]
    if manifest.part is not None and not spreads:
        found.append(("devices", 1, manifest.part.count))
    return found


_TYPES = {"engine": "str", "engine_version": "str", "model": "str", "revision": "str|None",
          "config_sha256": "str", "dtype": "str", "quantization": "str|None", "device": "str",
          "tp_rank": "int", "tp_size": "int", "layout_version": "int"}


def _is_a(value: Any, kind: str) -> bool:
    if value is None:
        return kind.endswith("|None")
    return type(value) is (str if kind.startswith("str") else int)


def config_digest(config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> str:
    """Digest of a model's effective config as plain data (keys sorted, values JSON or their str()),
    leaving out the top-level keys in `ignore` (the engine knows which say nothing about the bytes)."""
    skip = frozenset(ignore)
    data = {k: v for k, v in config.items() if k not in skip}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weight_files(model_dir: str | os.PathLike) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of every weight file: identifies a checkpoint without reading it
    (the decode must not read the checkpoint)."""
    weights = []
    for entry in sorted(Path(model_dir).iterdir()):
        if entry.is_file() and (entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name in _WEIGHT_INDEXES):
            st = entry.stat()
            weights.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(weights)
