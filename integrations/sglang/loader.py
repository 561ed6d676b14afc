"""The model loader SGLang gets while the plugin is active: SGLang's own loader, run through a
sharedcache Instance in each tensor-parallel rank's scheduler process.

save:  SGLang's loader loads and post-processes the weights (`process_weights_after_loading`),
       then the core moves every parameter and buffer into the arena and publishes it;
load:  the model is built on the meta device (quantization post-processing mirrored there), every
       tensor is bound to the published arena, and no checkpoint file is read.
Entries are keyed per TP rank; SGLang is told the bytes it did not allocate so it sizes its KV pool.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sglang.srt.model_loader.loader import BaseModelLoader
from torch import nn

from sharedcache import Fingerprint, UnsupportedModel
from sharedcache.fingerprint import device_id, weight_files
from sharedcache.layout import dtype_name

from . import PluginConfig

# load formats whose weights are not the checkpoint's bytes, or that bring their own sharing
_UNSHARED_FORMATS = {"dummy", "bitsandbytes", "gguf", "layered", "remote", "remote_instance", "ipc_cache",
                     "sharded_state", "private", "flash_rl", "jax", "rdma"}
_instances: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def instance_of(model: nn.Module):
    """The sharedcache Instance that produced `model` in this process, or None."""
    return _instances.get(model)


class SharedCacheLoader(BaseModelLoader):
    """Wraps the loader SGLang chose; everything but `load_model` is the inner loader's."""

    def __init__(self, inner: BaseModelLoader, load_config, config: PluginConfig) -> None:
        super().__init__(load_config)
        self.inner, self.config = inner, config

    def __getattr__(self, name: str):  # only reached for attributes this wrapper lacks
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def download_model(self, model_config) -> None:
        self.inner.download_model(model_config)

    def load_model(self, *, model_config, device_config) -> nn.Module:
        from sglang.srt.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                          get_tensor_model_parallel_world_size)

        from sharedcache.instance import Instance

        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        settings = replace(self.config.settings, key=f"{self.config.settings.key}-tp{rank}")
        source = SGLangSource(self.inner, self.load_config, model_config, device_config, rank, size)
        instance = Instance(self.config.role, settings, source)
        model = instance.run()
        _instances[model] = instance
        report = instance.report
        if report.mode in ("load", "placeholder") and report.fallback is None:
            # resident before SGLang sampled its baseline: charge it as if this rank had loaded it
            self.preloaded_weights_bytes = report.bytes_shared
        if report.mode == "save" and report.fallback is None:
            _unpublish_on_sigterm(instance)
        _write_report(self.config.report_dir, rank, size, report, model)
        return model


def _unpublish_on_sigterm(instance) -> None:
    """SGLang's scheduler process dies of SIGTERM without running Python's exit path: unpublish first,
    so that stopping a prefill server leaves no orphaned entry behind. Left alone if SGLang set its own."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        return

    def handler(signum, _frame) -> None:
        try:
            instance.close()
        finally:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)


class SGLangSource:
    """What the core needs to know about one SGLang rank's model (sharedcache.instance.ModelSource)."""

    engine = "sglang"

    def __init__(self, inner, load_config, model_config, device_config, rank: int, size: int) -> None:
        self.inner, self.load_config = inner, load_config
        self.model_config, self.device_config = model_config, device_config
        self.tp_rank, self.tp_size = rank, size
        self.device = _device(device_config)
        self._identity: tuple[str, tuple] | None = None

    def check(self) -> None:
        fmt = getattr(self.load_config.load_format, "value", self.load_config.load_format)
        if str(fmt) in _UNSHARED_FORMATS:
            raise UnsupportedModel(f"SGLang load_format={fmt} does not load the checkpoint's bytes in a way the "
                                   "cache can reproduce.", hint="Use load_format=auto or safetensors, or set "
                                                                "cache.on_unsupported=fallback.")
        if getattr(self.model_config, "modelopt_quant", None):
            raise UnsupportedModel("ModelOpt quantization on load is not shared.",
                                   hint="Serve a pre-quantized checkpoint, or set cache.on_unsupported=fallback.")
        if not self.model_dir().is_dir():
            raise UnsupportedModel(f"model path {self.model_config.model_path!r} is not a local directory, so its "
                                   "weight files cannot be fingerprinted.", hint="Download the model and pass its "
                                                                                 "directory as model.path.")

    def fingerprint(self, model: nn.Module | None) -> Fingerprint:
        import sglang

        if self._identity is None:
            self._identity = (_config_digest(self.model_config), weight_files(self.model_dir()))
        config_sha, weights = self._identity
        return Fingerprint(
            engine=self.engine, engine_version=sglang.__version__, model=str(self.model_dir()),
            revision=getattr(self.model_config, "revision", None), config_sha256=config_sha, weights=weights,
            dtype=dtype_name(self.model_config.dtype), quantization=self.model_config.quantization,
            device=device_id(self.device), tp_rank=self.tp_rank, tp_size=self.tp_size)

    def load(self) -> nn.Module:
        return self.inner.load_model(model_config=self.model_config, device_config=self.device_config)

    def skeleton(self) -> nn.Module:
        from sglang.srt.model_loader.loader import (_get_quantization_config, _initialize_model,
                                                    _modules_with_quant_method)
        from sglang.srt.model_loader.utils import set_default_torch_dtype

        quant = _get_quantization_config(self.model_config, self.load_config)
        with set_default_torch_dtype(self.model_config.dtype), torch.device("meta"):
            model = _initialize_model(self.model_config, self.load_config, quant)
            for module, method in _modules_with_quant_method(model):
                try:  # post-processing may re-register tensors (scales, repacked weights): mirror it on meta
                    method.process_weights_after_loading(module)
                except Exception as e:  # noqa: BLE001 - any failure means the skeleton cannot mirror the owner
                    raise UnsupportedModel(f"{type(method).__name__}.process_weights_after_loading cannot run on "
                                           f"the meta device ({e}).",
                                           hint="Set cache.on_unsupported=fallback to load this model normally.") from e
        return model

    def finish(self, model: nn.Module, *, attached: bool) -> nn.Module:
        return model.eval()

    def model_dir(self) -> Path:
        return Path(self.model_config.model_path).expanduser().resolve()


def _device(device_config) -> torch.device:
    device = torch.device(device_config.device)
    if device.type == "cuda" and device.index is None:
        gpu = device_config.gpu_id
        return torch.device("cuda", gpu if gpu is not None and gpu >= 0 else torch.cuda.current_device())
    return device


def _config_digest(model_config) -> str:
    """The effective model config as SGLang resolved it (dtype has its own fingerprint field)."""
    import hashlib

    hf = {k: v for k, v in model_config.hf_config.to_dict().items()
          if k not in ("dtype", "torch_dtype", "transformers_version")}
    extra = {k: getattr(model_config, k, None) for k in ("context_len", "is_generation", "model_impl")}
    body = json.dumps({"hf_config": hf, "sglang": extra}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _write_report(report_dir, rank: int, size: int, report, model: nn.Module) -> None:
    """Each rank's report, written atomically by the process that loaded the model; launch.py gathers them."""
    import sglang

    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    data = {**report.to_json(), "pid": os.getpid(), "tp_rank": rank, "tp_size": size,
            "meta_tensors": [n for n, t in tensors if t.device.type == "meta"],
            "versions": {"torch": torch.__version__, "sglang": sglang.__version__}}
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"report-tp{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
