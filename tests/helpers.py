"""In-process helpers: compose the real config and go through the transformers integration; a free port and
requests to an SGLang server's HTTP API, for the tests and for bench/ (which imports this module: its
top-level imports stay light, pytest included)."""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from sharedcache import CacheSettings, Role
from sharedcache.conf import compose, role_of


def role_and_settings(role: str, cache_dir: Path, *overrides: str) -> tuple[Role, CacheSettings, dict]:
    cfg = compose([f"role={role}", f"cache.dir={cache_dir}", *overrides])
    r = role_of(cfg)
    return r, CacheSettings.from_mapping(cfg["cache"]), cfg


def from_pretrained(role: str, cache_dir: Path, model_path: Path, *overrides: str, cls=None, **kwargs):
    """`cls.from_pretrained(model_path, **kwargs)` with the integration installed for `role`."""
    from transformers import AutoModelForCausalLM

    from sharedcache_integrations import hf

    r, settings, _ = role_and_settings(role, cache_dir, f"cache.key={overrides_key(overrides)}", *overrides)
    with hf.patched(role=r, cache=settings):
        return (cls or AutoModelForCausalLM).from_pretrained(model_path, **kwargs)


def overrides_key(overrides) -> str:
    for o in overrides:
        if o.startswith("cache.key="):
            return o.split("=", 1)[1]
    return "k"


def mappings_of(directory: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file under `directory` (after collecting garbage)."""
    gc.collect()
    d = str(Path(directory).resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if d in line]


def copy_entry(src_dir: Path, key: str, dst_dir: Path, dst_key: str = "k") -> Path:
    """Copy a published entry (manifest + arena) into another cache dir, owner not running there."""
    dst = dst_dir / dst_key
    dst.mkdir(mode=0o700)
    for f in (src_dir / key).iterdir():
        if f.name == "manifest.json" or f.name.startswith("arena-"):
            shutil.copy2(f, dst / f.name)
    return dst


def entry_copy(published, cache_dir, mutate_manifest=None, mutate_arena=None):
    """The `published` entry copied to `cache_dir`/k (its owner does not hold it there), then edited."""
    src, _ = published
    dst = copy_entry(src, "k", cache_dir)
    if mutate_manifest is not None:
        path = dst / "manifest.json"
        data = json.loads(path.read_text())
        out = mutate_manifest(data)
        path.write_bytes(out if isinstance(out, bytes) else json.dumps(data).encode())
    if mutate_arena is not None:
        mutate_arena(next(dst.glob("arena-*")))
    return dst


def attach_fails(cache_dir, model_path, exc, *patterns, overrides=(), **kwargs):
    """A decode of key k in `cache_dir` fails with `exc` naming `patterns`, and leaves nothing behind."""
    import pytest

    from sharedcache.instance import _BY_MODEL

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    before = len(_BY_MODEL)
    fds = set(os.listdir("/proc/self/fd"))
    manifest = cache_dir / "k" / "manifest.json"
    snapshot = manifest.read_bytes() if manifest.exists() else None
    with pytest.raises(exc) as info:
        from_pretrained("decode", cache_dir, model_path, "cache.wait_timeout_s=0.5", *overrides, **kwargs)
    msg = str(info.value)
    del info  # the traceback holds the frames; drop it so the mapping can go
    for p in patterns:
        assert p in msg, msg
    assert len(_BY_MODEL) == before, "no model may come out of a failed attach"
    assert (manifest.read_bytes() if manifest.exists() else None) == snapshot, "a failed attach changes nothing"
    assert mappings_of(cache_dir) == [], "a failed attach must not leave the arena mapped"
    leaked = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds
              if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in leaked if str(cache_dir) in p], f"a failed attach leaves no fd open: {leaked}"
    return msg


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`sharedcache ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "sharedcache.cli", *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768+), so that no process asking the kernel
    for any free port (SGLang's NCCL/gloo ports) can be handed it between now and a server's bind."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def sglang_request(port: int, path: str, body: dict | None = None, *, timeout: float = 300,
                   error_answer: bool = False) -> dict:
    """The JSON answer of the SGLang server (or router) on 127.0.0.1:`port` to a GET of `path`, or to a
    POST of `body` as JSON. An HTTP error raises, unless `error_answer`: then its own JSON answer is
    returned (SGLang answers a refused request with 400 and its message)."""
    url = f"http://127.0.0.1:{port}{path}"
    req = url if body is None else urllib.request.Request(url, json.dumps(body).encode(),
                                                           {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if not error_answer:
            raise
        return json.loads(e.read())


def sglang_healthy(port: int) -> bool:
    """Does the server (or router) on 127.0.0.1:`port` answer its /health with 200?"""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def attached_decode(cache_dir: Path, home: Path, model: str = "tiny", *overrides: str) -> subprocess.Popen:
    """A decode in its own process (tests/probe.py), attached and waiting for a line on stdin before it
    generates and exits; its last stdout line is then its JSON report."""
    extra = [arg for o in overrides for arg in ("--override", o)]
    probe = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "probe.py"), "--role", "decode",
                              "--cache-dir", str(cache_dir), "--model", model, "--home", str(home), *extra,
                              "--wait-stdin"], cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = probe.stdout.readline()
    if not line or json.loads(line) != {"attached": True}:
        probe.kill()
        raise AssertionError(f"the decode did not attach: {line!r} {probe.stderr.read()[-3000:]}")
    return probe


def served_by(entry, pid: int, timeout: float = 30) -> None:
    """Until `entry`'s manifest names `pid` as the process that serves its arena (a hand-on takes ~0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = entry.read()
        if m.server is not None and m.server.pid == pid:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took over serving {entry.key}: {entry.read().server}")


class Asking:
    """`ask()` called back to back on a thread until stopped: what a client of a server sees while something
    beside it dies and restarts. `answers`: (time.time(), what ask returned); `failures`: (time, the error)."""

    def __init__(self, ask) -> None:
        self.ask = ask
        self.answers: list[tuple[float, bool]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append((time.time(), self.ask()))
            except Exception as e:  # noqa: BLE001 - every failure is counted: what the client would see
                self.failures.append((time.time(), repr(e)[:200]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
