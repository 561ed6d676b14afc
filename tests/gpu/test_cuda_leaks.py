"""No leaks on the GPU (pytest -m gpu): attach/detach cycles in one process and instance restarts
return file descriptors, resident memory and GPU memory to their baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gpu.test_cuda import CUDA, gpu_used_mib

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
    for wave in range(10):  # 50 decode instances, 5 at a time: each starts, attaches, generates, exits
        decs = [launcher.start("decode", *CUDA, name=f"restart-{wave}-{i}") for i in range(5)]
        for dec in decs:
            assert dec.wait(300) == 0, dec.output()
    assert gpu_used_mib() - base < 64
    assert len(os.listdir(f"/proc/{prefill.popen.pid}/fd")) == fds
    assert prefill.stop() == 0
