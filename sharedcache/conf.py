"""Hydra/OmegaConf glue shared by launch.py and the CLI (imports omegaconf lazily)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


def conf_dir() -> Path:
    """The project's conf/: $SHAREDCACHE_CONF if set; else the conf/ beside this package when it runs from a
    checkout (so edits there count even if a wheel is installed too); else the installed copy (a wheel
    installs conf/ as the package `sharedcache_conf`)."""
    if os.environ.get("SHAREDCACHE_CONF"):
        return Path(os.environ["SHAREDCACHE_CONF"])
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "config.yaml").is_file() and (checkout / "role").is_dir():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("sharedcache_conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return checkout


def entry_key(path: str | None, name: str) -> str:
    """Cache key for a model: its directory's basename when a path is given, else its name."""
    raw = os.path.basename(os.path.normpath(path)) if path else name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw).lstrip(".-_")[:128] or "model"


def user_name() -> str:
    """Whose cache directory this is: $USER, or the uid where it is unset (containers, systemd units)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", os.environ.get("USER", "")) or str(os.getuid())


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sc.key"):
        OmegaConf.register_new_resolver("sc.key", entry_key)
    if not OmegaConf.has_resolver("sc.user"):
        OmegaConf.register_new_resolver("sc.user", user_name)


def literal(key: str, value: str) -> str:
    """The override `key=<value>` that sets `value` as the very string given: quoted for Hydra's grammar (a
    comma, quote, '=' or bracket is text), backslashes before a quote or the end doubled (Hydra's rule), and
    `${` escaped, so no interpolation ever reads it. A plain path or name stays as it is."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return f"{key}={value}"
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"{key}='{text}'"


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """The composed config as plain data, outside of @hydra.main (CLI, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()  # inside a Hydra app of the caller's own: compose ours, then give it back
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides or [])
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    return OmegaConf.to_container(cfg, resolve=True)


LAUNCHER_ROLE_KEYS = ("hold", "generate", "launch")  # role keys for launch.py, not for the core


def core_role(cfg: dict[str, Any]) -> dict[str, Any]:
    """The composed role group as the core reads it: launcher-only keys left out."""
    return {k: v for k, v in cfg["role"].items() if k not in LAUNCHER_ROLE_KEYS}


def role_of(cfg: dict[str, Any]):
    """The core Role of a composed config."""
    from .roles import Role

    return Role.from_mapping(core_role(cfg))


def configured(role: str = "auto", *overrides: str):
    """(Role, CacheSettings) as the packaged conf/ defines them, which is what `sharedcache launch role=<role>`
    composes, with Hydra overrides on top (`"cache.dir=/dev/shm/x"`): the Python API's defaults live in
    conf/ like everyone else's."""
    from .settings import CacheSettings

    cfg = compose([f"role={role}", *overrides])
    return role_of(cfg), CacheSettings.from_mapping(cfg["cache"])
