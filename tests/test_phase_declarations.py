"""The steps' declarations cannot drift from their code: an AST walk of every registered step (and of the
helpers it calls, in its own step module or one it imported them from) collects the run-state fields it
reads and writes, and they must be the ones it declares. The order check of a role's phases
(sharedcache.phases.validate_order) trusts these declarations, so a step that read a field it does not
declare could run before the field exists.

What the walk sees: `s.<f>` for the run state; `<name>.<f>` for a part, where the name is `p`, a parameter
annotated `Part`, or bound from `s.head`, `s.parts[...]`, `Part(...)` or a loop over the parts;
`s.head.<f>` and `s.parts[i].<f>` directly; `Part(...)`'s arguments as the fields they set; mutations of
`s.parts`. A read counts as one before the step's own write when it comes first in the code (helpers
inlined where they are called; branches taken in textual order), and such a read must be declared.
getattr/setattr/delattr on the run state are refused: the walk could not see them."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap

import pytest

from sharedcache.phases import STEPS, _load_builtin_steps
from sharedcache.run import Part

RUN = "s"  # the name the step modules give the run state
PART_ARGS = [f.name for f in dataclasses.fields(Part)]  # Part(...)'s positional arguments, in order
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear"}
DERIVED = {"spreads": "source", "several_parts": "parts", "claims": "parts.claim", "head": "parts"}  # properties
IDENTITY = {"parts", "parts.index"}  # the list of parts and a part's number: always there, never declared as read


def _is_run(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == RUN


def _is_parts(node: ast.AST) -> bool:
    """s.parts, reversed(s.parts), s.parts[a:b]: something to loop over the parts with."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "reversed":
        return len(node.args) == 1 and _is_parts(node.args[0])
    if isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Attribute) and _is_run(node.value) and node.attr == "parts"


def _part_expr(node: ast.AST) -> bool:
    """An expression that is one part: s.head, s.parts[i], Part(...), or a conditional of those."""
    if isinstance(node, ast.Attribute):
        return _is_run(node.value) and node.attr == "head"
    if isinstance(node, ast.Subscript):
        return _is_parts(node.value) and not isinstance(node.slice, ast.Slice)
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id == "Part"
    if isinstance(node, ast.IfExp):
        return _part_expr(node.body) or _part_expr(node.orelse)
    return False


def _part_names(fn: ast.FunctionDef) -> set[str]:
    """The names that hold a part anywhere in `fn`."""
    names = {"p"} | {a.arg for a in fn.args.args + fn.args.kwonlyargs
                     if isinstance(a.annotation, ast.Name) and a.annotation.id == "Part"
                     or isinstance(a.annotation, ast.Constant) and a.annotation.value == "Part"}
    for node in ast.walk(fn):
        if isinstance(node, (ast.For, ast.comprehension)) and _is_parts(node.iter) \
                and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign) and _part_expr(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


class _Access(ast.NodeVisitor):
    """The fields a function reads and writes, following the functions it calls that are defined in the
    step modules (its own, or another it imported them from)."""

    def __init__(self, modules: dict[str, str]) -> None:
        """`modules`: {module name: its source}."""
        self.functions = {(m, n.name): n for m, source in modules.items() for n in ast.parse(source).body
                          if isinstance(n, ast.FunctionDef)}
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self.reads_first: set[str] = set()  # read before the step wrote them
        self.dynamic: list[str] = []  # getattr/setattr on the run state: invisible to the walk
        self._seen: set[tuple[str, str]] = set()
        self._module, self._parts = "", {"p"}

    def walk(self, module: str, name: str) -> None:
        target = (module, name) if (module, name) in self.functions else self._imported(module, name)
        if target is None or target in self._seen:
            return
        self._seen.add(target)
        fn = self.functions[target]
        outer = self._module, self._parts
        self._module, self._parts = target[0], _part_names(fn)
        for statement in fn.body:
            self.visit(statement)
        self._module, self._parts = outer

    def _imported(self, module: str, name: str) -> tuple[str, str] | None:
        """Where a name a step module imported from another step module is defined."""
        fn = getattr(sys.modules.get(module), name, None)
        where = (getattr(fn, "__module__", None), name)
        return where if where in self.functions else None

    def _field(self, node: ast.AST) -> str | None:
        """The run-state field an expression names: s.<f>, or parts.<f> for a part's."""
        if not isinstance(node, ast.Attribute):
            return None
        if _is_run(node.value):
            return node.attr
        if isinstance(node.value, ast.Name) and node.value.id in self._parts or _part_expr(node.value):
            return f"parts.{node.attr}"
        return None

    def _read(self, field: str) -> None:
        field = DERIVED.get(field, field)
        self.reads.add(field)
        if field not in self.writes:
            self.reads_first.add(field)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        field = self._field(node)
        if field is None:
            self.generic_visit(node)
        elif isinstance(node.ctx, (ast.Store, ast.Del)):
            self.writes.add(field)
        else:  # s.<f> or a part's <f>: see what the part expression itself reads (s.parts[i] reads parts)
            self._read(field)
            if not isinstance(node.value, ast.Name):
                self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:  # the value is read before the targets are written
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        field = self._field(node.target)
        if field is not None:
            self._read(field)
        self.visit(node.value)
        self.visit(node.target)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        field = self._field(node.value)
        if field is not None and isinstance(node.ctx, (ast.Store, ast.Del)):
            self.writes.add(field)  # del s.parts[1:], s.x[k] = v
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "setattr", "delattr", "vars") \
                and node.args and _is_run(node.args[0]):
            self.dynamic.append(ast.unparse(node))
        self.generic_visit(node)  # the arguments are evaluated before the call runs
        if isinstance(func, ast.Attribute) and func.attr in MUTATORS:
            field = self._field(func.value)
            if field is not None:
                self.writes.add(field)  # s.parts.append(...)
        if isinstance(func, ast.Name) and func.id == "Part":  # a new part, with the fields it is made with
            self.writes.update(f"parts.{name}" for name in PART_ARGS[1:len(node.args)])
            self.writes.update(f"parts.{k.arg}" for k in node.keywords)
        if isinstance(func, ast.Name):
            self.walk(self._module, func.id)


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
    name = step.run.__name__
    assert not access.dynamic, f"{name} reaches the run state through {access.dynamic}: name the fields instead"
    declared = set(step.reads) | set(step.uses) | set(step.provides)
    undeclared_reads = sorted(access.reads - declared - IDENTITY)
    assert not undeclared_reads, f"{name} reads {undeclared_reads} without declaring them"
    early = sorted(access.reads_first - set(step.reads) - set(step.uses) - IDENTITY)
    assert not early, f"{name} reads {early} before it writes them: declare them as read (or used)"
    stale = sorted((set(step.reads) | set(step.uses)) - access.reads)
    assert not stale, f"{name} declares it reads {stale}, which it does not"
    assert access.writes == set(step.provides), (
        f"{name} writes {sorted(access.writes)} but declares it provides {sorted(step.provides)}")


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
            s.parts.append(Part(1, s.head.entry, None, arena=None))
            _helper(s)
            head = s.head
            head.manifest = [q.checksums for q in s.parts]
            s.parts[0].layout = s.backend
            _typed(s, s.head)

        def _helper(s):
            for p in s.parts:
                p.layout = p.slots
                p.claim.arena = s.settings.key
            for part in reversed(s.parts):
                part.checksums = part.refs
            del s.parts[1:]

        def _typed(s, q: Part):
            q.group = s.backend
    ''')})
    access.walk("probe", "step")
    assert access.reads == {"source", "wait_seconds", "parts", "parts.entry", "parts.slots", "parts.claim",
                            "settings", "parts.checksums", "parts.refs", "backend"}
    assert access.writes == {"model", "wait_seconds", "parts", "parts.entry", "parts.device", "parts.arena",
                             "parts.layout", "parts.checksums", "parts.manifest", "parts.group"}
    assert access.reads_first == access.reads - {"parts.checksums"}  # written by _helper before step reads it
    assert not access.dynamic


def test_the_walk_refuses_what_it_cannot_see():
    access = _Access({"probe": "def step(s):\n    setattr(s, 'model', None)\n    return getattr(s, 'backend')\n"})
    access.walk("probe", "step")
    assert access.dynamic == ["setattr(s, 'model', None)", "getattr(s, 'backend')"]
