"""Waiting for an owner returns what happened (published, claimed, timed out) and reports its progress as
events; whatever the wait took is given back if the caller's progress callback fails."""
from __future__ import annotations

import io
import time

import pytest

from sharedcache.cache import CacheDir
from sharedcache.ownership import Claim
from sharedcache.progress import LogProgress, Progress, TerminalProgress
from sharedcache.waiting import Outcome, wait_for_owner


@pytest.fixture
def entry(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    return CacheDir(root).entry("k")


def wait(entry, progress, *, timeout_s=0.3, loading_s=None, reclaim=False):
    now = time.monotonic()
    return wait_for_owner(entry, deadline=now + timeout_s, loading_deadline=now + (loading_s or timeout_s),
                          role="decode", reclaim=reclaim, progress=progress)


def test_a_wait_nobody_answers_times_out_naming_the_state_and_ends_its_progress(entry):
    events: list[Progress] = []
    result = wait(entry, events.append)
    assert result.outcome is Outcome.TIMED_OUT and result.why == "no owner has published it yet"
    assert result.hold is None and result.claim is None
    assert events[0].unit == "s" and "waiting for an owner to publish 'k'" in events[0].text
    assert events[-1].final and "gave up waiting" in events[-1].text  # a terminal's line is always ended


def test_a_wait_goes_on_past_its_timeout_while_an_owner_loads_and_ends_at_the_loading_deadline(entry):
    """Issue 24: a decode gave up at cache.wait_timeout_s while a prefill of its key was visibly loading."""
    loader = Claim.take(entry)  # an owner holding its claim, still loading
    try:
        t0 = time.monotonic()
        events: list[Progress] = []
        result = wait(entry, events.append, timeout_s=0.2, loading_s=1.0)
        assert result.outcome is Outcome.TIMED_OUT and result.loading and time.monotonic() - t0 >= 1.0
        assert result.why == "an owner holds the key and is still loading it"
        assert any("an owner is loading it" in e.text for e in events) and events[-1].final
    finally:
        loader.close()


def test_a_wait_past_its_timeout_gives_up_once_nobody_loads_any_more(entry):
    loader = Claim.take(entry)
    seen: list[str] = []

    def progress(event):
        seen.append(event.text)
        if "an owner is loading it" in event.text:
            loader.close()  # the loader dies without publishing: nobody is loading now

    result = wait(entry, progress, timeout_s=0.2, loading_s=300)
    assert result.outcome is Outcome.TIMED_OUT and not result.loading, seen
    assert result.why == "no owner has published it yet" and "gave up" in seen[-1]


def test_an_auto_wait_on_a_free_key_claims_it(entry):
    result = wait(entry, lambda e: None, reclaim=True)
    assert result.outcome is Outcome.CLAIMED and entry.claimed()
    result.claim.close()
    assert not entry.claimed()


def test_a_failing_progress_callback_gives_the_claim_back(entry):
    saver = Claim.take(entry)  # a saver still loading: the auto instance waits for it

    def progress(event):
        if not event.final:
            saver.close()  # the saver gives up while we wait: the next look claims the key
        else:
            raise KeyboardInterrupt  # Ctrl-C while the line is being ended

    with pytest.raises(KeyboardInterrupt):
        wait(entry, progress, timeout_s=5, reclaim=True)
    assert not entry.claimed()  # else every other instance of the key would wait for a claim nobody holds


def test_terminal_progress_is_one_line_updated_in_place_and_ended():
    out = io.StringIO()
    show = TerminalProgress(out)
    show(Progress("decode", "waiting", 1, 10, "s"))
    show(Progress("decode", "waiting", 2, 10, "s"))
    show(Progress("decode", "attached", 0, 0, "", final=True))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 3


def test_log_progress_logs_the_first_event_then_every_interval_and_the_end(caplog):
    caplog.set_level("INFO", logger="sharedcache.progress")
    show = LogProgress(every=3600)
    for i in range(5):
        show(Progress("decode", "waiting", i, 10, "s"))
    show(Progress("decode", "published after 5s", 0, 0, "", final=True))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "0s / 10s" in lines[0] and lines[1] == "[decode] published after 5s"


def test_log_progress_logs_a_change_of_state_at_once(caplog):
    caplog.set_level("INFO", logger="sharedcache.progress")
    show = LogProgress(every=3600)
    show(Progress("decode", "waiting (no owner)", 0, 10, "s"))
    show(Progress("decode", "waiting (no owner)", 1, 10, "s"))
    show(Progress("decode", "waiting: an owner is loading it", 2, 10, "s"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "an owner is loading it" in lines[1]


def test_terminal_progress_fits_a_narrow_terminal_and_is_ended_before_a_message(monkeypatch):
    """Issue 25: on a terminal narrower than the line, each update wrapped and left a copy behind; on Ctrl-C
    the line was not ended before the message."""
    import os

    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((60, 24)))
    out = io.StringIO()
    show = TerminalProgress(out)
    long = "waiting for an owner to publish 'sc-llama-100m' in /dev/shm/sharedcache-0 (nobody loads it yet)"
    for i in range(3):
        show(Progress("decode", long, i, 60, "s"))
    updates = [u for u in out.getvalue().split("\r") if u]
    assert len(updates) == 3 and all(len(u.replace("\x1b[K", "")) <= 59 for u in updates), updates
    assert updates[-1].replace("\x1b[K", "").endswith("2s / 60s") and updates[-1].startswith("[decode] waiting")
    show.close()  # a run stopped mid-wait: the next message starts on a line of its own
    assert out.getvalue().endswith("\n") and not show.open


def test_a_timeout_names_the_keys_published_beside_it_and_the_closest(published, tmp_path):
    """Issue 25: an AttachTimeout for a misspelt cache.key did not say which keys are there."""
    from sharedcache import AttachTimeout, CacheSettings
    from sharedcache.waiting import timed_out

    src, _model = published
    entry = CacheDir(src).entry("kk")
    found = wait(entry, lambda event: None, timeout_s=0.2)
    assert found.outcome is Outcome.TIMED_OUT
    settings = CacheSettings.from_mapping({**_cache_defaults(), "dir": str(src), "key": "kk"})
    e = timed_out(found, settings, "kk", "entry 'kk'", "Start the prefill")
    assert isinstance(e, AttachTimeout) and "Published there: k; did you mean cache.key=k?" in str(e), str(e)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    settings = CacheSettings.from_mapping({**_cache_defaults(), "dir": str(empty), "key": "kk"})
    assert f"Nothing is published in {empty}." in str(timed_out(found, settings, "kk", "entry 'kk'", "Start it"))


def _cache_defaults() -> dict:
    from sharedcache.conf import compose

    return compose([])["cache"]
