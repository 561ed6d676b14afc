"""Hostile and broken surroundings: entries reached through links or open directories, hard-linked
arenas, gc racing attachers, odd files where sharedcache keeps its own, values out of range, text that
would drive a terminal, and writes into shared weights. Each refusal is one sharedcache error and
leaves nothing behind; real files, real processes, real locks and mappings."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers import attach_fails, cli, entry_copy, from_pretrained, mappings_of
from sharedcache import AttachTimeout, ConfigError, EntryError, ManifestError, StorageError
from sharedcache.cache import CacheDir
from sharedcache.fingerprint import Fingerprint


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _orphan(published, cache_dir, key: str = "k", **edits) -> Path:
    """A copy of the published entry whose owner is dead (a real pid that has exited)."""
    def mutate(d):
        d["owner"]["pid"] = _dead_pid()
        for path, value in edits.items():
            node = d
            *parents, last = path.split("__")
            for part in parents:
                node = node[part]
            node[last] = value
    dst = entry_copy(published, cache_dir, mutate)
    if key != "k":
        dst.rename(cache_dir / key)
        dst = cache_dir / key
    return dst


def _arena_digest(entry_dir: Path) -> str:
    return hashlib.sha256(next(entry_dir.glob("arena-*.bin")).read_bytes()).hexdigest()


def _holding(script: str, *args: str) -> subprocess.Popen:
    """A Python process that runs `script`, prints 'ready', and holds what it made until stdin closes."""
    code = textwrap.dedent(script) + "\nprint('ready', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"holder did not start: {line!r}"
    return proc


# ---------------------------------------------------------------- 1-2: entry directory and arena file

def test_decode_refuses_an_entry_directory_that_is_a_symlink(published, cache_dir, models):
    real = entry_copy(published, cache_dir).rename(cache_dir / "elsewhere")
    os.symlink(real, cache_dir / "k")
    attach_fails(cache_dir, models["tiny"], EntryError, "cache entry directory", "is a symbolic link")


def test_decode_refuses_an_entry_directory_open_to_others(published, cache_dir, models):
    dst = entry_copy(published, cache_dir)
    os.chmod(dst, 0o777)
    attach_fails(cache_dir, models["tiny"], EntryError, "accessible to other users", "chmod 700")


def test_decode_refuses_an_entry_directory_of_another_user(published, cache_dir, models):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    dst = entry_copy(published, cache_dir)
    os.chown(dst, 65534, 65534)
    attach_fails(cache_dir, models["tiny"], EntryError, "belongs to uid 65534")


def test_hard_linked_arena_is_not_mapped(published, cache_dir, models):
    dst = entry_copy(published, cache_dir)
    arena = next(dst.glob("arena-*.bin"))
    other = cache_dir / "someone-elses-bytes"
    other.write_bytes(arena.read_bytes())
    arena.unlink()
    os.link(other, arena)
    attach_fails(cache_dir, models["tiny"], EntryError, "2 hard links")


def test_attached_decode_maps_the_arena_read_only(published, cache_dir, models):
    """A stray in-place write in an attached instance faults there; the shared bytes stay as published."""
    dst = _orphan(published, cache_dir)
    before = _arena_digest(dst)
    code = f"""
        import sys, torch
        from helpers import from_pretrained
        model = from_pretrained("decode", {str(cache_dir)!r}, {str(models["tiny"])!r})
        print("attached", flush=True)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        print("wrote", flush=True)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert "attached" in res.stdout and "wrote" not in res.stdout, res.stdout + res.stderr
    assert res.returncode == -signal.SIGSEGV, (res.returncode, res.stderr[-2000:])
    assert _arena_digest(dst) == before


def test_owner_cannot_change_published_weights_in_place(cache_dir, models):
    """Once published, the owner's own mapping is read-only too: load_state_dict into the prefill faults
    there instead of silently changing what every attached decode computes."""
    code = f"""
        import torch
        from helpers import from_pretrained
        model = from_pretrained("prefill", {str(cache_dir)!r}, {str(models["tiny"])!r})
        print("published", flush=True)
        model.load_state_dict({{k: torch.zeros_like(v) for k, v in model.state_dict().items()}})
        print("overwritten", flush=True)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert "published" in res.stdout and "overwritten" not in res.stdout, res.stdout + res.stderr
    assert res.returncode == -signal.SIGSEGV, (res.returncode, res.stderr[-2000:])


# ---------------------------------------------------------------- 3-4: gc and what is in use

@pytest.mark.slow
def test_gc_keeps_an_entry_a_decode_is_attaching_to(published, cache_dir, models):
    """The window between reading the manifest and mapping the arena: a real decode, paused right after
    it read the manifest (its attach waits for a line on stdin). gc keeps the entry; the
    decode then attaches to it."""
    _orphan(published, cache_dir)
    code = f"""
        import sys
        from sharedcache import steps_load as steps
        attach = steps._attach_held
        def paused(s, manifest, deadline):
            print("read", flush=True)
            sys.stdin.readline()
            return attach(s, manifest, deadline)
        steps._attach_held = paused
        from helpers import from_pretrained
        from sharedcache_integrations import hf
        model = from_pretrained("decode", {str(cache_dir)!r}, {str(models["tiny"])!r}, "cache.wait_timeout_s=30")
        print("weights allocated", hf.instance_of(model).report.weight_bytes_allocated, flush=True)
    """
    decode = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    try:
        assert decode.stdout.readline().strip() == "read"
        out = cli("gc", "--dir", str(cache_dir))
        assert out.returncode == 0 and "0 removed, 1 kept" in out.stdout, out.stdout + out.stderr
        rest, _ = decode.communicate("go\n", timeout=120)
        assert decode.returncode == 0 and "weights allocated 0" in rest, rest
    finally:
        decode.kill()
    out = cli("gc", "--dir", str(cache_dir))
    assert "1 removed, 0 kept" in out.stdout, out.stdout
    assert not (cache_dir / "k" / "manifest.json").exists() and not list((cache_dir / "k").glob("arena-*"))


def test_an_attacher_blocked_on_a_lock_gc_unlinks_takes_the_lock_again_where_it_is_now(cache_dir):
    """gc removes an emptied entry's lock files and directory while it holds the locks. An attacher that opened
    `attach.lock` before and waits for it must not end up holding a lock on the unlinked file (a later gc
    could not see it): it takes the lock again on the file a new owner made at the same path."""
    from sharedcache.ownership import Claim

    entry = CacheDir(cache_dir).entry("k")
    claim = Claim.take(entry, retry_s=0)  # what gc takes: the owner lock, then the attach and write locks
    unused = entry.lock_unused()
    code = f"""
        import os
        from sharedcache.cache import CacheDir
        fd = CacheDir({str(cache_dir)!r}).entry("k").hold_for_attach()
        st = os.fstat(fd)
        print(st.st_ino, st.st_nlink, flush=True)
    """
    attacher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        lock = str(entry.dir / "attach.lock")
        deadline = time.monotonic() + 60
        while not _has_open(attacher.pid, lock):  # it opened the lock file and waits for the lock
            assert attacher.poll() is None and time.monotonic() < deadline, attacher.communicate()
            time.sleep(0.01)
        with entry.write_lock():
            assert entry.remove_emptied() and not entry.dir.exists()
        os.close(unused)
        claim.close()
        new_owner = Claim.take(entry, retry_s=0)  # the key's next owner makes the entry anew
        out, err = attacher.communicate(timeout=60)
        assert attacher.returncode == 0, err
        ino, nlink = map(int, out.split())
        assert nlink == 1 and ino == os.stat(entry.dir / "attach.lock").st_ino, (out, entry.dir)
        new_owner.close()
    finally:
        attacher.kill()


def test_gc_removes_a_directory_left_with_nothing_but_lock_files_and_says_so(cache_dir):
    """An owner that gave up before writing anything leaves its lock files: gc and its dry run both name it,
    gc removes it, and the key can be owned again afterwards."""
    from sharedcache.ownership import Claim

    Claim.take(CacheDir(cache_dir).entry("gone"), retry_s=0).close()
    assert sorted(p.name for p in (cache_dir / "gone").iterdir()) == ["attach.lock", "owner.lock"]
    dry = cli("gc", "--dry-run", "--dir", str(cache_dir))
    assert "would remove gone: nothing but lock files left" in dry.stdout and (cache_dir / "gone").exists(), dry
    out = cli("gc", "--dir", str(cache_dir))
    assert "removed gone: nothing but lock files left" in out.stdout and "gc: 1 removed, 0 kept" in out.stdout, out
    assert not (cache_dir / "gone").exists()
    Claim.take(CacheDir(cache_dir).entry("gone"), retry_s=0).close()


def _has_open(pid: int, path: str) -> bool:
    try:
        return any(os.readlink(fd) == path for fd in Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_gc_keeps_an_entry_mapped_under_a_path_with_a_newline(published, tmp_path):
    """/proc/<pid>/maps writes a newline in a path as \\012: a process that maps the arena file itself
    (holding no lock of ours) is still seen, by gc and in `ls`'s MAPPED BY column."""
    root = tmp_path / "cache\nwith newline"
    root.mkdir(mode=0o700)
    arena = next(_orphan(published, root).glob("arena-*.bin"))
    mapper = _holding("""
        import mmap, sys
        f = open(sys.argv[1], "rb")
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    """, str(arena))
    try:
        out = cli("gc", "--dir", str(root))
        assert "0 removed, 1 kept" in out.stdout, out.stdout + out.stderr
        row = cli("ls", "--dir", str(root)).stdout.splitlines()[1].split()
        assert row[0] == "k" and row[6] == str(mapper.pid), row  # KEY MODEL BACKEND SIZE OWNER STATE, MAPPED BY
    finally:
        mapper.communicate("", timeout=60)
    assert "1 removed" in cli("gc", "--dir", str(root)).stdout


def test_gc_reports_files_it_did_not_make_and_goes_on(published, cache_dir):
    odd = _orphan(published, cache_dir, key="odd")
    (odd / "arena-1-cafe.bin").mkdir()
    (odd / "settled.json").mkdir()
    _orphan(published, cache_dir, key="plain")
    out = cli("gc", "--dir", str(cache_dir))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "removed plain" in out.stdout and "odd kept:" in out.stdout and "is a directory" in out.stdout, out.stdout
    assert not (cache_dir / "plain" / "manifest.json").exists()
    assert (odd / "manifest.json").is_file() and list(odd.glob("arena-*.bin"))  # nothing of odd was removed


def _foreign(entry: Path, where: str) -> Path:
    """Put a directory, FIFO or symbolic link in place of one of the entry's files."""
    name, kind = where.split(":")
    path = entry / "manifest.json" if name == "manifest" else next(entry.glob("arena-*.bin"))
    path.unlink()
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.symlink_to(entry / "elsewhere")
    return path


@pytest.mark.parametrize("where", ["manifest:dir", "arena:dir", "arena:fifo", "arena:link"])
def test_gc_dry_run_says_what_gc_does_with_an_entry_holding_files_it_did_not_make(published, cache_dir, where):
    """Issue 24: the dry run said it would remove such an entry; gc then kept it, having deleted its manifest
    or arena already. Now both report it kept, with the file and what it is, and neither removes anything."""
    odd = _orphan(published, cache_dir, key="odd")
    path = _foreign(odd, where)
    before = sorted(p.name for p in odd.iterdir())
    dry = cli("gc", "--dry-run", "--dir", str(cache_dir), timeout=60)
    real = cli("gc", "--dir", str(cache_dir), timeout=60)
    for out in (dry, real):
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert f"odd kept: {path} is a" in out.stdout and "not a file sharedcache made" in out.stdout, out.stdout
        assert "0 removed, 1 kept" in out.stdout.replace("would remove", "removed"), out.stdout
    assert sorted(p.name for p in odd.iterdir()) == before


@pytest.mark.slow
def test_a_new_owner_sweeps_the_temp_manifest_of_an_owner_killed_inside_the_rename(launcher, cache_dir):
    """Issue 24: a killed owner's `.manifest.json.<pid>.<rand>.tmp` outlived the next owner until gc; the next
    owner's publish removes it (a live process's temp file stays: it may be renaming it right now)."""
    entry = cache_dir / "sc-llama-tiny"
    entry.mkdir(mode=0o700)
    dead = entry / f".manifest.json.{_dead_pid()}.0badc0de.tmp"
    live = entry / f".manifest.json.{os.getpid()}.0ddba11.tmp"
    for tmp in (dead, live):
        tmp.write_bytes(b"{}")
    prefill = launcher.start("prefill")
    assert prefill.wait_report()["mode"] == "save", prefill.output()
    assert not dead.exists() and live.exists()
    assert prefill.stop() == 0


@pytest.mark.parametrize("file", ["/", "../../usr/lib"])
def test_gc_removes_an_entry_whose_handle_names_no_arena_file(published, cache_dir, file):
    _orphan(published, cache_dir, handle={"file": file})
    out = cli("gc", "--dir", str(cache_dir))
    assert "1 removed, 0 kept" in out.stdout, out.stdout + out.stderr
    assert not (cache_dir / "k" / "manifest.json").exists()


def test_gc_removes_a_temp_manifest_of_an_owner_killed_inside_the_rename(published, cache_dir):
    dst = _orphan(published, cache_dir)
    tmp = dst / f".manifest.json.{_dead_pid()}.0badc0de.tmp"
    tmp.write_bytes((dst / "manifest.json").read_bytes())
    (dst / "manifest.json").unlink()
    out = cli("gc", "--dir", str(cache_dir))
    assert "1 removed" in out.stdout, out.stdout + out.stderr
    assert not tmp.exists() and not list(dst.glob("arena-*"))


@pytest.mark.parametrize("kind", ["symlink", "world-writable", "group-readable"])
def test_gc_refuses_a_cache_root_that_decode_and_prefill_refuse(published, cache_dir, tmp_path, kind):
    _orphan(published, cache_dir)
    target = cache_dir
    if kind == "symlink":
        target = tmp_path / "link"
        os.symlink(cache_dir, target)
    else:
        os.chmod(cache_dir, 0o777 if kind == "world-writable" else 0o750)
    out = cli("gc", "--dir", str(target))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: [sharedcache.entry] cache directory") and "\n" == out.stderr[-1]
    assert (cache_dir / "k" / "manifest.json").exists() and list((cache_dir / "k").glob("arena-*.bin"))


def test_gc_does_not_block_on_a_fifo_named_manifest(cache_dir):
    entry = cache_dir / "k"
    entry.mkdir(mode=0o700)
    os.mkfifo(entry / "manifest.json", 0o600)
    out = cli("gc", "--dir", str(cache_dir), timeout=60)
    assert out.returncode == 0 and "is a FIFO, not a file sharedcache made" in out.stdout, out.stdout + out.stderr
    ls = cli("ls", "--dir", str(cache_dir), timeout=60)
    assert ls.returncode == 0


# ---------------------------------------------------------------- 5: hangs and stale entries

def test_decode_does_not_attach_to_an_entry_from_another_boot(published, cache_dir, models):
    _orphan(published, cache_dir, owner__boot_id="another-boot")
    attach_fails(cache_dir, models["tiny"], AttachTimeout, "before the last reboot (stale)")


def test_decode_with_a_missing_cache_dir_creates_nothing(cache_dir, models):
    missing = cache_dir / "typo"
    with pytest.raises(AttachTimeout, match="does not exist yet"):
        from_pretrained("decode", missing, models["tiny"], "cache.wait_timeout_s=0.3")
    assert not missing.exists()
    out = cli("inspect", "k", "--dir", str(missing))
    assert out.returncode == 2 and "no manifest" in out.stderr and not missing.exists()


# ---------------------------------------------------------------- odd files where sharedcache keeps its own

@pytest.mark.parametrize("name,kind", [("owner.lock", "symlink"), ("owner.lock", "directory"),
                                       ("write.lock", "directory"), ("write.lock", "symlink")])
def test_prefill_refuses_odd_lock_files(cache_dir, models, tmp_path, name, kind):
    entry = cache_dir / "k"
    entry.mkdir(mode=0o700)
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text("")
        os.symlink(tmp_path / "elsewhere", entry / name)
    else:
        (entry / name).mkdir()
    with pytest.raises(EntryError, match=f"lock file .*{name} is a"):
        from_pretrained("prefill", cache_dir, models["tiny"])
    assert not (entry / "manifest.json").exists() and not list(entry.glob("arena-*"))
    assert mappings_of(cache_dir) == []


def test_decode_refuses_a_directory_named_like_the_arena(published, cache_dir, models):
    def replace(arena: Path):
        arena.unlink()
        arena.mkdir()
    entry_copy(published, cache_dir, mutate_arena=replace)
    attach_fails(cache_dir, models["tiny"], EntryError, "is not a regular file")


def test_dangling_manifest_symlink_is_refused_at_once(published, cache_dir, models, tmp_path):
    dst = entry_copy(published, cache_dir)
    (dst / "manifest.json").unlink()
    os.symlink(tmp_path / "nothing-here", dst / "manifest.json")
    msg = attach_fails(cache_dir, models["tiny"], ManifestError, "symbolic link", overrides=("cache.wait_timeout_s=60",))
    assert "no owner has published" not in msg


@pytest.mark.parametrize("kind", ["dangling-symlink", "regular-file", "name-too-long"])
def test_unusable_cache_dir_is_one_clear_error(cache_dir, models, tmp_path, kind):
    if kind == "dangling-symlink":
        root = tmp_path / "cache"
        os.symlink(tmp_path / "nowhere", root)
        exc, pattern = EntryError, "is a symbolic link"
    elif kind == "regular-file":
        root = tmp_path / "cache"
        root.write_text("not a directory")
        exc, pattern = EntryError, "is not a directory"
    else:
        root = tmp_path / ("x" * 300) / "cache"
        exc, pattern = StorageError, "File name too long"
    for role in ("prefill", "decode"):
        with pytest.raises(exc, match=pattern) as info:
            from_pretrained(role, root, models["tiny"], "cache.wait_timeout_s=0.3")
        assert "cache.dir" in str(info.value) or "cache directory" in str(info.value)
    assert mappings_of(tmp_path) == []


def test_cache_dir_without_write_permission_is_a_storage_error(cache_dir, models):
    if os.geteuid() == 0:
        pytest.skip("root writes into a mode-500 directory anyway; this needs an unprivileged user")
    os.chmod(cache_dir, 0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            from_pretrained("prefill", cache_dir, models["tiny"])
    finally:
        os.chmod(cache_dir, 0o700)


def test_mapping_beyond_the_address_space_limit_is_a_storage_error(published, cache_dir):
    """ENOMEM from mmap under `ulimit -v`: the backend's attach, in a process whose address space has room
    for everything but the arena."""
    _orphan(published, cache_dir)
    code = f"""
        import resource
        from sharedcache.backends.cpu_shm import CpuShmBackend
        from sharedcache.cache import CacheDir
        from sharedcache import CacheSettings, StorageError
        from sharedcache.conf import compose
        backend = CpuShmBackend(CacheSettings.from_mapping(compose([])["cache"]))
        entry = CacheDir({str(cache_dir)!r}).entry("k")
        manifest = entry.read()
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + manifest.arena.size // 2, resource.RLIM_INFINITY))
        try:
            backend.attach(entry.dir, manifest)
        except StorageError as e:
            print("refused:", e)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "refused:" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "Cannot allocate memory" in res.stdout and "ulimit -v" in res.stdout


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("edit,pattern", [
    (lambda d: d["device"].update(index=float("nan")), "NaN is not a number"),
    (lambda d: d["arena"].update(size=int("9" * 4000)), "arena.size must be an integer in [1, 2**63)"),
    (lambda d: d["handle"].update(file="arena-\u0000.bin"), "handle.file must be a plain name"),
])
def test_manifest_values_out_of_range_are_refused(published, cache_dir, models, edit, pattern):
    def mutate(d):
        edit(d)
        return json.dumps(d).encode()  # json.dumps writes NaN; a manifest may not hold it
    entry_copy(published, cache_dir, mutate)
    attach_fails(cache_dir, models["tiny"], ManifestError, pattern)
    ls = cli("ls", "--dir", str(cache_dir))
    assert ls.returncode == 0 and "corrupt" in ls.stdout and "Traceback" not in ls.stderr, ls.stdout + ls.stderr
    inspect = cli("inspect", "k", "--dir", str(cache_dir))
    assert inspect.returncode == 4 and inspect.stderr.startswith("error: [sharedcache.manifest]"), inspect.stderr
    gc = cli("gc", "--dir", str(cache_dir))
    assert gc.returncode == 0 and "removed k: unreadable manifest" in gc.stdout, gc.stdout + gc.stderr


def test_duplicate_json_keys_are_refused(published, cache_dir, models):
    def mutate(d):
        body = json.dumps(d)
        return body.replace('"backend":', '"backend": "cuda_ipc", "backend":', 1).encode()
    entry_copy(published, cache_dir, mutate)
    attach_fails(cache_dir, models["tiny"], ManifestError, "'backend' appears twice")


def test_alignment_without_bound_is_a_config_error(cache_dir, models):
    with pytest.raises(ConfigError, match="power of two from 256 bytes to 2 MiB"):
        from_pretrained("prefill", cache_dir, models["tiny"], f"cache.alignment={2**64}")
    assert list(cache_dir.iterdir()) == []


def test_terminal_escapes_in_a_manifest_are_printed_escaped(published, cache_dir):
    def mutate(d):
        fp = dict(d["fingerprint"], model="evil\x1b]0;pwned\x07\x1b[2J")
        d["fingerprint"] = fp
        d["fingerprint_digest"] = Fingerprint.from_json(fp).digest()
    entry_copy(published, cache_dir, mutate)
    for args in (("ls",), ("inspect", "k")):
        out = cli(*args, "--dir", str(cache_dir))
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert "evil\\x1b]0;pwned\\x07" in out.stdout


@pytest.mark.slow
def test_a_mismatch_against_a_huge_published_value_is_one_bounded_line(published, cache_dir, launcher):
    """Issue 24: FingerprintMismatch quoted the published values whole (a 60 MB model name made a line of 63
    million characters in the log, on stderr and in report.json). Now every message quotes what it read
    shortened, and no message or hint exceeds a few KiB."""
    def mutate(d):
        fp = dict(d["fingerprint"], model="m" * (8 << 20), config_sha256="0" * 64)
        d["fingerprint"] = fp
        d["fingerprint_digest"] = Fingerprint.from_json(fp).digest()
    entry_copy(published, cache_dir, mutate)
    decode = launcher.run("decode", "cache.key=k", "cache.wait_timeout_s=5", timeout=120)
    assert decode.popen.returncode == 2, decode.output()
    report = decode.report()
    assert report["error"] == "FingerprintMismatch" and "differing fields: model, config_sha256" in report["message"]
    assert "(8388610 characters)" in report["message"] and len(report["message"]) < 4096, report["message"][:300]
    assert len(decode.output()) < 16384 and max(map(len, decode.output().splitlines())) < 4096


@pytest.mark.slow
def test_a_report_that_cannot_be_written_is_one_line_with_its_exit_code(launcher):
    """Issue 24: report.json standing as a directory in the run directory killed a decode that had attached
    with a raw IsADirectoryError traceback and exit 1. Now: one line naming the path, the storage exit code,
    and nothing of the run left published."""
    prefill = launcher.start("prefill")
    prefill.wait_report()
    run_dir = launcher.workdir / "decode-unwritable"
    (run_dir / "report.json").mkdir(parents=True)
    decode = launcher.run("decode", name="decode-unwritable", timeout=120)
    out = decode.output()
    assert decode.popen.returncode == 5 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "ReportUnwritable" in line or "report" in line and "failed" in line]
    assert len(lines) == 1 and f"{run_dir / 'report.json'}" in lines[0] and "Is a directory" in lines[0], out
    assert prefill.stop() == 0


@pytest.mark.parametrize("name", ["back\\slash", "${oc.env:HOME}", "a,b='c'=[1]", "trailing\\"])
def test_sglang_switch_values_are_taken_literally(tmp_path, name):
    """Issue 24: a backslash in SHAREDCACHE_DIR was doubled and `${oc.env:HOME}` interpolated."""
    from sharedcache_integrations.sglang import config_from_switches

    odd = str(tmp_path / name)
    cfg = config_from_switches({"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_DIR": odd})
    assert cfg.settings.dir == odd and cfg.key_from_model


@pytest.mark.parametrize("env, says", [
    ({"SHAREDCACHE_KEY": "../escape"}, "cache key '../escape' is not a plain name"),
    ({"SHAREDCACHE_KEY": "${oc.env:HOME}"}, "cache key '${oc.env:HOME}' is not a plain name"),
    ({"SHAREDCACHE_KEY": "k" * 129}, "at most 128 characters"),
    ({"SHAREDCACHE_OVERRIDES": "role=plain"}, "SHAREDCACHE_OVERRIDES sets the role ('role=plain')"),
    ({"SHAREDCACHE_OVERRIDES": "cache.wait_timeout_s=5 role.mode=off"}, "sets the role ('role.mode=off')"),
    ({"SHAREDCACHE_OVERRIDES": "'unclosed"}, "SHAREDCACHE_OVERRIDES is not a shell-quoted list"),
])
def test_sglang_switches_are_checked_before_sglang_loads_anything(tmp_path, env, says):
    """Issue 24: a key escaping the cache dir was accepted at start and failed minutes later in a traceback,
    and SHAREDCACHE_OVERRIDES=role=plain silently made a decode server an unshared one. Refused at once."""
    from sharedcache_integrations.sglang import config_from_switches

    with pytest.raises((ConfigError, EntryError)) as info:
        config_from_switches({"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_DIR": str(tmp_path / "c"), **env})
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_serve_dir_is_the_very_directory_named(tmp_path, sc_home):
    """Issue 24: `sharedcache serve --dir D` handed D to Hydra unquoted: a comma or quote gave a grammar error,
    `${oc.env:HOME}` made the holder publish elsewhere. The holder now publishes in D itself."""
    odd = tmp_path / "c,d='e' ${oc.env:HOME}"
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "sharedcache.cli", "serve", "--dir", str(odd), "model=tiny",
                               f"model.embedded.dir={sc_home}/models/tiny", f"hydra.run.dir={run_dir}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = iter(holder.stdout.readline, "")
        for line in lines:
            if "Attach with:" in line:
                break
        attach = shlex.split(next(lines))
        report = json.loads((run_dir / "report.json").read_text())
        assert report["cache_dir"] == str(odd) and (odd / "sc-llama-tiny" / "manifest.json").exists(), report
        # the printed attach command, as a shell would split it, reaches the same directory
        assert attach[:2] == ["sharedcache", "launch"] and "role=decode" in attach, attach  # `serve`: installed
        decode = subprocess.run([sys.executable, "-m", "sharedcache_integrations.launch", *attach[2:],
                                 f"hydra.run.dir={tmp_path / 'decode'}"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert decode.returncode == 0, decode.stdout + decode.stderr
        attached = json.loads((tmp_path / "decode" / "report.json").read_text())
        assert attached["mode"] == "load" and attached["cache_dir"] == str(odd) and attached["weight_bytes_allocated"] == 0
    finally:
        holder.terminate()
        holder.wait(60)


def test_launch_with_a_model_path_that_holds_no_model(launcher, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    proc = launcher.run("prefill", f"model.path={empty}")
    assert proc.popen.returncode == 2
    out = proc.output()
    assert "has no config.json" in out and "Traceback" not in out, out[-3000:]
    assert not CacheDir(launcher.cache_dir).entries()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (mounting needs privileges: skipped where the test runs without them)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64,mode=700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill it ({res.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_is_a_storage_error_and_leaves_nothing(small_tmpfs, models):
    """The tiny model's arena does not fit in 256 KiB: posix_fallocate fails with ENOSPC at publish time."""
    cache = small_tmpfs / "cache"
    with pytest.raises(StorageError, match="No space left on device") as info:
        from_pretrained("prefill", cache, models["tiny"])
    assert "df -h" in str(info.value)
    assert not list((cache / "k").glob("arena-*")) and not (cache / "k" / "manifest.json").exists()
    assert mappings_of(small_tmpfs) == []


def test_read_only_filesystem_is_a_storage_error(small_tmpfs, models):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(StorageError, match="Read-only file system") as info:
        from_pretrained("prefill", small_tmpfs / "cache", models["tiny"])
    assert "writable" in str(info.value)


@pytest.mark.slow
def test_a_lock_held_by_a_stopped_process_is_an_error_not_a_hang(published, cache_dir, models):
    """A gc stopped (Ctrl-Z) while it holds an entry's attach lock exclusively: a decode gives up after the
    short locks' bound with a message naming the file, instead of waiting forever."""
    _orphan(published, cache_dir)
    holder = _holding("""
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    """, str(cache_dir / "k" / "attach.lock"))
    try:
        attach_fails(cache_dir, models["tiny"], EntryError, "attach.lock has been held by another process")
    finally:
        holder.communicate("", timeout=30)


def test_ls_calls_an_entry_no_decode_would_attach_to_stale(published, cache_dir):
    dst = _orphan(published, cache_dir)
    arena = next(dst.glob("arena-*.bin"))
    os.link(arena, cache_dir / "second-name")
    line = cli("ls", "--dir", str(cache_dir)).stdout.splitlines()[1]
    assert line.startswith("k ") and " stale " in line and "orphaned" not in line, line


def test_entry_from_an_unknown_backend_names_the_entry_not_the_config(published, cache_dir, models):
    entry_copy(published, cache_dir, lambda d: d.update(backend="evil"))
    attach_fails(cache_dir, models["tiny"], ManifestError, "published with backend 'evil'", "Remove the entry")


def test_prefill_over_a_directory_named_manifest_refuses_before_loading(cache_dir, models):
    (cache_dir / "k").mkdir(mode=0o700)
    (cache_dir / "k" / "manifest.json").mkdir()
    with pytest.raises(EntryError, match="is not a file sharedcache wrote"):
        from_pretrained("prefill", cache_dir, models["tiny"])
    assert not list((cache_dir / "k").glob("arena-*"))


def test_a_shared_system_directory_as_cache_dir_is_not_told_to_chmod(models):
    if os.stat("/dev/shm").st_uid != os.getuid():
        pytest.skip("/dev/shm is not ours here: the ownership check answers first")
    with pytest.raises(EntryError, match="do not change its mode") as info:
        from_pretrained("decode", Path("/dev/shm"), models["tiny"], "cache.wait_timeout_s=0.3")
    assert "chmod" not in str(info.value)


def test_cli_with_bad_overrides_or_a_closed_pipe_prints_no_traceback(published, cache_dir):
    out = cli("ls", "cache=nonexistent")
    assert out.returncode == 2 and out.stderr.startswith("error: [sharedcache.config]"), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
    _orphan(published, cache_dir)
    res = subprocess.run(f"{sys.executable} -m sharedcache.cli ls --dir {cache_dir} | head -c 1", shell=True,
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
