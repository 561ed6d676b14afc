"""Every config group composes; impossible roles are rejected before anything loads."""
from __future__ import annotations

import pytest

from conftest import REPO
from sharedcache import CacheSettings, ConfigError, Mode, Role
from sharedcache.conf import compose, role_of

ROLES = sorted(p.stem for p in (REPO / "conf" / "role").glob("*.yaml"))


def _role(cfg) -> Role:
    return role_of(cfg)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_composes_and_validates(role):
    cfg = compose([f"role={role}"])
    r = _role(cfg)
    assert r.name == role
    CacheSettings.from_mapping(cfg["cache"])


@pytest.mark.parametrize("group", ["model", "engine", "cache"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
        cfg = compose([f"{group}={option}"])
        CacheSettings.from_mapping(cfg["cache"])


def test_declared_orders():
    assert _role(compose(["role=prefill"])).phases == {"save": ("intercept", "align", "serialize")}
    assert _role(compose(["role=decode"])).phases == {"load": ("intercept", "serialize", "align")}
    auto = _role(compose(["role=auto"]))
    assert auto.mode is Mode.AUTO and set(auto.phases) == {"save", "load"}


def test_cache_key_follows_model():
    assert compose([])["cache"]["key"] == "sc-llama-100m"
    assert compose(["model.path=/models/Llama-3.1-8B/"])["cache"]["key"] == "Llama-3.1-8B"
    assert compose(["cache.key=mine"])["cache"]["key"] == "mine"


@pytest.mark.parametrize("mode,phases,words", [
    ("load", ["intercept", "align", "serialize"], ["phase 'align' needs ['serialize'] before it"]),
    ("save", ["intercept", "serialize", "align"], ["phase 'serialize' needs ['align'] before it"]),
    ("save", ["align", "intercept", "serialize"], ["phase 'align' needs ['intercept'] before it"]),
    ("save", ["intercept", "align"], ["needs phases ['serialize']"]),
    ("load", ["intercept", "serialize", "align", "align"], ["appear more than once"]),
    ("load", ["intercept", "serialize", "bind"], ["unknown phase 'bind'"]),
    ("load", ["intercept", "serialize", "align", "verify"], []),  # optional phase, valid
    ("banana", ["intercept"], ["unknown mode 'banana'"]),
    ("auto", ["intercept", "align", "serialize"], ["phases must give both orders"]),
])
def test_phase_orders(mode, phases, words):
    m = {"name": "r", "mode": mode, "phases": phases}
    if not words:
        Role.from_mapping(m)
        return
    with pytest.raises(ConfigError) as info:
        Role.from_mapping(m)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("override,words", [
    ("cache.on_mismatch=maybe", "cache.on_mismatch must be 'error' or 'fallback'"),
    ("cache.alignment=100", "cache.alignment must be a power of two"),
    ("cache.backend=floppy", "unknown cache.backend 'floppy'"),
    ("+cache.colour=red", "unknown cache keys ['colour']"),
])
def test_bad_cache_settings(override, words):
    with pytest.raises(ConfigError) as info:
        CacheSettings.from_mapping(compose([override])["cache"])
    assert words in str(info.value)


def test_wrong_order_is_rejected_by_launch_before_loading(launcher, sc_home, cache_dir):
    proc = launcher.run("decode", "role.phases=[intercept,align,serialize]", model="tiny")
    assert proc.popen.returncode == 2
    out = proc.output()
    assert "phase 'align' needs ['serialize'] before it" in out
    assert not proc.report_path.exists()
    assert list(cache_dir.iterdir()) == [], "nothing may be created before the config is accepted"
