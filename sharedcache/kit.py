"""The public kit for integrations: what an adapter needs from the core beyond `sharedcache` itself.

An integration imports only `sharedcache` and `sharedcache.kit` (tests/test_boundaries.py holds that
line). Importing this module is as cheap as importing `sharedcache`: no torch, no CUDA; the functions
that need torch import it when called.

- the cache: `check_cache` (its directory and a key) and `check_backend` (the backend named suits the engine's
  device and has its driver), checked before an engine loads anything;
- devices: `resolve_device`, `device_index`, `device_id` (which physical device, by UUID);
- fingerprints: `checkpoint_fingerprint` for a model directory, with `config_digest` and `weight_files`;
- files: `write_json_atomic` (a reader sees the old file or the new one, never part of one), `write_report`
  (a run's report.json; a ReportUnwritable where it cannot be written);
- rank keys: `rank_key` / `rank_suffix` name one rank of a parallel server (`<key>-tp<r>`,
  `<key>-pp<p>-tp<r>`), `split_rank_key` reads such a key back (sharedcache.keys);
- memory sizing: `SizingTurn` (see sharedcache.settle);
- holding: `hold` maps and keeps a published entry's arena with no model (`Held`, `superseded`; see
  sharedcache.holding), for a holder of weights an engine's own loader made;
- instances: `instance_of(model)`, the Instance that produced a model, whichever integration loaded it;
- launchers (the Hydra launcher in integrations/launch.py, the SGLang plugin's switches): `conf_dir`,
  `compose`, `literal` (an override that sets a value as the very string given), `register_resolvers`,
  `core_role`, `role_of` (the composed config as the core reads it), `entry_key` (a model's cache key),
  `prepare_device` (a device's backends brought up before the timed phases), `TerminalProgress` / `log_progress` (progress on a terminal or in logs),
  `process_age`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .devices import device_id, device_index, resolve_device
from .files import write_json_atomic, write_report
from .fingerprint import Fingerprint, config_digest, weight_files
from .keys import rank_key, rank_suffix, split_rank_key
from .layout import dtype_name

if TYPE_CHECKING:
    import torch

    from .conf import compose, conf_dir, core_role, entry_key, literal, register_resolvers, role_of
    from .progress import TerminalProgress, log_progress
    from .holding import Held, hold, superseded
    from .settle import SizingTurn

__all__ = [
    "check_backend", "check_cache", "checkpoint_fingerprint", "compose", "conf_dir", "config_digest", "core_role",
    "device_id", "device_index", "dtype_name", "entry_key", "Held", "hold", "instance_of", "literal", "log_progress",
    "prepare_device", "process_age", "rank_key", "rank_suffix", "register_resolvers", "resolve_device", "role_of",
    "SizingTurn", "split_rank_key", "superseded", "TerminalProgress", "weight_files", "write_json_atomic",
    "write_report",
]
# exported names whose modules are imported only when an integration asks for them
_LAZY = {
    "compose": "conf", "conf_dir": "conf", "core_role": "conf", "entry_key": "conf", "literal": "conf",
    "register_resolvers": "conf", "role_of": "conf", "Held": "holding", "hold": "holding",
    "superseded": "holding", "log_progress": "progress", "TerminalProgress": "progress",
    "SizingTurn": "settle",
}


def check_cache(settings: Any, key: str | None) -> None:
    """The cache directory (and `key`, when known) as the core will use them, checked now without creating
    anything: a launcher refuses a bad one in one line before its engine loads (ConfigError, EntryError)."""
    from pathlib import Path

    from .cache import CacheDir
    from .files import check_private_dir

    if key is None:
        check_private_dir(Path(settings.dir))
    else:
        CacheDir(settings.dir).entry(key)


def check_backend(name: str, device_type: str | None) -> None:
    """cache.backend `name` checked for the engine's device type (None: not known yet) before anything loads."""
    if name == "auto":
        return  # chosen at load, for the device the weights land on (and no torch import for that now)
    from .backends import check_choice

    check_choice(name, device_type)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__.rpartition(".")[0]), name)
    raise AttributeError(name)


# ---------------------------------------------------------------- launchers

def prepare_device(device: "torch.device | str") -> None:
    """Bring up the backends of `device` at process start (driver bindings, current context), so that
    loading and attaching are timed without them."""
    import torch

    from .backends import prepare

    prepare(torch.device(device))


def process_age() -> float:
    """Seconds since this process started (the kernel's clock, so interpreter start-up counts)."""
    from pathlib import Path

    from .manifest import process_start_ticks

    start = process_start_ticks(os.getpid()) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - start


# ---------------------------------------------------------------- fingerprints

def checkpoint_fingerprint(*, engine: str, engine_version: str, path: str | os.PathLike, config_sha256: str,
                           dtype: Any, device: "torch.device | str", revision: str | None = None,
                           quantization: str | None = None, tp_rank: int = 0, tp_size: int = 1,
                           weights: tuple[tuple[str, int, int], ...] | None = None) -> Fingerprint:
    """The fingerprint of a model loaded from the checkpoint directory `path`.

    `config_sha256`: the engine's digest of its effective config (`config_digest`); `dtype`: a torch
    dtype or its name; `device`: where the weights live (named by UUID); `weights`: the directory's
    `weight_files()` when taken earlier (before a load could touch them), else listed now."""
    return Fingerprint(
        engine=engine, engine_version=engine_version, model=str(path), revision=revision,
        config_sha256=config_sha256, weights=weight_files(path) if weights is None else weights,
        dtype=dtype_name(dtype), quantization=quantization, device=device_id(device), tp_rank=tp_rank,
        tp_size=tp_size)


# ---------------------------------------------------------------- instances

def instance_of(model: Any) -> Any:
    """The sharedcache Instance whose run produced `model` (its `.report`, its `.close()`), or None."""
    from .instance import instance_of as lookup  # a model exists, so torch is loaded already

    return lookup(model)
