"""What the plugin installs in one SGLang scheduler process (one TP/PP rank), through SGLang's hooks.

- `get_model_loader`: SGLang's loader becomes the normal load of a sharedcache Instance (loader.py).
- `ModelRunner.load_model`: before the weights, wait until the entry settled (an attacher), take
  this device's sizing turn, and re-measure SGLang's pre-load baseline, so the KV pool is sized
  from memory actually free once the owner finished allocating, whatever the start order.
- `Scheduler.init_model_worker`: once the KV pool and CUDA graphs exist, an owner marks its entry
  settled, the sizing turn is released, and the rank's report is written.
- `WeightUpdater.update_weights_from_disk`: refused while this rank's weights are shared.

Why re-measure: SGLang gives its KV pool `free after loading - baseline x (1 - mem_fraction_static)`
with the baseline measured before loading. A decode that waits for its prefill measured its baseline
before the prefill allocated anything, so everything the prefill allocates during the wait is taken
from the decode's pool (or fails it: "Loaded weights leave no GPU memory for the KV cache").
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharedcache import Mode
from sharedcache.cache import CacheDir
from sharedcache.fingerprint import device_id
from sharedcache.settle import SizingTurn, wait_settled

from . import PluginConfig, compat

log = logging.getLogger(__name__)


@dataclass
class RankState:
    """This scheduler process's part in sharing (one per process: the target model's rank)."""

    config: PluginConfig
    ranks: dict[str, int] | None = None
    turn: SizingTurn | None = None
    instance: Any = None  # the Instance whose model this rank serves, once the loader ran
    report: dict[str, Any] | None = None  # written by the loader, completed at settle
    sizing: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.config.settings.key}-{rank_tag(self.ranks)}"

    @property
    def shared(self) -> bool:
        """Is this rank's model the arena (owner) or bound to it (attached)?"""
        report = getattr(self.instance, "report", None)
        return report is not None and report.fallback is None and report.mode != "off"


STATE: RankState | None = None


def install(config: PluginConfig) -> None:
    global STATE
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    STATE = RankState(config)
    HookRegistry.register(compat.GET_MODEL_LOADER, _around_get_model_loader, HookType.AROUND)
    HookRegistry.register(compat.RUNNER_LOAD_MODEL, _around_runner_load_model, HookType.AROUND)
    HookRegistry.register(compat.SCHEDULER_INIT_MODEL_WORKER, _around_init_model_worker, HookType.AROUND)
    HookRegistry.register(compat.UPDATE_WEIGHTS_FROM_DISK, _around_update_weights_from_disk, HookType.AROUND)


def rank_tag(ranks: dict[str, int]) -> str:
    """Entry key and report suffix: `tp<r>`, or `pp<p>-tp<r>` with pipeline parallelism."""
    tp = f"tp{ranks['tp_rank']}"
    return f"pp{ranks['pp_rank']}-{tp}" if ranks["pp_size"] > 1 else tp


def _around_get_model_loader(original, *args, **kwargs):
    from .loader import SharedCacheLoader

    inner = original(*args, **kwargs)
    load_config = kwargs.get("load_config", args[0] if args else None)
    return SharedCacheLoader(inner, load_config, STATE)


def _around_runner_load_model(original, runner, *args, **kwargs):
    if compat.is_draft_runner(runner) or STATE.ranks is not None or STATE.config.role.mode is Mode.OFF:
        return original(runner, *args, **kwargs)  # a draft model, a reload, or a role that shares nothing
    STATE.ranks = compat.ranks()
    settings, mode = STATE.config.settings, STATE.config.role.mode
    role = STATE.config.role.name
    t0 = time.monotonic()
    if mode is not Mode.SAVE:  # load, placeholder, auto: size only once nobody allocates for the entry
        entry = CacheDir(settings.dir).entry(STATE.key)
        wait_settled(entry, timeout_s=settings.wait_timeout_s, until_published=mode is not Mode.AUTO, role=role)
    settle_wait = time.monotonic() - t0
    turn_wait = 0.0
    if STATE.ranks["tp_size"] * STATE.ranks["pp_size"] == 1:
        # one rank, one device: take turns with other instances sizing on it. With several ranks a
        # turn per device could deadlock two servers over the same GPUs (each holding one device).
        import torch

        STATE.turn = SizingTurn(settings.dir, device_id(torch.device(runner.device, runner.gpu_id)
                                                        if runner.device == "cuda" else torch.device(runner.device)))
        turn_wait = STATE.turn.acquire(timeout_s=settings.wait_timeout_s, role=role)
    at_start = compat.baseline_gib(runner)
    now = compat.free_memory_gib(runner)
    compat.set_baseline_gib(runner, now)
    STATE.sizing = {"baseline_gib_at_start": round(at_start, 3), "baseline_gib": round(now, 3), "sized_at": time.time(),
                    "settle_wait_seconds": round(settle_wait, 3), "turn_wait_seconds": round(turn_wait, 3)}
    log.info("sharedcache: %s sizes its memory from %.2f GiB free (%.2f GiB when the server started; waited "
             "%.1fs for the entry to settle, %.1fs for the device's turn)", STATE.key, now, at_start, settle_wait,
             turn_wait)
    return original(runner, *args, **kwargs)


def _around_init_model_worker(original, scheduler, *args, **kwargs):
    try:
        result = original(scheduler, *args, **kwargs)
        if STATE.instance is not None and STATE.report is not None:
            if STATE.report["mode"] == "save" and STATE.shared:
                STATE.instance.mark_settled()
            _write_report(scheduler)
        return result
    finally:
        if STATE.turn is not None:
            STATE.turn.release()


def _around_update_weights_from_disk(original, updater, *args, **kwargs):
    if not STATE.shared:
        return original(updater, *args, **kwargs)
    role = "owns" if STATE.report and STATE.report["mode"] == "save" else "is attached to"
    message = (f"[sharedcache] update_weights_from_disk refused: this server {role} the shared weights of cache "
               f"entry {STATE.key!r}, which other servers map; updating them in place would change their weights "
               f"too. Start a prefill with the new weights under another cache.key and restart the decodes on it.")
    log.error("%s", message)
    return False, message


def _write_report(scheduler) -> None:
    """The rank's report, written atomically once its pools exist; launch.py gathers the ranks'."""
    data = {**STATE.report, **STATE.sizing, "settled_at": time.time(),
            **compat.pool_sizes(scheduler)}
    report_dir = STATE.config.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    path = Path(report_dir) / f"report-{rank_tag(STATE.ranks)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
