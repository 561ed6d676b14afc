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
    """The fields a function reads and writes, following the functions of its own module that it calls."""

    def __init__(self, source: str) -> None:
        tree = ast.parse(source)
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self._seen: set[str] = set()

    def walk(self, name: str) -> None:
        if name in self._seen or name not in self.functions:
            return
        self._seen.add(name)
        for statement in self.functions[name].body:
            self.visit(statement)

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
            self.walk(func.id)
        self.generic_visit(node)


def _access(step) -> _Access:
    access = _Access(inspect.getsource(sys.modules[step.run.__module__]))
    access.walk(step.run.__name__)
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
    access = _Access(textwrap.dedent('''
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
    '''))
    access.walk("step")
    assert access.reads == {"source", "wait_seconds", "parts", "parts.entry", "parts.slots", "parts.claim",
                            "settings"}
    assert access.writes == {"model", "wait_seconds", "parts", "parts.entry", "parts.arena", "parts.layout"}
