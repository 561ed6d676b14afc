"""Exception classes: every failure a user can act on has its own type.

Messages read "[component] what happened. What to do." so that a log line alone is
enough to fix the problem.
"""
from __future__ import annotations


class SharedCacheError(Exception):
    """Base class of every error sharedcache raises on purpose."""

    component = "sharedcache"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        text = f"[{self.component}] {message}"
        if hint:
            text += f" {hint}"
        super().__init__(text)


class ConfigError(SharedCacheError):
    """The composed configuration cannot work (unknown mode, impossible phase order...)."""

    component = "sharedcache.config"


class ManifestError(SharedCacheError):
    """A manifest is missing, unreadable or inconsistent; nothing was mapped."""

    component = "sharedcache.manifest"


class ArenaError(SharedCacheError):
    """The arena's memory cannot be created, imported or mapped as the manifest says."""

    component = "sharedcache.arena"


class BindError(SharedCacheError):
    """The model skeleton and the published tensors do not fit together; the model was not touched."""

    component = "sharedcache.bind"


class FingerprintMismatch(SharedCacheError):
    """The published entry was made from another model, dtype, device or engine."""

    component = "sharedcache.fingerprint"

    def __init__(self, key: str, differences: list[tuple[str, object, object]]) -> None:
        self.differences = differences
        fields = ", ".join(name for name, _, _ in differences)
        detail = "; ".join(f"{n}: ours={o!r} published={p!r}" for n, o, p in differences)
        super().__init__(
            f"entry {key!r} was published for another model (differing fields: {fields}). {detail}.",
            hint="Start the decode with the same model/dtype as the prefill, use another cache.key, "
            "or set cache.on_mismatch=fallback to load normally instead.",
        )


class AttachTimeout(SharedCacheError):
    """No owner published the entry within cache.wait_timeout_s."""

    component = "sharedcache.attach"


class EntryOwned(SharedCacheError):
    """Another live instance owns (or is saving) this entry."""

    component = "sharedcache.owner"


class BackendUnavailable(SharedCacheError):
    """The requested memory backend cannot run on this machine."""

    component = "sharedcache.backend"


class UnsupportedModel(SharedCacheError):
    """The model uses a feature that cannot be shared (quantized params, offload, PEFT, ...)."""

    component = "sharedcache.model"
