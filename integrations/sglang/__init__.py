"""SGLang integration: every SGLang process that loads a model goes through the role's cache phases.

SGLang discovers this plugin through the `sglang.srt.plugins` entry point (pyproject.toml) in each
process it spawns, and calls `register()`. The plugin does nothing unless `launch.py` (or the user)
set SHAREDCACHE_SGLANG to the JSON that `plugin_env()` builds: the role, the cache settings and where
to write each rank's report. Then it wraps SGLang's `get_model_loader` through SGLang's hook
registry, so the loader SGLang would have used becomes the "normal load" of a sharedcache Instance.
No SGLang file is changed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedcache import CacheSettings, ConfigError, Role

ENV = "SHAREDCACHE_SGLANG"
PLUGIN_NAME = "sharedcache"  # the entry point's name, which SGLANG_PLUGINS allow-lists
_TARGET = "sglang.srt.model_loader.loader.get_model_loader"


def plugin_env(*, role: dict[str, Any], cache: dict[str, Any], report_dir: str) -> dict[str, str]:
    """Environment for an SGLang server that should share its weights (set before it starts)."""
    allowed = [p for p in os.environ.get("SGLANG_PLUGINS", "").split(",") if p]
    return {ENV: json.dumps({"role": role, "cache": cache, "report_dir": report_dir}),
            "SGLANG_PLUGINS": ",".join(dict.fromkeys([*allowed, PLUGIN_NAME]))}


@dataclass(frozen=True)
class PluginConfig:
    role: Role
    settings: CacheSettings
    report_dir: Path


def load_plugin_config(raw: str) -> PluginConfig:
    """Parse SHAREDCACHE_SGLANG; a malformed value is a configuration error, not a crash."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {"role", "cache", "report_dir"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected the keys role, cache, report_dir, got {got}")
    except ValueError as e:
        raise ConfigError(f"SHAREDCACHE_SGLANG is not the plugin's JSON: {e}.",
                          hint="Start SGLang through `python launch.py engine=sglang`, or build the value with "
                               "integrations.sglang.plugin_env().") from e
    return PluginConfig(Role.from_mapping(data["role"]), CacheSettings.from_mapping(data["cache"]),
                        Path(data["report_dir"]))


def register() -> None:
    """SGLang's plugin entry point: hook the model loader when a role was configured."""
    if not os.environ.get(ENV):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_TARGET, _around_get_model_loader, HookType.AROUND)


def _around_get_model_loader(original, *args, **kwargs):
    from .loader import SharedCacheLoader

    inner = original(*args, **kwargs)
    load_config = kwargs.get("load_config", args[0] if args else None)
    return SharedCacheLoader(inner, load_config, load_plugin_config(os.environ[ENV]))
