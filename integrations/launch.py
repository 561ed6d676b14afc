"""Start one instance of a role:  sharedcache launch role=prefill | role=decode [overrides...]
(in a checkout also `python launch.py ...`, the same launcher with the same overrides; its runs go under
./outputs instead of the state directory, conf/config.yaml `runs`).

What it starts for a role is that role's declaration in conf/role/<name>.yaml (`launch.runs`, the
`launch.engines` it starts with, `hold`, `generate`; checked by launch_checks.role_launch), never its name.
engine=hf (default): the prefill (save) loads the model, publishes it and holds it until
SIGINT/SIGTERM; a decode (load) attaches zero-copy, generates greedily from `prompt` and
writes report.json into its Hydra run directory.
engine=sglang: starts an SGLang server for the role (the sharedcache plugin loads or attaches
the weights in each TP rank), writes the gathered report, serves until SIGINT/SIGTERM;
a role that runs `router` starts sglang-router's PD router in front of the prefill and decode servers.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sharedcache import CacheSettings, ConfigError, Interrupted, ReportUnwritable, Role, SharedCacheError
from sharedcache.kit import (TerminalProgress, conf_dir, core_role, literal, log_progress, prepare_device,
                             process_age, register_resolvers, role_of, write_report)
from sharedcache_integrations import launch_checks

log = logging.getLogger("sharedcache.launch")
register_resolvers()



INSTALLED_RUNS = "runs.root=${runs.installed}"  # conf/config.yaml: where an installed launcher's runs go


def from_checkout() -> bool:
    """Started as a checkout's launch.py (a script), not as the installed module."""
    return getattr(sys.modules["__main__"], "__spec__", None) is None


def invocation() -> list[str]:
    """How the user started this launcher, for the commands it prints: the console script (installed,
    `python -m sharedcache_integrations.launch`) or a checkout's launch.py."""
    if from_checkout():
        return ["python", "launch.py"]
    import shutil

    script = Path(sys.executable).with_name("sharedcache")  # this Python's console script, else the module
    return ["sharedcache", "launch"] if script.exists() or shutil.which("sharedcache") else \
        ["python", "-m", "sharedcache_integrations.launch"]


def command() -> list[str]:
    """argv that starts this launcher in a new process of this Python, installed or from a checkout."""
    return [sys.executable, "-m", "sharedcache_integrations.launch"]


def command_env() -> dict[str, str]:
    """The environment for `command()`: where `sharedcache_integrations` lives on PYTHONPATH, so that a
    checkout run without installing finds it from any working directory."""
    import sharedcache_integrations

    where = Path(sharedcache_integrations.__file__).resolve()
    root = where.parents[1] if where.name == "__init__.py" else where.parent
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_dir(model_cfg: dict[str, Any]) -> Path:
    if model_cfg["path"]:
        path = Path(model_cfg["path"]).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.path {path} is not a directory.", hint="Give a local Hugging Face model "
                              "directory, or leave model.path=null for the embedded default.")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path {path} has no config.json, so it is not a Hugging Face model "
                              "directory.", hint="Point it at the directory that holds config.json and the weights.")
        return path
    from sharedcache_integrations.hf.embedded import EmbeddedSpec, ensure_embedded_model

    emb = model_cfg["embedded"]
    return ensure_embedded_model(Path(emb["dir"]).expanduser(), EmbeddedSpec.from_mapping(emb["spec"]))


def run_hf(cfg: dict[str, Any], declared: launch_checks.RoleLaunch, role: Role, settings: CacheSettings,
           out: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from sharedcache_integrations import hf
    from sharedcache_integrations.hf.config import SPREADING

    path = model_dir(cfg["model"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a directory that is not a complete model: one line, not a traceback
        raise ConfigError(f"model.path {path} holds no usable tokenizer: {_first_line(e)}",
                          hint="Point model.path at a complete Hugging Face model directory.") from None
    engine = cfg["engine"]
    kwargs = {k: engine[k] for k in ("dtype", "device_map") if engine[k] is not None}
    spread = engine["device_map"] in SPREADING and torch.cuda.is_available()
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if spread else [engine["device_map"]]
    for device in devices:
        if str(device or "cpu").startswith("cuda"):
            # a server brings its CUDA contexts up at start; they are not part of loading or attaching
            torch.cuda.init()
            torch.empty(1, device=device)
            prepare_device(device)
    # a terminal gets one updating line; a log file (systemd, Kubernetes, launch.log) gets log lines
    hf.install(role=role, cache=settings, progress=PROGRESS)
    try:
        model = getattr(transformers, engine["auto_class"]).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # transformers' own refusal of the checkpoint (no weights, bad config)
        raise ConfigError(f"cannot load the model in {path}: {_first_line(e)}",
                          hint="Point model.path at a complete Hugging Face model directory.") from None
    finally:
        hf.uninstall()
    instance = hf.instance_of(model)
    report = instance.report
    report.extra.update(pid=os.getpid(), run_dir=str(out),
                        versions={"torch": torch.__version__, "transformers": transformers.__version__})
    if declared.generate:
        report.extra.update(_generate(cfg, model, tokenizer))
    write_report(out / cfg["report_file"], report.to_json())
    print(report.summary())
    if "generated" in report.extra:
        print(f"  generated: {report.extra['generated']!r}  (tokens {report.extra['generated_tokens']})")
    print(f"  report: {out / cfg['report_file']}", flush=True)
    if declared.hold and report.owns:
        _hold(instance, settings)
    return report.to_json()


def _generate(cfg: dict[str, Any], model, tokenizer) -> dict[str, Any]:
    """Greedy generation from `prompt`: the logits digest and tokens are what parity checks compare."""
    import torch

    inputs = tokenizer(cfg["prompt"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits
        first_token_age = process_age()
        tokens = model.generate(**inputs, max_new_tokens=cfg["max_new_tokens"],
                                min_new_tokens=cfg["min_new_tokens"], do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    new = tokens[0, inputs["input_ids"].shape[1]:]
    return {
        "generated": tokenizer.decode(new, skip_special_tokens=True),
        "generated_tokens": new.tolist(),
        "logits_sha256": hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest(),
        "prompt": cfg["prompt"],
        "process_to_first_token_seconds": round(first_token_age, 3),
    }


def attach_command(settings: CacheSettings) -> str:
    """The decode's command line: this run's own overrides (model, engine: what the fingerprint depends on)
    with role=decode and the entry's cache.dir and cache.key, quoted for a shell; not where this run's
    directory went (the decode's goes where its launcher puts runs)."""
    own = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").split("=", 1)[0]
           .startswith(("role", "cache.dir", "cache.key", "runs.", "hydra.run.", "hydra.sweep."))]  # runs: its own
    args = [*invocation(), "role=decode", *own, literal("cache.dir", settings.dir), f"cache.key={settings.key}"]
    return " ".join(shlex.quote(a) for a in args)


def _hold(instance, settings: CacheSettings) -> None:
    """Own the weights until SIGINT/SIGTERM, then unpublish; attached instances keep working."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"published cache key {settings.key!r} in {settings.dir}. Attach with:\n"
          f"  {attach_command(settings)}\n"
          f"holding the weights (pid {os.getpid()}); stop with Ctrl-C or SIGTERM.", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:  # a multirun's next job gets the handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    instance.close()
    others = [p["key"] for p in instance.report.parts[1:]]
    parts = f" and its other parts {others}" if others else ""
    print(f"removed entry {settings.key!r}{parts}; attached instances keep their mapping.", flush=True)


def run_sglang(cfg: dict[str, Any], declared: launch_checks.RoleLaunch, role: Role, out: Path) -> None:
    """Start SGLang (or its PD router) for the role, gather the ranks' reports, serve until SIGTERM."""
    from sharedcache_integrations.sglang import server as sgl

    if declared.runs == "router":
        plan = sgl.plan_router(cfg)
    else:
        plan = sgl.plan_server(cfg, model_dir(cfg["model"]), core_role(cfg), out)
    if cfg["engine"]["dry_run"]:  # one line to paste into a shell (or a container's command)
        assignments = [f"{k}={v}" for k, v in plan.env.items() if v != ""]  # unset switches: left out
        print(" ".join(shlex.quote(a) for a in [*assignments, *plan.argv]))
        return
    stop, stopped_by = threading.Event(), []

    def on_signal(signum, _frame) -> None:
        stopped_by.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        server = sgl.Server(plan)
        reports = server.wait_ready(cfg["engine"]["ready_timeout_s"], stop)
        if reports is None:  # Ctrl-C or SIGTERM while it started: the whole server goes, and one line says so
            server.stop()
            raise Interrupted(stopped_by[0], "the SGLang server was starting; stopped it (an owner's ranks "
                                             "unpublish what they had published).")
        report = sgl.gather(reports)
        report.update(role=role.name, engine="sglang", launcher_pid=os.getpid(), server_pid=server.proc.pid,
                      url=plan.url, pd_mode=plan.pd_mode, run_dir=str(out))
        if declared.generate and plan.url and not plan.pd_mode:  # PD servers answer through the router
            report.update(server.generate(cfg["prompt"], cfg["max_new_tokens"]))
        write_report(out / cfg["report_file"], report)
        print(f"[launch] {role.name}: SGLang serving at {plan.url or 'the router port'} (pid {server.proc.pid}); "
              f"report: {out / cfg['report_file']}. Stop with Ctrl-C or SIGTERM.", flush=True)
        while not stop.wait(0.5):
            if server.proc.poll() is not None:
                raise sgl.ServerFailed(f"the SGLang server exited with code {server.proc.returncode}.")
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():  # a multirun's next job gets the handlers back
            signal.signal(sig, handler)


def _write_failure(path: Path, e: SharedCacheError) -> None:
    """A failed run's report says why, for whoever reads run directories (scripts, dashboards)."""
    try:
        write_report(path, {**e.as_report(), "pid": os.getpid()})
    except ReportUnwritable as err:
        log.warning("could not write %s: %s", path, err)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is: it unwinds as Ctrl-C does (no core step takes it for a failed load)."""


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM before the prefill starts holding: exit through Python, so the owner's
    finalizers unpublish whatever it already made."""
    raise Terminated()


# one updating line on a terminal; log lines otherwise (a file, a pipe)
PROGRESS = TerminalProgress() if sys.stderr.isatty() else log_progress


def main() -> None:
    """The launcher. The command line's overrides are composed once first: what Hydra would refuse with its own
    multi-line error and exit 1 (a misspelt key or option) is one line naming the closest, exit 2."""
    if not from_checkout():  # the installed launcher: runs under conf's runs.installed unless told otherwise
        sys.argv.insert(1, INSTALLED_RUNS)
    refusal = launch_checks.override_refusal(sys.argv[1:], " ".join(invocation()))
    if refusal is not None:
        print(refusal, file=sys.stderr)
        sys.exit(refusal.exit_code)
    _run()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _run(dcfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cfg = OmegaConf.to_container(dcfg, resolve=True)
    if cfg["engine"].get("cuda_alloc_conf"):
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cfg["engine"]["cuda_alloc_conf"])
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        # all checked before anything loads: a wrong value, role or cache config costs nothing
        launch_checks.check(cfg, list(HydraConfig.get().overrides.task), " ".join(invocation()))
        role = role_of(cfg)
        settings = CacheSettings.from_mapping(cfg["cache"])
        declared = launch_checks.role_launch(cfg)
        declared.check_engine(cfg["engine"]["name"])  # one the role does not start with: the role's own line
        if cfg["engine"]["name"] == "sglang" and declared.runs == "hold":
            from sharedcache_integrations.sglang.holder import run_holder

            run_holder(cfg, settings, out)
        elif cfg["engine"]["name"] == "sglang":
            run_sglang(cfg, declared, role, out)
        elif cfg["engine"]["name"] == "hf":
            run_hf(cfg, declared, role, settings, out)
    except SharedCacheError as e:
        _fail(e, out / cfg["report_file"])
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while loading or waiting: one line, not a traceback
        _fail(Interrupted(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT), out / cfg["report_file"])


def _fail(e: SharedCacheError, report: Path) -> None:
    """One line (after any progress line is ended), the failure's report, its exit code."""
    if isinstance(PROGRESS, TerminalProgress):
        PROGRESS.close()
    log.error("%s", e)  # Hydra's logging shows it on the console and keeps it in the run dir's log
    if not isinstance(e, ReportUnwritable):
        _write_failure(report, e)
    sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
