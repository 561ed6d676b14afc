"""transformers integration: `PreTrainedModel.from_pretrained` goes through the role's cache phases.

    from sharedcache_integrations import hf
    model = hf.from_pretrained(path, role="decode")          # one call, the packaged conf's settings
    with hf.patched(role=role, cache=settings):             # or any code that calls from_pretrained
        model = AutoModelForCausalLM.from_pretrained(path)
    hf.instance_of(model).report

Only the outermost `from_pretrained` call is intercepted; nested ones (sub-models)
run untouched. `install()` patches, `uninstall()` restores.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Callable, Iterator, Sequence

from sharedcache import CacheSettings, Role
from sharedcache.kit import instance_of as _instance_of

_lock = threading.Lock()
_installed: dict[str, Any] = {}  # "original" -> the unpatched function, "role", "cache", "options"
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("sharedcache_hf_depth", default=0)


def install(*, role: Role, cache: CacheSettings, progress: Callable[[Any], None] | None = None) -> None:
    """Route every outermost `from_pretrained` through `role` with `cache`. Idempotent per process.
    `progress` receives the slow steps' progress events (default: the core's log lines)."""
    from transformers import PreTrainedModel

    with _lock:
        if "original" not in _installed:
            _installed["original"] = PreTrainedModel.__dict__["from_pretrained"]
            PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
        _installed["role"], _installed["cache"] = role, cache
        _installed["options"] = {} if progress is None else {"progress": progress}


def uninstall() -> None:
    from transformers import PreTrainedModel

    with _lock:
        original = _installed.pop("original", None)
        if original is not None:
            PreTrainedModel.from_pretrained = original
        _installed.clear()


@contextlib.contextmanager
def patched(*, role: Role, cache: CacheSettings, progress: Callable[[Any], None] | None = None) -> Iterator[None]:
    install(role=role, cache=cache, progress=progress)
    try:
        yield
    finally:
        uninstall()


def from_pretrained(path: str | os.PathLike, *, role: str = "auto", overrides: Sequence[str] = (),
                    auto_class: str = "AutoModelForCausalLM", **kwargs: Any) -> Any:
    """`transformers.<auto_class>.from_pretrained(path, **kwargs)` through a sharedcache role in one call.

    The role (`prefill`, `decode`, `auto`, `holder`, `plain`) and the cache settings are the packaged
    conf's, as `sharedcache launch role=<role> model.path=<path>` composes them (the key: the model
    directory's name), with `overrides` in Hydra's syntax on top, e.g. `["cache.dir=/dev/shm/x"]`. The
    default, auto, attaches to a live compatible entry and otherwise loads and publishes one. An owner's
    entry lives as long as the returned model (or until `instance_of(model).close()`)."""
    import transformers

    from sharedcache import configured

    role_, settings = configured(role, f"model.path={os.fspath(path)}", *overrides)
    with patched(role=role_, cache=settings):
        return getattr(transformers, auto_class).from_pretrained(path, **kwargs)


def instance_of(model: Any):
    """The sharedcache Instance that produced `model` (its `.report`, its `.close()`), or None."""
    return _instance_of(model)


def _from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    original = _installed["original"].__func__
    if _depth.get() > 0:
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)
    from sharedcache import Instance

    from .source import HFSource

    token = _depth.set(_depth.get() + 1)
    try:
        source = HFSource(cls, original, pretrained_model_name_or_path, args, kwargs)
        instance = Instance(_installed["role"], _installed["cache"], source, **_installed["options"])
        model = instance.run()
    finally:
        _depth.reset(token)
    return source.returned(model)
