"""How transformers loads, fingerprints and skeletons a model, for the sharedcache core."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sharedcache import ConfigError, Fingerprint, UnsupportedModel
from sharedcache.kit import checkpoint_fingerprint, resolve_device, weight_files

from .config import SPREADING, hf_config_digest

# from_pretrained options that only matter for fetching files; safe to forward to config loading
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
               "trust_remote_code")
# options that steer how weights load, not what the config says; every other keyword is a config
# override (rope_parameters=..., num_hidden_layers=...) and becomes part of the fingerprint
_LOAD_KWARGS = set(_HUB_KWARGS) | {
    "config", "dtype", "torch_dtype", "device_map", "attn_implementation", "low_cpu_mem_usage", "use_safetensors",
    "weights_only", "variant", "adapter_kwargs", "adapter_name", "output_loading_info", "offload_folder",
    "offload_state_dict", "offload_buffers", "quantization_config", "state_dict", "gguf_file", "max_memory",
    "key_mapping", "proxies", "_from_auto", "_from_pipeline", "tqdm_class", "generation_config", "use_kernels",
    "disable_mmap", "fusion_config", "ignore_mismatched_sizes"}


class HFSource:
    engine = "transformers"
    adopts = True  # a save may take over a dead owner's arena: the skeleton binds to it as an attach's does

    def __init__(self, cls: type, original: Callable, path: str | os.PathLike, args: tuple,
                 kwargs: dict[str, Any]) -> None:
        self.cls, self.original, self.path, self.args, self.kwargs = cls, original, path, args, dict(kwargs)
        self._config = None
        self._dir: Path | None = None
        self._identity: tuple[str, tuple] | None = None
        self._loading_info: tuple | None = None  # what from_pretrained returned beside the model, if a tuple
        device_map = kwargs.get("device_map")
        # several GPUs: the core publishes one part per device; self.device then only names the first
        self.spreads = _spreads(device_map)
        device = torch.device("cuda", 0) if self.spreads else _single_device(device_map)
        self.device = resolve_device(device) if device is not None else None  # a bare "cuda": its index

    # -------------------------------------------------------------- ModelSource
    def check(self) -> None:
        k = self.kwargs
        if self.args:
            raise UnsupportedModel("positional model arguments to from_pretrained cannot be reproduced on attach.",
                                   hint="Pass options as keywords, or set cache.on_unsupported=fallback.")
        if k.get("output_loading_info") or k.get("state_dict") is not None or k.get("gguf_file"):
            raise UnsupportedModel("from_pretrained with output_loading_info, state_dict or gguf_file is not shared.",
                                   hint="Drop that option, or set cache.on_unsupported=fallback.")
        if self.device is None:
            raise UnsupportedModel(f"device_map={k.get('device_map')!r} offloads the model to the CPU or disk, or "
                                   "mixes them with GPUs; offloaded weights cannot be shared.",
                                   hint="Use one device (device_map='cpu' or 'cuda:0') or GPUs only "
                                        "(device_map='auto' or a map of GPU numbers), or set "
                                        "cache.on_unsupported=fallback.")
        if k.get("offload_folder") or k.get("offload_state_dict"):
            raise UnsupportedModel("offloaded weights (offload_folder) cannot be shared.",
                                   hint="Load without offload, or set cache.on_unsupported=fallback.")
        if k.get("config") is None and not (self.model_dir() / "config.json").is_file():
            raise ConfigError(f"model {str(self.path)!r} has no config.json ({self.model_dir()}), so it is not a "
                              "Hugging Face model directory.",
                              hint="Point at the directory that holds config.json and the weights.")
        self.config()  # unknown options surface here, before anything loads
        quant = self.quantization()
        if quant and "bitsandbytes" in quant:
            raise UnsupportedModel(f"{quant} parameters keep state outside plain bytes and cannot be shared.",
                                   hint="Use an unquantized or pre-quantized checkpoint, or set "
                                        "cache.on_unsupported=fallback.")
        if (self.model_dir() / "adapter_config.json").exists() or k.get("adapter_kwargs"):
            raise UnsupportedModel("PEFT adapters are not shared (the base and adapter weights would be mixed).",
                                   hint="Load the merged model, or set cache.on_unsupported=fallback.")

    def fingerprint(self, model: nn.Module | None) -> Fingerprint:
        import transformers

        if self._identity is None:  # taken from the request, before the load mutates the config
            weights = weight_files(self.model_dir())
            config_sha = hf_config_digest(self.config().to_dict())
            self._identity = (config_sha, weights)
        config_sha, weights = self._identity
        return checkpoint_fingerprint(
            engine=self.engine, engine_version=transformers.__version__, path=self.model_dir(),
            revision=self.kwargs.get("revision"), config_sha256=config_sha, weights=weights,
            dtype=_model_dtype(model) if model is not None else self.requested_dtype(),
            quantization=self.quantization(), device=self.device, tp_rank=0, tp_size=1)

    def load(self) -> nn.Module:
        model, self._loading_info = _split_loading_info(self.original(self.cls, self.path, *self.args, **self.kwargs))
        return model

    def skeleton(self) -> nn.Module:
        extra = {k: self.kwargs[k] for k in ("attn_implementation",) if k in self.kwargs}
        if self.args:
            raise UnsupportedModel("positional model arguments cannot be reproduced on attach.")
        with torch.device("meta"), _no_init():
            return self.cls._from_config(self.config(), dtype=self.requested_dtype(), **extra)

    def placement(self, model: nn.Module) -> dict[str, torch.device] | None:
        """Where each module of a model spread over GPUs runs: the device map transformers dispatched."""
        hf_map = getattr(model, "hf_device_map", None)
        return {name: _as_device(where) for name, where in hf_map.items()} if hf_map else None

    def finish(self, model: nn.Module, *, attached: bool,
               placement: dict[str, torch.device] | None = None) -> nn.Module:
        if attached and placement:
            self._dispatch(model, placement)
        if attached:
            from transformers import GenerationConfig

            model.config._name_or_path = str(self.path)
            try:
                model.generation_config = GenerationConfig.from_pretrained(self.model_dir())
            except OSError:  # no generation_config.json: the model config's defaults, as a normal load does
                model.generation_config = GenerationConfig.from_model_config(model.config)
            model.eval()
        return model

    def _dispatch(self, model: nn.Module, placement: dict[str, torch.device]) -> None:
        """Give an attached spread model the hooks a multi-device load gets (inputs follow each block to its
        GPU), on the owner's placement: its tensors already lie there, so nothing moves."""
        asked = self.kwargs.get("device_map")
        if isinstance(asked, dict):
            ours = {name: _as_device(where) for name, where in asked.items()}
            differing = sorted(n for n in ours.keys() | placement.keys() if ours.get(n) != placement.get(n))
            if differing:
                raise ConfigError(f"device_map places {differing[:3]} otherwise than the owner did "
                                  f"(owner: {_show(placement, differing)}; asked: {_show(ours, differing)}).",
                                  hint="Pass the owner's device map, or device_map='auto' to take the owner's "
                                       "placement as it is.")
        from accelerate import dispatch_model

        skip = getattr(model, "_skip_keys_device_placement", None)
        dispatch_model(model, device_map={name: d.index for name, d in placement.items()}, skip_keys=skip)

    # -------------------------------------------------------------- helpers
    def returned(self, model: nn.Module) -> Any:
        """What from_pretrained returns to its caller: the model, or (model, loading info) when asked
        for with output_loading_info (which loads normally: check() does not share it)."""
        return model if self._loading_info is None else (model, *self._loading_info)

    def model_dir(self) -> Path:
        """The local directory holding config and weights (a hub id resolved from the local cache only)."""
        if self._dir is None:
            sub = self.kwargs.get("subfolder") or ""
            path = Path(os.fspath(self.path))
            if not path.is_dir():
                from huggingface_hub import snapshot_download

                try:
                    path = Path(snapshot_download(str(self.path), revision=self.kwargs.get("revision"),
                                                  cache_dir=self.kwargs.get("cache_dir"), local_files_only=True))
                except Exception as e:  # noqa: BLE001 - any hub failure means: not available locally
                    raise UnsupportedModel(f"model {self.path!r} is neither a local directory nor in the local "
                                           f"hub cache ({e}).", hint="Download it first, or pass a directory.") from e
            self._dir = (path / sub).resolve()
        return self._dir

    def config(self):
        """The effective config: the one given, or the checkpoint's with the call's overrides applied."""
        if self._config is None:
            given = self.kwargs.get("config")
            if given is not None and not isinstance(given, (str, os.PathLike)):
                self._config = given
            else:
                from transformers import AutoConfig

                hub = {k: self.kwargs[k] for k in _HUB_KWARGS if k in self.kwargs and k != "subfolder"}
                overrides = {k: v for k, v in self.kwargs.items() if k not in _LOAD_KWARGS}
                config, unused = AutoConfig.from_pretrained(given or self.model_dir(), return_unused_kwargs=True,
                                                            **hub, **overrides)
                if unused:
                    raise UnsupportedModel(f"from_pretrained options {sorted(unused)} are neither loading options "
                                           "nor config fields; they cannot be reproduced on attach.",
                                           hint="Drop them, or set cache.on_unsupported=fallback.")
                self._config = config
        return self._config

    def requested_dtype(self) -> torch.dtype:
        """The dtype a normal load would produce: explicit dtype, else the config's, else the default."""
        dtype = self.kwargs.get("dtype", self.kwargs.get("torch_dtype"))
        if dtype is None or dtype == "auto":
            dtype = getattr(self.config(), "dtype", None) or torch.get_default_dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return dtype

    def quantization(self) -> str | None:
        q = self.kwargs.get("quantization_config") or getattr(self.config(), "quantization_config", None)
        if q is None:
            return None
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        method = getattr(method, "value", method)
        if isinstance(q, dict) and (q.get("load_in_4bit") or q.get("load_in_8bit")) or \
                getattr(q, "load_in_4bit", False) or getattr(q, "load_in_8bit", False):
            return f"bitsandbytes ({method})"
        return str(method)


def _no_init():
    """transformers' own switch that skips weight initialisation: a skeleton's values are never read."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x: initialising meta tensors is only slower
        return contextlib.nullcontext()
    return no_init_weights()


def _single_device(device_map: Any) -> torch.device | None:
    """The one device a device_map names, or None when it names several (or offloads)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (torch.device, int)):
        return _as_device(device_map)
    if isinstance(device_map, str):
        if device_map in SPREADING:  # not spreading (see _spreads): the one GPU there is, or the CPU without one
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return torch.device(device_map)
    if isinstance(device_map, dict):
        targets = {str(v) for v in device_map.values()}
        if len(targets) != 1 or targets & {"disk"}:
            return None
        (only,) = targets
        return _as_device(only)
    return None


def _spreads(device_map: Any) -> bool:
    """Does the device_map let the model lie on several GPUs, and on nothing else?"""
    if isinstance(device_map, str) and device_map in SPREADING:
        return torch.cuda.is_available() and torch.cuda.device_count() > 1
    if isinstance(device_map, dict):
        try:
            targets = {_as_device(v) for v in device_map.values()}
        except (RuntimeError, ValueError, TypeError):  # "disk", or not a device at all
            return False
        return len(targets) > 1 and all(d.type == "cuda" for d in targets)
    return False


def _as_device(where: Any) -> torch.device:
    """A device map's value as a torch device (GPU numbers are CUDA devices)."""
    if isinstance(where, int) or (isinstance(where, str) and where.isdigit()):
        return torch.device("cuda", int(where))
    return resolve_device(where)


def _show(placement: dict[str, torch.device], names: list[str]) -> str:
    return ", ".join(f"{n or '<model>'}={placement.get(n)}" for n in names[:3])


def _split_loading_info(result: Any) -> tuple[nn.Module, tuple | None]:
    """from_pretrained's result as (model, the rest): the rest is None unless it returned a tuple such as
    (model, loading_info) for output_loading_info=True."""
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, tuple) and result and isinstance(result[0], nn.Module):
        return result[0], result[1:]
    raise TypeError(f"the load returned {type(result).__name__}, not a torch module")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
