"""In-process helpers: compose the real config and go through the transformers integration."""
from __future__ import annotations

import gc
import shutil
from pathlib import Path

from sharedcache import CacheSettings, Role
from sharedcache.conf import compose, role_of


def role_and_settings(role: str, cache_dir: Path, *overrides: str) -> tuple[Role, CacheSettings, dict]:
    cfg = compose([f"role={role}", f"cache.dir={cache_dir}", *overrides])
    r = role_of(cfg)
    return r, CacheSettings.from_mapping(cfg["cache"]), cfg


def from_pretrained(role: str, cache_dir: Path, model_path: Path, *overrides: str, cls=None, **kwargs):
    """`cls.from_pretrained(model_path, **kwargs)` with the integration installed for `role`."""
    from transformers import AutoModelForCausalLM

    from integrations import hf

    r, settings, _ = role_and_settings(role, cache_dir, f"cache.key={overrides_key(overrides)}", *overrides)
    with hf.patched(role=r, cache=settings):
        return (cls or AutoModelForCausalLM).from_pretrained(model_path, **kwargs)


def overrides_key(overrides) -> str:
    for o in overrides:
        if o.startswith("cache.key="):
            return o.split("=", 1)[1]
    return "k"


def mappings_of(directory: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file under `directory` (after collecting garbage)."""
    gc.collect()
    d = str(Path(directory).resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if d in line]


def copy_entry(src_dir: Path, key: str, dst_dir: Path, dst_key: str = "k") -> Path:
    """Copy a published entry (manifest + arena) into another cache dir, owner not running there."""
    dst = dst_dir / dst_key
    dst.mkdir(mode=0o700)
    for f in (src_dir / key).iterdir():
        if f.name == "manifest.json" or f.name.startswith("arena-"):
            shutil.copy2(f, dst / f.name)
    return dst
