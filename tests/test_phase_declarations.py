"""The steps' declarations cannot drift from their code: an AST walk of every registered step (and of the
helpers of its module it calls) collects the run-state fields it reads and writes, and they must be the
ones it declares. The order check of a role's phases (sharedcache.phases.validate_order) trusts these
declarations, so a step that reads a field it does not declare could run before the field exists."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap

import pytest

from sharedcache.phases import STEPS, _load_builtin_steps

RUN, PART = "s", "p"  # the names the step modules give the run state and a device part
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear"}
DERIVED = {"spreads": "source", "spread": "parts", "claims": "parts.claim", "head": "parts"}  # RunState properties
IDENTITY = {"parts", "parts.index"}  # the list of parts and a part's number: always there, never declared as read


class _Access(ast.NodeVisitor):
    """The fields a function reads and writes, following the functions it calls that are defined in the
    step modules (its own, or another it imported them from)."""

    def __init__(self, modules: dict[str, str]) -> None:
        """`modules`: {module name: its source}."""
        self.functions = {(m, n.name): n for m, source in modules.items() for n in ast.parse(source).body
                          if isinstance(n, ast.FunctionDef)}
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self._seen: set[tuple[str, str]] = set()
        self._module = ""

    def walk(self, module: str, name: str) -> None:
        target = (module, name) if (module, name) in self.functions else self._imported(module, name)
        if target is None or target in self._seen:
            return
        self._seen.add(target)
        outer, self._module = self._module, target[0]
        for statement in self.functions[target].body:
            self.visit(statement)
        self._module = outer

    def _imported(self, module: str, name: str) -> tuple[str, str] | None:
        """Where a name a step module imported from another step module is defined."""
        fn = getattr(sys.modules.get(module), name, None)
        where = (getattr(fn, "__module__", None), name)
        return where if where in self.functions else None

    def _field(self, node: ast.AST) -> str | None:
        """The run-state field an expression names: s.<f>, s.head.<f> or p.<f> (parts.<f>)."""
        if not isinstance(node, ast.Attribute):
            return None
        if isinstance(node.value, ast.Name) and node.value.id == RUN:
            return node.attr
        if isinstance(node.value, ast.Name) and node.value.id == PART:
            return f"parts.{node.attr}"
        inner = node.value
        if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == RUN \
                and inner.attr == "head":
            return f"parts.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        field = self._field(node)
        if field is None:
            self.generic_visit(node)
        elif isinstance(node.ctx, (ast.Store, ast.Del)):
            self.writes.add(field)
        else:  # s.<f>, p.<f> or s.head.<f>: nothing more to see inside it
            self.reads.add(DERIVED.get(field, field))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        field = self._field(node.target)
        if field is not None:
            self.reads.add(field)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        field = self._field(node.value)
        if field is not None and isinstance(node.ctx, (ast.Store, ast.Del)):
            self.writes.add(field)  # del s.parts[1:], s.x[k] = v
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in MUTATORS:
            field = self._field(func.value)
            if field is not None:
                self.writes.add(field)  # s.parts.append(...)
        if isinstance(func, ast.Name) and func.id == "Part":  # a new part, with the fields it is made with
            self.writes.update(f"parts.{k.arg}" for k in node.keywords)
        if isinstance(func, ast.Name):
            self.walk(self._module, func.id)
        self.generic_visit(node)


def _access(step) -> _Access:
    from sharedcache.phases import BUILTIN_STEPS

    names = [f"sharedcache.{m}" for m in BUILTIN_STEPS]
    access = _Access({m: inspect.getsource(sys.modules[m]) for m in names})
    access.walk(step.run.__module__, step.run.__name__)
    return access


def _registered():
    _load_builtin_steps()
    return sorted(STEPS.values(), key=lambda s: (s.plan, s.phase))


@pytest.mark.parametrize("step", _registered(), ids=lambda s: f"{s.plan}-{s.phase}")
def test_a_step_declares_every_field_it_reads_and_writes(step):
    access = _access(step)
    declared = set(step.reads) | set(step.uses) | set(step.provides)
    undeclared_reads = sorted(access.reads - declared - IDENTITY)
    assert not undeclared_reads, f"{step.run.__name__} reads {undeclared_reads} without declaring them"
    stale = sorted((set(step.reads) | set(step.uses)) - access.reads)
    assert not stale, f"{step.run.__name__} declares it reads {stale}, which it does not"
    assert access.writes == set(step.provides), (
        f"{step.run.__name__} writes {sorted(access.writes)} but declares it provides {sorted(step.provides)}")


def test_every_declared_field_is_a_field_of_the_run_or_of_a_part():
    from sharedcache.run import Part, RunState

    run_fields = {f.name for f in dataclasses.fields(RunState)}
    part_fields = {f.name for f in dataclasses.fields(Part)}
    unknown = []
    for step in _registered():
        for field in (*step.reads, *step.uses, *step.provides):
            owner, _, name = field.rpartition(".")
            known = name in part_fields if owner == "parts" else field in run_fields
            if not known:
                unknown.append(f"{step.run.__name__}: {field}")
    assert not unknown, unknown


def test_the_walk_sees_reads_writes_mutations_and_helpers():
    """The checker itself: each kind of access it must see, in source made for the purpose."""
    access = _Access({"probe": textwrap.dedent('''
        def step(s):
            s.model = s.source.load()
            s.wait_seconds += 1
            s.parts.append(Part(1, entry=s.head.entry, arena=None))
            _helper(s)

        def _helper(s):
            for p in s.parts:
                p.layout = p.slots
                p.claim.arena = s.settings.key
            del s.parts[1:]
    ''')})
    access.walk("probe", "step")
    assert access.reads == {"source", "wait_seconds", "parts", "parts.entry", "parts.slots", "parts.claim",
                            "settings"}
    assert access.writes == {"model", "wait_seconds", "parts", "parts.entry", "parts.arena", "parts.layout"}
