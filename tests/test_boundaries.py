"""The lines between the parts hold: integrations use only the public API (`sharedcache`, `sharedcache.kit`),
the core knows no framework, importing the core stays cheap, and the integrations are installed under a
name of this distribution's own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC = {"sharedcache", "sharedcache.kit"}
FRAMEWORKS = {"transformers", "sglang", "sgl_kernel", "vllm"}
OWN_NAMES = {"integrations", "sharedcache_integrations"}  # what the core must not import either


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _imports(path: Path):
    """(line, module, names) of every absolute import in a file; names is None for `import x`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def test_integrations_import_only_the_public_api():
    import sharedcache
    import sharedcache.kit

    exported = {"sharedcache": set(sharedcache.__all__), "sharedcache.kit": set(sharedcache.kit.__all__)}
    bad = []
    for path in _sources("integrations"):
        for line, module, names in _imports(path):
            if module.split(".")[0] != "sharedcache":
                continue
            if module not in PUBLIC:
                bad.append(f"{_where(path, line)} imports {module}")
            elif names is not None and set(names) - exported[module]:
                bad.append(f"{_where(path, line)} imports {sorted(set(names) - exported[module])} from {module}, "
                           "which it does not export")
    assert not bad, "integrations may import only `sharedcache` and `sharedcache.kit`:\n" + "\n".join(bad)


def test_the_core_imports_no_framework_and_no_integration():
    bad = [f"{_where(path, line)} imports {module}"
           for path in _sources("sharedcache") for line, module, _ in _imports(path)
           if module.split(".")[0] in FRAMEWORKS | OWN_NAMES]
    assert not bad, "the core stays framework-agnostic:\n" + "\n".join(bad)


def test_nothing_imports_the_integrations_by_their_folder_name():
    """`integrations` is the folder; the import name is `sharedcache_integrations` (installed or not)."""
    files = [*_sources("integrations"), *_sources("tests"), *_sources("bench"), REPO / "launch.py"]
    bad = [f"{_where(path, line)} imports {module}"
           for path in files for line, module, _ in _imports(path) if module.split(".")[0] == "integrations"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["sharedcache", "sharedcache.kit"])
def test_importing_the_core_and_the_kit_imports_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_integrations_load_from_their_folder_under_the_distributions_name():
    code = ("import sys, sharedcache_integrations.hf, sharedcache_integrations.sglang as s; "
            "assert 'integrations' not in sys.modules; print(s.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert Path(out.stdout.strip()).resolve() == REPO / "integrations" / "sglang" / "__init__.py"


def test_every_package_folder_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in [("sharedcache", "sharedcache"), *((k, v) for k, v in setuptools["package-dir"].items())]:
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(REPO / folder).parts]))
    assert listed == found
    plugin = config["project"]["entry-points"]["sglang.srt.plugins"]["sharedcache"]
    assert plugin.split(":")[0].split(".")[0] == "sharedcache_integrations"


def test_the_transformers_config_digest_is_unchanged_by_its_move_out_of_the_core():
    """Published entries compare these digests: they must stay what the core computed before."""
    from sharedcache_integrations.hf.config import hf_config_digest

    config = {"a": 1, "dtype": "bfloat16", "torch_dtype": "float16", "transformers_version": "5.0",
              "nested": {"x": [1, 2]}, "obj": type}
    assert hf_config_digest(config) == "ebacc5720dd34646f6620bd6e0611d4e743cd00a08bee653255923d99eea5730"
    assert hf_config_digest(config, context_len=8, is_generation=True, model_impl=None) == \
        "da2ab02ad59080060b3c8bd9f1fc15c7bc26c249a1628da6f946023a77d0e9fc"


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_POSITIONAL = 320, 60, 5


def _functions(folder: str):
    for path in _sources(folder):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_every_core_module_stays_one_idea_in_size():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in _sources("sharedcache")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"core modules over {MAX_MODULE_LINES} lines: split them by idea: {long}"


def test_no_product_function_is_longer_than_a_screen():
    long = [f"{_where(p, f.lineno)} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for folder in ("sharedcache", "integrations") for p, f in _functions(folder)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_core_function_takes_more_than_five_positional_arguments():
    def positional(f) -> int:
        names = [a.arg for a in (*f.args.posonlyargs, *f.args.args)]
        return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)

    wide = [f"{_where(p, f.lineno)} {f.name} ({positional(f)})" for p, f in _functions("sharedcache")
            if positional(f) > MAX_POSITIONAL]
    assert not wide, f"make the options keyword-only or pass a record: {wide}"
