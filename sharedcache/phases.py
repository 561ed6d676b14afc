"""The phases of one instance and the steps that do their work, with what each step reads and provides.

A step is a function registered for one (phase, plan) by the `step` decorator (the built-in ones are
in sharedcache.steps_save and sharedcache.steps_load). It declares the fields of the run state it
reads, the ones it provides, and the ones it uses only when an earlier step provided them; a field of
the model's device parts is named `parts.<field>` (sharedcache.run.Part), and a step that adds parts
provides `parts`. A role's order is checked against these
declarations when the config is read, before anything loads: every field a step reads must be
provided by a step before it, and a step that provides what another uses must not come after it.
save runs intercept -> align -> serialize (capture, pack, publish); load runs intercept ->
serialize -> align (skeleton, import, bind).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .run import RunState

StepFn = Callable[["RunState"], "object | None"]

# a save runs its role's save order; an adopt (a save taking over the arena a dead owner left) runs the same
# order with its own steps; a load its role's load order
PLANS = ("save", "adopt", "load")

# what the orchestrator puts in the run state before the first step: part 0 with its entry, the
# fingerprint a normal load would have and (save) its claim
GIVEN = frozenset({"role", "mode", "settings", "source", "progress", "parts", "parts.index", "parts.entry",
                   "parts.fingerprint", "parts.claim", "wait_seconds"})


@dataclass(frozen=True)
class Step:
    phase: str
    plan: str  # "save" | "load"
    run: StepFn
    reads: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # read when present: whoever provides them must run first


@dataclass(frozen=True)
class Phase:
    name: str
    required: bool  # every plan must contain it
    doc: str


PHASES: dict[str, Phase] = {}
STEPS: dict[tuple[str, str], Step] = {}


def register_phase(name: str, *, required: bool = True, doc: str = "") -> Phase:
    PHASES[name] = Phase(name, required, doc)
    return PHASES[name]


def step(phase: str, plan: str, *, reads: tuple[str, ...] = (), provides: tuple[str, ...] = (),
         uses: tuple[str, ...] = ()) -> Callable[[StepFn], StepFn]:
    """Register the decorated function as `phase`'s work in a `plan`."""
    def register(fn: StepFn) -> StepFn:
        if phase not in PHASES:
            raise ConfigError(f"step {fn.__name__} is for unknown phase {phase!r}; register the phase first.")
        STEPS[(phase, plan)] = Step(phase, plan, fn, tuple(reads), tuple(provides), tuple(uses))
        return fn
    return register


def steps_for(plan: str, order: tuple[str, ...]) -> list[Step]:
    _load_builtin_steps()
    return [STEPS[(name, plan)] for name in order]


def validate_order(role: str, plan: str, order: tuple[str, ...]) -> None:
    """Reject unknown, repeated, missing or mis-ordered phases, naming the phase and what it lacks."""
    _load_builtin_steps()
    for name in order:
        if name not in PHASES:
            raise ConfigError(f"role {role!r}: unknown phase {name!r}; known phases: {sorted(PHASES)}.")
        if (name, plan) not in STEPS:
            raise ConfigError(f"role {role!r}: phase {name!r} has nothing to do in a {plan} plan.")
    dupes = sorted({n for n in order if order.count(n) > 1})
    if dupes:
        raise ConfigError(f"role {role!r}: phases {dupes} appear more than once in {list(order)}.")
    missing = [n for n, p in PHASES.items() if p.required and n not in order]
    if missing:
        raise ConfigError(f"role {role!r}: a {plan} plan needs phases {missing}; order given: {list(order)}.")
    steps = steps_for(plan, order)
    have = set(GIVEN)
    for s in steps:
        lacking = [f for f in s.reads if f not in have]
        if lacking:
            needed = _providers(steps, lacking, but=s)
            raise ConfigError(
                f"role {role!r} ({plan}): phase {s.phase!r} needs {needed or 'a phase providing ' + str(lacking)} "
                f"before it (it reads {lacking}); order given: {list(order)}.",
                hint=f"Put {needed or lacking} earlier in role.phases.")
        late = [f for f in s.uses if f not in have and _providers(steps, [f], but=s)]
        if late:
            needed = _providers(steps, late, but=s)
            raise ConfigError(
                f"role {role!r} ({plan}): phase {s.phase!r} needs {needed} before it (it uses {late} when "
                f"present); order given: {list(order)}.", hint=f"Put {needed} before {s.phase!r} in role.phases.")
        have.update(s.provides)


def _providers(steps: list[Step], fields: list[str], *, but: Step) -> list[str]:
    """The phases other than `but` that provide any of `fields`."""
    return sorted({s.phase for s in steps if s is not but and set(fields) & set(s.provides)})


def phase_table() -> str:
    """The README's phase table, from the registrations (`python -m sharedcache.phases`)."""
    _load_builtin_steps()
    lines = ["| phase | plan | step | reads | provides | required |", "|---|---|---|---|---|---|"]
    for name, phase in PHASES.items():
        for plan in PLANS:
            s = STEPS.get((name, plan))
            if s is not None:
                reads = ", ".join(s.reads + tuple(f"{u} (if any)" for u in s.uses)) or "-"
                lines.append(f"| {name} | {plan} | `{s.run.__name__}` | {reads} | {', '.join(s.provides) or '-'} "
                             f"| {'yes' if phase.required else 'no'} |")
    return "\n".join(lines)


BUILTIN_STEPS = ("steps_save", "steps_load", "steps_adopt")  # modules whose steps register themselves on import


def _load_builtin_steps() -> None:
    """The built-in steps register themselves on import (torch with them: a model is about to load)."""
    for module in BUILTIN_STEPS:
        importlib.import_module(f"{__package__}.{module}")



register_phase("intercept", doc="save: run the framework's own load and capture the model; "
               "load: build the skeleton without weights")
register_phase("align", doc="save: plan the arena, move the weights in, rebind; load: bind the skeleton to views")
register_phase("serialize", doc="save: export the handle and write the manifest; load: wait, read, validate, import")
register_phase("verify", required=False, doc="checksums of every stored tensor; a save plan runs it before "
               "serialize, which publishes them")

if __name__ == "__main__":  # run as a script this file is __main__; the registrations go to sharedcache.phases
    from sharedcache.phases import phase_table as registered_table

    print(registered_table())
