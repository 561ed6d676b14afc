"""sharedcache: one physical copy of model weights for every inference instance on a machine.

Importing this package is cheap: no CUDA initialisation, no framework imports.
"""
from .errors import (ArenaError, AttachTimeout, BackendUnavailable, BindError, ConfigError, EntryError, EntryOwned,
                     FingerprintMismatch, ManifestError, SharedCacheError, StorageError, UnsupportedModel)
from .fingerprint import Fingerprint
from .roles import Mode, Role
from .settings import CacheSettings

__all__ = [
    "ArenaError", "AttachTimeout", "BackendUnavailable", "BindError", "CacheSettings", "ConfigError",
    "EntryError", "EntryOwned", "Fingerprint", "FingerprintMismatch", "Instance", "ManifestError", "Mode", "Role",
    "SharedCacheError", "StorageError", "UnsupportedModel",
]


def __getattr__(name: str):
    if name == "Instance":  # pulls in the phases' machinery only when used
        from .instance import Instance

        return Instance
    raise AttributeError(name)
