"""`sharedcache ls` and `sharedcache inspect` against a real running owner."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

from helpers import cli


@pytest.mark.slow
def test_ls_and_inspect_follow_the_owner(launcher, cache_dir):
    prefill = launcher.start("prefill")
    pre = prefill.wait_report()
    ls = cli("ls", "--dir", str(cache_dir))
    assert ls.returncode == 0, ls.stderr
    row = next(line for line in ls.stdout.splitlines() if line.startswith("sc-llama-tiny"))
    assert "cpu_shm" in row and str(pre["pid"]) in row and "live" in row and "MiB" in row
    assert pre["model"] in row

    ins = cli("inspect", "sc-llama-tiny", "--dir", str(cache_dir), "--tensors", "-1")
    assert ins.returncode == 0, ins.stderr
    for words in ("fingerprint", pre["fingerprint"], "layout digest", "model.embed_tokens.weight",
                  "lm_head.weight", "-> model.embed_tokens.weight", "non-persistent", "dtype", "float32"):
        assert words in ins.stdout, words

    prefill.stop(signal.SIGKILL)
    ls = cli("ls", "--dir", str(cache_dir))
    assert "orphaned" in ls.stdout and "live" not in ls.stdout


def test_ls_default_dir_comes_from_conf_and_console_script_exists(cache_dir):
    out = cli("ls", f"cache.dir={cache_dir}")
    assert out.returncode == 0 and f"no entries in {cache_dir}" in out.stdout
    script = shutil.which("sharedcache") or str(Path(sys.executable).parent / "sharedcache")
    assert Path(script).exists(), "pip install -e . must install the `sharedcache` command"


def test_inspect_unknown_key_is_a_clear_error(cache_dir):
    out = cli("inspect", "nope", "--dir", str(cache_dir))
    assert out.returncode == 2 and "no manifest at" in out.stderr


def test_operator_cli_version_bare_help_json_and_gc_dry_run(published, cache_dir):
    """--version, help when run bare, `ls --json`, and a `gc --dry-run` whose counts agree with `ls`."""
    import datetime as dt
    import json
    import subprocess
    import time

    import sharedcache
    from helpers import entry_copy

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sharedcache {sharedcache.__version__}"
    bare = cli()
    assert bare.returncode == 2 and "gc" in bare.stdout and "exit codes" in bare.stdout, bare.stdout + bare.stderr

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # a pid that has exited: the copy's owner is gone
    entry_copy(published, cache_dir, lambda d: d["owner"].__setitem__("pid", dead))
    (cache_dir / "empty").mkdir(mode=0o700)  # an entry directory with lock files only: not listed; gc removes it
    (cache_dir / "empty" / "owner.lock").touch(mode=0o600)
    out = cli("ls", "--json", "--dir", str(cache_dir)).stdout
    listed = [json.loads(line) for line in out.splitlines()]  # JSON Lines: one record per entry, a line each
    assert [r["key"] for r in listed] == ["k"], listed
    created = dt.datetime.fromisoformat(listed[0]["created"])  # ISO 8601 with its offset
    assert created.tzinfo is not None and abs(created.timestamp() - time.time()) < 3600, listed[0]["created"]
    assert listed[0]["state"] == "orphaned" and listed[0]["owner_pid"] == dead and listed[0]["mapped_by"] == []
    assert listed[0]["size_bytes"] > 0 and listed[0]["backend"] == "cpu_shm" and listed[0]["error"] is None

    dry = cli("gc", "--dry-run", "--dir", str(cache_dir))
    assert dry.returncode == 0 and "would remove k: owner pid" in dry.stdout, dry.stdout + dry.stderr
    assert "would remove empty: nothing but lock files left" in dry.stdout
    assert "gc: 2 would remove, 0 kept (dry run: nothing was removed)" in dry.stdout
    assert (cache_dir / "k" / "manifest.json").exists() and list((cache_dir / "k").glob("arena-*"))
    gc = cli("gc", "--dir", str(cache_dir))
    assert "gc: 2 removed, 0 kept" in gc.stdout and not (cache_dir / "k" / "manifest.json").exists(), gc.stdout
    assert not (cache_dir / "k").exists() and not (cache_dir / "empty").exists()  # lock files and directories too


@pytest.mark.slow
def test_sharedcache_launch_is_the_launcher_from_any_directory(tmp_path, cache_dir, models):
    """`sharedcache launch` takes the launcher's overrides and --help (the app help), from a directory that is
    not the checkout; the prefill it starts prints an attach command of the same form."""
    import os
    import shlex
    import subprocess

    script = shutil.which("sharedcache") or str(Path(sys.executable).parent / "sharedcache")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    run = lambda *a, **kw: subprocess.run([script, *a], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                          timeout=300, env=env, **kw)
    help_ = run("launch", "--help")
    assert help_.returncode == 0 and "sharedcache launch role=decode" in help_.stdout, help_.stderr
    bad = run("launch", "role=decode", "max_new_tokens=abc")
    assert bad.returncode == 2 and "max_new_tokens='abc' cannot work" in bad.stdout + bad.stderr
    # an installed launcher's runs, refused ones too, go under the state directory, none into the current one
    refused = json.loads(next((tmp_path / "state" / "sharedcache" / "runs").glob("*/*-decode/report.json")).read_text())
    assert refused["ok"] is False and refused["exit_code"] == 2 and not (tmp_path / "outputs").exists()
    home = f"model.embedded.dir={models['tiny']}"
    prefill = subprocess.Popen([script, "launch", "role=prefill", "model=tiny", home, f"cache.dir={cache_dir}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in prefill.stdout:
            lines.append(line)
            if "Attach with:" in line:
                attach = next(prefill.stdout).strip()
                break
        else:
            raise AssertionError("".join(lines))
        assert attach.startswith("sharedcache launch role=decode model=tiny"), attach
        decode = run(*shlex.split(attach)[1:], f"hydra.run.dir={tmp_path / 'decode'}")
        assert decode.returncode == 0, decode.stdout + decode.stderr
        report = json.loads((tmp_path / "decode" / "report.json").read_text())
        assert report["mode"] == "load" and report["weight_bytes_allocated"] == 0 and report["fallback"] is None
    finally:
        prefill.terminate()
        prefill.wait(60)


def test_rank_keys_are_built_and_read_back_by_one_definition():
    """The SGLang plugin keys a rank's entry with the kit's `rank_key`; `ls` reads it back with `split_rank_key`."""
    import sharedcache.kit as kit
    from sharedcache.kit import rank_key, rank_suffix, split_rank_key

    assert {"rank_key", "rank_suffix", "split_rank_key"} <= set(kit.__all__)
    assert rank_key("m", tp_rank=3) == "m-tp3" and rank_key("m-1.5", tp_rank=1, pp_rank=2) == "m-1.5-pp2-tp1"
    assert rank_suffix(tp_rank=0) == "tp0" and rank_suffix(tp_rank=10, pp_rank=1) == "pp1-tp10"
    assert split_rank_key("m-tp3") == ("m", None, 3) and split_rank_key("a-b-pp2-tp10") == ("a-b", 2, 10)
    for key in ("m-tp3", "m-pp2-tp1", "a-tp1-tp10", "report-pp0-tp7"):
        base, pp, tp = split_rank_key(key)
        assert rank_key(base, tp_rank=tp, pp_rank=pp) == key
    for key in ("m", "m-tp", "m-tpx", "mtp3", "m-tp3-part1", "m-pp1", "m-tp1\n"):
        assert split_rank_key(key) is None, key
    assert split_rank_key("m-pp-tp1") == ("m-pp", None, 1)  # only a whole suffix is a rank


def test_gc_removes_the_leftovers_of_an_owner_that_never_published(cache_dir):
    """sharedcache.collect decides and removes; a dry run decides the same and leaves the files."""
    from sharedcache.cache import CacheDir
    from sharedcache.collect import sweep

    entry = cache_dir / "never-published"
    entry.mkdir(mode=0o700)
    for name in ("owner.lock", "attach.lock", "arena-x.bin", ".manifest.json.123.tmp"):
        (entry / name).touch(mode=0o600)
    (entry / "notes.txt").touch(mode=0o600)  # not a file sharedcache makes: never removed
    why = "files left by an owner that never published"
    dry = list(sweep(CacheDir(cache_dir), dry_run=True))
    assert [(v.key, v.removed, v.why, v.listed) for v in dry] == [("never-published", True, why, False)]
    assert (entry / "arena-x.bin").exists()
    out = cli("gc", "--dir", str(cache_dir))
    assert out.returncode == 0 and out.stdout.splitlines() == [f"removed never-published: {why}",
                                                               "gc: 1 removed, 0 kept"], out.stdout + out.stderr
    assert sorted(p.name for p in entry.iterdir()) == ["attach.lock", "notes.txt", "owner.lock", "write.lock"]
    assert [(v.removed, v.why) for v in sweep(CacheDir(cache_dir), dry_run=False)] == [(False, None)]


def test_python_dash_m_sharedcache_is_the_command(cache_dir):
    """Issue 25: for a Python whose scripts directory is not on PATH, `python -m sharedcache` is the command."""
    import subprocess

    import sharedcache

    version = subprocess.run([sys.executable, "-m", "sharedcache", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"sharedcache {sharedcache.__version__}"
    ls = subprocess.run([sys.executable, "-m", "sharedcache", "ls", "--dir", str(cache_dir)], capture_output=True,
                        text=True)
    assert ls.returncode == 0 and f"no entries in {cache_dir}" in ls.stdout, ls.stdout + ls.stderr


def test_demo_help_is_help_and_starts_nothing():
    """Issue 25: `sharedcache demo --help` started a prefill."""
    import glob
    import subprocess

    before = set(glob.glob("/dev/shm/sharedcache-demo-*"))
    res = subprocess.run([sys.executable, "-m", "sharedcache", "demo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "sharedcache demo [hydra overrides" in res.stdout, res.stdout + res.stderr
    assert set(glob.glob("/dev/shm/sharedcache-demo-*")) == before
