"""GPU scenarios (pytest -m gpu): every instance is its own process through launch.py or probe.py,
so no GPU state leaks between tests."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from helpers import attached_decode, served_by
from sharedcache import ExitCode
from sharedcache.cache import CacheDir, EntryState

pytestmark = pytest.mark.gpu
CUDA = ("engine.device_map=cuda",)
KEY = "sc-llama-100m"  # the launcher's key for the embedded default model


def gpu_used_mib() -> int:
    """Device-wide used memory from nvidia-smi: this test process holds no CUDA context."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def hold_probe(*args: str) -> subprocess.Popen:
    """probe.py that stops after attaching (or after its bare start) until told to go on."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "probe.py"), *args, "--wait-stdin"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(proc.stderr.read())
    assert json.loads(line)["attached"] is True
    return proc


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["cuda_vmm", "cuda_ipc"])
def test_two_processes_on_one_gpu_bit_identical(launcher, backend):
    prefill = launcher.start("prefill", *CUDA, f"cache.backend={backend}", model="default")
    pre = prefill.wait_report()
    dec = launcher.run("decode", *CUDA, model="default")
    assert dec.popen.returncode == 0, dec.output()
    plain = launcher.run("plain", *CUDA, model="default")
    d, p = dec.report(), plain.report()
    assert pre["backend"] == d["backend"] == backend
    assert d["logits_sha256"] == pre["logits_sha256"] == p["logits_sha256"]
    assert d["generated_tokens"] == pre["generated_tokens"] == p["generated_tokens"]
    assert d["weight_bytes_allocated"] == 0 and d["tensors"] == pre["tensors"]
    assert prefill.stop() == 0


def test_decode_gpu_memory_grows_by_no_more_than_its_context(launcher, cache_dir, sc_home):
    launcher.start("prefill", *CUDA, model="default").wait_report()
    common = ("--cache-dir", str(cache_dir), "--model", "default", "--home", str(sc_home), "--override",
              "engine.device_map=cuda")
    time.sleep(1)
    base = gpu_used_mib()
    bare = hold_probe("--role", "bare", *common)  # same imports, CUDA context and cuBLAS, no model
    bare_growth = gpu_used_mib() - base
    finish(bare)
    time.sleep(1)
    base = gpu_used_mib()
    dec = hold_probe("--role", "decode", *common)
    dec_growth = gpu_used_mib() - base
    result = finish(dec)
    model_mib = result["model_bytes"] / 2**20
    assert result["outside_mapping_cuda"] == [] and result["report"]["backend"] == "cuda_vmm"
    assert dec_growth <= bare_growth + 0.25 * model_mib, (dec_growth, bare_growth, model_mib)


def test_vmm_decode_survives_owner_sigkill_and_hands_the_arena_on(launcher, cache_dir, sc_home):
    """Issue 23, item 1: the decode keeps the fds it received; once the owner is killed it serves them, so a
    new decode attaches (0 bytes, same logits); when the last holder goes, new attaches are refused."""
    prefill = launcher.start("prefill", *CUDA, model="default")
    pre = prefill.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    dec = attached_decode(cache_dir, sc_home, "default", *CUDA)
    try:
        prefill.stop(signal.SIGKILL)
        served_by(entry, dec.pid)
        assert entry.state(entry.read()) is EntryState.SERVED
        late = launcher.run("decode", *CUDA, model="default", name="late")  # through the survivor's socket
        rep = late.report()
        assert late.popen.returncode == 0, late.output()
        assert rep["owner_alive"] is False and rep["weight_bytes_allocated"] == 0
        assert rep["logits_sha256"] == pre["logits_sha256"] and rep["generated_tokens"] == pre["generated_tokens"]
        result = finish(dec)
    finally:
        dec.kill()
    assert result["tokens"] == pre["generated_tokens"] and result["logits_sha256"] == pre["logits_sha256"]
    # the last holder is gone, and the memory with it: refused with its reason, not a crash
    refused = launcher.run("decode", *CUDA, "cache.wait_timeout_s=5", model="default", name="refused")
    assert refused.popen.returncode == ExitCode.RETRY and "is dead" in refused.output(), refused.output()


def test_vmm_prefill_killed_and_restarted_takes_its_arena_over(launcher, cache_dir, sc_home):
    """Issue 23, item 2 on the transformers path: the restarted prefill maps the arena its killed predecessor
    left (served by the decode meanwhile), allocates no weights, owns the entry again; a decode that attaches
    afterwards gets the same logits, and GPU memory holds one copy throughout."""
    first = launcher.start("prefill", *CUDA, model="default", name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    dec = attached_decode(cache_dir, sc_home, "default", *CUDA)
    try:
        first.stop(signal.SIGKILL)
        served_by(entry, dec.pid)
        used_before = gpu_used_mib()
        second = launcher.start("prefill", *CUDA, model="default", name="second")
        rep = second.wait_report()
        assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0 and rep["fallback"] is None, \
            second.output()
        assert rep["logits_sha256"] == pre["logits_sha256"] and rep["generated_tokens"] == pre["generated_tokens"]
        m = entry.read()
        assert m.owner.pid == second.popen.pid and entry.owner_alive(m) and m.server.pid == dec.pid
        grown = gpu_used_mib() - used_before  # the second prefill's context and activations, no second copy
        assert grown < 0.5 * pre["arena_bytes"] / 2**20 + 1024, (grown, pre["arena_bytes"])
        result = finish(dec)  # the mapper that served goes: the new owner serves its own arena again
        served_by(entry, second.popen.pid)
        after = launcher.run("decode", *CUDA, model="default", name="after")
        d = after.report()
        assert after.popen.returncode == 0 and d["owner_pid"] == second.popen.pid and d["owner_alive"]
        assert d["logits_sha256"] == pre["logits_sha256"] and d["weight_bytes_allocated"] == 0
        assert second.stop() == 0 and not entry.published()
    finally:
        dec.kill()
    assert result["logits_sha256"] == pre["logits_sha256"]


def test_vmm_owner_cannot_change_published_weights_in_place(launcher, cache_dir, sc_home):
    """Issue 24, item 1: once published, the owner maps its arena read-only too. An in-place write in the owner
    faults there ("an illegal memory access") instead of changing what its attached decode computes."""
    owner = hold_probe("--role", "prefill", "--cache-dir", str(cache_dir), "--model", "default",
                       "--home", str(sc_home), "--override", CUDA[0])
    dec = attached_decode(cache_dir, sc_home, "default", *CUDA)
    try:
        out, err = owner.communicate("write\n", timeout=300)
        wrote = json.loads(out.strip().splitlines()[-1])
        assert wrote["write"].startswith("faulted") and "illegal" in wrote["write"], (wrote, err[-3000:])
        result = finish(dec)
    finally:
        dec.kill()
        owner.kill()
    plain = launcher.run("plain", *CUDA, model="default")
    assert result["logits_sha256"] == plain.report()["logits_sha256"]  # the shared bytes stayed as published
    assert result["tokens"] == plain.report()["generated_tokens"]


def test_cuda_ipc_dead_owner_is_refused(launcher):
    prefill = launcher.start("prefill", *CUDA, "cache.backend=cuda_ipc")
    prefill.wait_report()
    prefill.stop(signal.SIGKILL)
    dec = launcher.run("decode", *CUDA, "cache.wait_timeout_s=5")
    assert dec.popen.returncode == ExitCode.RETRY
    assert "is dead" in dec.output() and "cuda_ipc" in dec.output() and "memory died with it" in dec.output()


def _mutations(m: dict):
    yield "not JSON", b"{ not json", "not valid JSON"
    t = [dict(x) for x in m["tensors"]]
    t[0]["offset"] = m["arena"]["size"]
    yield "offset", {**m, "tensors": t}, "lie outside"
    yield "chunks", {**m, "handle": {**m["handle"], "chunks": m["handle"]["chunks"] + 1}}, "the manifest describes"
    yield "socket", {**m, "handle": {**m["handle"], "socket": "../../x.sock"}}, "does not name an owner socket"


def test_bad_input_on_cuda_is_refused_cleanly(launcher, cache_dir):
    launcher.start("prefill", *CUDA).wait_report()
    path = next(cache_dir.glob("*/manifest.json"))
    good = path.read_bytes()
    manifest = json.loads(good)
    try:
        for name, bad, words in _mutations(manifest):
            path.write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())
            dec = launcher.run("decode", *CUDA, "cache.wait_timeout_s=2", name=f"bad-{name}")
            assert dec.popen.returncode == ExitCode.INTEGRITY, (name, dec.output())  # remove the entry, publish again
            assert words in dec.output(), (name, dec.output())
    finally:
        path.write_bytes(good)
    dec = launcher.run("decode", *CUDA, "engine.dtype=bfloat16", name="bad-dtype-fp")
    assert dec.popen.returncode == ExitCode.CONFIG and "differing fields: dtype" in dec.output()
    ok = launcher.run("decode", *CUDA, name="good-after")
    assert ok.popen.returncode == 0, ok.output()


def test_vmm_prefill_refills_from_its_host_copy_after_every_process_died(launcher, cache_dir):
    """Issue 23, item 4 on the GPU: the owner copies its arena to host memory in the background; once every
    process that held the GPU arena is gone, the next prefill refills a new arena from the copy (no checkpoint
    read), checks its digest, and computes the same logits."""
    hosted = (*CUDA, "cache.host_copy=true")
    first = launcher.start("prefill", *hosted, model="default", name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    deadline = time.monotonic() + 120
    while not (entry.dir / "hostcopy.json").exists():
        assert time.monotonic() < deadline, first.output()
        time.sleep(0.05)
    first.stop(signal.SIGKILL)  # nobody else mapped it: the GPU memory is gone
    assert entry.state(entry.read()) is EntryState.UNUSABLE
    second = launcher.start("prefill", *hosted, model="default", name="second")
    rep = second.wait_report()
    assert rep["refilled"] is True and rep["load_seconds"] is None and rep["fallback"] is None, second.output()
    assert rep["backend"] == "cuda_vmm" and rep["backend_timings"]["host_refill"] > 0
    assert rep["logits_sha256"] == pre["logits_sha256"] and rep["generated_tokens"] == pre["generated_tokens"]
    dec = launcher.run("decode", *CUDA, model="default", name="decode")
    assert dec.popen.returncode == 0 and dec.report()["logits_sha256"] == pre["logits_sha256"], dec.output()
    assert second.stop() == 0
