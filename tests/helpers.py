"""In-process helpers: compose the real config and go through the transformers integration."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sharedcache import CacheSettings, Role
from sharedcache.conf import compose, role_of


def role_and_settings(role: str, cache_dir: Path, *overrides: str) -> tuple[Role, CacheSettings, dict]:
    cfg = compose([f"role={role}", f"cache.dir={cache_dir}", *overrides])
    r = role_of(cfg)
    return r, CacheSettings.from_mapping(cfg["cache"]), cfg


def from_pretrained(role: str, cache_dir: Path, model_path: Path, *overrides: str, cls=None, **kwargs):
    """`cls.from_pretrained(model_path, **kwargs)` with the integration installed for `role`."""
    from transformers import AutoModelForCausalLM

    from sharedcache_integrations import hf

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


def entry_copy(published, cache_dir, mutate_manifest=None, mutate_arena=None):
    """The `published` entry copied to `cache_dir`/k (its owner does not hold it there), then edited."""
    src, _ = published
    dst = copy_entry(src, "k", cache_dir)
    if mutate_manifest is not None:
        path = dst / "manifest.json"
        data = json.loads(path.read_text())
        out = mutate_manifest(data)
        path.write_bytes(out if isinstance(out, bytes) else json.dumps(data).encode())
    if mutate_arena is not None:
        mutate_arena(next(dst.glob("arena-*")))
    return dst


def attach_fails(cache_dir, model_path, exc, *patterns, overrides=(), **kwargs):
    """A decode of key k in `cache_dir` fails with `exc` naming `patterns`, and leaves nothing behind."""
    from sharedcache.instance import _BY_MODEL

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    before = len(_BY_MODEL)
    fds = set(os.listdir("/proc/self/fd"))
    manifest = cache_dir / "k" / "manifest.json"
    snapshot = manifest.read_bytes() if manifest.exists() else None
    with pytest.raises(exc) as info:
        from_pretrained("decode", cache_dir, model_path, "cache.wait_timeout_s=0.5", *overrides, **kwargs)
    msg = str(info.value)
    del info  # the traceback holds the frames; drop it so the mapping can go
    for p in patterns:
        assert p in msg, msg
    assert len(_BY_MODEL) == before, "no model may come out of a failed attach"
    assert (manifest.read_bytes() if manifest.exists() else None) == snapshot, "a failed attach changes nothing"
    assert mappings_of(cache_dir) == [], "a failed attach must not leave the arena mapped"
    leaked = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds
              if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in leaked if str(cache_dir) in p], f"a failed attach leaves no fd open: {leaked}"
    return msg


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`sharedcache ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "sharedcache.cli", *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
