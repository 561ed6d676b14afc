"""The model loader SGLang gets while the plugin is active: SGLang's own loader, run through a
sharedcache Instance in each tensor-parallel rank's scheduler process.

save:  SGLang's loader loads and post-processes the weights (`process_weights_after_loading`),
       then the core moves every parameter and buffer into the arena and publishes it;
load:  the model is built on the meta device (quantization post-processing mirrored there), every
       tensor is bound to the published arena, and no checkpoint file is read.
Entries are keyed per TP rank. SGLang internals are reached through compat.py only.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharedcache import Fingerprint, UnsupportedModel
from sharedcache.kit import checkpoint_fingerprint, entry_key, resolve_device, weight_files

from ..hf.config import hf_config_digest
from . import compat
from .hooks import RankState, agree_across_ranks

BaseModelLoader, DefaultModelLoader = compat.loader_classes()
log = logging.getLogger(__name__)


class SharedCacheLoader(BaseModelLoader):
    """Wraps the loader SGLang chose; everything but `load_model` is the inner loader's. Only the first model
    of a scheduler process gets this wrapper (hooks.py): a speculative draft or a weight update gets SGLang's."""

    def __init__(self, inner: BaseModelLoader, load_config, state: RankState) -> None:
        super().__init__(load_config)
        self.inner, self.state = inner, state
        self.preloaded_weights_bytes = compat.inner_preloaded_bytes(inner)

    def __getattr__(self, name: str):  # only reached for attributes this wrapper lacks
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def download_model(self, model_config) -> None:
        self.inner.download_model(model_config)

    def load_model(self, *, model_config, device_config) -> nn.Module:
        from sharedcache import Instance

        state = self.state
        if state.config.key_from_model:  # no key given: the model directory's name, as launch.py keys it
            state.config = state.config.keyed(entry_key(str(model_config.model_path), "model"))
        if state.ranks is None:  # the model runner's hook sets them; a loader called on its own has none
            state.ranks = compat.ranks()
        settings = replace(state.config.settings, key=state.key)
        source = SGLangSource(self.inner, self.load_config, model_config, device_config, state.ranks)
        instance = Instance(state.config.role, settings, source)
        model = instance.run()
        report = instance.report
        if report.owns:  # before the wait for the peers: a SIGTERM then
            _unpublish_on_sigterm(instance)                   # must not leave the published entry behind
        agree_across_ranks(instance, state)
        # An attached rank maps memory that its owner allocated before this rank measured its baseline,
        # so it is already missing from "free": reporting it as preloaded (0.5.23's term) would hold back
        # slack for weights this rank does not hold; the same for an owner that took over a dead one's
        # arena or refilled one from the host copy (SGLang's loader never ran). An owner that loaded (or a
        # fallback) reports what its loader did.
        took_over = report.attached or report.adopted or report.refilled
        self.preloaded_weights_bytes = 0 if took_over else compat.inner_preloaded_bytes(self.inner)
        state.instance = instance
        state.report = _rank_report(state.ranks, report, model, self.preloaded_weights_bytes)
        return model


def _unpublish_on_sigterm(instance) -> None:
    """SGLang's scheduler process dies of SIGTERM without running Python's exit path: unpublish first.
    Best effort: a SIGKILL (SGLang's parent-death signal, a stop that times out) still leaves the entry
    orphaned, which `sharedcache ls` shows and the next owner sweeps. Left alone if SGLang set its own."""
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
    adopts = True  # a restarted prefill takes over its dead predecessor's arena: the skeleton binds as a decode's does
    settles = True  # SGLang sizes its KV pool from free memory after loading: attach once the owner settled

    def __init__(self, inner, load_config, model_config, device_config, ranks: dict[str, int]) -> None:
        self.inner, self.load_config = inner, load_config
        self.model_config, self.device_config = model_config, device_config
        self.tp_rank, self.tp_size, self.pp_rank = ranks["tp_rank"], ranks["tp_size"], ranks["pp_rank"]
        self.device = resolve_device(device_config.device, index=getattr(device_config, "gpu_id", None))
        self._identity: tuple[str, tuple] | None = None

    def check(self) -> None:
        if type(self.inner) is not DefaultModelLoader:  # its subclasses and the others bring their own ways
            raise UnsupportedModel(f"SGLang chose {type(self.inner).__name__} for this model (load_format, "
                                   "quantization); only its DefaultModelLoader's result is shared.",
                                   hint="Use load_format=auto or safetensors, or set cache.on_unsupported=fallback.")
        model_class = compat.model_class(self.model_config)
        if hasattr(model_class, "post_load_weights"):
            raise UnsupportedModel(f"{model_class.__name__} builds state in post_load_weights that is not "
                                   "a parameter or buffer, which an attached model would lack.",
                                   hint="Set cache.on_unsupported=fallback to load this model normally.")
        if not self.model_dir().is_dir():
            raise UnsupportedModel(f"model path {self.model_config.model_path!r} is not a local directory, so its "
                                   "weight files cannot be fingerprinted.", hint="Download the model and pass its "
                                                                                 "directory as model.path.")

    def fingerprint(self, model: nn.Module | None) -> Fingerprint:
        import sglang

        if self._identity is None:
            self._identity = (_config_digest(self.model_config), weight_files(self.model_dir()))
        config_sha, weights = self._identity
        return checkpoint_fingerprint(
            engine=self.engine, engine_version=sglang.__version__, path=self.model_dir(),
            revision=getattr(self.model_config, "revision", None), config_sha256=config_sha, weights=weights,
            dtype=self.model_config.dtype, quantization=self.model_config.quantization,
            device=self.device, tp_rank=self.tp_rank, tp_size=self.tp_size)  # PP rank: in the key

    def load(self) -> nn.Module:
        return self.inner.load_model(model_config=self.model_config, device_config=self.device_config)

    def skeleton(self) -> nn.Module:
        with compat.default_dtype(self.model_config.dtype), torch.device("meta"):
            model = compat.build_model(self.model_config, self.load_config)
            for module, method in compat.modules_with_quant_method(model):
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


def _config_digest(model_config) -> str:
    """The effective model config as SGLang resolved it, with the options that shape its bytes."""
    extra = {k: getattr(model_config, k, None) for k in ("context_len", "is_generation", "model_impl")}
    return hf_config_digest(model_config.hf_config.to_dict(), **extra, **compat.layout_options())


def _rank_report(ranks: dict[str, int], report, model: nn.Module, preloaded: int) -> dict[str, Any]:
    """This rank's part of the report; hooks.py completes it with the KV pool and writes it."""
    import sglang

    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {**report.to_json(), **ranks, "pid": os.getpid(), "preloaded_weights_bytes": preloaded,
            "layout_options": compat.layout_options(),
            "meta_tensors": [n for n, t in tensors if t.device.type == "meta"],
            "versions": {"torch": torch.__version__, "sglang": sglang.__version__}}
