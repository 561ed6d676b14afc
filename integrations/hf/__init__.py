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
# one from_pretrained() call's role and cache, ahead of install()'s; the patch stays while calls use it
_call: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("sharedcache_hf_call", default=None)
_calls_in_flight = 0


def install(*, role: Role, cache: CacheSettings, progress: Callable[[Any], None] | None = None) -> None:
    """Route every outermost `from_pretrained` through `role` with `cache`. Idempotent per process.
    `progress` receives the slow steps' progress events (default: the core's log lines)."""
    with _lock:
        _patch_class()
        _installed["role"], _installed["cache"] = role, cache
        _installed["options"] = {} if progress is None else {"progress": progress}


def uninstall() -> None:
    with _lock:
        for name in ("role", "cache", "options"):
            _installed.pop(name, None)
        if _calls_in_flight == 0:  # a from_pretrained() call still running keeps the class patched
            _restore_class()


def _patch_class() -> None:
    """Under _lock: route PreTrainedModel.from_pretrained through _from_pretrained (idempotent)."""
    from transformers import PreTrainedModel

    if "original" not in _installed:
        _installed["original"] = PreTrainedModel.__dict__["from_pretrained"]
        PreTrainedModel.from_pretrained = classmethod(_from_pretrained)


def _restore_class() -> None:
    from transformers import PreTrainedModel

    original = _installed.pop("original", None)
    if original is not None:
        PreTrainedModel.from_pretrained = original


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
    from sharedcache.kit import entry_key

    named = any(o.lstrip("+~").startswith("cache.key=") for o in overrides)
    key = [] if named else [f"cache.key={entry_key(os.fspath(path), 'model')}"]  # the key a launcher would use
    role_, settings = configured(role, *key, *overrides)
    global _calls_in_flight
    with _lock:  # patch the class for this call without touching an install() of the process's own
        _patch_class()
        _calls_in_flight += 1
    token = _call.set((role_, settings))
    try:
        return getattr(transformers, auto_class).from_pretrained(path, **kwargs)
    finally:
        _call.reset(token)
        with _lock:
            _calls_in_flight -= 1
            if _calls_in_flight == 0 and "role" not in _installed:
                _restore_class()


def instance_of(model: Any):
    """The sharedcache Instance that produced `model` (its `.report`, its `.close()`), or None."""
    return _instance_of(model)


def _from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    original = _installed["original"].__func__
    call = _call.get()
    if _depth.get() > 0 or (call is None and "role" not in _installed):  # nested, or patched for another call only
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)
    role, cache = call if call is not None else (_installed["role"], _installed["cache"])
    options = {} if call is not None else _installed["options"]
    from sharedcache import Instance

    from .source import HFSource

    token = _depth.set(_depth.get() + 1)
    try:
        source = HFSource(cls, original, pretrained_model_name_or_path, args, kwargs)
        instance = Instance(role, cache, source, **options)
        model = instance.run()
    finally:
        _depth.reset(token)
    return source.returned(model)
