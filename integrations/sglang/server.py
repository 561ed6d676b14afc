"""Starting SGLang by role from the composed config (used by `launch.py engine=sglang`).

Builds the `sglang.launch_server` (or sglang-router) command line and environment, waits for the
server's ranks to report through the plugin, and gathers their reports. Imports no SGLang: the
server runs in its own processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharedcache import ConfigError, SharedCacheError
from sharedcache.kit import split_rank_key

from . import ENV, KEY_ENV, DIR_ENV, OVERRIDES_ENV, REPORT_ENV, ROLE_ENV, plugin_env

SWITCHES = (ENV, ROLE_ENV, KEY_ENV, DIR_ENV, OVERRIDES_ENV, REPORT_ENV)
# engine.disaggregation.mooncake_protocol -> the environment SGLang's mooncake backend and Mooncake read.
# nvlink_intra: MC_INTRANODE_NVLINK makes Mooncake install its CUDA IPC transport (without it Mooncake logs "Using TCP
# transport (no HCA detected)" and quietly moves the KV over loopback TCP, as it did in a run on an H200), and SGLang's
# INTRA_NODE_NVLINK switch keeps the first token's metadata on the GPU, where that transport reads it.
MOONCAKE_PROTOCOLS = {
    "nvlink_intra": {"MC_INTRANODE_NVLINK": "true", "SGLANG_MOONCAKE_CUSTOM_MEM_POOL": "INTRA_NODE_NVLINK"},
}

ROOT = Path(__file__).resolve().parents[2]


class ServerFailed(SharedCacheError):
    """The SGLang server exited or did not come up."""


@dataclass
class ServerPlan:
    argv: list[str]
    env: dict[str, str]  # only what launch.py adds to its own environment
    url: str | None  # the HTTP endpoint once it is up (None for the router)
    report_dir: Path | None
    ranks: int  # model-loading processes that report (TP x PP)
    pd_mode: str | None


def _per_role(engine: dict[str, Any], key: str, role: str) -> Any:
    table = engine[key]
    if role not in table:
        raise ConfigError(f"engine.{key} has no entry for role {role!r} (it has {sorted(table)}).",
                          hint=f"Add one: engine.{key}.{role}=VALUE")
    return table[role]


def _flags(extra: dict[str, Any]) -> list[str]:
    """{name: value} to CLI flags: True -> --name, False/None -> nothing, lists repeat the values."""
    out: list[str] = []
    for name, value in extra.items():
        flag = "--" + str(name).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _transport_env(dis: dict[str, Any]) -> dict[str, str]:
    """The environment that selects Mooncake's transport; the prefill and the decode must agree on it. Checked for
    every role (a router or plain server started from the same config would otherwise hide a typo until PD)."""
    protocol = dis["mooncake_protocol"]
    if protocol is None:
        return {}
    if protocol not in MOONCAKE_PROTOCOLS:
        raise ConfigError(f"engine.disaggregation.mooncake_protocol={protocol!r} is not one this launcher knows "
                          f"({', '.join(MOONCAKE_PROTOCOLS)}).",
                          hint="Use nvlink_intra for prefill and decode on one host, or null for SGLang's default "
                               "(RDMA; transfer_backend=mooncake_tcp for TCP). Anything else Mooncake reads can be set "
                               "through engine.env.")
    if dis["transfer_backend"] != "mooncake":
        raise ConfigError(f"engine.disaggregation.mooncake_protocol={protocol} applies to transfer_backend=mooncake, "
                          f"not {dis['transfer_backend']!r}.",
                          hint="Set engine.disaggregation.transfer_backend=mooncake, or mooncake_protocol=null.")
    return dict(MOONCAKE_PROTOCOLS[protocol])


def plan_server(cfg: dict[str, Any], model_path: Path, role_core: dict[str, Any], out: Path) -> ServerPlan:
    """The SGLang server for a cache role (prefill, decode, auto, plain)."""
    engine, role = cfg["engine"], cfg["role"]["name"]
    port = _per_role(engine, "port", role)
    pd_mode = engine["disaggregation"]["mode"].get(role)
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
            "--host", engine["host"], "--port", str(port), "--tp-size", str(engine["tp_size"]),
            "--dtype", str(engine["dtype"]),
            "--mem-fraction-static", str(_per_role(engine, "mem_fraction_static", role)),
            "--base-gpu-id", str(_per_role(engine, "base_gpu_id", role))]
    if engine["device"]:
        argv += ["--device", engine["device"]]
    if pd_mode:
        dis = engine["disaggregation"]
        argv += ["--disaggregation-mode", pd_mode, "--disaggregation-transfer-backend", dis["transfer_backend"],
                 "--disaggregation-bootstrap-port", str(dis["bootstrap_port"])]
    argv += _flags(engine["extra_args"])
    # the plugin's switches are this config's alone: ones exported in the shell (a README recipe) must not turn
    # a plain server into a sharing one, nor change a sharing one's role
    env = {name: "" for name in SWITCHES}
    transport = _transport_env(engine["disaggregation"])
    if pd_mode:  # a server outside PD moves no KV
        env.update(transport)
    env.update({k: str(v) for k, v in engine["env"].items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    report_dir = None
    if role_core["mode"] != "off":
        report_dir = out / "ranks"
        env.update(plugin_env(role=role_core, cache=dict(cfg["cache"]), report_dir=str(report_dir)))
    ranks = int(engine["tp_size"]) * int(engine["extra_args"].get("pp_size", 1))
    return ServerPlan(argv, env, f"http://{engine['host']}:{port}", report_dir, ranks, pd_mode)


def plan_router(cfg: dict[str, Any]) -> ServerPlan:
    """sglang-router's PD router in front of the prefill and decode servers of this config."""
    engine = cfg["engine"]
    router, dis, host = engine["router"], engine["disaggregation"], engine["host"]
    _transport_env(dis)  # the servers behind it are started from this config too
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--prefill", f"http://{host}:{_per_role(engine, 'port', 'prefill')}", str(dis["bootstrap_port"]),
            "--decode", f"http://{host}:{_per_role(engine, 'port', 'decode')}",
            "--host", router["host"], "--port", str(router["port"])]
    if router["mini_lb"]:
        argv.append("--mini-lb")
    argv += _flags(router["extra_args"])
    return ServerPlan(argv, {}, None, None, 0, None)


_UNREPORTED_GRACE_S = 30  # a server that answers /health while its ranks never reported lacks the plugin
_PEER_FAILURE_GRACE_S = 5  # after one rank failed, how long its peers get to write their own reasons


def _rank_order(path: Path) -> tuple[int, ...]:
    """failed-pp1-tp10.json after failed-pp1-tp2.json: by the ranks in the name, not as text."""
    rank = split_rank_key(path.stem)
    return () if rank is None else (rank[1] or 0, rank[2])


def rank_failure(failures: list[dict[str, Any]], ranks: int) -> ServerFailed:
    """One error for the whole server from its ranks' failure reports: the first rank's reason, which
    ranks share it, and the exit code of the rank's own error (a mismatch stays a configuration error)."""
    first = failures[0]
    same = [f["rank"] for f in failures[1:] if f["error"] == first["error"]]
    other = [f"{f['rank']}: {f['error']}" for f in failures[1:] if f["error"] != first["error"]]
    if ranks == 1:
        who = "its rank refused to start"
    elif len(failures) == ranks:
        who = f"all {ranks} of its ranks refused to start"
    else:  # SGLang stops the other ranks as soon as one fails: they never got to say whether they would have
        names = ", ".join(f["rank"] for f in failures)
        who = f"{'rank' if len(failures) == 1 else 'ranks'} {names} of {ranks} refused to start, and SGLang " \
              "stopped the others with it"
    message = f"the SGLang server stopped: {who}. {first['rank']}: {first['message']}"
    if same:
        message += f" (the same on {', '.join(same)})"
    if other:
        message += f" (also {'; '.join(other)})"
    err = ServerFailed(message, hint=first.get("hint"))
    err.exit_code = first.get("exit_code", err.exit_code)
    return err


class Server:
    """A running server process group: started, awaited, stopped as a whole. The group gets SIGTERM
    when the launcher dies, so a killed launch.py leaves no server behind."""

    def __init__(self, plan: ServerPlan) -> None:
        self.plan = plan
        if plan.report_dir is not None:  # the plugin would stop the server with the same lines; say them first
            from . import check_dumper
            from .compat import SUPPORTED, installed_version, unsupported_reason

            check_dumper({**os.environ, **plan.env})
            why = unsupported_reason(installed_version())
            if why is not None:
                raise ConfigError(f"{why}.", hint=f"Install SGLang {SUPPORTED[0]} to {SUPPORTED[1]} into this "
                                                  "Python, or run the role with engine=hf.")
        if plan.report_dir is not None:  # reports of an earlier run in the same run dir must not count
            for old in [*plan.report_dir.glob("report-*.json"), *plan.report_dir.glob("failed-*.json")]:
                old.unlink()
        self.proc = subprocess.Popen(plan.argv, env={**os.environ, **plan.env}, start_new_session=True,
                                     preexec_fn=_term_with_parent)

    def wait_ready(self, timeout_s: float, stop: threading.Event) -> list[dict[str, Any]] | None:
        """Until every rank reported (cache roles) and the HTTP endpoint answers: the rank reports;
        None when `stop` was set first (Ctrl-C, SIGTERM)."""
        deadline = time.monotonic() + timeout_s
        reports: list[dict[str, Any]] = []
        healthy_since = None
        failed_since = None
        while not stop.is_set():
            failures = self._rank_failures()
            if failures:  # the other ranks may be waiting on this one (NCCL, their owner): stop them all now
                failed_since = failed_since or time.monotonic()
                if (len(failures) == self.plan.ranks or self.proc.poll() is not None
                        or time.monotonic() - failed_since > _PEER_FAILURE_GRACE_S):
                    self.stop()
                    raise rank_failure(failures, self.plan.ranks)
            self._check_alive()
            if self.plan.report_dir is not None and not reports:
                paths = sorted(self.plan.report_dir.glob("report-*.json"))
                if len(paths) == self.plan.ranks:
                    reports = [json.loads(p.read_text()) for p in paths]
            healthy = self._healthy()
            if healthy and (self.plan.report_dir is None or reports):
                return reports
            healthy_since = (healthy_since or time.monotonic()) if healthy else None
            if healthy_since is not None and time.monotonic() - healthy_since > _UNREPORTED_GRACE_S:
                self.stop()
                raise ServerFailed(f"the SGLang server is up but {self.plan.ranks - len(reports)} of its "
                                   f"{self.plan.ranks} ranks never reported: the sharedcache plugin did not run.",
                                   hint="Install sharedcache in the server's Python (pip install sharedcache; "
                                        "pip install -e . in a checkout) so that "
                                        "SGLang finds its entry point, and keep 'sharedcache' in SGLANG_PLUGINS.")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"the SGLang server did not come up within {timeout_s:g}s ({self.plan.url}).",
                                   hint="Read its log above; raise engine.ready_timeout_s for a slow start.")
            time.sleep(0.5)
        return None

    def _rank_failures(self) -> list[dict[str, Any]]:
        if self.plan.report_dir is None:
            return []
        out = []
        for path in sorted(self.plan.report_dir.glob("failed-*.json"), key=_rank_order):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # written atomically; unreadable means removed meanwhile
                continue
        return out

    def _healthy(self) -> bool:
        if self.plan.url is None:
            return True
        try:
            with urllib.request.urlopen(self.plan.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:  # (a rank's own reason, if it wrote one, was raised by wait_ready before this)
            raise ServerFailed(f"the SGLang server exited with code {code} before it was ready.",
                               hint="Its log above says why.")

    def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        """Greedy generation through the server's own HTTP API."""
        body = json.dumps({"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                               "temperature": 0.0}}).encode()
        req = urllib.request.Request(self.plan.url + "/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        return {"generated": out.get("text"), "generated_tokens": out.get("output_ids"), "prompt": prompt}

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM to the whole group (SGLang spawns its schedulers), SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + timeout_s  # the ranks finish their own exit (an owner unpublishes)
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        return self.proc.returncode


def greedy_ids(url: str, input_ids: list[int], max_new_tokens: int, timeout_s: float = 300) -> list[int]:
    """Token ids a server generates greedily from `input_ids` (always `max_new_tokens` of them): the
    comparison the tests and benchmarks make between prefill, decode and plain servers."""
    body = json.dumps({"input_ids": input_ids, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}}).encode()
    req = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())["output_ids"]


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def gather(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report with the transformers path's keys (rank 0's), every rank's under `ranks`."""
    first = dict(reports[0]) if reports else {}
    first["ranks"] = reports
    return first
