"""Checks of the launcher's composed config, before anything loads.

The values live in conf/; this module only says what each may be, so that a wrong type, an unknown key
or an impossible combination (CUDA on a machine without it, an engine whose package is missing) fails at
start with one line naming the key and the fix, instead of a traceback after a model attached. The cache
and role groups are checked by the core's own constructors (CacheSettings, Role); what a role does at launch
(its `hold`, `generate` and `launch` keys, which the core does not read) is checked here (`role_launch`).
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Callable

from sharedcache import ConfigError
from sharedcache.kit import check_backend
from sharedcache_integrations.hf.config import SPREADING

# Mappings that take keys of the user's choosing (`+engine.extra_args.attention_backend=triton`).
OPEN_MAPPINGS = ("engine.extra_args.", "engine.env.", "engine.router.extra_args.", "hydra.")
HF_DTYPES = ("auto", "float32", "float16", "bfloat16")
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# What launch.py can start for a role (role.launch.runs), and on which engines it can start it.
RUNS = {"model": ("hf", "sglang"), "router": ("sglang",), "hold": ("hf", "sglang")}
LAUNCH_KEYS = ("runs", "engines", "refusal")


@dataclass(frozen=True)
class RoleLaunch:
    """What launch.py does with the composed role, as conf/role/<name>.yaml declares it."""

    name: str
    runs: str  # model: the engine loads or attaches the model; router: sglang-router's PD router, no model;
    # hold: the weights kept resident with nothing serving (hf: loaded and published by this process; sglang:
    # the arenas an SGLang owner's ranks published, mapped and kept, sharedcache.holding)
    engines: tuple[str, ...]  # the engines it starts with
    hold: bool  # an instance that published the weights keeps them until SIGINT/SIGTERM (engine=hf)
    generate: bool  # greedy generation from `prompt` once the model is there
    refusal: tuple[str, str] | None  # (message after "role=<name> ", hint) for any other engine

    def check_engine(self, engine: str) -> None:
        """Raise the role's own refusal when `engine` is not one it starts with."""
        if engine not in self.engines:
            message, hint = self.refusal
            raise ConfigError(f"role={self.name} {message}", hint=hint)


def check(cfg: dict[str, Any], overrides: list[str], launcher: str = "sharedcache launch") -> None:
    """Raise ConfigError naming the first key that cannot work (`launcher`: the command the user ran, for hints)."""
    _no_new_keys(overrides, launcher)
    _integer("max_new_tokens", cfg["max_new_tokens"], minimum=1, example=16)
    _integer("min_new_tokens", cfg["min_new_tokens"], minimum=0, example=0)
    if not isinstance(cfg["prompt"], str):
        _fail("prompt", cfg["prompt"], "a string", 'prompt="Shared weights, one copy:"')
    ENGINE_CHECKS.get(cfg["engine"]["name"], _unknown_engine)(cfg["engine"])
    role_launch(cfg)
    if cfg["role"]["mode"] != "off":  # a role that shares: its backend must hold the engine's tensors here
        check_backend(cfg["cache"]["backend"], engine_device_type(cfg["engine"]))


def override_refusal(argv: list[str], launcher: str) -> ConfigError | None:
    """The command line's overrides composed as Hydra will compose them; what it refuses, re-worded as one line
    naming the closest key or option. None when they compose, or when a flag (--help, --cfg, -m ...) asks Hydra
    for something else, which Hydra answers itself."""
    if any(a.startswith("-") for a in argv):
        return None
    from sharedcache.kit import compose

    try:
        compose(argv)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors have no common base worth naming
        return _reworded(str(e), argv, launcher)
    return None


def _reworded(error: str, argv: list[str], launcher: str) -> ConfigError:
    import difflib

    from sharedcache.kit import compose

    first = error.strip().splitlines()[0] if error.strip() else "it does not compose"
    key = re.search(r"Could not override '([^']+)'", error)
    if key:
        known = sorted(_dotted(compose([a for a in argv if "/" not in a.split("=")[0] and _selects_group(a)])))
        near = difflib.get_close_matches(key[1], known, n=1, cutoff=0.6)
        return ConfigError(f"{key[1]!r} is not a key of the config" + (f"; did you mean {near[0]!r}?" if near else "."),
                           hint=f"`{launcher} --cfg job` prints every key; only engine.extra_args.* and "
                                "engine.env.* take new ones (with a leading '+').")
    group = re.search(r"Could not find '([^'/]+)/([^']+)'", error)
    if group:
        options = re.findall(r"^\t(\S+)$", error, flags=re.M)
        near = difflib.get_close_matches(group[2], options, n=1, cutoff=0.5)
        return ConfigError(f"{group[1]}={group[2]} is not an option of {group[1]}" +
                           (f"; did you mean {group[1]}={near[0]}?" if near else ".") +
                           (f" It is one of {', '.join(options)}." if options else ""))
    return ConfigError(f"the overrides do not compose: {first}",
                       hint="Quote a value holding ',' or '=' (key='a,b'), or check the key's spelling.")


def _selects_group(arg: str) -> bool:
    """`engine=sglang`, `role=decode`: an override choosing a config group's option (it changes which keys exist)."""
    key, _, value = arg.partition("=")
    return "." not in key and not key.startswith(("+", "~")) and bool(value)


def _dotted(tree: Any, prefix: str = "") -> list[str]:
    """Every key of a composed config, dotted (`cache.wait_timeout_s`), tables included."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for name, sub in tree.items():
            out += _dotted(sub, f"{prefix}.{name}" if prefix else str(name))
    return out


def engine_device_type(engine: dict[str, Any]) -> str | None:
    """The device type the engine's weights will live on, as far as the config says (None: spread over what
    the machine has, decided at load)."""
    if engine["name"] == "hf":
        device = engine["device_map"]
        if device is None:
            return "cpu"
        return None if device in SPREADING else device.partition(":")[0]
    return engine.get("device") or "cuda"  # sglang: null is SGLang's default device, CUDA


def role_launch(cfg: dict[str, Any]) -> RoleLaunch:
    """The composed role's launch declarations (`hold`, `generate`, `launch`), each value checked."""
    role = cfg["role"]
    launch = role.get("launch")
    if not isinstance(launch, dict):
        raise ConfigError(f"role {role['name']!r} declares no launch block, so launch.py cannot tell what to start "
                          f"for it (role.launch={launch!r}).",
                          hint=f"Add one to conf/role/{role['name']}.yaml as the packaged roles have it, e.g. "
                               "launch: {runs: model, engines: [hf, sglang], refusal: null}.")
    if sorted(launch) != sorted(LAUNCH_KEYS):
        _fail("role.launch", sorted(launch), f"a block with the keys {', '.join(LAUNCH_KEYS)}",
              "launch: {runs: model, engines: [hf, sglang], refusal: null}")
    for key in ("hold", "generate"):
        if not isinstance(role.get(key), bool):
            _fail(f"role.{key}", role.get(key), "true or false", f"role.{key}=false")
    if launch["runs"] not in RUNS:
        _fail("role.launch.runs", launch["runs"], "model (the engine loads or attaches the model), router "
              "(sglang-router's PD router, no model) or hold (the weights kept resident, nothing serving)",
              "role.launch.runs=model")
    engines = launch["engines"]
    allowed = RUNS[launch["runs"]]
    if not isinstance(engines, list) or not engines or not all(e in allowed for e in engines):
        _fail("role.launch.engines", engines, f"a list of the engines that can start runs={launch['runs']} "
              f"({', '.join(allowed)})", f"role.launch.engines=[{','.join(allowed)}]")
    return RoleLaunch(role["name"], launch["runs"], tuple(engines), role["hold"], role["generate"],
                      _refusal(launch["refusal"], every=set(engines) >= set(ENGINE_CHECKS)))


def _refusal(refusal: Any, *, every: bool) -> tuple[str, str] | None:
    """role.launch.refusal: null for a role every engine starts, else {message, hint}."""
    if refusal is None and every:
        return None
    if not isinstance(refusal, dict) or sorted(refusal) != ["hint", "message"] or \
            not all(isinstance(v, str) and v for v in refusal.values()):
        _fail("role.launch.refusal", refusal, "{message, hint}: why another engine is refused (after "
              "'role=<name> ') and what to do instead" + ("" if every else ", since role.launch.engines leaves "
                                                          "an engine out"),
              'role.launch.refusal={message:"needs engine=sglang.",hint:"Add engine=sglang."}')
    return refusal["message"], refusal["hint"]


def _no_new_keys(overrides: list[str], launcher: str) -> None:
    """`+key=value` adds a key Hydra would otherwise reject; nothing reads it, so it is a typo."""
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if not key.startswith(OPEN_MAPPINGS) and "/" not in key:  # `+group/option=...` adds a config group
            raise ConfigError(f"{override!r} adds the key {key!r}, which nothing reads.",
                              hint=f"Check its spelling against `{launcher} --cfg job` and set it without the "
                                   "'+'; only engine.extra_args.*, engine.env.* and engine.router.extra_args.* "
                                   "take new keys.")


def _check_hf(engine: dict[str, Any]) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("engine=hf needs transformers, which is not installed in this Python.",
                          hint="pip install 'sharedcache[hf]' (or pip install -e '.[hf]' in a checkout).")
    if engine["dtype"] is not None:  # null: from_pretrained's own default
        _choice("engine.dtype", engine["dtype"], HF_DTYPES)
    device = engine["device_map"]
    if device is None:
        return
    if isinstance(device, str) and device in SPREADING:  # over the GPUs there are (the CPU where there are none)
        return
    if not isinstance(device, str) or not DEVICE.match(device):
        _fail("engine.device_map", device, "null (CPU), cpu, cuda or cuda:N (one device), or auto, balanced, "
              "balanced_low_0 or sequential (spread over GPUs; offload is not shared)", "engine.device_map=cuda:0")
    if device.startswith("cuda"):
        _cuda_device("engine.device_map", device)


def _check_sglang(engine: dict[str, Any]) -> None:
    _integer("engine.tp_size", engine["tp_size"], minimum=1, example=1)
    _choice("engine.dtype", engine["dtype"], SGLANG_DTYPES)
    for table, example in (("mem_fraction_static", "0.4"), ("port", "30001"), ("base_gpu_id", "0")):
        if not isinstance(engine[table], dict):  # a per-role table replaced by one value
            _fail(f"engine.{table}", engine[table], "a table by role", f"engine.{table}.decode={example}")
    for role, value in engine["mem_fraction_static"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            _fail(f"engine.mem_fraction_static.{role}", value, "a fraction between 0 and 1",
                  f"engine.mem_fraction_static.{role}=0.4")
    for role, port in engine["port"].items():
        _integer(f"engine.port.{role}", port, minimum=1, maximum=65535, example=30000)


def _unknown_engine(engine: dict[str, Any]) -> None:
    raise ConfigError(f"unknown engine {engine['name']!r}.", hint="Use engine=hf or engine=sglang.")


ENGINE_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"hf": _check_hf, "sglang": _check_sglang}


def _cuda_device(key: str, device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        _fail(key, device, "a device this machine has: it has no usable CUDA GPU", f"{key}=null (CPU)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        _fail(key, device, f"a device this machine has (cuda:0 to cuda:{torch.cuda.device_count() - 1})",
              f"{key}=cuda:0")


def _integer(key: str, value: Any, *, minimum: int, example: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum else f"at least {minimum}"
        _fail(key, value, f"an integer {bound}", f"{key}={example}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"one of {', '.join(choices)}", f"{key}={choices[-1]}")


def _fail(key: str, value: Any, expected: str, example: str) -> None:
    raise ConfigError(f"{key}={value!r} cannot work: it must be {expected}.", hint=f"For example: {example}")
