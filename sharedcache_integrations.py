"""The integrations/ folder under its installed name, for a checkout used without installing it.

A wheel or `pip install -e .` installs integrations/ as the package `sharedcache_integrations`
(pyproject.toml maps it), never as a top-level `integrations` that other distributions could claim.
Run from the repository root without installing (`python launch.py`, pytest), this module stands in
for that package: it runs integrations/__init__.py and finds the subpackages (hf, sglang) there.
"""
from pathlib import Path

_folder = Path(__file__).resolve().with_name("integrations")
__path__ = [str(_folder)]
exec(compile((_folder / "__init__.py").read_text(), str(_folder / "__init__.py"), "exec"))
