"""Roles and modes: what one instance does with the cache, declared in conf/role/."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError


class Mode(str, enum.Enum):
    SAVE = "save"  # load normally, then publish (this instance owns the weights)
    LOAD = "load"  # meta skeleton, attach, bind; no weight memory
    PLACEHOLDER = "placeholder"  # like load, skeleton holds zero-element tensors on the target device
    AUTO = "auto"  # load if a compatible live entry exists, else save
    OFF = "off"  # the framework's own loading, untouched

    @property
    def attaches(self) -> bool:
        return self in (Mode.LOAD, Mode.PLACEHOLDER)

    @property
    def plan_key(self) -> str:
        """Which phase order applies: placeholder runs the load order."""
        return "load" if self.attaches else self.value


@dataclass(frozen=True)
class Role:
    name: str
    mode: Mode
    # phase order per resolved plan ("save" / "load"); auto carries both, off none.
    phases: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "Role":
        from .phases import validate_order  # phases import roles; keep the cycle lazy

        known = {"name", "mode", "phases", "description"}
        unknown = set(m) - known
        if unknown:
            raise ConfigError(f"unknown role keys {sorted(unknown)} (known: {sorted(known)}).")
        name = m.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError("role.name must be a non-empty string.")
        raw_mode = m.get("mode")
        if raw_mode is False:  # YAML 1.1 reads a bare `off` as false
            raw_mode = "off"
        try:
            mode = Mode(raw_mode)
        except ValueError:
            raise ConfigError(f"role {name!r}: unknown mode {m.get('mode')!r}; "
                              f"choose one of {[x.value for x in Mode]}.") from None
        raw = m.get("phases")
        plans = _plans_for(name, mode, raw)
        for plan, order in plans.items():
            validate_order(name, plan, order)
            if plan == "save":  # a save may turn out to adopt its dead predecessor's arena: same order
                validate_order(name, "adopt", order)
        return cls(name, mode, plans)

    def phases_for(self, resolved: Mode) -> tuple[str, ...]:
        return self.phases[resolved.plan_key]


def _plans_for(name: str, mode: Mode, raw: Any) -> dict[str, tuple[str, ...]]:
    if mode is Mode.OFF:
        return {}
    needed = ("save", "load") if mode is Mode.AUTO else (mode.plan_key,)
    if isinstance(raw, Mapping):
        missing = [p for p in needed if p not in raw]
        if missing:
            raise ConfigError(f"role {name!r} (mode {mode.value}): phases has no order for {missing}; "
                              f"give phases as {{save: [...], load: [...]}}.")
        return {p: _as_order(name, raw[p]) for p in needed}
    if mode is Mode.AUTO:
        raise ConfigError(f"role {name!r}: mode auto may save or load, so phases must give both orders, "
                          f"e.g. {{save: [intercept, align, serialize], load: [intercept, serialize, align]}}.")
    return {needed[0]: _as_order(name, raw)}


def _as_order(name: str, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"role {name!r}: phases must be a list of phase names, got {raw!r}.",
                          hint=f"Or take the packaged role with its phases: sharedcache.configured({name!r}).")
    return tuple(raw)
