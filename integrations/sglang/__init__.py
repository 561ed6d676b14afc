"""SGLang integration: every SGLang process that loads a model goes through the role's cache phases.

SGLang discovers this plugin through the `sglang.srt.plugins` entry point (pyproject.toml) in each
process it spawns, and calls `register()`. The plugin does nothing unless it is switched on, by either
- `launch.py engine=sglang`, which sets SHAREDCACHE_SGLANG to the JSON that `plugin_env()` builds (the
  role, the cache settings, where each rank writes its report), or
- a plain SGLang command line with a few readable variables (`switches_env`): SHAREDCACHE_ROLE
  (prefill, decode or auto), and optionally SHAREDCACHE_KEY (default: the model directory's name, as
  launch.py), SHAREDCACHE_DIR, SHAREDCACHE_OVERRIDES (more Hydra overrides of the cache and role
  groups) and SHAREDCACHE_REPORT_DIR; every other setting comes from the packaged conf/.
Then it wraps SGLang's `get_model_loader` through SGLang's hook
registry, so the loader SGLang would have used becomes the "normal load" of a sharedcache Instance,
and hooks the model runner so that the KV pool is sized once the owner settled (see hooks.py).
No SGLang file is changed; every SGLang internal used goes through compat.py.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from sharedcache import CacheSettings, ConfigError, Mode, Role, SharedCacheError
from sharedcache.kit import check_backend

ENV = "SHAREDCACHE_SGLANG"
# the switches of a plain SGLang command line
ROLE_ENV, KEY_ENV, DIR_ENV = "SHAREDCACHE_ROLE", "SHAREDCACHE_KEY", "SHAREDCACHE_DIR"
OVERRIDES_ENV, REPORT_ENV = "SHAREDCACHE_OVERRIDES", "SHAREDCACHE_REPORT_DIR"
SWITCH_ROLES = ("prefill", "decode", "auto")
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
    report_dir: Path | None  # None: the ranks log their reports and write none
    key_from_model: bool = False  # the key is the model directory's name, known once SGLang loads

    def keyed(self, key: str) -> "PluginConfig":
        return replace(self, settings=replace(self.settings, key=key), key_from_model=False)


def switches_env(role: str, *, key: str | None = None, cache_dir: str | None = None,
                 overrides: list[str] | None = None, report_dir: str | None = None) -> dict[str, str]:
    """The readable variables that make a plain SGLang server share its weights (the README's recipe, the
    tests); the inverse of `config_from_switches`."""
    env = {ROLE_ENV: role, KEY_ENV: key, DIR_ENV: cache_dir, REPORT_ENV: report_dir,
           OVERRIDES_ENV: " ".join(shlex.quote(o) for o in overrides) if overrides else None}
    return {k: v for k, v in env.items() if v}


def config_from_switches(environ: Mapping[str, str]) -> PluginConfig:
    """The plugin's config from SHAREDCACHE_ROLE and friends, every other setting from the packaged conf/."""
    from sharedcache.kit import check_cache, compose, literal, role_of

    role = environ[ROLE_ENV]
    if role not in SWITCH_ROLES:
        raise ConfigError(f"{ROLE_ENV}={role!r} is not a role an SGLang server can take.",
                          hint=f"Set it to one of {', '.join(SWITCH_ROLES)}: prefill loads and publishes, decode "
                               "attaches, auto attaches if it can and publishes otherwise.")
    overrides = [f"role={role}"]  # the switches' values as the very strings given (no grammar, no ${...})
    overrides += [literal("cache.dir", environ[DIR_ENV])] if environ.get(DIR_ENV) else []
    overrides += [literal("cache.key", environ[KEY_ENV])] if environ.get(KEY_ENV) else []
    try:
        extra = shlex.split(environ.get(OVERRIDES_ENV, ""))
    except ValueError as e:
        raise ConfigError(f"{OVERRIDES_ENV} is not a shell-quoted list of overrides ({e}).",
                          hint=f"Quote values with spaces in {OVERRIDES_ENV}, e.g. \"cache.dir='/a b'\".") from None
    roles = [o for o in extra if re.match(r"^[+~]*role(\.|=|@|$)", o)]
    if roles:
        raise ConfigError(f"{OVERRIDES_ENV} sets the role ({roles[0]!r}); {ROLE_ENV}={role} decides it.",
                          hint=f"Remove {roles[0]!r} from {OVERRIDES_ENV}; set {ROLE_ENV} instead.")
    try:
        cfg = compose(overrides + extra)
    except Exception as e:  # noqa: BLE001 - Hydra's and shlex's errors: one line naming the variable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the sharedcache switches do not compose ({first}).",
                          hint=f"Check {OVERRIDES_ENV}, {KEY_ENV} and {DIR_ENV} against "
                               "`sharedcache launch --cfg job`.") from None
    report = Path(environ[REPORT_ENV]) if environ.get(REPORT_ENV) else None
    if report is not None:
        try:  # a rank writes here only once its pools exist: find out now, not minutes into the start
            report.mkdir(parents=True, exist_ok=True)
            if not os.access(report, os.W_OK):
                raise PermissionError(f"no write permission on {report}")
        except OSError as e:
            raise ConfigError(f"{REPORT_ENV}={str(report)!r} cannot take the ranks' reports ({e}).",
                              hint=f"Point {REPORT_ENV} at a directory you can write, or unset it.") from None
    named = environ.get(KEY_ENV) or any(o.lstrip("+~").startswith("cache.key=") for o in extra)
    settings = CacheSettings.from_mapping(cfg["cache"])
    check_cache(settings, settings.key if named else None)  # a bad key or directory: one line now, not minutes in
    return PluginConfig(role_of(cfg), settings, report, key_from_model=not named)


def load_plugin_config(raw: str) -> PluginConfig:
    """Parse SHAREDCACHE_SGLANG; a malformed value is a configuration error, not a crash."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {"role", "cache", "report_dir"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected the keys role, cache, report_dir, got {got}")
    except ValueError as e:
        raise ConfigError(f"SHAREDCACHE_SGLANG is not the plugin's JSON: {e}.",
                          hint="Start SGLang through `sharedcache launch engine=sglang` (`python launch.py` in a "
                               "checkout), or build the value with sharedcache_integrations.sglang.plugin_env()."
                          ) from e
    return PluginConfig(Role.from_mapping(data["role"]), CacheSettings.from_mapping(data["cache"]),
                        Path(data["report_dir"]))


def server_device(argv: list[str]) -> str | None:
    """The device type an SGLang server was started for (`--device cpu`), None where its command line does not
    say (SGLang then picks one: CUDA where there is one)."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1].partition(":")[0]
    return None


def check_dumper(environ: Mapping[str, str]) -> None:
    """A sharing server must not start with SGLang's dumper able to write into the model: what it writes lands in
    the shared weights (a CUDA fault on read-only mappings, other tokens on every attached server)."""
    from . import compat

    risks = compat.dumper_writes(environ)
    if risks:
        raise ConfigError("SGLang's tensor dumper could write into the shared weights on this server: "
                          + "; ".join(f"{setting}: {why}" for setting, why in risks.items()) + ".",
                          hint="Unset those variables on a server that shares its weights (DUMPER_ENABLE alone, "
                               "which only writes dumps, is fine), or debug on a server started with role=plain.")


def register() -> None:
    """SGLang's plugin entry point, run in every SGLang process that loads plugins.

    Inert without SHAREDCACHE_SGLANG or SHAREDCACHE_ROLE. With one: an SGLang outside the supported range
    or a malformed value stops the process with one line (a server asked to share must not serve
    unshared). The server's launcher process loads no model, so hooks go only into its spawned scheduler
    processes."""
    if not os.environ.get(ENV) and not os.environ.get(ROLE_ENV):
        return
    from . import compat

    why = compat.unsupported_reason(compat.installed_version())
    if why is not None:
        raise SystemExit(f"[sharedcache.sglang] {why}. Install a supported SGLang, or unset {ENV} and "
                         f"{ROLE_ENV} to serve without sharing.")
    try:
        config = load_plugin_config(os.environ[ENV]) if os.environ.get(ENV) else config_from_switches(os.environ)
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    if multiprocessing.parent_process() is None:  # the server's launcher: before any process loads anything
        if config.role.mode is not Mode.OFF:
            try:
                check_backend(config.settings.backend, server_device(sys.argv))
                check_dumper(os.environ)
            except SharedCacheError as e:
                raise SystemExit(str(e)) from e
        return  # it loads no model; the plugin hooks its scheduler processes
    if "sglang.srt.managers.scheduler" not in sys.modules:
        # the detokenizer or data-parallel controller: no model is loaded there
        log.debug("sharedcache: this SGLang process loads no model; the plugin hooks its scheduler processes")
        return
    from .hooks import install

    install(config)
