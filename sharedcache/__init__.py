"""sharedcache: one physical copy of model weights for every inference instance on a machine.

Importing this package is cheap: no CUDA initialisation, no framework imports.
"""
from .errors import (ArenaError, AttachTimeout, BackendUnavailable, BindError, ConfigError, DriverError, EntryError,
                     EntryOwned, ExitCode, FingerprintMismatch, HandoverError, IntegrityError, Interrupted,
                     ManifestError, NoManifest,
                     OwnerGone, ReportUnwritable, SharedCacheError, StorageError, UnsupportedModel)
from .conf import configured
from .fingerprint import Fingerprint
from .roles import Mode, Role
from .settings import CacheSettings

__version__ = "0.1.0"  # the one place it is written; pyproject.toml reads it

__all__ = [
    "__version__", "ArenaError", "AttachTimeout", "BackendUnavailable", "BindError", "CacheSettings", "ConfigError",
    "DriverError", "EntryError", "EntryOwned", "ExitCode", "Fingerprint", "FingerprintMismatch", "HandoverError",
    "Instance", "IntegrityError", "Interrupted", "ManifestError", "Mode", "NoManifest", "OwnerGone",
    "ReportUnwritable", "Role",
    "SharedCacheError",
    "StorageError", "UnsupportedModel", "configured",
]


def __getattr__(name: str):
    if name == "Instance":  # pulls in the phases' machinery only when used
        from .instance import Instance

        return Instance
    raise AttributeError(name)
