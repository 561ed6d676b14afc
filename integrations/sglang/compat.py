"""Every SGLang internal the plugin touches, in one place, for the supported range of versions.

SGLang has no stable loader API, so each private name the plugin needs is reached through a function
here, with the version that introduced a difference named next to its fallback. A version outside
SUPPORTED fails at registration (one line) instead of somewhere deep in a scheduler process.

Run: 0.5.17 on a GPU (H100, CUDA graphs on) and on SGLang's CPU engine; 0.5.23 on the CPU engine (CI).
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Any, Iterator, Mapping

SUPPORTED = ("0.5.17", "0.5.23")  # inclusive: oldest and newest release the plugin was run against

# Hook targets (dotted paths for SGLang's HookRegistry); identical across the supported range.
GET_MODEL_LOADER = "sglang.srt.model_loader.loader.get_model_loader"
RUNNER_LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
SCHEDULER_INIT_MODEL_WORKER = "sglang.srt.managers.scheduler.Scheduler.init_model_worker"
_UPDATER = "sglang.srt.model_executor.model_runner_components.weight_updater"
# In-place weight updates, each returning (success, message). 0.5.23 replaced
# update_weights_from_distributed with load_weights_from_distributed (the scheduler brackets it).
_WEIGHT_UPDATES = ("update_weights_from_disk", "update_weights_from_tensor", "update_weights_from_ipc",
                   "update_weights_from_distributed", "load_weights_from_distributed")
# the updates whose failure SGLang's scheduler logs with the message itself (0.5.17 and 0.5.23): a refusal of
# these is not logged a second time; 0.5.23's load_weights_from_distributed fails without a line of its own
FAILURES_SGLANG_LOGS = ("update_weights_from_disk", "update_weights_from_tensor", "update_weights_from_ipc",
                        "update_weights_from_distributed")


# Requests the scheduler answers itself that write weights in place: the update session (0.5.23's begin/end,
# which repack quantized weights) and the weights checker's writing actions (check_weights carries the action).
_SCHEDULER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
_SCHEDULER_WRITES = {"begin_weight_update": "BeginWeightUpdateReqOutput",
                     "end_weight_update": "EndWeightUpdateReqOutput", "check_weights": "CheckWeightsReqOutput"}
WRITING_CHECKS = ("reset_tensors",)  # /weights_checker actions that write; snapshot, compare, checksum only read


def scheduler_write_targets() -> dict[str, str]:
    """{request: hook target} for the scheduler's requests that can write weights, as this SGLang has them."""
    return _manager_targets(_SCHEDULER_WRITES)


def _manager_targets(ops) -> dict[str, str]:
    """{request: hook target} for those of `ops` that this SGLang's scheduler weight manager handles."""
    import importlib

    module, _, cls = _SCHEDULER.rpartition(".")
    manager = getattr(importlib.import_module(module), cls)
    return {op: f"{_SCHEDULER}.{op}" for op in ops if hasattr(manager, op)}


# Requests that release and resume the server's GPU memory by tag (RL frameworks): the "weights" tag would
# re-import the model's static state into the shared tensors on resume (an in-place write); the other tags do not
# touch weights
MEMORY_OCCUPATION = {"release_memory_occupation": "ReleaseMemoryOccupationReqOutput",
                     "resume_memory_occupation": "ResumeMemoryOccupationReqOutput"}


def memory_occupation_targets() -> dict[str, str]:
    """{request: hook target} for the memory release/resume requests this SGLang has."""
    return _manager_targets(MEMORY_OCCUPATION)


def drop_weights_tag(recv_req: Any) -> tuple[bool, bool]:
    """Take the weights tag out of a release/resume request, in place (no tags means every tag).
    Returns (the request named the weights, any other tag is left to do)."""
    from sglang.srt.constants import GPU_MEMORY_ALL_TYPES, GPU_MEMORY_TYPE_WEIGHTS

    tags = list(recv_req.tags or GPU_MEMORY_ALL_TYPES)
    if GPU_MEMORY_TYPE_WEIGHTS not in tags:
        return False, True
    recv_req.tags = [t for t in tags if t != GPU_MEMORY_TYPE_WEIGHTS]  # never empty below: [] means every tag
    return True, bool(recv_req.tags)


def done_reply(op: str) -> Any:
    """SGLang's answer to a release/resume request (it carries no fields)."""
    from sglang.srt.managers import io_struct

    return getattr(io_struct, MEMORY_OCCUPATION[op])()


def refused_reply(op: str, message: str) -> Any:
    """SGLang's own answer object for a scheduler request `op`, refused with `message` (HTTP 400)."""
    from sglang.srt.managers import io_struct

    return getattr(io_struct, _SCHEDULER_WRITES[op])(success=False, message=message)


# SGLang's tensor dumper (sglang.srt.debug_utils.dumper, the same in 0.5.17 and 0.5.23) reads DUMPER_<FIELD>
# variables at start. Dumping only reads; these settings can write into the model (each with why).
_DUMPER_RISKS = {
    "DUMPER_SERVER_PORT": "its control port (or /dumper/{method} with 'reuse') takes a filter that every scheduler "
                          "evaluates as Python, so any client can run code beside the weights",
    "DUMPER_GRAFTER_ENABLE": "its grafter copies tensors received from another run into the model's tensors",
    "DUMPER_SOURCE_PATCHER_CONFIG": "its source patcher rewrites model code",
}


def dumper_writes(environ: Mapping[str, str]) -> dict[str, str]:
    """{`NAME=value`: why} for the DUMPER_* settings with which SGLang's dumper could write into the model; empty
    when it is off or only writes dumps. Parsed as the dumper parses them (an unparsable port, which SGLang would
    fail on, counts as set)."""
    found = {}
    for name, why in _DUMPER_RISKS.items():
        raw = environ.get(name)
        if raw is not None and raw.strip() and _dumper_setting_on(name, raw):
            found[f"{name}={raw[:200]}"] = why
    return found


def _dumper_setting_on(name: str, raw: str) -> bool:
    if name == "DUMPER_GRAFTER_ENABLE":  # a bool field: SGLang takes these two, unstripped, as true
        return raw.lower() in ("true", "1")
    if name == "DUMPER_SERVER_PORT" and raw != "reuse":  # server_port_parsed: "reuse", or int(raw) > 0
        try:
            return int(raw) > 0
        except ValueError:
            return True
    return True


def weight_update_targets() -> dict[str, str]:
    """{operation: hook target} for the in-place weight updates this SGLang has."""
    import importlib

    updater = importlib.import_module(_UPDATER).WeightUpdater
    return {op: f"{_UPDATER}.WeightUpdater.{op}" for op in _WEIGHT_UPDATES if hasattr(updater, op)}


def register_around(hooks: dict[str, Any]) -> None:
    """Register {target: hook} as AROUND hooks; SGLang applies them when its plugins are loaded."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook in hooks.items():
        HookRegistry.register(target, hook, HookType.AROUND)


def unapplied_hooks(targets) -> list[str]:
    """Targets SGLang failed to patch (it logs the failure and goes on)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return sorted(t for t in targets if t not in HookRegistry._patched)


def _release(version: str) -> tuple[int, ...]:
    """'0.5.23', '0.5.23.post1', '0.5.18rc0' -> (0, 5, 23); pre-releases count as their release."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(version)
    return tuple(int(x) for x in m.groups())


def installed_version() -> str | None:
    """The installed sglang's version from its metadata (imports nothing of sglang)."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def unsupported_reason(version: str | None) -> str | None:
    """None when `version` is inside SUPPORTED, else the one-line reason."""
    lo, hi = SUPPORTED
    if version is None:
        return "sglang is not installed in this Python environment"
    try:
        inside = _release(lo) <= _release(version) <= _release(hi)
    except ValueError:
        inside = False
    if inside:
        return None
    return f"SGLang {version} is outside the range the sharedcache plugin supports ({lo} to {hi})"


# ---------------------------------------------------------------- model loader internals

def loader_classes() -> tuple[type, type]:
    """(BaseModelLoader, DefaultModelLoader)."""
    from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader

    return BaseModelLoader, DefaultModelLoader


def inner_preloaded_bytes(loader: Any) -> int:
    """What the inner loader reports as weight memory already resident before SGLang's pre-load
    measurement. 0.5.23 added `BaseModelLoader.preloaded_weights_bytes`; before it, nothing is read."""
    return int(getattr(loader, "preloaded_weights_bytes", 0))


def build_model(model_config: Any, load_config: Any) -> Any:
    """The model as SGLang's DefaultModelLoader constructs it, before weights (call under a device
    context): quantization config resolved, model class initialised."""
    from sglang.srt.model_loader.loader import _get_quantization_config, _initialize_model

    quant = _get_quantization_config(model_config, load_config)
    return _initialize_model(model_config, load_config, quant)


def default_dtype(dtype: Any):
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    return set_default_torch_dtype(dtype)


def model_class(model_config: Any) -> type:
    from sglang.srt.model_loader.utils import get_model_architecture

    return get_model_architecture(model_config)[0]


def modules_with_quant_method(model: Any) -> Iterator[tuple[Any, Any]]:
    """(module, quant_method) pairs whose post-processing SGLang runs after loading.
    0.5.23 has `_modules_with_quant_method`, which skips LoRA wrappers (they forward quant_method
    but own no packed params); 0.5.17 loops over named_modules inline, without that skip."""
    from sglang.srt.model_loader import loader

    helper = getattr(loader, "_modules_with_quant_method", None)
    if helper is not None:
        yield from helper(model)
        return
    for _, module in model.named_modules():  # 0.5.17
        method = getattr(module, "quant_method", None)
        if method is not None:
            yield module, method


# ---------------------------------------------------------------- process and parallel state

def ranks() -> dict[str, int]:
    """This process's TP rank and size, PP rank and size."""
    from sglang.srt.distributed.parallel_state import (get_pipeline_model_parallel_rank,
                                                      get_pipeline_model_parallel_world_size,
                                                      get_tensor_model_parallel_rank,
                                                      get_tensor_model_parallel_world_size)

    return {"tp_rank": get_tensor_model_parallel_rank(), "tp_size": get_tensor_model_parallel_world_size(),
            "pp_rank": get_pipeline_model_parallel_rank(), "pp_size": get_pipeline_model_parallel_world_size()}


def gather_from_ranks(obj: Any) -> list[Any]:
    """`obj` from every model-loading rank of this server (TP x PP), in rank order, over SGLang's CPU
    (gloo) world group; [obj] when the server has one rank."""
    import torch.distributed as dist
    from sglang.srt.distributed.parallel_state import get_world_group

    group = get_world_group()
    if group.world_size == 1:
        return [obj]
    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj, group=group.cpu_group)
    return out


def layout_options() -> dict[str, str]:
    """Server options that change the post-processed bytes or their split without changing the model
    config: MoE runner backend (weights shuffled for it) and the expert/attention parallel widths."""
    from sglang.srt.runtime_context import get_parallel

    out: dict[str, str] = {}
    try:
        from sglang.srt.layers.moe.utils import get_moe_runner_backend

        out["moe_runner_backend"] = str(get_moe_runner_backend())
    except Exception as e:  # noqa: BLE001 - not initialised for dense models in some versions: record why
        out["moe_runner_backend"] = f"unavailable: {type(e).__name__}"
    parallel = get_parallel()
    for name in ("moe_ep_size", "moe_dp_size", "attn_dp_size", "attn_cp_size"):
        try:
            out[name] = str(getattr(parallel, name))
        except Exception as e:  # noqa: BLE001 - a width this SGLang version does not publish
            out[name] = f"unavailable: {type(e).__name__}"
    return out


# ---------------------------------------------------------------- the model runner's memory accounting

def is_draft_runner(runner: Any) -> bool:
    return bool(getattr(runner, "is_draft_worker", False))


def free_memory_gib(runner: Any) -> float:
    """Free device memory as SGLang measures it for its pre-load baseline (GiB; the minimum over the
    world's ranks when there are several, so every rank calls it together)."""
    from sglang.srt.distributed.parallel_state import get_world_group
    from sglang.srt.utils.common import get_available_gpu_memory

    world = get_world_group()
    return get_available_gpu_memory(runner.device, runner.gpu_id, distributed=world.world_size > 1,
                                    cpu_group=world.cpu_group)


def baseline_gib(runner: Any) -> float:
    return float(runner.pre_model_load_memory)


def set_weight_load_gib(runner: Any, gib: float) -> None:
    """What SGLang reports as this rank's weight memory (server info, load metrics)."""
    runner.weight_load_mem_usage = gib


def set_baseline_gib(runner: Any, gib: float) -> None:
    """SGLang sizes the KV pool as free memory after loading less baseline x (1 - mem_fraction_static)
    (both versions; 0.5.23 first adds `preloaded_weights_bytes` to the baseline)."""
    runner.pre_model_load_memory = gib


def pool_sizes(scheduler: Any) -> dict[str, int | None]:
    """What the scheduler sized once its model worker is up: KV pool tokens, max running requests."""
    return {"kv_pool_tokens": getattr(scheduler, "max_total_num_tokens", None),
            "max_running_requests": getattr(scheduler, "max_running_requests", None)}
