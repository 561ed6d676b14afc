"""Operations on the GPU (pytest -m gpu): the persistent holder on cuda_vmm; attach/detach cycles in
one process and instance restarts return fds, resident memory and GPU memory to their baseline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from sharedcache import ExitCode
from gpu.test_cuda import CUDA, finish, gpu_used_mib, hold_probe

pytestmark = pytest.mark.gpu


def test_200_gpu_attach_detach_cycles_in_one_process(launcher, cache_dir, sc_home):
    launcher.start("prefill", *CUDA, model="default").wait_report()
    out = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "leak_probe.py"), str(cache_dir),
                          str(sc_home / "models" / "default"), "200"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    b, a = r["before"], r["after"]
    assert a["fds"] == b["fds"]
    assert a["rss_kb"] - b["rss_kb"] < 50 * 1024, r
    assert b["free"] - a["free"] < 64 * 2**20, r  # device memory back to where it was (allocator slack aside)


def test_50_gpu_instance_restarts(launcher, cache_dir):
    prefill = launcher.start("prefill", *CUDA)
    prefill.wait_report()
    fds = len(os.listdir(f"/proc/{prefill.popen.pid}/fd"))
    base = gpu_used_mib()
    for wave in range(5):  # 50 decode instances, 10 at a time: each starts, attaches, generates, exits
        decs = [launcher.start("decode", *CUDA, name=f"restart-{wave}-{i}") for i in range(10)]
        for dec in decs:
            assert dec.wait(300) == 0, dec.output()
    assert gpu_used_mib() - base < 64
    assert len(os.listdir(f"/proc/{prefill.popen.pid}/fd")) == fds
    assert prefill.stop() == 0


def test_holder_on_cuda_vmm_serves_restarts_and_sigterm_keeps_attached_ones(launcher, cache_dir, sc_home, tmp_path):
    """The persistent holder keeps the VMM allocation and serves its fds; after SIGTERM an attached
    decode keeps generating, and a new one is refused (it waits, then times out with its message)."""
    log = open(tmp_path / "holder.log", "wb")
    holder = subprocess.Popen([sys.executable, "-m", "sharedcache.cli", "serve", "--dir", str(cache_dir),
                               "model=default", f"model.embedded.dir={sc_home}/models/default", *CUDA,
                               f"hydra.run.dir={tmp_path}/holder"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "holder" / "report.json").exists():
            assert holder.poll() is None and time.monotonic() < deadline, (tmp_path / "holder.log").read_text()
            time.sleep(0.2)
        assert json.loads((tmp_path / "holder" / "report.json").read_text())["backend"] == "cuda_vmm"
        plain = launcher.run("plain", *CUDA, model="default").report()
        runs = [launcher.run("decode", *CUDA, model="default", name=f"re-{i}") for i in range(3)]  # restarts
        for run in runs:
            d = run.report()
            assert d["owner_pid"] == holder.pid and d["weight_bytes_allocated"] == 0
            assert d["backend"] == "cuda_vmm" and d["logits_sha256"] == plain["logits_sha256"]
        auto = launcher.run("auto", *CUDA, model="default").report()
        assert auto["mode"] == "load" and auto["owner_pid"] == holder.pid
        attached = hold_probe("--role", "decode", "--cache-dir", str(cache_dir), "--model", "default", "--home",
                              str(sc_home), "--override", "engine.device_map=cuda")
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(60) == 0
        result = finish(attached)
        assert result["tokens"] == plain["generated_tokens"] and result["logits_sha256"] == plain["logits_sha256"]
    finally:
        holder.kill()
    late = launcher.run("decode", *CUDA, "cache.wait_timeout_s=2", model="default")
    assert late.popen.returncode == ExitCode.RETRY and "waited 2s" in late.output()  # AttachTimeout
