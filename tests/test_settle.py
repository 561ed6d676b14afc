"""Settling (sharedcache.settle): an attacher that sizes memory from what is free waits until the owner's
engine has allocated everything it keeps, and instances size one at a time per device. Real owner
processes (launch.py), real lock files."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from sharedcache import AttachTimeout, Fingerprint
from sharedcache.cache import CacheDir
from sharedcache.layout import TensorSpec, layout_digest
from sharedcache.manifest import ArenaInfo, Manifest, Owner, write_manifest
from sharedcache.settle import SizingTurn, is_settled, mark_settled, wait_settled

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`

KEY = "settle-tiny"


def test_attacher_waits_for_the_owner_to_settle_not_only_to_publish(launcher, cache_dir):
    prefill = launcher.start("prefill", f"cache.key={KEY}")
    prefill.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    with pytest.raises(AttachTimeout, match="still allocating its engine's memory"):
        wait_settled(entry, timeout_s=0.3, until_published=True, role="decode")
    manifest = entry.read()
    mark_settled(entry, manifest)  # what an engine integration does once its pools exist
    assert wait_settled(entry, timeout_s=5, until_published=True, role="decode") == manifest
    assert prefill.stop() == 0
    assert not (entry.dir / "settled.json").exists()  # unpublishing takes the mark with it


def test_a_predecessors_mark_does_not_count_and_an_orphan_needs_no_waiting(launcher, cache_dir):
    first = launcher.start("prefill", f"cache.key={KEY}", "cache.backend=cpu_shm")
    first.wait_report()
    entry = CacheDir(cache_dir).entry(KEY)
    mark_settled(entry, entry.read())
    first.stop(signal.SIGKILL)  # dies without unpublishing: its manifest and mark stay behind
    orphan = entry.read()
    assert wait_settled(entry, timeout_s=5, until_published=True, role="decode") == orphan  # nobody allocates more
    second = launcher.start("prefill", f"cache.key={KEY}", "cache.backend=cpu_shm")
    second.wait_report()
    assert entry.read().owner.pid != orphan.owner.pid
    assert not is_settled(entry, entry.read())  # the dead owner's mark is not the new owner's
    with pytest.raises(AttachTimeout):
        wait_settled(entry, timeout_s=0.3, until_published=True, role="decode")
    assert second.stop() == 0


def test_nothing_to_wait_for_when_nobody_claims_the_key(cache_dir):
    entry = CacheDir(cache_dir).entry(KEY)
    assert wait_settled(entry, timeout_s=5, until_published=False, role="auto") is None  # auto saves itself
    with pytest.raises(AttachTimeout, match="no owner has published it yet"):
        wait_settled(entry, timeout_s=0.2, until_published=True, role="decode")


def _manifest(**owner) -> Manifest:
    """A valid manifest published by this process, or by the owner `owner` changes it into."""
    spec = TensorSpec("w", "param", True, "float32", (2,), (1,), 0, 8)
    fp = Fingerprint("test", "1", "/m", None, "c" * 64, (), "float32", None, "cpu", 0, 1)
    return Manifest(KEY, fp, dataclasses.replace(Owner.current(), **owner), "cpu_shm", {"file": "arena-x.bin"},
                    {"type": "cpu", "index": None, "uuid": None},
                    ArenaInfo(4096, 4096, 256, layout_digest((spec,), 4096, 256)), (spec,), 1.0)


@pytest.mark.parametrize("owner, claimed, waits_for", [
    ({}, True, "still allocating its engine's memory"),  # live
    ({}, False, None),  # running, but nobody holds the entry: nobody allocates for it
    ({"pid": 2**31 - 1}, True, "is gone and a new owner is loading"),  # no such process: replacing
    ({"pid": 2**31 - 1}, False, None),  # orphaned
    ({"boot_id": "before-the-reboot"}, True, "is gone and a new owner is loading"),
    ({"boot_id": "before-the-reboot"}, False, None),
])
def test_what_an_attacher_waits_for_follows_the_owners_liveness(cache_dir, owner, claimed, waits_for):
    entry = CacheDir(cache_dir).entry(KEY).ensure()
    manifest = _manifest(**owner)
    write_manifest(entry.manifest_path, manifest)
    fd = entry.claim(retry_s=0) if claimed else None
    try:
        if waits_for is None:
            assert wait_settled(entry, timeout_s=5, until_published=True, role="decode") == manifest
            return
        with pytest.raises(AttachTimeout, match=waits_for):
            wait_settled(entry, timeout_s=0.2, until_published=True, role="decode")
        mark_settled(entry, manifest)  # counts only for a live owner
        if owner:
            with pytest.raises(AttachTimeout, match=waits_for):
                wait_settled(entry, timeout_s=0.2, until_published=True, role="decode")
        else:
            assert wait_settled(entry, timeout_s=5, until_published=True, role="decode") == manifest
    finally:
        if fd is not None:
            os.close(fd)


HOLD_TURN = """
import sys, time
from sharedcache.settle import SizingTurn
turn = SizingTurn(sys.argv[1], "cuda:GPU-test")
turn.acquire(timeout_s=5, role="holder")
print("held", flush=True)
time.sleep(60)
"""


def test_one_instance_sizes_at_a_time_per_device_and_a_dead_holder_frees_the_turn(cache_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TURN, str(cache_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        turn = SizingTurn(cache_dir, "cuda:GPU-test")
        with pytest.raises(AttachTimeout, match="finish sizing its memory"):
            turn.acquire(timeout_s=0.3, role="decode")
        assert not turn.held
        with SizingTurn(cache_dir, "cpu") as other:  # another device takes its own turn
            assert other.acquire(timeout_s=0.3, role="decode") < 0.3
        holder.kill()
        holder.wait()
        start = time.monotonic()
        with turn:
            turn.acquire(timeout_s=5, role="decode")
            assert turn.held and time.monotonic() - start < 5
        assert not turn.held
    finally:
        holder.kill()
        holder.wait()
