"""SGLang on a real GPU (pytest -m gpu, with sglang installed: ../shared/sglang-gpu-bundle.sh on the GPU machine).

Real `launch.py engine=sglang` servers with CUDA graphs on, on a Llama-3-8B-shaped bf16 checkpoint
(bench/make_model.py; generated on the machine, nothing downloaded). The tests run in order and share
the servers of the module: a decode started before its prefill, one started after it, a mismatched
one, the weight-writing endpoints refused, the prefill killed (SIGKILL) and restarted while a decode answers,
a holder that keeps the weights while every engine stops and a prefill starts again, and a plain server for the
tokens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, Launcher
from helpers import Asking, free_port, sglang_request
from sharedcache.cache import CacheDir
from sharedcache.kit import rank_key

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="sglang is not installed here; on the GPU machine unpack the bundle of "
                              "../shared/sglang-gpu-bundle.sh and put it on PYTHONPATH"),
]
MODEL = Path(os.environ.get("SHAREDCACHE_GPU_MODEL", "/tmp/llama8b"))
KEY = "llama8b"
IDS = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
N_TOKENS = 16
MEM = {"prefill": 0.40, "decode": 0.40, "plain": 0.60}
SERVER_FLAGS = ("+engine.extra_args.attention_backend=triton", "+engine.extra_args.sampling_backend=pytorch",
                "+engine.extra_args.grammar_backend=none", "+engine.extra_args.cuda_graph_max_bs_decode=16",
                # every request takes the same kernel path (a radix-cache hit would extend a cached prefix,
                # which rounds differently, and random weights make near-ties that shows in greedy tokens)
                "+engine.extra_args.disable_radix_cache=true",
                # one GPU, no KV transfer engine here: the servers run as replicas (PD: bench/, README)
                "engine.disaggregation.mode.prefill=null", "engine.disaggregation.mode.decode=null")


# what each test leaves for the tests after it: its servers and reports in Servers.state (the holder test also stops
# the sharing servers, freeing the GPU memory that the plain server needs)
PROVIDED_BY = {"prefill": "test_decode_started_before_its_prefill_attaches_once_it_settled",
               "after": "test_decode_started_after_the_prefill_gets_the_same_kv_pool",
               "holder": "test_an_sglang_holder_keeps_the_weights_while_every_engine_stops_and_starts_again"}


class Servers:
    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.ports: dict[str, int] = {}

    def start(self, role: str, name: str, *overrides: str):
        self.ports[name] = port = free_port()
        return self.launcher.start(
            role, "engine=sglang", f"model.path={MODEL}", f"cache.key={KEY}", "cache.wait_timeout_s=600",
            f"engine.port.{role}={port}", f"engine.mem_fraction_static.{role}={MEM[role]}",
            f"max_new_tokens={N_TOKENS}", *SERVER_FLAGS, *overrides, name=name)

    def post(self, name: str, path: str, body: dict) -> dict:
        # SGLang answers a refused update with 400 and its message: that answer is what the test reads
        return sglang_request(self.ports[name], path, body, timeout=300, error_answer=True)

    def tokens(self, name: str) -> list[int]:
        out = self.post(name, "/generate", {"input_ids": IDS, "sampling_params": {
            "max_new_tokens": N_TOKENS, "temperature": 0.0, "ignore_eos": True}})
        return out["output_ids"]

    def server_info(self, name: str) -> dict:
        return sglang_request(self.ports[name], "/server_info", timeout=30)

    def needs(self, *keys: str) -> None:
        """The tests go on from the servers the ones before them started: selected without those, a test would
        wait for servers nobody starts, so it skips naming them."""
        missing = sorted({PROVIDED_BY[k] for k in keys if k not in self.state})
        if missing:
            pytest.skip(f"needs what {', '.join(missing)} leaves, and that did not run or did not finish: select it "
                        "too, or run the whole file")


def process_gpu_mib() -> dict[int, int]:
    """Per-process GPU memory from NVML (nvidia-smi): pid -> MiB."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return {int(p): int(m) for p, m in (line.split(", ") for line in out.strip().splitlines() if line)}


def kv_bytes_per_token() -> int:
    cfg = json.loads((MODEL / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2  # K and V, bf16


@pytest.fixture(scope="module")
def servers(sc_home, models):
    subprocess.run([sys.executable, str(REPO / "bench" / "make_model.py"), "--out", str(MODEL)], check=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="sc-sgl-gpu-", dir="/dev/shm"))
    os.chmod(cache_dir, 0o700)
    work = Path(os.environ.get("SHAREDCACHE_GPU_LOGS") or tempfile.mkdtemp(prefix="sc-sgl-gpu-logs-"))
    work.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(sc_home, cache_dir, work)
    s = Servers(launcher)
    s.state = {}
    yield s
    for p in launcher.procs:
        if p.popen.poll() is None:
            p.stop(timeout=120)
    shutil.rmtree(cache_dir, ignore_errors=True)


def test_decode_started_before_its_prefill_attaches_once_it_settled(servers):
    first = servers.start("decode", "decode-first")  # waits for an owner that does not exist yet
    time.sleep(3)
    prefill = servers.start("prefill", "prefill")
    pre, dec = prefill.wait_report(900), first.wait_report(900)
    assert pre["mode"] == "save" and pre["backend"] == "cuda_vmm" and pre["fallback"] is None, pre
    assert dec["mode"] == "load" and dec["fallback"] is None and dec["weight_bytes_allocated"] == 0, dec
    rank = dec["ranks"][0]
    assert rank["wait_seconds"] > 0 and rank["meta_tensors"] == [] and rank["preloaded_weights_bytes"] == 0
    # the decode sized its pool from what was free once the prefill had allocated everything it keeps
    assert rank["sized_at"] >= pre["ranks"][0]["settled_at"], (rank, pre)
    assert rank["baseline_gib"] < rank["baseline_gib_at_start"] - 15, rank
    tokens = servers.tokens("prefill")
    assert servers.tokens("decode-first") == tokens
    used = process_gpu_mib()
    kv = {"decode": rank["kv_pool_tokens"] * kv_bytes_per_token() / 2**20,
          "prefill": pre["ranks"][0]["kv_pool_tokens"] * kv_bytes_per_token() / 2**20}
    weights = pre["arena_bytes"] / 2**20
    dec_extra = used[rank["pid"]] - kv["decode"]  # context, CUDA graphs, activations: no weights
    pre_extra = used[pre["ranks"][0]["pid"]] - kv["prefill"]
    assert dec_extra < 4096 and pre_extra > weights, (used, kv, weights)
    servers.state.update(first=dec, prefill=pre, prefill_proc=prefill, tokens=tokens,
                         memory={"decode_first_mib": used[rank["pid"]], "prefill_mib": used[pre["ranks"][0]["pid"]],
                                 "decode_first_kv_mib": kv["decode"], "weights_mib": weights})
    assert first.stop(timeout=120) == 0, first.output()


def test_decode_started_after_the_prefill_gets_the_same_kv_pool(servers):
    servers.needs("prefill")
    late = servers.start("decode", "decode-after")
    dec = late.wait_report(900)
    first = servers.state["first"]
    tokens, first_tokens = dec["ranks"][0]["kv_pool_tokens"], first["ranks"][0]["kv_pool_tokens"]
    assert abs(tokens - first_tokens) <= 0.01 * first_tokens, (tokens, first_tokens)
    assert dec["weight_bytes_allocated"] == 0 and servers.tokens("decode-after") == servers.state["tokens"]
    servers.state.update(after=dec, after_proc=late)


def test_decode_of_another_dtype_is_refused_naming_the_field(servers):
    servers.needs("prefill")
    other = servers.start("decode", "decode-fp16", "engine.dtype=float16", "engine.ready_timeout_s=300")
    assert other.wait(600) != 0
    out = other.output()
    assert "differing fields: dtype" in out, out[-4000:]


def test_update_weights_from_disk_on_a_decode_is_refused(servers):
    servers.needs("after")
    out = servers.post("decode-after", "/update_weights_from_disk", {"model_path": str(MODEL)})
    assert out.get("success") is False and "sharedcache" in out["message"] and "refused" in out["message"], out
    assert servers.tokens("decode-after") == servers.state["tokens"]  # still the same weights


def test_weights_checker_reset_is_refused_on_owner_and_decode(servers):
    """Issue 24, item 1: the checker's writing action is refused with SGLang's own failure reply on the owner
    (whose mapping is read-only once published: a write would kill its CUDA context) and on the decode; the
    checker's reading action still answers, and both servers keep generating the same tokens."""
    servers.needs("prefill", "after")
    for name in ("prefill", "decode-after"):
        out = servers.post(name, "/weights_checker", {"action": "reset_tensors"})
        assert out.get("success") is False and "weights_checker 'reset_tensors' refused" in out["message"], out
    assert servers.post("decode-after", "/weights_checker", {"action": "checksum"}).get("success") is True
    assert servers.tokens("prefill") == servers.tokens("decode-after") == servers.state["tokens"]


def test_prefill_killed_and_restarted_takes_its_arena_over_while_the_decode_answers(servers):
    """Issue 23, items 1-2 on SGLang: every process of the prefill's server is SIGKILLed; the decode serves
    the arena's fds meanwhile, answers every request with the same tokens, and the restarted prefill takes
    the arena over (0 weight bytes, no second copy in GPU memory) and owns the entry again."""
    servers.needs("prefill", "after")
    pre, old = servers.state["prefill"], servers.state["prefill_proc"]
    entry = CacheDir(servers.launcher.cache_dir).entry(rank_key(KEY, tp_rank=0))
    asking = Asking(lambda: servers.tokens("decode-after") == servers.state["tokens"])
    try:
        killed = time.time()
        os.killpg(os.getpgid(pre["ranks"][0]["pid"]), signal.SIGKILL)  # the server, its scheduler, all of it
        old.stop(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (entry.read().server or entry.read().owner).pid != servers.state["after"]["ranks"][0]["pid"]:
            assert time.monotonic() < deadline, f"the decode never took over serving: {entry.read()}"
            time.sleep(0.05)
        served = time.time()
        second = servers.start("prefill", "prefill-restarted")
        rep = second.wait_report(900)
        ready = time.time()
    finally:
        asking.stop()
    rank = rep["ranks"][0]
    assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0 and rep["fallback"] is None, rep
    assert rank["preloaded_weights_bytes"] == 0 and rank["meta_tensors"] == []
    assert asking.failures == [] and asking.answers and all(ok for _, ok in asking.answers), \
        (asking.failures, asking.answers)
    assert servers.tokens("prefill-restarted") == servers.state["tokens"]
    m = entry.read()
    assert m.owner.pid == rank["pid"] and entry.owner_alive(m)
    used = process_gpu_mib()  # the restarted prefill holds its KV pool and context, not a second copy
    extra = used[rank["pid"]] - rank["kv_pool_tokens"] * kv_bytes_per_token() / 2**20
    assert extra < 4096, (used, rank["kv_pool_tokens"])
    servers.state.update(prefill_proc=second, restart={
        "killed_at": killed, "served_by_decode_at": served, "restarted_ready_at": ready,
        "adopt_phases": rank["phases"], "attach_seconds": rank["attach_seconds"],
        "first_load_phases": pre["ranks"][0]["phases"], "decode_answers": len(asking.answers),
        "decode_failures": len(asking.failures), "restarted_extra_mib": extra})


def test_an_sglang_holder_keeps_the_weights_while_every_engine_stops_and_starts_again(servers):
    """Issue 23, item 3 on a GPU: a holder (role=holder engine=sglang, no engine) maps the rank arena; the
    prefill stops (the decode answers on), then the decode; the holder publishes the arena again, and a prefill
    started afterwards takes it over: SGLang's start-up without its weight load, and still one copy in GPU memory."""
    servers.needs("prefill", "after")
    entry = CacheDir(servers.launcher.cache_dir).entry(rank_key(KEY, tp_rank=0))
    holder = servers.launcher.start("holder", "engine=sglang", f"model.path={MODEL}", f"cache.key={KEY}",
                                    "cache.wait_timeout_s=120", name="holder")
    held = holder.wait_report(300)
    assert held["mode"] == "hold" and [h["key"] for h in held["held"]] == [rank_key(KEY, tp_rank=0)], held
    assert held["weight_bytes_allocated"] == 0 and held["arena_bytes"] == servers.state["prefill"]["arena_bytes"]
    holder_mib = process_gpu_mib().get(held["pid"], 0)  # its CUDA context: NVML does not count imported memory
    assert servers.state["prefill_proc"].stop(timeout=120) == 0
    assert servers.tokens("decode-after") == servers.state["tokens"]  # the decode answers on without its prefill
    assert servers.state["after_proc"].stop(timeout=120) == 0
    deadline = time.monotonic() + 60
    while not entry.published() or (entry.read().server or entry.read().owner).pid != held["pid"]:
        assert time.monotonic() < deadline, f"the holder did not publish the arena again: {entry.read()}"
        time.sleep(0.05)
    t0 = time.monotonic()
    third = servers.start("prefill", "prefill-after-holder")
    rep = third.wait_report(900)
    ready_s = time.monotonic() - t0
    rank = rep["ranks"][0]
    assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0 and rep["fallback"] is None, rep
    assert rank["preloaded_weights_bytes"] == 0 and servers.tokens("prefill-after-holder") == servers.state["tokens"]
    extra = process_gpu_mib()[rank["pid"]] - rank["kv_pool_tokens"] * kv_bytes_per_token() / 2**20
    assert extra < 4096, extra  # no second copy
    assert third.stop(timeout=120) == 0 and holder.stop(timeout=120) == 0, holder.output()
    servers.state["holder"] = {"holder_gpu_mib": holder_mib, "prefill_after_holder_ready_s": ready_s,
                               "prefill_after_holder_phases": rank["phases"],
                               "prefill_after_holder_attach_seconds": rank["attach_seconds"]}


def test_plain_server_generates_the_same_tokens(servers):
    servers.needs("holder")
    t0 = time.monotonic()
    plain = servers.start("plain", "plain")
    report = plain.wait_report(900)
    servers.state.setdefault("holder", {})["plain_ready_s"] = time.monotonic() - t0  # loads its own weights
    assert report["role"] == "plain" and "ranks" in report
    assert servers.tokens("plain") == servers.state["tokens"]
    info = servers.server_info("plain")
    summary = {"first": servers.state["first"]["ranks"][0], "after": servers.state["after"]["ranks"][0],
               "prefill": servers.state["prefill"]["ranks"][0], "plain_kv_pool_tokens": info["max_total_num_tokens"],
               "memory": servers.state["memory"], "tokens": servers.state["tokens"],
               "restart": servers.state.get("restart"), "holder": servers.state.get("holder")}
    out = os.environ.get("SHAREDCACHE_GPU_SUMMARY")
    if out:
        Path(out).write_text(json.dumps(summary, indent=2, sort_keys=True))
