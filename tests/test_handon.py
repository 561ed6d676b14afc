"""Weights outlive their owner without a daemon (issue 23, item 1, on the CPU): with cpu_memfd the memory
lives while any process holds it, every mapper keeps the fd, and when the owner dies a surviving mapper
serves it to new attachers and to a restarted owner. Real processes through launch.py, SIGKILL, real
memfds passed over Unix sockets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import attached_decode, cli, served_by
from sharedcache.cache import CacheDir, EntryState
from sharedcache.handon import served

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`

KEY = "sc-llama-tiny"
MEMFD = "cache.backend=cpu_memfd"


def _finish(probe: subprocess.Popen) -> dict:
    out, err = probe.communicate("go\n", timeout=300)
    assert probe.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_a_surviving_decode_hands_the_arena_on_after_its_owner_is_killed(launcher, cache_dir, sc_home):
    prefill = launcher.start("prefill", MEMFD, name="prefill")
    pre = prefill.wait_report()
    assert pre["backend"] == "cpu_memfd" and not list((cache_dir / KEY).glob("arena-*.bin"))  # no file to collect
    entry = CacheDir(cache_dir).entry(KEY)
    survivor = attached_decode(cache_dir, sc_home)
    try:
        prefill.stop(signal.SIGKILL)
        served_by(entry, survivor.pid)
        assert entry.state(entry.read()) is EntryState.SERVED
        ls = cli("ls", "--dir", str(cache_dir)).stdout
        assert f"served by {survivor.pid}" in ls and str(survivor.pid) in ls.split("served by")[1], ls
        late = launcher.run("decode", name="late")  # attaches through the survivor's socket
        dec = late.report()
        assert late.popen.returncode == 0, late.output()
        assert dec["owner_alive"] is False and dec["weight_bytes_allocated"] == 0
        assert dec["logits_sha256"] == pre["logits_sha256"]
        assert _finish(survivor)["logits_sha256"] == pre["logits_sha256"]
    finally:
        survivor.kill()
    # the last holder is gone, and the memory with it: nothing to attach, a retryable refusal, gc removes it
    assert entry.state(entry.read()) is EntryState.UNUSABLE
    refused = launcher.run("decode", "cache.wait_timeout_s=5", name="refused")
    assert refused.popen.returncode == 3 and "cannot attach without it" in refused.output(), refused.output()
    assert list(entry.dir.glob("serve-*.lock"))
    gc = cli("gc", "--dir", str(cache_dir))
    assert "1 removed" in gc.stdout, gc.stdout + gc.stderr
    assert not entry.published() and not list(entry.dir.glob("serve-*.lock"))  # the dead arena's turn goes too


def test_a_restarted_owner_takes_the_arena_over_from_the_mapper_that_serves_it(launcher, cache_dir, sc_home):
    first = launcher.start("prefill", MEMFD, name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    survivor = attached_decode(cache_dir, sc_home)
    try:
        first.stop(signal.SIGKILL)
        served_by(entry, survivor.pid)
        second = launcher.start("prefill", MEMFD, name="second")
        rep = second.wait_report()
        assert rep["adopted"] is True and rep["weight_bytes_allocated"] == 0, second.output()
        assert rep["logits_sha256"] == pre["logits_sha256"]
        m = entry.read()
        assert m.owner.pid == second.popen.pid and m.server.pid == survivor.pid and entry.owner_alive(m)
        _finish(survivor)  # the mapper that served goes: the new owner serves its own arena again
        served_by(entry, second.popen.pid)
        after = launcher.run("decode", name="after")
        dec = after.report()
        assert after.popen.returncode == 0 and dec["owner_pid"] == second.popen.pid and dec["owner_alive"]
        assert dec["logits_sha256"] == pre["logits_sha256"] and dec["weight_bytes_allocated"] == 0
        assert second.stop() == 0
        assert not entry.published()
    finally:
        survivor.kill()


def _stderr_until(probe: subprocess.Popen, text: str, timeout: float = 30) -> str:
    """The probe's stderr so far, once it holds `text` (read without blocking: the probe runs on)."""
    fd, seen = probe.stderr.fileno(), b""
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"no {text!r} on the probe's stderr: {seen.decode()[-2000:]}"
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    return seen.decode()


def test_an_owner_stopped_on_purpose_is_not_handed_on(launcher, cache_dir, sc_home):
    prefill = launcher.start("prefill", MEMFD, name="prefill")
    prefill.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    arena = entry.read().handle["arena"]
    attached = attached_decode(cache_dir, sc_home)
    try:
        assert prefill.stop() == 0  # SIGTERM: unpublished, new attaches refused, attached ones keep working
        # the attached decode's relay took its turn, found nothing published, and gave the turn back
        _stderr_until(attached, f"arena {arena} of {KEY} is no longer published: nothing to hand on")
        assert not entry.published() and not served(entry.dir, arena)
        _finish(attached)
    finally:
        attached.kill()


def test_the_hand_on_passes_from_mapper_to_mapper_until_the_last_one_goes(launcher, cache_dir, sc_home):
    """Two decodes map the arena; the owner is killed, one of them serves; it is killed too, and the other
    takes over: a new decode still attaches, with the same logits, and no process ever loaded again."""
    prefill = launcher.start("prefill", MEMFD, name="prefill")
    pre = prefill.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    mappers = [attached_decode(cache_dir, sc_home) for _ in range(2)]
    try:
        prefill.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while entry.read().server is None:
            assert time.monotonic() < deadline, "no mapper took over"
            time.sleep(0.05)
        first = next(m for m in mappers if m.pid == entry.read().server.pid)
        other = next(m for m in mappers if m is not first)
        first.kill()  # the serving mapper dies too, without any chance to clean up
        first.wait()
        served_by(entry, other.pid)
        late = launcher.run("decode", name="late")
        assert late.popen.returncode == 0, late.output()
        assert late.report()["logits_sha256"] == pre["logits_sha256"]
        assert _finish(other)["logits_sha256"] == pre["logits_sha256"]
    finally:
        for m in mappers:
            m.kill()
