"""Operating the cache: a persistent holder, gc, who maps what, many instances at once, no leaks."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers import cli, from_pretrained, mappings_of
from sharedcache_integrations import hf
from sharedcache import ArenaError
from sharedcache.backends.fdpass import FdServer, receive_fds

pytestmark = pytest.mark.slow  # scenarios with several real processes each: `pytest -m slow`



def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_holder_serves_attachers_and_sigterm_refuses_new_ones(launcher, cache_dir, sc_home, tmp_path):
    log = open(tmp_path / "holder.log", "wb")
    holder = subprocess.Popen([sys.executable, "-m", "sharedcache.cli", "serve", "--dir", str(cache_dir),
                               "model=tiny", f"model.embedded.dir={sc_home}/models/tiny",
                               f"hydra.run.dir={tmp_path}/holder"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(cache_dir / "sc-llama-tiny" / "manifest.json", holder)
        first = launcher.run("decode")
        assert first.popen.returncode == 0, first.output()
        again = launcher.run("decode")  # a restarted decode re-attaches to the same resident weights
        rep = json.loads((tmp_path / "holder" / "report.json").read_text())
        assert rep["role"] == "holder" and "generated" not in rep
        for d in (first.report(), again.report()):
            assert d["owner_pid"] == holder.pid and d["weight_bytes_allocated"] == 0
        auto = launcher.run("auto")  # auto attaches to a live holder instead of saving
        assert auto.report()["mode"] == "load"
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(60) == 0
    finally:
        holder.kill()
    late = launcher.run("decode", "cache.wait_timeout_s=1")
    assert late.popen.returncode == 3 and "waited 1s" in late.output()  # retryable


def test_ls_shows_who_maps_an_entry_and_gc_never_removes_one_in_use(launcher, cache_dir, sc_home):
    # three entries: a live owner, an orphan still mapped by a decode, and a plain orphan
    live = launcher.start("prefill", "cache.key=live", name="live")
    live.wait_report()
    for key in ("mapped", "stale"):
        p = launcher.start("prefill", f"cache.key={key}", name=key)
        p.wait_report()
        p.stop(signal.SIGKILL)
    probe = subprocess.Popen([sys.executable, str(REPO / "tests" / "probe.py"), "--role", "decode", "--cache-dir",
                              str(cache_dir), "--model", "tiny", "--home", str(sc_home), "--override",
                              "cache.key=mapped", "--wait-stdin"], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(probe.stdout.readline()) == {"attached": True}
        ls = cli("ls", "--dir", str(cache_dir)).stdout
        rows = {line.split()[0]: line for line in ls.splitlines()[1:]}
        assert " live " in rows["live"] and str(live.popen.pid) in rows["live"]
        assert " orphaned " in rows["mapped"] and str(probe.pid) in rows["mapped"]
        assert " orphaned " in rows["stale"]
        # an entry whose arena file vanished, and one from before a reboot
        (cache_dir / "gone").mkdir(mode=0o700)
        (cache_dir / "gone" / "manifest.json").write_bytes((cache_dir / "stale" / "manifest.json").read_bytes())
        (cache_dir / "reboot").mkdir(mode=0o700)
        m = json.loads((cache_dir / "stale" / "manifest.json").read_text())
        m["owner"]["boot_id"] = "another-boot"
        (cache_dir / "reboot" / "manifest.json").write_text(json.dumps(m))
        out = cli("gc", "--dir", str(cache_dir))
        assert out.returncode == 0, out.stderr
        assert "3 removed, 2 kept" in out.stdout, out.stdout
        assert (cache_dir / "live" / "manifest.json").exists() and (cache_dir / "mapped" / "manifest.json").exists()
        for key in ("stale", "gone", "reboot"):
            assert not (cache_dir / key / "manifest.json").exists() and not list((cache_dir / key).glob("arena-*"))
        out, _ = probe.communicate("go\n", timeout=120)  # the mapped orphan still serves its decode
        assert probe.returncode == 0 and json.loads(out.splitlines()[-1])["outside_mapping"] == []
    finally:
        probe.kill()


def test_eight_decodes_started_with_the_prefill_all_attach_to_one_entry(launcher, cache_dir):
    decodes = [launcher.start("decode", "cache.wait_timeout_s=300", name=f"d{i}") for i in range(8)]
    prefill = launcher.start("prefill", name="prefill")
    pre = prefill.wait_report(300)
    for d in decodes:
        assert d.wait(300) == 0, d.output()
        rep = d.report()
        assert rep["mode"] == "load" and rep["load_seconds"] is None and rep["weight_bytes_allocated"] == 0
        assert rep["owner_pid"] == pre["pid"] and rep["logits_sha256"] == pre["logits_sha256"]
    assert len(list(cache_dir.glob("*/manifest.json"))) == 1 and len(list(cache_dir.glob("*/arena-*"))) == 1


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_200_attach_detach_cycles_leak_neither_memory_nor_fds(models, cache_dir):
    owner = from_pretrained("prefill", cache_dir, models["default"])
    try:
        def cycle():
            model = from_pretrained("decode", cache_dir, models["default"])
            assert hf.instance_of(model).report.weight_bytes_allocated == 0
            del model
            gc.collect()

        for _ in range(20):  # warm up allocator and import caches
            cycle()
        rss, fds = _rss_kb(), _fds()
        for _ in range(200):
            cycle()
        assert _fds() == fds
        growth = (_rss_kb() - rss) * 1024
        assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 cycles of a 97 MiB model"
        maps = [line for line in mappings_of(cache_dir) if "arena-" in line]
        assert len(maps) == 1, "only the owner's own mapping may remain"
    finally:
        hf.instance_of(owner).close()


def test_50_instance_restarts_leave_nothing_behind(launcher, cache_dir):
    prefill = launcher.start("prefill")
    prefill.wait_report()
    pid = prefill.popen.pid
    fd_before = len(os.listdir(f"/proc/{pid}/fd"))
    files_before = sorted(p.name for p in (cache_dir / "sc-llama-tiny").iterdir())
    code = ("import sys; sys.path.insert(0, %r); from helpers import from_pretrained; from pathlib import Path; "
            "m = from_pretrained('decode', Path(%r), Path(%r), 'cache.key=sc-llama-tiny'); "
            "print(sum(p.numel() for p in m.parameters()))") % (str(REPO / "tests"), str(cache_dir),
                                                                str(launcher.home / "models" / "tiny"))
    for _ in range(50):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert len(os.listdir(f"/proc/{pid}/fd")) == fd_before
    assert sorted(p.name for p in (cache_dir / "sc-llama-tiny").iterdir()) == files_before
    assert prefill.stop() == 0


def test_socket_peer_of_another_uid_is_refused():
    if os.getuid() != 0:
        pytest.skip("needs root to run the peer as another uid")
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp dirs are closed to other uids
    os.chmod(tmp_path, 0o711)
    fd = os.open("/dev/null", os.O_RDONLY)
    server = FdServer(tmp_path / "arena-t.sock", lambda: ({"sizes": [1]}, [fd]))
    try:
        os.chmod(tmp_path / "arena-t.sock", 0o666)  # let the other uid reach the credential check
        code = ("import os, sys; sys.path.insert(0, %r); "
                "from sharedcache.backends.fdpass import receive_fds; from pathlib import Path; "
                "os.setgid(65534); os.setuid(65534); "  # imports first: root's Python is not readable after
                "receive_fds(Path(%r), 5)") % (str(REPO), str(tmp_path / "arena-t.sock"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "refused us: peer uid 65534" in out.stderr, out.stderr
        header, fds = receive_fds(tmp_path / "arena-t.sock", 5)  # our own uid is served
        assert len(fds) == 1
        for f in fds:
            os.close(f)
    finally:
        server.close()
        os.close(fd)
    with pytest.raises(ArenaError, match="no owner answers"):
        receive_fds(tmp_path / "arena-t.sock", 1)
    shutil.rmtree(tmp_path)
