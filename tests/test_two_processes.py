"""A prefill and decode instances as real processes through launch.py, on the embedded default model."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_probe


def test_decode_matches_prefill_and_plain_load_bit_for_bit(launcher, cache_dir):
    prefill = launcher.start("prefill", model="default")
    pre = prefill.wait_report()
    decode = launcher.run("decode", model="default")
    assert decode.popen.returncode == 0, decode.output()
    dec = decode.report()
    plain = launcher.run("plain", model="default")
    assert plain.popen.returncode == 0, plain.output()
    base = plain.report()

    assert pre["mode"] == "save" and dec["mode"] == "load" and base["mode"] == "off"
    # parity: same logits bytes and same greedy tokens in all three
    assert dec["logits_sha256"] == pre["logits_sha256"] == base["logits_sha256"]
    assert dec["generated_tokens"] == pre["generated_tokens"] == base["generated_tokens"]
    assert len(set(dec["generated_tokens"])) > 1, "greedy output should vary (weak parity check otherwise)"
    # the decode bound every tensor to the arena and allocated no weights of its own
    assert dec["tensors"] == pre["tensors"] > 0
    assert dec["weight_bytes_allocated"] == 0
    assert dec["bytes_shared"] == pre["bytes_shared"] >= 100_000_000
    assert dec["fingerprint"] == pre["fingerprint"] and dec["owner_pid"] == pre["pid"]
    assert [p["name"] for p in dec["phases"]] == ["intercept", "serialize", "align"]
    assert [p["name"] for p in pre["phases"]] == ["intercept", "align", "serialize"]
    for key in ("role", "mode", "engine", "backend", "model", "fingerprint", "tensors", "bytes_shared",
                "weight_bytes_allocated", "phases", "attach_seconds", "generated"):
        assert key in dec, key
    assert "waiting" not in decode.output()  # the prefill had published already

    # SIGTERM: the owner unpublishes cleanly and exits 0
    assert prefill.stop(signal.SIGTERM) == 0, prefill.output()
    entry = cache_dir / pre["key"]
    assert not (entry / "manifest.json").exists()
    assert not list(entry.glob("arena-*")), "the arena file must be removed with the entry"
    assert "removed entry" in prefill.output()


def test_decode_tensors_live_in_the_shared_mapping_and_anon_memory_stays_flat(launcher, cache_dir, sc_home):
    prefill = launcher.start("prefill", model="default")
    prefill.wait_report()
    dec = run_probe("--role", "decode", "--cache-dir", str(cache_dir), "--model", "default", "--home", str(sc_home))
    assert dec["report"]["mode"] == "load"
    assert dec["tensor_count"] > 70
    assert dec["outside_mapping"] == [], "every parameter and buffer must lie inside the shared arena mapping"
    assert len(dec["mapped_files"]) == 1 and "arena-" in dec["mapped_files"][0]
    assert dec["tied"] and not dec["any_requires_grad"] and not dec["training"] and not dec["any_meta"]
    assert not dec["checkpoint_mapped"], "the decode must not map the checkpoint's weights"
    # attach + forward + generate: anonymous memory grows by activations, not by a copy of the weights
    assert dec["model_bytes"] >= 100_000_000
    assert dec["anon_growth_bytes"] < 0.3 * dec["model_bytes"], dec["anon_growth_bytes"]
    # a plain load in the same kind of process agrees on every logit
    plain = run_probe("--role", "plain", "--cache-dir", str(cache_dir), "--model", "default", "--home", str(sc_home))
    assert plain["checkpoint_mapped"] or plain["anon_growth_bytes"] > 0.5 * dec["model_bytes"]
    assert plain["logits_sha256"] == dec["logits_sha256"] and plain["tokens"] == dec["tokens"]


@pytest.mark.slow
def test_placeholder_mode_attaches_too(launcher):
    launcher.start("prefill").wait_report()
    dec = launcher.run("decode", "role.mode=placeholder")
    assert dec.popen.returncode == 0, dec.output()
    rep = dec.report()
    assert rep["mode"] == "placeholder" and rep["weight_bytes_allocated"] == 0
    assert rep["logits_sha256"] == launcher.procs[0].report()["logits_sha256"]


@pytest.mark.slow
def test_decode_keeps_working_after_owner_sigkill(launcher, cache_dir, sc_home):
    prefill = launcher.start("prefill", model="default")
    pre = prefill.wait_report()
    cmd = [sys.executable, str(REPO / "tests" / "probe.py"), "--role", "decode", "--cache-dir", str(cache_dir),
           "--model", "default", "--home", str(sc_home), "--wait-stdin"]
    probe = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(probe.stdout.readline()) == {"attached": True}
        prefill.stop(signal.SIGKILL)
        assert prefill.popen.returncode == -signal.SIGKILL
        out, err = probe.communicate("go\n", timeout=300)
    finally:
        probe.kill()
    assert probe.returncode == 0, err
    dec = json.loads(out.strip().splitlines()[-1])
    assert dec["tokens"] == pre["generated_tokens"]
    assert dec["logits_sha256"] == pre["logits_sha256"]


@pytest.mark.slow
def test_decode_started_before_prefill_waits_then_attaches(launcher):
    decode = launcher.start("decode", "cache.wait_timeout_s=240")
    deadline = time.monotonic() + 120
    while "waiting for an owner to publish" not in decode.output():  # it waits before any prefill exists
        assert decode.popen.poll() is None and time.monotonic() < deadline, decode.output()
        time.sleep(0.05)
    prefill = launcher.start("prefill")
    assert decode.wait(300) == 0, decode.output()
    assert "waiting for an owner to publish" in decode.output()
    rep = decode.report()
    assert rep["mode"] == "load"
    assert rep["logits_sha256"] == prefill.wait_report()["logits_sha256"]
    # the wait is reported apart from the attach work, which it would otherwise swamp
    assert rep["wait_seconds"] >= 1.0
    assert rep["attach_seconds"] == pytest.approx(sum(p["seconds"] for p in rep["phases"]) - rep["wait_seconds"],
                                                  abs=1e-5)
    assert rep["attach_seconds"] < rep["wait_seconds"]


@pytest.mark.slow
def test_decode_without_prefill_times_out_with_its_message(launcher, cache_dir):
    decode = launcher.run("decode", "cache.wait_timeout_s=1")
    assert decode.popen.returncode == 3  # retryable: start the prefill, then try again
    out = decode.output()
    assert "waited 1s for entry 'sc-llama-tiny'" in out
    assert str(cache_dir / "sc-llama-tiny" / "manifest.json") in out
    assert "Start the prefill role" in out
    failed = json.loads(decode.report_path.read_text())  # a failed run's report says why
    assert failed["ok"] is False and failed["error"] == "AttachTimeout" and failed["exit_code"] == 3
    assert failed["message"].startswith("waited 1s") and failed["hint"].startswith("Start the prefill role")


@pytest.mark.slow
def test_two_savers_racing_exactly_one_publishes(launcher, cache_dir):
    a, b = launcher.start("prefill", name="a"), launcher.start("prefill", name="b")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(p.popen.poll() is not None for p in (a, b)):
        time.sleep(0.1)
    loser = a if a.popen.poll() is not None else b
    winner = b if loser is a else a
    assert loser.popen.returncode == 3, loser.output()  # EntryOwned: retryable
    assert "owned by another live instance" in loser.output() and "role=decode" in loser.output()
    assert winner.wait_report()["mode"] == "save"
    assert len(list(cache_dir.glob("*/manifest.json"))) == 1
    assert len(list(cache_dir.glob("*/arena-*"))) == 1


@pytest.mark.slow
def test_two_auto_instances_racing_one_saves_one_attaches(launcher, cache_dir):
    a, b = launcher.start("auto", name="a"), launcher.start("auto", name="b")
    modes = sorted(p.wait_report()["mode"] for p in (a, b))
    assert modes == ["load", "save"]
    reps = [p.report() for p in (a, b)]
    assert reps[0]["logits_sha256"] == reps[1]["logits_sha256"]
    assert len(list(cache_dir.glob("*/arena-*"))) == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_a_signal_while_a_decode_waits_is_one_line_a_report_and_its_exit_code(launcher, sig, code):
    """Ctrl-C (SIGINT) or SIGTERM while a decode waits: one line, report.json saying so (`ok: false`), and the
    shell's code for the signal, as the README's exit-code table says."""
    decode = launcher.start("decode", "cache.wait_timeout_s=240")
    deadline = time.monotonic() + 120
    while "waiting for an owner to publish" not in decode.output():
        assert decode.popen.poll() is None and time.monotonic() < deadline, decode.output()
        time.sleep(0.2)
    assert decode.stop(sig) == code, decode.output()
    out = decode.output()
    name = signal.Signals(sig).name
    assert "Traceback" not in out and f"interrupted by {name}" in out, out
    report = decode.report()
    assert report["ok"] is False and report["error"] == "Interrupted" and report["exit_code"] == code, report


@pytest.mark.slow
def test_the_attach_command_the_prefill_prints_attaches(launcher, tmp_path):
    """The printed command carries the prefill's own overrides (here a dtype, which the fingerprint holds):
    pasted into a shell, it attaches instead of failing with FingerprintMismatch."""
    import shlex

    from conftest import REPO

    prefill = launcher.start("prefill", "engine.dtype=bfloat16")
    prefill.wait_report()
    deadline = time.monotonic() + 60
    while "Attach with:" not in prefill.output():
        assert time.monotonic() < deadline, prefill.output()
        time.sleep(0.1)
    lines = prefill.output().splitlines()
    command = shlex.split(lines[next(i for i, line in enumerate(lines) if "Attach with:" in line) + 1])
    assert command[:3] == ["python", "launch.py", "role=decode"] and "engine.dtype=bfloat16" in command, command
    decode = subprocess.run([sys.executable, *command[1:], f"hydra.run.dir={tmp_path / 'pasted'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert decode.returncode == 0, decode.stdout + decode.stderr
    report = json.loads((tmp_path / "pasted" / "report.json").read_text())
    assert report["mode"] == "load" and report["weight_bytes_allocated"] == 0 and report["fallback"] is None
