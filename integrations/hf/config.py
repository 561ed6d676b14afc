"""Which parts of a transformers config identify a model's bytes (shared with the SGLang integration,
whose model config carries a transformers config too)."""
from __future__ import annotations

from typing import Any, Mapping

from sharedcache.kit import config_digest

# device_map names with which transformers spreads a model over the GPUs there are (the CPU where there are none)
SPREADING = ("auto", "balanced", "balanced_low_0", "sequential")

# keys of `PretrainedConfig.to_dict()` that say nothing about the weights' bytes: dtype has a fingerprint
# field of its own, and the transformers version that wrote the config is not the model
NOT_IDENTITY = ("dtype", "torch_dtype", "transformers_version")


def hf_config_digest(config: Mapping[str, Any], **engine_options: Any) -> str:
    """Digest of a model's effective transformers config (its `to_dict()`) and of any engine options
    that change the bytes (`{"hf_config": ..., "engine": ...}` when there are some)."""
    if not engine_options:
        return config_digest(config, ignore=NOT_IDENTITY)
    data = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    return config_digest({"hf_config": data, "engine": engine_options})
