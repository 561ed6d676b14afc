"""SGLang integration: every SGLang process that loads a model goes through the role's cache phases.

SGLang discovers this plugin through the `sglang.srt.plugins` entry point (pyproject.toml) in each
process it spawns, and calls `register()`. The plugin does nothing unless `launch.py` (or the user)
set SHAREDCACHE_SGLANG to the JSON that `plugin_env()` builds: the role, the cache settings and where
to write each rank's report. Then it wraps SGLang's `get_model_loader` through SGLang's hook
registry, so the loader SGLang would have used becomes the "normal load" of a sharedcache Instance,
and hooks the model runner so that the KV pool is sized once the owner settled (see hooks.py).
No SGLang file is changed; every SGLang internal used goes through compat.py.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedcache import CacheSettings, ConfigError, Role

ENV = "SHAREDCACHE_SGLANG"
PLUGIN_NAME = "sharedcache"  # the entry point's name, which SGLANG_PLUGINS allow-lists
log = logging.getLogger(__name__)


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
                               "sharedcache_integrations.sglang.plugin_env().") from e
    return PluginConfig(Role.from_mapping(data["role"]), CacheSettings.from_mapping(data["cache"]),
                        Path(data["report_dir"]))


def register() -> None:
    """SGLang's plugin entry point, run in every SGLang process that loads plugins.

    Inert without SHAREDCACHE_SGLANG. With it: an SGLang outside the supported range or a malformed
    value stops the process with one line (a server asked to share must not serve unshared). The
    server's launcher process loads no model, so hooks go only into its spawned scheduler processes."""
    if not os.environ.get(ENV):
        return
    from . import compat

    why = compat.unsupported_reason(compat.installed_version())
    if why is not None:
        raise SystemExit(f"[sharedcache.sglang] {why}. Install a supported SGLang, or unset {ENV} to serve "
                         "without sharing.")
    try:
        config = load_plugin_config(os.environ[ENV])
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    if multiprocessing.parent_process() is None or "sglang.srt.managers.scheduler" not in sys.modules:
        # the launcher, detokenizer or data-parallel controller: no model is loaded there
        log.debug("sharedcache: this SGLang process loads no model; the plugin hooks its scheduler processes")
        return
    from .hooks import install

    install(config)
