"""The cache settings of one instance, taken from the composed `cache` config group.

Every value comes from conf/; this module only checks them, it supplies no defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class CacheSettings:
    dir: str
    key: str
    backend: str  # "auto" or a registered backend name
    wait_timeout_s: float
    settle_timeout_s: float  # waiting on an owner that is loading or settling, and for a device's sizing turn
    on_mismatch: str  # "error" | "fallback"
    on_unsupported: str  # "error" | "fallback"
    alignment: int
    vmm_chunk_mib: int  # cuda_vmm: physical chunk size; bounds the save's extra peak memory
    handle_timeout_s: float  # how long an attacher waits for the owner to hand over its handles
    adopt: bool  # save: take over the arena a dead owner left (same fingerprint) instead of loading again
    host_copy: bool  # owner: keep a copy of the arena in host memory that refills the GPU after every process died

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "CacheSettings":
        names = [f.name for f in fields(cls)]
        unknown, missing = set(m) - set(names), [n for n in names if n not in m]
        if unknown:
            raise ConfigError(f"unknown cache keys {sorted(unknown)} (known: {names}).")
        if missing:
            raise ConfigError(f"cache config lacks {missing}; add them to conf/cache/.")
        s = cls(**{n: m[n] for n in names})
        s._check()
        return s

    def _check(self) -> None:
        from .backends import known_backends

        if not isinstance(self.dir, str) or not self.dir:
            raise ConfigError("cache.dir must be a directory path.")
        for opt in ("adopt", "host_copy"):
            if not isinstance(getattr(self, opt), bool):
                raise ConfigError(f"cache.{opt} must be true or false, got {getattr(self, opt)!r}.")
        for opt in ("on_mismatch", "on_unsupported"):
            if getattr(self, opt) not in ("error", "fallback"):
                raise ConfigError(f"cache.{opt} must be 'error' or 'fallback', got {getattr(self, opt)!r}.")
        if self.backend != "auto" and self.backend not in known_backends():
            raise ConfigError(f"unknown cache.backend {self.backend!r}; choose 'auto' or one of {known_backends()}.")
        for opt in ("wait_timeout_s", "settle_timeout_s"):
            value = getattr(self, opt)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"cache.{opt} must be a finite number >= 0 (seconds), got {value!r}.")
        if not isinstance(self.vmm_chunk_mib, int) or isinstance(self.vmm_chunk_mib, bool) \
                or not 2 <= self.vmm_chunk_mib <= 1 << 20:
            raise ConfigError(f"cache.vmm_chunk_mib must be an integer from 2 to 1048576 (MiB), got {self.vmm_chunk_mib!r}.")
        h = self.handle_timeout_s
        if not isinstance(h, (int, float)) or isinstance(h, bool) or not math.isfinite(h) or not 0 < h <= 3600:
            raise ConfigError(f"cache.handle_timeout_s must be a number of seconds in (0, 3600], got {h!r}.")
        a = self.alignment
        if not isinstance(a, int) or isinstance(a, bool) or a < 256 or a > 2**21 or a & (a - 1):
            raise ConfigError(f"cache.alignment must be a power of two from 256 bytes to 2 MiB (each tensor is "
                              f"padded to it), got {a!r}.")
