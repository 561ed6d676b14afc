"""`sharedcache ls` and `sharedcache inspect` against a real running owner."""
from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from helpers import cli


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
