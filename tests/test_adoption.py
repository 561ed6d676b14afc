"""A restarted owner takes over the arena its killed predecessor left (issue 23, cpu_shm and transformers):
real processes through launch.py, a SIGKILL, real files and mappings."""
from __future__ import annotations

import json
import signal

import pytest

from helpers import attached_decode
from sharedcache.cache import CacheDir

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`

KEY = "sc-llama-tiny"  # the launcher's key for the tiny embedded model


def test_a_killed_prefill_restarted_takes_its_arena_over_instead_of_loading(launcher, cache_dir, sc_home):
    first = launcher.start("prefill", name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    arenas = sorted(p.name for p in entry.dir.glob("arena-*"))
    before = attached_decode(cache_dir, sc_home)  # a decode mapping the arena across both owners
    try:
        first.stop(signal.SIGKILL)
        second = launcher.start("prefill", name="second")
        rep = second.wait_report()
        assert rep["adopted"] is True and rep["mode"] == "save" and rep["fallback"] is None, second.output()
        assert rep["weight_bytes_allocated"] == 0 and rep["load_seconds"] is None
        assert rep["bytes_shared"] == pre["bytes_shared"] and rep["layout_digest"] == pre["layout_digest"]
        assert rep["generated_tokens"] == pre["generated_tokens"] and rep["logits_sha256"] == pre["logits_sha256"]
        assert "took over the arena its dead predecessor left" in second.output()
        # the same bytes, one file, now published by the second owner
        assert sorted(p.name for p in entry.dir.glob("arena-*")) == arenas
        assert entry.read().owner.pid == second.popen.pid and entry.owner_alive(entry.read())
        after = launcher.run("decode", name="after")
        dec = after.report()
        assert after.popen.returncode == 0 and dec["owner_pid"] == second.popen.pid and dec["owner_alive"]
        assert dec["logits_sha256"] == pre["logits_sha256"] and dec["weight_bytes_allocated"] == 0
        assert second.stop() == 0  # the new owner gives the arena back as its own
        assert not entry.dir.joinpath("manifest.json").exists() and not list(entry.dir.glob("arena-*"))
        out, err = before.communicate("go\n", timeout=300)  # the first decode never noticed
    finally:
        before.kill()
    assert before.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["logits_sha256"] == pre["logits_sha256"]


def test_a_prefill_restarted_with_another_dtype_never_takes_the_arena_over(launcher, cache_dir):
    first = launcher.start("prefill", name="first")
    first.wait_report()
    first.stop(signal.SIGKILL)
    entry = CacheDir(cache_dir).entry(KEY)
    left = entry.read()
    refused = launcher.run("prefill", "engine.dtype=bfloat16", name="refused")
    assert refused.popen.returncode == 2, refused.output()
    out = refused.output()
    assert "published for another model" in out and "dtype" in out and "cache.on_mismatch=fallback" in out
    assert entry.read() == left and not entry.claimed()  # nothing changed: the orphan is as it was
    replacing = launcher.start("prefill", "engine.dtype=bfloat16", "cache.on_mismatch=fallback", name="replacing")
    rep = replacing.wait_report()
    assert rep["adopted"] is False and rep["weight_bytes_allocated"] > 0 and rep["load_seconds"] is not None
    assert entry.read().fingerprint.dtype == "bfloat16" and entry.read().handle != left.handle
    assert replacing.stop() == 0


def test_adopt_false_loads_a_second_copy_as_before(launcher, cache_dir):
    first = launcher.start("prefill", name="first")
    first.wait_report()
    first.stop(signal.SIGKILL)
    left = CacheDir(cache_dir).entry(KEY).read()
    second = launcher.start("prefill", "cache.adopt=false", name="second")
    rep = second.wait_report()
    assert rep["adopted"] is False and rep["weight_bytes_allocated"] > 0
    assert CacheDir(cache_dir).entry(KEY).read().handle != left.handle
    assert second.stop() == 0
