"""The SGLang integration against the real sglang package on CPU: `launch.py engine=sglang` starts real
SGLang servers (HTTP, scheduler subprocesses), the sharedcache plugin runs the role inside them.

Runs where sglang is installed (.ci/run builds that venv from requirements-sglang-cpu.txt); the
sgl_kernel stand-in in tests/sglang_stub replaces the Intel CPU kernel build no wheel provides.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers import free_port, sglang_healthy, sglang_request

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="sglang is not installed in this environment; .ci/run installs it into a second venv "
                              "(requirements-sglang-cpu.txt) and runs tests/with_sglang there"),
]
STUB = REPO / "tests" / "sglang_stub"
N_TOKENS = 12




class SGLangServers:
    """Prefill, decode and plain SGLang servers on its CPU engine, each `launch.py engine=sglang role=...`
    started through the suite's Launcher."""

    def __init__(self, launcher, model: Path) -> None:
        self.launcher, self.model = launcher, model
        self.ports = {"prefill": free_port(), "decode": free_port(), "plain": free_port()}

    def start(self, role: str, *extra: str, name: str | None = None):
        return self.launcher.start(
            role, *extra, "engine=sglang", "engine.device=cpu", "engine.dtype=float32", f"model.path={self.model}",
            "cache.key=sgl-llama", *(f"engine.port.{r}={p}" for r, p in self.ports.items()),
            # no KV transfer engine (mooncake/nixl) runs on CPU: the two servers run without PD
            "engine.disaggregation.mode.prefill=null", "engine.disaggregation.mode.decode=null",
            "+engine.env.SGLANG_USE_CPU_ENGINE=1", "+engine.extra_args.attention_backend=torch_native",
            "+engine.extra_args.max_total_tokens=2048", "+engine.extra_args.disable_cuda_graph=true",
            f"max_new_tokens={N_TOKENS}", name=name or role)

    def generate(self, role: str, ids: list[int]) -> list[int]:
        from sharedcache_integrations.sglang.server import greedy_ids

        return greedy_ids(f"http://127.0.0.1:{self.ports[role]}", ids, N_TOKENS)


def transformers_tokens(model: Path, ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def spoil_weights_keeping_identity(model: Path) -> None:
    """Overwrite every tensor byte of the checkpoint (header kept, size and mtime restored): a process
    that read it would compute garbage, while its fingerprint still matches."""
    for path in model.glob("*.safetensors"):
        st = path.stat()
        with open(path, "r+b") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header_len)
            f.write(b"\x7f" * (st.st_size - 8 - header_len))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def arena_mappings(pid: int, cache_dir: Path) -> list[str]:
    root = str(cache_dir.resolve())
    return [line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if root in line]


def scheduler_pids(server_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


class PlainSGLang:
    """`python -m sglang.launch_server ...` as a user would type it, sharing through SHAREDCACHE_ROLE and
    friends (no launch.py, no JSON): the CPU engine flags the suite's other servers get from conf/."""

    def __init__(self, model: Path, port: int, cache_dir: Path, report_dir: Path, role: str = "decode",
                 name: str = "decode-b") -> None:
        import sys

        from sharedcache_integrations.sglang import switches_env

        self.report_dir, self.port = report_dir, port
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONUNBUFFERED": "1",
               **switches_env(role, cache_dir=str(cache_dir), report_dir=str(report_dir),
                              overrides=["cache.wait_timeout_s=600"])}
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
                "--port", str(port), "--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native",
                "--max-total-tokens", "2048", "--disable-cuda-graph"]
        self.log = report_dir.parent / f"{name}.log"
        report_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as f:
            self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def wait_report(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        path = self.report_dir / "report-tp0.json"
        while not path.exists() or not self._healthy():  # its rank reported and its HTTP server is up
            assert self.popen.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.5)
        return {"ranks": [json.loads(path.read_text())]}

    def _healthy(self) -> bool:
        return sglang_healthy(self.port)

    def output(self, whole: bool = False) -> str:
        text = self.log.read_text(errors="replace")
        return text if whole else text[-6000:]

    def stop(self, timeout: float) -> int:
        """SIGTERM to its process group: 0 once it is gone, or the code it had already died with."""
        import signal

        if self.popen.poll() is not None:
            return self.popen.returncode
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        return 0


def test_prefill_publishes_and_decode_attaches_with_transformers_tokens(launcher, models, cache_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]))
    model = tmp_path / "model"
    shutil.copytree(models["default"], model, copy_function=shutil.copy2)
    ids = [5, 17, 33, 80, 101, 2, 64, 9]
    expected = transformers_tokens(model, ids)
    sgl = SGLangServers(launcher, model)
    prefill = sgl.start("prefill")
    pre = prefill.wait_report(600)
    assert pre["mode"] == "save" and pre["backend"] == "cpu_shm" and pre["fallback"] is None, pre
    assert pre["key"] == "sgl-llama-tp0" and pre["meta_tensors"] == []
    manifest = json.loads((cache_dir / "sgl-llama-tp0" / "manifest.json").read_text())
    fp = manifest["fingerprint"]
    assert (fp["engine"], fp["tp_rank"], fp["tp_size"], fp["dtype"], fp["device"], fp["quantization"]) == \
        ("sglang", 0, 1, "float32", "cpu", None)
    assert fp["engine_version"] == pre["ranks"][0]["versions"]["sglang"]

    spoil_weights_keeping_identity(model)  # from here on, reading the checkpoint would show
    decode = sgl.start("decode")
    dec = decode.wait_report(600)
    assert dec["mode"] == "load" and dec["fallback"] is None, dec
    assert dec["weight_bytes_allocated"] == 0 and dec["meta_tensors"] == []
    assert dec["tensors"] == pre["tensors"] and dec["owner_pid"] == pre["ranks"][0]["pid"]
    rank_pid = dec["ranks"][0]["pid"]
    assert rank_pid in scheduler_pids(dec["server_pid"])
    mapped = arena_mappings(rank_pid, cache_dir)  # the decode's scheduler maps the prefill's arena
    assert mapped and all("/sgl-llama-tp0/arena-" in p for p in mapped), mapped

    assert sgl.generate("prefill", ids) == expected
    assert sgl.generate("decode", ids) == expected
    assert dec["generated_tokens"] == pre["generated_tokens"]  # launch.py's own greedy request, by text
    # the arena the decode maps was allocated by the owner before the decode measured its baseline:
    # nothing of it is reported as preloaded (which would hold back slack for weights it does not hold)
    assert dec["ranks"][0]["preloaded_weights_bytes"] == 0 and dec["arena_bytes"] > 0
    assert pre["ranks"][0]["preloaded_weights_bytes"] == 0
    assert dec["ranks"][0]["layout_options"] == pre["ranks"][0]["layout_options"]

    # the prefill server stops and unpublishes; the decode keeps serving
    assert prefill.stop(timeout=120) == 0, prefill.output()
    assert not (cache_dir / "sgl-llama-tp0" / "manifest.json").exists()
    assert not list((cache_dir / "sgl-llama-tp0").glob("arena-*"))
    assert sgl.generate("decode", ids) == expected
    assert decode.stop(timeout=120) == 0, decode.output()

    # and the spoiled checkpoint does show when read: SGLang's own load of it generates something else
    plain = sgl.start("plain")
    plain.wait_report(600)  # up and serving
    assert sgl.generate("plain", ids) != expected
    assert plain.stop(timeout=120) == 0, plain.output()


def test_an_sglang_holder_keeps_the_weights_and_a_killed_prefill_restarted_takes_them_over(
        launcher, models, cache_dir, tmp_path, monkeypatch):
    """Issue 23, items 2-3 on SGLang's CPU engine: a holder (role=holder engine=sglang) maps the prefill's
    rank arena (cpu_memfd: it dies with its last holder, like GPU memory); the prefill's server is SIGKILLed
    whole, the holder serves the arena, and the restarted prefill takes it over without reading the checkpoint
    (spoiled meanwhile), as does a decode started afterwards. Then every server stops cleanly, the holder
    publishes the arena again, and a prefill started afterwards takes it over too."""
    import signal

    from sharedcache.cache import CacheDir

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]))
    model = tmp_path / "model"
    shutil.copytree(models["default"], model, copy_function=shutil.copy2)
    ids = [5, 17, 33, 80, 101, 2, 64, 9]
    expected = transformers_tokens(model, ids)
    sgl, memfd = SGLangServers(launcher, model), "cache.backend=cpu_memfd"
    first = sgl.start("prefill", memfd, name="first")
    pre = first.wait_report(600)
    assert pre["backend"] == "cpu_memfd" and sgl.generate("prefill", ids) == expected, pre
    holder = launcher.start("holder", "engine=sglang", f"model.path={model}", "cache.key=sgl-llama", name="holder")
    held = holder.wait_report(120)
    assert held["mode"] == "hold" and [h["key"] for h in held["held"]] == ["sgl-llama-tp0"], held
    assert held["weight_bytes_allocated"] == 0 and held["arena_bytes"] == pre["arena_bytes"]
    spoil_weights_keeping_identity(model)  # from here on, reading the checkpoint would show
    entry = CacheDir(cache_dir).entry("sgl-llama-tp0")
    os.killpg(os.getpgid(pre["ranks"][0]["pid"]), signal.SIGKILL)  # the whole server, its scheduler first
    first.stop(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (entry.read().server or entry.read().owner).pid != held["pid"]:
        assert time.monotonic() < deadline, f"the holder never served the arena: {entry.read()}"
        time.sleep(0.05)
    second = sgl.start("prefill", memfd, name="second")
    rep = second.wait_report(600)
    assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0 and rep["fallback"] is None, rep
    assert rep["ranks"][0]["preloaded_weights_bytes"] == 0 and rep["ranks"][0]["meta_tensors"] == []
    assert sgl.generate("prefill", ids) == expected  # the arena's weights, not the spoiled checkpoint's
    assert entry.read().owner.pid == rep["ranks"][0]["pid"]
    decode = sgl.start("decode", memfd, name="decode")
    dec = decode.wait_report(600)
    assert dec["weight_bytes_allocated"] == 0 and sgl.generate("decode", ids) == expected, dec
    # every server stopped on purpose: the prefill unpublishes, the holder publishes its arena again
    for server in (second, decode):
        assert server.stop(timeout=120) == 0, server.output()
    deadline = time.monotonic() + 60
    while not entry.published() or entry.read().server is None or entry.read().server.pid != held["pid"]:
        assert time.monotonic() < deadline, "the holder did not publish the arena again after the clean stop"
        time.sleep(0.05)
    third = sgl.start("prefill", memfd, name="third")
    rep = third.wait_report(600)
    assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0, rep
    assert sgl.generate("prefill", ids) == expected
    for server in (third, holder):
        assert server.stop(timeout=120) == 0, server.output()


def test_decodes_started_before_the_prefill_wait_for_it_to_settle_and_size_one_at_a_time(launcher, models, tmp_path,
                                                                                        monkeypatch, request):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]))
    ports = {"decode-a": free_port(), "decode-b": free_port(), "prefill": free_port()}
    sgl = SGLangServers(launcher, models["default"])

    def start(role: str, name: str):
        sgl.ports[name] = ports[name]
        return launcher.start(
            role, "engine=sglang", "engine.device=cpu", "engine.dtype=float32", f"model.path={models['default']}",
            f"cache.key={models['default'].name}", "cache.wait_timeout_s=600", f"engine.port.{role}={ports[name]}",
            "engine.disaggregation.mode.prefill=null", "engine.disaggregation.mode.decode=null",
            "+engine.env.SGLANG_USE_CPU_ENGINE=1", "+engine.extra_args.attention_backend=torch_native",
            "+engine.extra_args.max_total_tokens=2048", "+engine.extra_args.disable_cuda_graph=true", name=name)

    # both before any owner exists: one through launch.py, one a plain SGLang command line switched on by
    # the readable variables (its key: the model directory's name, as launch.py's, so the launch.py servers
    # name the same key)
    decodes = [start("decode", "decode-a"), PlainSGLang(models["default"], ports["decode-b"], launcher.cache_dir,
                                                        launcher.workdir / "decode-b-reports")]
    request.addfinalizer(lambda: decodes[1].stop(timeout=60))  # not the launcher's: stopped on a failure too
    sgl.ports["decode-b"] = ports["decode-b"]
    deadline = time.monotonic() + 300
    while not all("waiting for an owner" in d.log.read_text(errors="replace").lower() for d in decodes):  # no owner yet
        assert all(d.popen.poll() is None for d in decodes) and time.monotonic() < deadline, \
            [d.output()[-2000:] for d in decodes]
        time.sleep(0.2)
    # the prefill a plain SGLang command line too, keyed by its model directory as well
    prefill = PlainSGLang(models["default"], ports["prefill"], launcher.cache_dir, launcher.workdir / "prefill-reports",
                          role="prefill", name="prefill")
    request.addfinalizer(lambda: prefill.stop(timeout=60))
    sgl.ports["prefill"] = ports["prefill"]
    pre = prefill.wait_report(600)
    reports = [d.wait_report(600)["ranks"][0] for d in decodes]
    assert reports[1]["key"] == f"{models['default'].name}-tp0"
    owner = pre["ranks"][0]
    for r in reports:
        assert r["mode"] == "load" and r["fallback"] is None and r["weight_bytes_allocated"] == 0, r
        assert r["wait_seconds"] > 0, r  # it waited for the owner's pools, not only for its manifest
        assert r["sized_at"] >= owner["settled_at"], (r, owner)  # measured only once the owner had settled
    # one instance at a time measured free memory and allocated its pools on this device
    first, second = sorted(reports + [owner], key=lambda r: r["sized_at"])[1:]
    assert first["settled_at"] <= second["sized_at"], (first, second)

    ids = [5, 17, 33, 80, 101, 2, 64, 9]
    tokens = sgl.generate("prefill", ids)
    assert sgl.generate("decode-a", ids) == tokens == sgl.generate("decode-b", ids)
    refused = update_weights_from_disk(ports["decode-a"], models["default"])
    assert refused["success"] is False and "update_weights_from_disk refused" in refused["message"], refused
    assert f"{models['default'].name}-tp0" in refused["message"]
    assert sgl.generate("decode-a", ids) == tokens  # nothing was written into the shared weights
    refused = update_weights_from_disk(ports["prefill"], models["default"])  # nor by the owner
    assert refused["success"] is False and "this server owns the shared weights" in refused["message"], refused
    # said once (SGLang logs a failed update's message itself), and every line names the key the entry has
    log = prefill.output(whole=True)
    assert log.count("update_weights_from_disk refused") == 1, log[-6000:]
    sizing = [line for line in log.splitlines() if "sizes its memory from" in line]
    assert len(sizing) == 1 and f"sharedcache: {models['default'].name}-tp0 sizes" in sizing[0], sizing
    # the weights checker's writing action and the update session (issue 24): refused on owner and decode
    # alike; the checker's reading actions still answer
    for name in ("decode-a", "prefill"):
        reset = sglang_request(ports[name], "/weights_checker", {"action": "reset_tensors"}, error_answer=True)
        assert reset["success"] is False and "weights_checker 'reset_tensors' refused" in reset["message"], reset
        for path in ("/begin_weight_update", "/end_weight_update"):
            if path in sglang_routes():
                answer = sglang_request(ports[name], path, {}, error_answer=True)
                assert answer["success"] is False and f"{path[1:]} refused" in answer["message"], answer
    assert sglang_request(ports["decode-a"], "/weights_checker", {"action": "checksum"})["success"] is True
    # releasing and resuming the weights' memory: the shared weights stay resident (resuming them would write the
    # model's static state back into the shared tensors). (The other tags cannot run on SGLang's CPU engine: its
    # release synchronizes CUDA.)
    for op in ("release_memory_occupation", "resume_memory_occupation"):
        sglang_request(ports["decode-a"], f"/{op}", {"tags": ["weights"]}, timeout=120)
    assert "the weights stay resident" in decodes[0].output()
    assert sgl.generate("decode-a", ids) == tokens
    assert sgl.generate("decode-a", ids) == tokens == sgl.generate("prefill", ids)  # nothing was written
    for proc in (*decodes, prefill):
        assert proc.stop(timeout=120) == 0, proc.output()


def test_decode_of_a_model_that_cannot_be_shared_falls_back_without_waiting_for_an_owner(launcher, models,
                                                                                        monkeypatch):
    """With cache.on_unsupported=fallback, a decode whose model cannot be shared (here: SGLang's dummy loader)
    loads normally at once: no prefill of that model would ever publish or settle."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    start = time.monotonic()
    decode = launcher.start(
        "decode", "engine=sglang", "engine.device=cpu", "engine.dtype=float32", f"model.path={models['default']}",
        "cache.key=sgl-fallback", "cache.wait_timeout_s=600", "cache.settle_timeout_s=600",
        "cache.on_unsupported=fallback", f"engine.port.decode={port}", "engine.disaggregation.mode.decode=null",
        "+engine.env.SGLANG_USE_CPU_ENGINE=1", "+engine.extra_args.attention_backend=torch_native",
        "+engine.extra_args.max_total_tokens=2048", "+engine.extra_args.disable_cuda_graph=true",
        "+engine.extra_args.load_format=dummy", name="decode-fallback")
    report = decode.wait_report(600)["ranks"][0]
    assert report["fallback"] and "DummyModelLoader" in report["fallback"], report
    assert report["wait_seconds"] == 0 and time.monotonic() - start < 300
    assert decode.stop(timeout=120) == 0, decode.output()


def sglang_routes() -> set[str]:
    """The HTTP routes of the installed SGLang's server."""
    from sglang.srt.entrypoints.http_server import app

    return {route.path for route in app.routes if hasattr(route, "path")}  # included routers carry none


def update_weights_from_disk(port: int, model: Path) -> dict:
    # SGLang answers a failed update with 400 and the message: that answer is what the tests read
    return sglang_request(port, "/update_weights_from_disk", {"model_path": str(model)}, timeout=300,
                          error_answer=True)


def test_ctrl_c_while_a_decode_server_waits_for_its_owner_stops_it_with_one_line(launcher, models, monkeypatch):
    """Ctrl-C (SIGINT to launch.py) while the SGLang server starts: the whole server goes, launch.py says so
    in one line and exits 130, with no traceback and no SGLang process left."""
    import signal

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")]))
    decode = launcher.start(
        "decode", "engine=sglang", "engine.device=cpu", "engine.dtype=float32", f"model.path={models['default']}",
        "cache.key=sgl-nobody", "cache.wait_timeout_s=600", f"engine.port.decode={free_port()}",
        "engine.disaggregation.mode.decode=null", "+engine.env.SGLANG_USE_CPU_ENGINE=1",
        "+engine.extra_args.attention_backend=torch_native", "+engine.extra_args.disable_cuda_graph=true",
        name="decode-interrupted")
    deadline = time.monotonic() + 300
    while "waiting for an owner" not in decode.output().lower():  # its rank is in the core's wait: mid start-up
        assert decode.popen.poll() is None and time.monotonic() < deadline, decode.output()[-4000:]
        time.sleep(0.5)
    children = scheduler_pids(decode.popen.pid) + [p for c in scheduler_pids(decode.popen.pid)
                                                   for p in scheduler_pids(c)]
    assert decode.stop(signal.SIGINT, timeout=120) == 130, decode.output()[-4000:]
    out = decode.output()
    assert "interrupted by SIGINT: the SGLang server was starting; stopped it" in out, out[-4000:]
    assert "Traceback" not in out.split("interrupted by")[-1], out[-4000:]
    assert decode.report()["error"] == "Interrupted" and decode.report()["exit_code"] == 130
    deadline = time.monotonic() + 30  # the launcher waited for its server; its children may be reaped just after
    while [p for p in children if Path(f"/proc/{p}").exists()]:
        assert time.monotonic() < deadline, "an SGLang process outlived the launcher by 30 s"
        time.sleep(0.05)


@pytest.mark.parametrize("backend, says", [
    ("cuda_vmm", "cache.backend=cuda_vmm holds cuda tensors, but the engine runs on cpu"),
    ("no_such", "unknown cache.backend 'no_such'"),
])
def test_a_plain_sglang_command_with_a_backend_that_cannot_hold_its_weights_stops_at_once(models, tmp_path, backend,
                                                                                         says):
    """Issue 24, item 2: `cache.backend=cuda_vmm` through SHAREDCACHE_OVERRIDES on a CPU server was accepted and
    ended minutes later in a long traceback. SGLang's launcher now stops with one line before any process loads."""
    assert_stops_at_once(models, tmp_path / "cache", says, "decode", overrides=[f"cache.backend={backend}"])


def assert_stops_at_once(models, cache_dir: Path, says: str, role: str, env: dict[str, str] | None = None,
                         overrides: list[str] | None = None) -> None:
    """A plain SGLang command switched on by SHAREDCACHE_ROLE (on the CPU engine) exits with the one line `says`,
    no traceback, before any weight loads or the cache directory exists."""
    import sys

    from sharedcache_integrations.sglang import switches_env

    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONUNBUFFERED": "1", **(env or {}),
           **switches_env(role, cache_dir=str(cache_dir), overrides=overrides)}
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(models["default"]), "--host",
            "127.0.0.1", "--port", str(free_port()), "--device", "cpu", "--dtype", "float32"]
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and says in out and "Traceback" not in out, out[-4000:]
    assert "Load weight begin" not in out and not cache_dir.exists(), out[-4000:]


ROUTE_WALK = """
import json
from sglang.srt.entrypoints.http_server import app
paths = set()
for route in app.routes:
    if hasattr(route, "path"):
        paths.add(route.path)
    else:  # a router FastAPI includes: its routes under the include's prefix
        prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
        paths |= {prefix + sub.path for sub in route.original_router.routes}
print(json.dumps(sorted(paths)))
"""


def test_every_route_of_the_installed_sglang_is_judged_for_weight_writes():
    """Issue 24, item 1: each HTTP route of this SGLang either has a hook that refuses (or keeps the weights out
    of) its in-place write on a sharing server, applied to an operation this SGLang has, or is listed as harmless
    with its reason (integrations/sglang/routes.py). A route in neither fails here, naming it."""
    import sys

    from sharedcache_integrations.sglang import compat, routes

    # in a fresh process with the variable that adds SGLang's conditional /dumper/{method} route
    res = subprocess.run([sys.executable, "-c", ROUTE_WALK], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DUMPER_SERVER_PORT": "reuse"})
    assert res.returncode == 0, res.stderr[-4000:]
    paths = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len(paths) > 50 and "/dumper/{method}" in paths, sorted(paths)
    unjudged = sorted(p for p in paths if routes.judged(p) is None)
    assert unjudged == [], f"judge these routes in integrations/sglang/routes.py: {unjudged}"
    hooked = {**compat.weight_update_targets(), **compat.scheduler_write_targets(),
              **compat.memory_occupation_targets()}
    for path, ops in routes.WRITES.items():
        if path in paths:
            assert any(op in hooked for op in ops.split("|")), (path, ops, sorted(hooked))


def test_a_sharing_sglang_server_with_the_dumpers_control_port_stops_at_once(models, tmp_path):
    """SGLang's tensor dumper, with DUMPER_SERVER_PORT=reuse, adds /dumper/{method}, whose configure takes a filter
    that every scheduler evaluates as Python: code beside the shared weights. A sharing server refuses that variable
    before any process loads, in one line naming it; the same server without it starts (the other tests)."""
    says = "SGLang's tensor dumper could write into the shared weights on this server: DUMPER_SERVER_PORT=reuse: "
    assert_stops_at_once(models, tmp_path / "cache", says, "prefill", env={"DUMPER_SERVER_PORT": "reuse"})
