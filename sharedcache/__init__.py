"""sharedcache: one physical copy of model weights for every inference instance on a machine.

Importing this package is cheap: no CUDA initialisation, no framework imports.
"""
from .errors import (ArenaError, AttachTimeout, BackendUnavailable, BindError, ConfigError, DriverError, EntryError,
                     EntryOwned, FingerprintMismatch, HandoverError, IntegrityError, ManifestError, OwnerGone,
                     SharedCacheError, StorageError, UnsupportedModel)
from .fingerprint import Fingerprint
from .roles import Mode, Role
from .settings import CacheSettings

__all__ = [
    "ArenaError", "AttachTimeout", "BackendUnavailable", "BindError", "CacheSettings", "ConfigError", "DriverError",
    "EntryError", "EntryOwned", "Fingerprint", "FingerprintMismatch", "HandoverError", "Instance", "IntegrityError",
    "ManifestError", "Mode", "OwnerGone", "Role", "SharedCacheError", "StorageError", "UnsupportedModel",
]


def __getattr__(name: str):
    if name == "Instance":  # pulls in the phases' machinery only when used
        from .instance import Instance

        return Instance
    raise AttributeError(name)
