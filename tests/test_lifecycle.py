"""Owners coming and going: dead owners, new owners still loading, signals, leftovers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from sharedcache.cache import CacheDir

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`


def until(condition, proc, timeout: float = 120) -> None:
    """Poll `condition` while `proc` runs; fail with its output if it exits or the deadline passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.popen.poll() is None, proc.output()
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.1)


def test_decode_waits_for_a_new_owner_rather_than_a_dead_ones_arena(launcher, cache_dir):
    first = launcher.start("prefill", name="first")
    first.wait_report()
    first.stop(signal.SIGKILL)
    entry = CacheDir(cache_dir).entry("sc-llama-tiny")
    claim = entry.claim()  # a new owner has claimed the key and is still loading
    try:
        decode = launcher.start("decode", "cache.wait_timeout_s=120")
        until(lambda: "is gone and a new owner is loading" in decode.output(), decode)
    finally:
        os.close(claim)  # the new owner gives up: the orphaned arena is all there is
    assert decode.wait(120) == 0, decode.output()
    rep = decode.report()
    assert rep["mode"] == "load" and rep["owner_alive"] is False


def test_next_owner_sweeps_arenas_left_by_dead_owners(launcher, cache_dir):
    first = launcher.start("prefill", name="first")
    first.wait_report()
    first.stop(signal.SIGKILL)
    entry = cache_dir / "sc-llama-tiny"
    orphan = entry / "arena-1-deadbeef.bin"  # an owner that died between align and serialize
    orphan.write_bytes(b"\0" * 4096)
    old = {p.name for p in entry.glob("arena-*")}
    second = launcher.start("prefill", "cache.adopt=false", name="second")  # loads its own copy: no take-over
    second.wait_report()
    now = {p.name for p in entry.glob("arena-*")}
    assert len(now) == 1 and not now & old, (old, now)
    assert second.stop() == 0
    assert not list(entry.glob("arena-*")) and not (entry / "manifest.json").exists()


def test_sigterm_while_the_prefill_is_still_busy_unpublishes(launcher, cache_dir):
    prefill = launcher.start("prefill", "max_new_tokens=100000", "min_new_tokens=100000", model="default")
    manifest = cache_dir / "sc-llama-100m" / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and time.monotonic() < deadline:
        assert prefill.popen.poll() is None, prefill.output()
        time.sleep(0.05)
    assert manifest.exists() and not prefill.report_path.exists()  # published, still generating
    assert prefill.stop(signal.SIGTERM) != 0
    assert not manifest.exists()
    assert not list(manifest.parent.glob("arena-*"))


def test_plain_role_never_touches_the_cache(launcher, tmp_path):
    missing = tmp_path / "never-created"
    plain = launcher.run("plain", f"cache.dir={missing}")
    assert plain.popen.returncode == 0, plain.output()
    assert plain.report()["mode"] == "off" and not missing.exists()


def test_auto_waiting_for_a_saver_that_gives_up_takes_the_key_over(launcher, cache_dir):
    entry = CacheDir(cache_dir).entry("sc-llama-tiny")
    claim = entry.claim()  # another saver has the key and is loading...
    try:
        auto = launcher.start("auto", "cache.wait_timeout_s=120")
        until(lambda: "waiting for an owner to publish" in auto.output(), auto)  # ...so auto waits to attach
    finally:
        os.close(claim)  # ...and then dies before publishing
    rep = auto.wait_report(120)
    assert rep["mode"] == "save" and rep["fallback"] is None, auto.output()
    assert (cache_dir / "sc-llama-tiny" / "manifest.json").exists()
    assert auto.stop() == 0


PAUSED_PREFILL = """
import sys
from sharedcache.ownership import Claim
publish = Claim.publish
def paused(self, manifest):  # loaded, about to publish: the test decides when
    print("loaded", flush=True)
    sys.stdin.readline()
    return publish(self, manifest)
Claim.publish = paused
from helpers import from_pretrained
model = from_pretrained("prefill", sys.argv[1], sys.argv[2], "cache.key=sc-llama-tiny")
print("published", flush=True)
sys.stdin.readline()
"""


def test_decode_waits_past_its_timeout_while_its_prefill_loads(launcher, cache_dir, models):
    """Issue 24: "start order does not matter" held only inside cache.wait_timeout_s. A decode whose
    wait_timeout_s (1 s) ends while a prefill of its key holds its claim, loading, waits on (up to
    cache.settle_timeout_s) and attaches once the prefill publishes."""
    prefill = subprocess.Popen([sys.executable, "-c", PAUSED_PREFILL, str(cache_dir), str(models["tiny"])],
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    try:
        assert prefill.stdout.readline().strip() == "loaded"
        decode = launcher.start("decode", "cache.wait_timeout_s=1", "cache.settle_timeout_s=300")
        until(lambda: "an owner is loading it" in decode.output(), decode)  # past its 1 s, still waiting
        prefill.stdin.write("publish\n")
        prefill.stdin.flush()
        assert prefill.stdout.readline().strip() == "published"
        rep = decode.wait_report(120)
        assert rep["mode"] == "load" and rep["weight_bytes_allocated"] == 0 and rep["wait_seconds"] > 1, rep
        assert decode.wait(120) == 0, decode.output()
    finally:
        prefill.kill()
        prefill.wait()


def test_decode_gives_up_at_settle_timeout_on_a_prefill_that_never_publishes(launcher, cache_dir):
    entry = CacheDir(cache_dir).entry("sc-llama-tiny")
    claim = entry.claim()  # a prefill holding its claim, loading for ever
    try:
        decode = launcher.run("decode", "cache.wait_timeout_s=1", "cache.settle_timeout_s=3", timeout=120)
    finally:
        os.close(claim)
    out = decode.output()
    assert decode.popen.returncode == 3 and "Traceback" not in out, out
    rep = decode.report()
    assert rep["error"] == "AttachTimeout" and "waited 3s" in rep["message"], rep
    assert "still loading it" in rep["message"] and "cache.settle_timeout_s" in rep["hint"], rep
