"""`launch.py role=holder engine=sglang` (or `sharedcache serve engine=sglang`): no SGLang server. The process
waits for an SGLang owner (role=prefill) to publish every tensor-parallel rank's entry under the key, maps and
keeps each rank's arena (sharedcache.holding), and serves nothing but those arenas: when the owner stops or
dies the weights stay, a restarted prefill takes them over and decodes attach, so restarting every server costs
SGLang's start-up without its weight load. The weights are the owner's, post-processed by SGLang's own loader;
the holder only keeps them (it never loads a checkpoint itself).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from sharedcache import CacheSettings
from sharedcache.kit import Held, hold, rank_key, superseded, write_report

log = logging.getLogger(__name__)


def rank_keys(cfg: dict[str, Any], settings: CacheSettings) -> list[str]:
    """The entries an SGLang server of this config publishes: one per rank, as its ranks key them (with the
    pipeline stage in the key only when there are several, sglang.hooks)."""
    engine = cfg["engine"]
    tp, pp = int(engine["tp_size"]), int(engine["extra_args"].get("pp_size", 1))
    return [rank_key(settings.key, tp_rank=r, pp_rank=p if pp > 1 else None) for p in range(pp) for r in range(tp)]


def run_holder(cfg: dict[str, Any], settings: CacheSettings, out: Path) -> None:
    """Hold every rank's arena until SIGINT/SIGTERM; the report names what is held."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    held: list[Held] = []
    try:
        for key in rank_keys(cfg, settings):
            held.append(hold(settings, key))
        report = {"role": cfg["role"]["name"], "engine": "sglang", "mode": "hold", "pid": os.getpid(),
                  "run_dir": str(out), "held": [_row(h) for h in held],
                  "arena_bytes": sum(h.manifest.arena.size for h in held), "weight_bytes_allocated": 0}
        write_report(out / cfg["report_file"], report)
        print(f"[launch] holder: keeping {len(held)} SGLang rank arena(s) of {settings.key!r} "
              f"({report['arena_bytes'] / 2**30:.2f} GiB) in {settings.dir} (pid {os.getpid()}); restarted "
              "prefills take them over and decodes attach. Stop with Ctrl-C or SIGTERM.", flush=True)
        while not stop.wait(0.2):
            for i, h in enumerate(held):
                if superseded(h):  # a new owner published its own arena: hold that one instead
                    log.info("holder: %s publishes a new arena; holding it instead", h.key)
                    h.close()
                    held[i] = hold(settings, h.key)
                else:  # its owner stopped on purpose while this holder served the arena: publish it again
                    h.arena.relay.republish()
    finally:
        for h in held:
            h.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"[launch] holder: released {len(held)} arena(s); instances that map them keep them.", flush=True)


def _row(h: Held) -> dict[str, Any]:
    m = h.manifest
    return {"key": h.key, "backend": m.backend, "bytes": m.arena.size, "device": m.device,
            "owner_pid": m.owner.pid, "tensors": len(m.tensors)}
