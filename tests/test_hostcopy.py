"""A host copy outlives every process (issue 23, item 4, on the CPU): with cpu_memfd the arena dies with the
last process that holds it, like GPU memory; with cache.host_copy=true its owner copies it into the entry
directory, and the next owner refills a new arena from that copy instead of loading the checkpoint. Real
processes through launch.py, SIGKILL, real memfds and files."""
from __future__ import annotations

import json
import signal
import time

import pytest

from helpers import cli
from sharedcache.cache import CacheDir, EntryState
from sharedcache.hostcopy import HOST_FILE, HOST_RECORD

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`

KEY = "sc-llama-tiny"
HOSTED = ("cache.backend=cpu_memfd", "cache.host_copy=true")


def _copied(entry, timeout: float = 60) -> dict:
    """Until the owner's background copy is complete (its record is written last)."""
    deadline = time.monotonic() + timeout
    while not (entry.dir / HOST_RECORD).exists():
        assert time.monotonic() < deadline, f"no host copy in {entry.dir} after {timeout}s"
        time.sleep(0.05)
    return json.loads((entry.dir / HOST_RECORD).read_text())


def test_after_every_process_died_the_next_prefill_refills_from_the_host_copy(launcher, cache_dir):
    first = launcher.start("prefill", *HOSTED, name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    record = _copied(entry)
    assert record["manifest"]["arena"]["size"] == pre["arena_bytes"] == (entry.dir / HOST_FILE).stat().st_size
    dead_arena = entry.read().handle["arena"]
    first.stop(signal.SIGKILL)  # nobody else held the memfd: the arena is gone
    assert entry.state(entry.read()) is EntryState.UNUSABLE
    assert "stale +host copy" in cli("ls", "--dir", str(cache_dir)).stdout
    second = launcher.start("prefill", *HOSTED, name="second")
    rep = second.wait_report()
    assert rep["refilled"] is True and rep["adopted"] is False and rep["fallback"] is None, second.output()
    assert rep["load_seconds"] is None and rep["backend_timings"]["host_refill"] > 0  # no checkpoint read
    assert rep["weight_bytes_allocated"] == rep["arena_bytes"]  # its own new arena, one copy
    assert rep["logits_sha256"] == pre["logits_sha256"] and rep["generated_tokens"] == pre["generated_tokens"]
    assert "refilled from the host copy" in second.output()
    m = entry.read()
    assert m.owner.pid == second.popen.pid and m.handle["arena"] != dead_arena and m.server is None
    dec = launcher.run("decode", name="decode")
    assert dec.popen.returncode == 0 and dec.report()["logits_sha256"] == pre["logits_sha256"], dec.output()
    assert json.loads((entry.dir / HOST_RECORD).read_text())["digest"] == record["digest"]  # the same copy kept
    assert second.stop() == 0


def test_a_host_copy_outlives_a_stop_on_purpose_and_gc_keeps_it_until_asked(launcher, cache_dir):
    first = launcher.start("prefill", *HOSTED, name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    _copied(entry)
    assert first.stop() == 0  # SIGTERM: unpublished, the memfd gone; the copy stays for the key's next owner
    assert not entry.published()
    assert "host copy only" in cli("ls", "--dir", str(cache_dir)).stdout
    gc = cli("gc", "--dir", str(cache_dir))
    assert (entry.dir / HOST_RECORD).exists(), gc.stdout  # usable: kept
    second = launcher.start("prefill", *HOSTED, name="second")
    rep = second.wait_report()
    assert rep["refilled"] is True and rep["logits_sha256"] == pre["logits_sha256"], second.output()
    assert second.stop() == 0
    gc = cli("gc", "--dir", str(cache_dir), "--host-copies")
    assert "host copy: removed on request" in gc.stdout, gc.stdout + gc.stderr
    assert not (entry.dir / HOST_RECORD).exists() and not (entry.dir / HOST_FILE).exists()


def test_a_damaged_host_copy_is_refused_removed_and_the_checkpoint_loaded(launcher, cache_dir):
    first = launcher.start("prefill", *HOSTED, name="first")
    pre = first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    record = _copied(entry)
    first.stop(signal.SIGKILL)
    with open(entry.dir / HOST_FILE, "r+b") as f:  # one flipped byte in the middle of the weights
        f.seek(record["manifest"]["arena"]["size"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = launcher.start("prefill", *HOSTED, name="second")
    rep = second.wait_report()
    assert rep["refilled"] is False and rep["load_seconds"] is not None, second.output()
    assert "do not match its content digest" in second.output()
    assert rep["logits_sha256"] == pre["logits_sha256"]
    fresh = _copied(entry)  # the damaged copy went; the new owner wrote a good one
    assert fresh["digest"] == record["digest"]
    assert second.stop() == 0


def test_a_prefill_of_another_dtype_never_refills_and_replaces_the_copy(launcher, cache_dir):
    first = launcher.start("prefill", *HOSTED, name="first")
    first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    record = _copied(entry)
    first.stop(signal.SIGKILL)
    other = launcher.start("prefill", *HOSTED, "engine.dtype=bfloat16", name="other")
    rep = other.wait_report()
    assert rep["refilled"] is False and rep["load_seconds"] is not None, other.output()
    assert entry.read().fingerprint.dtype == "bfloat16"
    replaced = _copied(entry)  # the float32 copy was swept at publish; this model's copy replaces it
    assert replaced["manifest"]["fingerprint"]["dtype"] == "bfloat16" and replaced["digest"] != record["digest"]
    assert other.stop() == 0


def test_gc_removes_a_host_copy_its_owner_never_finished_and_keeps_a_complete_one(launcher, cache_dir):
    """An owner killed between writing hostcopy.bin and its record leaves a copy nobody can check: gc removes
    it (and a writer's temp file); a complete copy stays for the key's next owner."""
    first = launcher.start("prefill", *HOSTED, name="first")
    first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    _copied(entry)
    first.stop(signal.SIGKILL)
    (entry.dir / HOST_RECORD).unlink()  # as if killed after the rename, before the record
    temp = entry.dir / ".hostcopy.bin.4242.0123456789ab.tmp"
    temp.write_bytes(b"\0" * 4096)
    listed = cli("ls", "--dir", str(cache_dir)).stdout
    assert "+host copy" not in listed, listed  # an unchecked copy is not offered
    gc = cli("gc", "--dir", str(cache_dir))
    assert "host copy: unfinished (no record)" in gc.stdout, gc.stdout + gc.stderr
    assert not (entry.dir / HOST_FILE).exists() and not temp.exists()
