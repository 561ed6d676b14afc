"""The core without any framework: layout planning, manifests on disk, the cpu_shm backend."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from sharedcache import ArenaError, CacheSettings, ConfigError, Fingerprint, ManifestError
from sharedcache.backends import get_backend, resolve
from sharedcache.binding import view_of
from sharedcache.cache import CacheDir
from sharedcache.conf import compose
from sharedcache.layout import TensorSlot, plan
from sharedcache.manifest import ArenaInfo, Manifest, Owner, write_manifest
from sharedcache.manifest_parse import read_manifest

SETTINGS = CacheSettings.from_mapping(compose([])["cache"])  # the packaged defaults: backends take no others

SLOTS = [
    TensorSlot("a.weight", "param", True, torch.float32, (3, 5)),
    TensorSlot("b.bias", "param", True, torch.bfloat16, (7,)),
    TensorSlot("c.inv_freq", "buffer", False, torch.float32, (4,)),
    TensorSlot("d.weight", "param", True, torch.float32, (3, 5), alias_of="a.weight"),
    TensorSlot("e.scale", "buffer", True, torch.int8, ()),
]
FP = Fingerprint("test", "1", "/m", None, "c" * 64, (("model.safetensors", 10, 1),), "float32", None, "cpu", 0, 1)


def test_plan_aligns_rounds_and_is_deterministic():
    lay = plan(SLOTS, alignment=256, granularity=4096)
    specs = lay.by_name()
    assert [specs[n].offset for n in ("a.weight", "b.bias", "c.inv_freq", "e.scale")] == [0, 256, 512, 768]
    assert specs["d.weight"].alias_of == "a.weight" and specs["d.weight"].offset == 0
    assert lay.size == 4096 and lay.payload_bytes == 60 + 14 + 16 + 1
    assert plan(SLOTS, alignment=256, granularity=4096).digest() == lay.digest()
    assert plan(SLOTS, alignment=512, granularity=4096).digest() != lay.digest()
    with pytest.raises(ValueError):
        plan(SLOTS, alignment=300, granularity=4096)


def _publish(cache_dir, backend="cpu_shm"):
    entry = CacheDir(cache_dir).entry("k").ensure()
    lay = plan(SLOTS, alignment=256, granularity=4096)
    arena = get_backend(backend, SETTINGS).create(entry.dir, lay.size, torch.device("cpu"))
    values = {}
    for spec in lay.tensors:
        if spec.alias_of is None:
            v = view_of(arena.base, spec)
            v.copy_(torch.arange(v.numel()).reshape(v.shape).to(v.dtype))
            values[spec.name] = v.clone()
    m = Manifest("k", FP, Owner.current(), backend, arena.handle, arena.device,
                 ArenaInfo(lay.size, lay.granularity, lay.alignment, lay.digest()), lay.tensors, 1.0)
    write_manifest(entry.manifest_path, m)
    return entry, arena, values


def test_manifest_round_trip_and_private_files(cache_dir):
    entry, arena, _ = _publish(cache_dir)
    m = read_manifest(entry.manifest_path)
    assert m.fingerprint == FP and m.fingerprint.diff(FP) == []
    assert [t.name for t in m.tensors] == [s.name for s in SLOTS]
    assert oct(os.stat(entry.manifest_path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(entry.dir / arena.handle["file"]).st_mode & 0o777) == "0o600"
    assert oct(os.stat(entry.dir).st_mode & 0o777) == "0o700"
    assert not [p for p in entry.dir.iterdir() if p.name.endswith(".tmp")]


def test_attach_sees_the_owners_bytes_and_writes(cache_dir):
    entry, owner, values = _publish(cache_dir)
    m = entry.read()
    mapped = get_backend("cpu_shm", SETTINGS).attach(entry.dir, m)
    assert not mapped.owned and mapped.region() != owner.region()
    for spec in m.tensors:
        assert torch.equal(view_of(mapped.base, spec), values[spec.alias_of or spec.name])
    view_of(owner.base, m.tensors[0]).fill_(42)  # one physical copy: the attacher sees it at once
    assert bool((view_of(mapped.base, m.tensors[0]) == 42).all())


def test_readers_never_see_a_half_written_manifest(cache_dir):
    entry, _, _ = _publish(cache_dir)
    m = entry.read()
    stop, errors = threading.Event(), []

    def writer():
        while not stop.is_set():
            write_manifest(entry.manifest_path, m)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            try:
                read_manifest(entry.manifest_path)
            except ManifestError as e:
                errors.append(e)
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_fingerprint_diff_names_fields():
    other = Fingerprint(**{**FP.__dict__, "dtype": "bfloat16", "tp_rank": 1})
    assert [d[0] for d in FP.diff(other)] == ["dtype", "tp_rank"]
    assert Fingerprint.from_json(json.loads(json.dumps(FP.to_json()))) == FP


def test_cache_dir_must_be_private(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(ConfigError, match="accessible to other users"):
        CacheDir(loose).entry("k")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="symbolic link"):
        CacheDir(link).entry("k")
    with pytest.raises(ConfigError, match="not a plain name"):
        CacheDir(tmp_path / "ok").entry("../escape")


def test_arena_handle_cannot_leave_the_entry(cache_dir):
    entry, _, _ = _publish(cache_dir)
    m = entry.read()
    bad = Manifest(**{**m.__dict__, "handle": {"file": "../../etc/passwd"}})
    with pytest.raises(ArenaError, match="does not name an arena file inside the entry"):
        get_backend("cpu_shm", SETTINGS).attach(entry.dir, bad)


def test_attach_never_creates_or_grows_the_arena_file(cache_dir):
    entry, _, _ = _publish(cache_dir)
    m = entry.read()
    path = entry.dir / m.handle["file"]
    os.truncate(path, 100)
    with pytest.raises(ArenaError, match="truncated"):
        get_backend("cpu_shm", SETTINGS).attach(entry.dir, m)
    assert path.stat().st_size == 100
    path.unlink()
    with pytest.raises(ArenaError, match="is gone"):
        get_backend("cpu_shm", SETTINGS).attach(entry.dir, m)
    assert not path.exists()


def test_cuda_backends_are_not_offered_for_cpu_and_auto_picks_cpu_shm():
    assert resolve("auto", torch.device("cpu"), SETTINGS).name == "cpu_shm"


def test_cuda_backends_say_why_they_are_unavailable_without_a_gpu():
    import sys

    from sharedcache import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CUDA backends are available here")
    for name in ("cuda_vmm", "cuda_ipc"):
        with pytest.raises(BackendUnavailable) as info:
            get_backend(name, SETTINGS)
        assert name in str(info.value) and ("cuda-bindings" in str(info.value) or "no CUDA device" in str(info.value))
    assert "cuda.bindings" not in sys.modules or torch.cuda.is_available()


def test_importing_the_core_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, sharedcache, sharedcache.instance, sharedcache.backends; "
            "bad = [m for m in ('transformers', 'cuda.bindings', 'hydra', 'omegaconf') if m in sys.modules]; "
            "print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # reading the cache (the CLI, manifests) needs no torch at all
    code = ("import sys, sharedcache, sharedcache.cli, sharedcache.manifest, sharedcache.cache; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_socket_paths_too_long_for_unix_sockets_are_a_clear_error(tmp_path):
    from sharedcache.backends.fdpass import FdServer, receive_fds

    long = tmp_path / ("k" * 120) / "arena-1.sock"
    with pytest.raises(ArenaError, match="shorter cache.dir or cache.key"):
        FdServer(long, lambda: ({}, []))
    with pytest.raises(ArenaError, match="shorter cache.dir or cache.key"):
        receive_fds(long, 1)
