"""The phases of one instance, registered by name, each stating what must run before it.

A role's order is checked against these needs when the config is read, before
anything loads. save runs intercept -> align -> serialize (capture, pack, publish);
load runs intercept -> serialize -> align (skeleton, import, bind).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .instance import InstanceState

PhaseFn = Callable[["InstanceState"], None]


@dataclass(frozen=True)
class Step:
    run: PhaseFn | str  # a callable, or the name of a built-in step in sharedcache.instance
    needs: tuple[str, ...] = ()
    why: str = ""  # what the needed phases provide, for the error message


@dataclass(frozen=True)
class Phase:
    name: str
    steps: dict[str, Step]  # plan ("save" | "load") -> step
    required: bool = True  # every plan must contain it
    doc: str = ""


PHASES: dict[str, Phase] = {}


def register_phase(phase: Phase) -> Phase:
    PHASES[phase.name] = phase
    return phase


def validate_order(role: str, plan: str, order: tuple[str, ...]) -> None:
    """Reject unknown, repeated, missing or mis-ordered phases, naming the phase and what it lacks."""
    for name in order:
        if name not in PHASES:
            raise ConfigError(f"role {role!r}: unknown phase {name!r}; known phases: {sorted(PHASES)}.")
        if plan not in PHASES[name].steps:
            raise ConfigError(f"role {role!r}: phase {name!r} has nothing to do in a {plan} plan.")
    dupes = sorted({n for n in order if order.count(n) > 1})
    if dupes:
        raise ConfigError(f"role {role!r}: phases {dupes} appear more than once in {list(order)}.")
    missing = [n for n, p in PHASES.items() if p.required and n not in order]
    if missing:
        raise ConfigError(f"role {role!r}: a {plan} plan needs phases {missing}; order given: {list(order)}.")
    for i, name in enumerate(order):
        step = PHASES[name].steps[plan]
        lacking = [n for n in step.needs if n not in order[:i]]
        if lacking:
            raise ConfigError(
                f"role {role!r} ({plan}): phase {name!r} needs {lacking} before it ({step.why}); "
                f"order given: {list(order)}.",
                hint=f"Put {lacking} earlier in role.phases.")


# ---------------------------------------------------------------- built-in phases
# The work itself lives in instance.py, which owns the state; here only the contract,
# so that validating a config imports nothing heavy.

def _steps() -> None:
    register_phase(Phase("intercept", {
        "save": Step("intercept_save"),
        "load": Step("intercept_load"),
    }, doc="save: run the framework's own load and capture the model; load: build the skeleton without weights"))
    register_phase(Phase("align", {
        "save": Step("align_save", ("intercept",), "it packs the captured model's tensors"),
        "load": Step("align_load", ("intercept", "serialize"),
                     "it binds the skeleton to the arena that serialize imported"),
    }, doc="save: plan the arena, move the weights in, rebind; load: bind the skeleton to views"))
    register_phase(Phase("serialize", {
        "save": Step("serialize_save", ("align",), "it publishes the arena and layout that align built"),
        "load": Step("serialize_load", (), ""),
    }, doc="save: export the handle and write the manifest; load: read, validate and import"))
    register_phase(Phase("verify", {
        "save": Step("verify_save", ("align",), "it checksums the packed bytes"),
        "load": Step("verify_load", ("align",), "it checksums the bound bytes"),
    }, required=False, doc="checksums of every stored tensor; save must run it before serialize to publish them"))


_steps()
