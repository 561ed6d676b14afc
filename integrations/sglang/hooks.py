"""What the plugin installs in one SGLang scheduler process (one TP/PP rank), through SGLang's hooks.

- `get_model_loader`: SGLang's loader becomes the normal load of a sharedcache Instance (loader.py).
- `ModelRunner.load_model`: take this device's sizing turn and re-measure SGLang's pre-load baseline:
  an owner before it loads, an attacher once the core waited for its owner to settle and it attached
  (attaching allocates nothing), so the KV pool is sized from memory actually free once the owner
  finished allocating, whatever the start order.
- `Scheduler.init_model_worker`: once the KV pool and CUDA graphs exist, an owner marks its entry
  settled, the sizing turn is released, and the rank's report is written.
- `WeightUpdater.update_weights_from_{disk,tensor,distributed,ipc}`: refused while this rank's weights are
  shared (they write in place, into memory other servers map).

With several ranks, the ranks agree after loading that all share or none does (`agree_across_ranks`),
and a rank that sharedcache refuses (a SharedCacheError) writes `failed-<rank>.json` for the launcher,
which stops the whole server with that reason; any other failure is SGLang's to report.

Why re-measure: SGLang gives its KV pool `free after loading - baseline x (1 - mem_fraction_static)`
with the baseline measured before loading. A decode that waits for its prefill measured its baseline
before the prefill allocated anything, so everything the prefill allocates during the wait is taken
from the decode's pool (or fails it: "Loaded weights leave no GPU memory for the KV cache").
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sharedcache import ConfigError, ExitCode, Mode, SharedCacheError
from sharedcache.kit import SizingTurn, device_id, entry_key, rank_key, rank_suffix, resolve_device, write_json_atomic

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
    hooks: dict[str, Any] = field(default_factory=dict)  # {SGLang target: hook} registered in this process

    @property
    def key(self) -> str:
        return rank_key(self.config.settings.key, **_rank(self.ranks))

    @property
    def owns(self) -> bool:
        """Did this rank publish its model's arena (and own the entry)?"""
        report = getattr(self.instance, "report", None)
        return report is not None and report.owns

    @property
    def attached(self) -> bool:
        """Is this rank's model bound to an arena another server published?"""
        report = getattr(self.instance, "report", None)
        return report is not None and report.attached

    @property
    def shared(self) -> bool:
        """Is this rank's model the arena (owner) or bound to it (attached)?"""
        return self.owns or self.attached


STATE: RankState | None = None


def install(config: PluginConfig) -> None:
    global STATE
    STATE = RankState(config)
    STATE.hooks = hooks()
    compat.register_around(STATE.hooks)


def _around_get_model_loader(original, *args, **kwargs):
    from .loader import SharedCacheLoader

    inner = original(*args, **kwargs)
    if STATE.instance is not None:  # the model is loaded; a later call (a weight update, a draft) is SGLang's own
        return inner
    load_config = kwargs.get("load_config", args[0] if args else None)
    return SharedCacheLoader(inner, load_config, STATE)


def rank_tag(ranks: dict[str, int]) -> str:
    """This rank's name in its entry's key, its report files and messages: `tp<r>`, or `pp<p>-tp<r>` with
    pipeline parallelism."""
    return rank_suffix(**_rank(ranks))


def _rank(ranks: dict[str, int]) -> dict[str, int | None]:
    """This rank as the kit's rank keys take it: no pipeline rank without pipeline parallelism."""
    return {"tp_rank": ranks["tp_rank"], "pp_rank": ranks["pp_rank"] if ranks["pp_size"] > 1 else None}


def _around_runner_load_model(original, runner, *args, **kwargs):
    mode = STATE.config.role.mode
    if compat.is_draft_runner(runner) or STATE.ranks is not None or mode is Mode.OFF:
        return original(runner, *args, **kwargs)  # a draft model, a reload, or a role that shares nothing
    STATE.ranks = compat.ranks()
    path = getattr(getattr(runner, "model_config", None), "model_path", None)
    if STATE.config.key_from_model and path is not None:  # keyed now, so that the sizing line names the real key
        STATE.config = STATE.config.keyed(entry_key(str(path), "model"))
    try:
        return _load_and_size(original, runner, *args, **kwargs)
    except SharedCacheError as e:  # the launcher reads it and stops the whole server with this rank's reason
        _write_failure(e)
        raise


def _load_and_size(original, runner, *args, **kwargs):
    mode = STATE.config.role.mode
    missing = compat.unapplied_hooks(STATE.hooks)
    if missing:  # SGLang logs a hook it could not apply and goes on; sharing without them would misbehave
        raise ConfigError(f"SGLang did not apply the sharedcache hooks on {missing} (its log above says why).",
                          hint="Use a supported SGLang (integrations/sglang/compat.py), or unset SHAREDCACHE_SGLANG.")
    at_start = compat.baseline_gib(runner)
    if mode is Mode.SAVE:  # the owner measures in its turn, before it loads
        _size_from_now(runner, at_start)
        return original(runner, *args, **kwargs)
    # load, placeholder, auto: the core waits for the owner to publish and settle, then attaches (or falls
    # back, or an auto instance becomes the owner). Attaching allocates nothing, so free memory measured
    # afterwards is what this rank may size from; a rank that loaded weights keeps SGLang's own baseline.
    model = original(runner, *args, **kwargs)
    if STATE.attached:
        compat.set_weight_load_gib(runner, STATE.report["weight_bytes_allocated"] / 2**30)
        _size_from_now(runner, at_start)
    return model


def _size_from_now(runner, at_start: float) -> None:
    """Take this device's sizing turn (one rank, one device), then re-measure SGLang's pre-load baseline."""
    settings, role = STATE.config.settings, STATE.config.role.name
    turn_wait = 0.0
    if STATE.ranks["tp_size"] * STATE.ranks["pp_size"] == 1:
        # With several ranks a turn per device could deadlock two servers over the same GPUs (each
        # holding one of them); those servers size without turns.
        device = resolve_device(runner.device, index=runner.gpu_id)
        STATE.turn = SizingTurn(settings.dir, device_id(device))
        turn_wait = STATE.turn.acquire(timeout_s=settings.settle_timeout_s, role=role)
    now = compat.free_memory_gib(runner)
    compat.set_baseline_gib(runner, now)
    waited = (STATE.report or {}).get("wait_seconds", 0.0)
    STATE.sizing = {"baseline_gib_at_start": round(at_start, 3), "baseline_gib": round(now, 3), "sized_at": time.time(),
                    "turn_wait_seconds": round(turn_wait, 3)}
    log.info("sharedcache: %s sizes its memory from %.2f GiB free (%.2f GiB when the server started; waited %.1fs "
             "for the owner, %.1fs for the device's turn)", STATE.key, now, at_start, waited, turn_wait)


def _around_init_model_worker(original, scheduler, *args, **kwargs):
    try:
        result = original(scheduler, *args, **kwargs)
        if STATE.instance is not None and STATE.report is not None:
            if STATE.owns:
                STATE.instance.mark_settled()
            _write_report(scheduler)
        return result
    finally:
        if STATE.turn is not None:
            STATE.turn.release()


class RanksDisagree(SharedCacheError):
    """Some ranks of one server share their weights and others could not: refused on every rank."""

    component = "sharedcache.sglang"
    exit_code = ExitCode.RETRY


def agree_across_ranks(instance, state: RankState) -> None:
    """Every rank of a server shares, or none does. A rank that fell back to its own copy while the
    others attached would serve, but with less KV than its peers (SGLang sizes every rank's pool to the
    smallest) and a weight copy nobody asked for; that is a broken prefill to fix, not a server to run."""
    report = instance.report
    mine = {"rank": rank_tag(state.ranks), "shared": report.attached or report.owns,
            "why": report.fallback}
    outcomes = compat.gather_from_ranks(mine)
    problem = disagreement(outcomes)
    if problem is not None:
        instance.close()
        raise RanksDisagree(problem, hint="Every rank needs its entry: check them with `sharedcache ls`, restart the "
                                          "prefill (all of its ranks), then this server.")


def disagreement(outcomes: list[dict[str, Any]]) -> str | None:
    """None when the ranks' outcomes agree, else what differs, naming the ranks."""
    alone = [o for o in outcomes if not o["shared"]]
    if not alone or len(alone) == len(outcomes):
        return None
    shared = ", ".join(o["rank"] for o in outcomes if o["shared"])
    why = "; ".join(f"{o['rank']}: {o['why']}" for o in alone)
    return (f"ranks {shared} share their weights through the cache but {len(alone)} of {len(outcomes)} could not "
            f"({why}); a server shares on every rank or on none, so every rank refuses.")


def _refuse_weight_update(op: str):
    """An AROUND hook for one of SGLang's in-place weight updates: refused while the weights are shared."""

    def hook(original, updater, *args, **kwargs):
        if not STATE.shared:
            return original(updater, *args, **kwargs)
        return _refusal(op, logged=op not in compat.FAILURES_SGLANG_LOGS)

    return hook


def _refuse_scheduler_write(op: str):
    """An AROUND hook for a scheduler request that writes weights (the update session, the weights checker's
    writing actions): answered with SGLang's own failure reply while the weights are shared."""

    def hook(original, manager, recv_req, *args, **kwargs):
        action = getattr(recv_req, "action", None)
        if not STATE.shared or (op == "check_weights" and action not in compat.WRITING_CHECKS):
            return original(manager, recv_req, *args, **kwargs)
        return compat.refused_reply(op, _refusal(f"weights_checker {action!r}" if action else op)[1])

    return hook


def _keep_shared_weights(op: str):
    """An AROUND hook for releasing or resuming GPU memory by tag: on a sharing server the weights stay resident
    (other servers map them, and resuming would write the model's static state back into them); the other tags
    (KV cache, CUDA graphs) are released and resumed as asked."""

    def hook(original, manager, recv_req, *args, **kwargs):
        if not STATE.shared:
            return original(manager, recv_req, *args, **kwargs)
        named, rest = compat.drop_weights_tag(recv_req)
        if named:
            log.warning("[sharedcache] %s: the weights stay resident: this server shares the weights of cache entry "
                        "%r with other servers, which map them; the other memory tags are %s as asked.", op,
                        STATE.key, "released" if op.startswith("release") else "resumed")
        return original(manager, recv_req, *args, **kwargs) if rest else compat.done_reply(op)

    return hook


def _refusal(op: str, *, logged: bool = True) -> tuple[bool, str]:
    """The refusal's one line, logged here unless SGLang logs the failed update's message itself (`logged`)."""
    role = "owns" if STATE.owns else "is attached to"
    message = (f"[sharedcache] {op} refused: this server {role} the shared weights of cache "
               f"entry {STATE.key!r}, which other servers map; updating them in place would change their weights "
               f"too. Start a prefill with the new weights under another cache.key and restart the decodes on it.")
    if logged:
        log.error("%s", message)
    return False, message


def _write_report(scheduler) -> None:
    """The rank's report, written atomically once its pools exist; launch.py gathers the ranks'."""
    data = {**STATE.report, **STATE.sizing, "settled_at": time.time(),
            **compat.pool_sizes(scheduler)}
    report_dir = STATE.config.report_dir
    if report_dir is None:  # switched on by environment variables without SHAREDCACHE_REPORT_DIR
        log.info("sharedcache: %s ready: mode=%s backend=%s weights allocated=%s bytes, KV pool %s tokens",
                 STATE.key, data.get("mode"), data.get("backend"), data.get("weight_bytes_allocated"),
                 data.get("kv_pool_tokens"))
        return
    _write_rank_file("report", data)


def _write_failure(e: SharedCacheError) -> None:
    """Why this rank cannot serve, for the launcher (`failed-<rank>.json` beside the reports); without a
    report dir nobody reads it, and SGLang logs the error itself."""
    if STATE.config.report_dir is not None:
        _write_rank_file("failed", {**e.as_report(), "rank": rank_tag(STATE.ranks), "pid": os.getpid()})


def _write_rank_file(kind: str, data: dict[str, Any]) -> None:
    """`<kind>-<rank>.json` in the report dir, atomically. The server goes on either way: launch.py, waiting
    for the ranks' files, then says which one is missing."""
    report_dir = STATE.config.report_dir
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report_dir / f"{rank_key(kind, **_rank(STATE.ranks))}.json", data, indent=2, sort_keys=True)
    except OSError as e:
        log.warning("sharedcache: could not write %s's %s file into %s: %s", STATE.key, kind, report_dir, e)


def hooks() -> dict[str, Any]:
    """{SGLang target: AROUND hook} that install() registers."""
    return {compat.GET_MODEL_LOADER: _around_get_model_loader,
            compat.RUNNER_LOAD_MODEL: _around_runner_load_model,
            compat.SCHEDULER_INIT_MODEL_WORKER: _around_init_model_worker,
            **{target: _refuse_weight_update(op) for op, target in compat.weight_update_targets().items()},
            **{target: _refuse_scheduler_write(op) for op, target in compat.scheduler_write_targets().items()},
            **{target: _keep_shared_weights(op) for op, target in compat.memory_occupation_targets().items()}}
