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
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="sglang is not installed in this environment; .ci/run installs it into a second venv "
                              "(requirements-sglang-cpu.txt) and runs tests/with_sglang there"),
]
STUB = REPO / "tests" / "sglang_stub"
N_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangLauncher:
    """`python launch.py engine=sglang role=...` on SGLang's CPU engine, one run dir per process."""

    def __init__(self, model: Path, cache_dir: Path, work: Path) -> None:
        self.model, self.cache_dir, self.work = model, cache_dir, work
        self.ports = {"prefill": free_port(), "decode": free_port(), "plain": free_port()}
        self.procs: list[subprocess.Popen] = []

    def overrides(self, role: str) -> list[str]:
        return [f"role={role}", "engine=sglang", "engine.device=cpu", "engine.dtype=float32",
                f"model.path={self.model}", f"cache.dir={self.cache_dir}", "cache.key=sgl-llama",
                *(f"engine.port.{r}={p}" for r, p in self.ports.items()),
                # no KV transfer engine (mooncake/nixl) runs on CPU: the two servers run without PD
                "engine.disaggregation.mode.prefill=null", "engine.disaggregation.mode.decode=null",
                "+engine.env.SGLANG_USE_CPU_ENGINE=1", "+engine.extra_args.attention_backend=torch_native",
                "+engine.extra_args.max_total_tokens=2048", "+engine.extra_args.disable_cuda_graph=true",
                f"max_new_tokens={N_TOKENS}", f"hydra.run.dir={self.work / role}"]

    def start(self, role: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")])}
        log = open(self.work / f"{role}.log", "wb")
        proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *self.overrides(role)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def report(self, role: str, proc: subprocess.Popen, timeout: float = 600) -> dict:
        path = self.work / role / "report.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, self.log(role)
            time.sleep(0.5)
        return json.loads(path.read_text())

    def log(self, role: str) -> str:
        return (self.work / f"{role}.log").read_text(errors="replace")[-6000:]

    def generate(self, role: str, ids: list[int]) -> list[int]:
        body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": N_TOKENS, "temperature": 0.0,
                                                                  "ignore_eos": True}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[role]}/generate", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["output_ids"]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def test_prefill_publishes_and_decode_attaches_with_transformers_tokens(models, cache_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models["default"], model, copy_function=shutil.copy2)
    ids = [5, 17, 33, 80, 101, 2, 64, 9]
    expected = transformers_tokens(model, ids)
    sgl = SGLangLauncher(model, cache_dir, tmp_path)
    try:
        prefill = sgl.start("prefill")
        pre = sgl.report("prefill", prefill)
        assert pre["mode"] == "save" and pre["backend"] == "cpu_shm" and pre["fallback"] is None, pre
        assert pre["key"] == "sgl-llama-tp0" and pre["meta_tensors"] == []
        manifest = json.loads((cache_dir / "sgl-llama-tp0" / "manifest.json").read_text())
        fp = manifest["fingerprint"]
        assert (fp["engine"], fp["tp_rank"], fp["tp_size"], fp["dtype"], fp["device"], fp["quantization"]) == \
            ("sglang", 0, 1, "float32", "cpu", None)
        assert fp["engine_version"] == pre["ranks"][0]["versions"]["sglang"]

        spoil_weights_keeping_identity(model)  # from here on, reading the checkpoint would show
        decode = sgl.start("decode")
        dec = sgl.report("decode", decode)
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
        # SGLang was told what the decode maps but did not allocate; the owner allocated its arena itself
        assert dec["ranks"][0]["preloaded_weights_bytes"] == dec["arena_bytes"] > 0
        assert pre["ranks"][0]["preloaded_weights_bytes"] == 0
        assert dec["ranks"][0]["layout_options"] == pre["ranks"][0]["layout_options"]

        prefill.terminate()  # the prefill server stops and unpublishes; the decode keeps serving
        assert prefill.wait(120) == 0, sgl.log("prefill")
        assert not (cache_dir / "sgl-llama-tp0" / "manifest.json").exists()
        assert not list((cache_dir / "sgl-llama-tp0").glob("arena-*"))
        assert sgl.generate("decode", ids) == expected
    finally:
        sgl.stop_all()
    assert decode.returncode == 0, sgl.log("decode")

    # and the spoiled checkpoint does show when read: SGLang's own load of it generates something else
    plain = sgl.start("plain")
    try:
        sgl.report("plain", plain)  # up and serving
        assert sgl.generate("plain", ids) != expected
    finally:
        sgl.stop_all()
