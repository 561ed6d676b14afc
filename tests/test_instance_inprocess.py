"""sharedcache.Instance in this process, without transformers: a ~20-line ModelSource over a plain
torch nn.Sequential (a few KB, float32, CPU), the real cpu_shm backend, real files, locks and memory
mappings in a private tmp dir, the roles of conf/ as launch.py composes them. Milliseconds per test,
except where the core itself sleeps (auto mode retries a held claim for 0.5 s before it attaches)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sharedcache import CacheSettings, Fingerprint, FingerprintMismatch, Instance, Role
from sharedcache.conf import compose, core_role
from sharedcache.kit import device_id

KEY = "tiny-seq"


class SeqSource:
    """A ModelSource (sharedcache.instance) for Linear -> LayerNorm -> Linear, seeded: every load is equal."""

    engine, settles = "torch-seq", False

    def __init__(self, dtype=torch.float32, width=16, on_load=None, on_skeleton=None):
        self.dtype, self.width, self.device = dtype, width, torch.device("cpu")
        self.on_load, self.on_skeleton = on_load, on_skeleton  # test hooks: called as the core gets there
        self.loads, self.skeletons, self.finished = 0, [], []

    def build(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, self.width), nn.LayerNorm(self.width), nn.Linear(self.width, 4)).to(self.dtype)

    def check(self) -> None:
        pass

    def fingerprint(self, model):
        dtype = next(model.parameters()).dtype if model is not None else self.dtype
        config = hashlib.sha256(f"seq:8x{self.width}x4".encode()).hexdigest()
        return Fingerprint(self.engine, "1", "seq", None, config, (), str(dtype).removeprefix("torch."), None,
                           device_id(self.device), 0, 1)

    def load(self) -> nn.Module:
        self.loads += 1
        if self.on_load is not None:
            self.on_load()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.build()
            for p in model.parameters():  # LayerNorm starts at ones/zeros: make every byte distinctive
                p.data.normal_()
            return model

    def skeleton(self) -> nn.Module:
        if self.on_skeleton is not None:
            self.on_skeleton()
        with torch.device("meta"):
            self.skeletons.append(self.build())
        return self.skeletons[-1]

    def finish(self, model: nn.Module, *, attached: bool) -> nn.Module:
        self.finished.append(attached)
        return model.eval()


# ---------------------------------------------------------------- config and bookkeeping

@functools.lru_cache(maxsize=None)
def _composed(role: str) -> tuple[dict, dict]:
    """conf/ composed as launch.py does (hydra takes ~70 ms a time: once per role and test session)."""
    cfg = compose([f"role={role}", f"cache.key={KEY}"])
    return core_role(cfg), cfg["cache"]


def role_and_settings(role: str, cache: Path, role_over: dict | None = None,
                      cache_over: dict | None = None) -> tuple[Role, CacheSettings]:
    """The composed role and cache groups with `role_over` / `cache_over` applied (as role.x= / cache.x=
    overrides would), through the same validating constructors."""
    r, c = _composed(role)
    return Role.from_mapping({**r, **(role_over or {})}), \
        CacheSettings.from_mapping({**c, "dir": str(cache), **(cache_over or {})})


@pytest.fixture
def cache(tmp_path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def make(cache):
    """make(role, source, role_over={...}, **cache_keys) -> an Instance on `cache`; owners are closed afterwards."""
    made: list[Instance] = []

    def _make(role: str, source: SeqSource, *, role_over: dict | None = None, **cache_over) -> Instance:
        made.append(Instance(*role_and_settings(role, cache, role_over, cache_over), source))
        return made[-1]

    yield _make
    for inst in made:
        inst.close()


def reference() -> nn.Module:
    return SeqSource().load()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def same_bits(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(bits(sa[k]), bits(sb[k])) for k in sa)


def mapping_at(ptr: int) -> tuple[str, str, str]:
    """(permissions, inode, path) of the mapping of this process that holds address `ptr`."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[1], fields[4], fields[5] if len(fields) > 5 else ""
    raise AssertionError(f"address {ptr:#x} is mapped nowhere")


def cache_mappings(cache: Path, before: list[str] | None = None) -> list[str]:
    """Lines of /proc/self/maps naming a file under `cache`; when they differ from `before`, again after a
    full garbage collection (~0.1 s with torch loaded), for mappings that only cycles still hold."""
    lines = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(cache.resolve()) in line]
    if before is not None and lines != before:
        import gc

        gc.collect()
        return cache_mappings(cache)
    return lines


def cache_fds(cache: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(cache.resolve()) in target:
            out.append(target)
    return sorted(out)


def assert_viewing_the_arena(model: nn.Module, inst: Instance, arena_file: Path) -> None:
    """Every tensor of `model` lies in `inst`'s arena region, a shared read-only mapping of `arena_file`."""
    lo, hi = inst.arena_region
    inode = str(arena_file.stat().st_ino)
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        assert lo <= ptr and ptr + t.nbytes <= hi, name
        perms, ino, path = mapping_at(ptr)
        assert perms == "r--s" and ino == inode and path == str(arena_file.resolve()), (name, perms, ino, path)


def published_arena(cache: Path) -> Path:
    (arena,) = (cache / KEY).glob("arena-*.bin")
    return arena


X = torch.linspace(-1, 1, 3 * 8).reshape(3, 8)


# ---------------------------------------------------------------- tests

def test_save_then_load_attaches_bit_identical_read_only_views(cache, make):
    ref = reference()
    owner_src = SeqSource()
    owner = make("prefill", owner_src)
    saved = owner.run()
    rep = owner.report
    assert (rep.mode, rep.backend, rep.fallback, rep.owner_pid) == ("save", "cpu_shm", None, os.getpid())
    assert owner_src.loads == 1 and owner_src.finished == [False]
    assert rep.tensors == 6 and rep.bytes_shared == sum(t.nbytes for t in ref.state_dict().values())
    assert (cache / KEY / "manifest.json").is_file()
    arena = published_arena(cache)
    assert same_bits(saved, ref)
    assert_viewing_the_arena(saved, owner, arena)  # the owner's own copy moved into the arena, sealed read-only

    attached = []
    for _ in range(2):  # two attaches in one process: two mappings of the one arena file
        src = SeqSource()
        inst = make("decode", src)
        model = inst.run()
        r = inst.report
        assert (r.mode, r.backend, r.fallback) == ("load", "cpu_shm", None)
        assert r.attach_seconds is not None and r.owner_pid == os.getpid() and r.owner_alive is True
        assert r.weight_bytes_allocated == 0 and r.load_seconds is None and r.layout_digest == rep.layout_digest
        assert src.loads == 0 and src.finished == [True]  # never loaded normally; finish was told "attached"
        assert model is src.skeletons[0]  # the skeleton itself, bound in place
        assert same_bits(model, saved)
        assert all(not p.requires_grad for p in model.parameters())
        assert_viewing_the_arena(model, inst, arena)
        attached.append((inst, model))
    (i1, m1), (i2, m2) = attached
    assert i1.arena_region != i2.arena_region != owner.arena_region
    assert m1[0].weight.data_ptr() != m2[0].weight.data_ptr()  # each attach maps the file anew
    with torch.no_grad():
        assert torch.equal(m1(X), ref(X)) and torch.equal(m2(X), ref(X))


def test_auto_first_owns_second_attaches_and_survives_the_owner(cache, make):
    first_src, second_src = SeqSource(), SeqSource()
    first = make("auto", first_src)
    owned = first.run()
    assert first.report.mode == "save" and first.report.fallback is None and first_src.loads == 1
    assert (cache / KEY / "manifest.json").is_file()

    second = make("auto", second_src)
    t0 = time.perf_counter()
    model = second.run()
    assert time.perf_counter() - t0 < 0.4  # a live compatible entry: attach at once, no claim retried
    r = second.report
    assert (r.mode, r.fallback, r.owner_pid, r.weight_bytes_allocated) == ("load", None, os.getpid(), 0)
    assert second_src.loads == 0 and second_src.finished == [True]
    assert same_bits(model, owned)
    assert_viewing_the_arena(model, second, published_arena(cache))
    expected = reference()(X).detach()

    first.close()  # the owner unpublishes; the attached instance keeps its mapping and keeps working
    assert not (cache / KEY / "manifest.json").exists() and not list((cache / KEY).glob("arena-*"))
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    third = make("auto", SeqSource())
    kept = third.run()  # and the key is free again: the next auto owns it (while its model lives)
    assert kept is not None and third.report.mode == "save" and (cache / KEY / "manifest.json").is_file()


def test_auto_waiting_for_a_saver_that_gives_up_takes_the_key_over(cache, make):
    """A saver claims the key and fails while loading (nothing published); an auto instance that found the
    key claimed waits to attach, then sees the claim go and becomes the owner itself."""
    auto_waiting, failures = threading.Event(), []
    saver_loading = threading.Event()

    def doomed_load():
        saver_loading.set()
        assert auto_waiting.wait(5), "the auto instance never got to waiting"
        time.sleep(0.1)  # let it poll the claimed, unpublished key a couple of times
        raise OSError("disk gone while loading")

    saver = make("prefill", SeqSource(on_load=doomed_load))

    def run_saver():
        try:
            saver.run()
        except BaseException as e:  # noqa: BLE001 - asserted below
            failures.append(e)

    thread = threading.Thread(target=run_saver)
    thread.start()
    try:
        assert saver_loading.wait(5)  # the saver holds the claim from here on
        auto_src = SeqSource(on_skeleton=auto_waiting.set)  # the load plan builds its skeleton, then waits
        auto = make("auto", auto_src, wait_timeout_s=3)
        model = auto.run()
    finally:
        auto_waiting.set()
        thread.join(10)
    assert [type(e) for e in failures] == [OSError] and saver.report is None
    assert len(auto_src.skeletons) == 1  # it resolved to load and built a skeleton to attach...
    r = auto.report
    assert (r.mode, r.fallback, r.owner_pid, r.backend) == ("save", None, os.getpid(), "cpu_shm")  # ...then owned
    assert auto_src.loads == 1 and auto_src.finished == [False] and model is not auto_src.skeletons[0]
    assert same_bits(model, reference())
    manifest = cache / KEY / "manifest.json"
    assert manifest.is_file() and published_arena(cache).is_file()  # exactly one arena: the failed saver left none
    attacher = make("decode", SeqSource())
    assert same_bits(attacher.run(), model) and attacher.report.owner_alive is True
    auto.close()
    assert not manifest.exists()


@pytest.mark.parametrize("role, kind", [("decode", "dtype"), ("decode", "shape"), ("auto", "dtype")])
def test_mismatching_fingerprint_falls_back_to_a_normal_load(cache, make, role, kind):
    owned = make("prefill", SeqSource()).run()  # the owner publishes while its model lives
    manifest = (cache / KEY / "manifest.json").read_bytes()
    maps, fds = cache_mappings(cache), cache_fds(cache)
    src = SeqSource(dtype=torch.float64) if kind == "dtype" else SeqSource(width=12)
    field = "dtype" if kind == "dtype" else "config_sha256"
    inst = make(role, src, on_mismatch="fallback")
    model = inst.run()
    r = inst.report
    assert r.fallback is not None and "published for another model" in r.fallback and field in r.fallback
    assert r.mode == "load"  # auto: the owner is alive, so it resolved to attaching, then fell back
    assert r.backend is None and r.tensors == 0 and r.bytes_shared == 0 and r.attach_seconds is None
    assert src.loads == 1 and src.finished == [False] and r.load_seconds is not None
    assert inst.arena_region is None
    expected = sum(t.nbytes for t in model.state_dict().values())
    assert r.weight_bytes_allocated == expected
    if kind == "dtype":
        assert all(p.dtype == torch.float64 for p in model.parameters())
    else:
        assert model[0].weight.shape == (12, 8)
    assert all(p.requires_grad for p in model.parameters())  # a plain, private, writable load
    with torch.no_grad():
        model[0].weight.add_(1)  # would fault on a shared read-only view
    assert (cache / KEY / "manifest.json").read_bytes() == manifest  # the owner's entry is untouched
    assert cache_mappings(cache, maps) == maps and cache_fds(cache) == fds  # nothing of the attempt stays mapped or open
    assert same_bits(owned, reference())


def test_mismatching_fingerprint_in_strict_load_mode_raises(cache, make):
    owned = make("prefill", SeqSource()).run()  # the owner publishes while its model lives
    maps, fds = cache_mappings(cache), cache_fds(cache)
    src = SeqSource(dtype=torch.float64)
    inst = make("decode", src, wait_timeout_s=1)
    with pytest.raises(FingerprintMismatch) as info:
        inst.run()
    assert [d[0] for d in info.value.differences] == ["dtype"]
    assert "ours='float64' published='float32'" in str(info.value)
    assert "on_mismatch=fallback" in str(info.value)  # the hint: what to do
    del info
    assert src.loads == 0 and src.finished == [] and inst.report is None
    assert cache_mappings(cache, maps) == maps and cache_fds(cache) == fds
    assert same_bits(owned, reference()) and (cache / KEY / "manifest.json").is_file()


def test_placeholder_holds_zero_element_tensors_on_the_device_until_bound(cache, make):
    """While a placeholder instance waits for an owner, its skeleton holds zero-element tensors on the
    target device (a load instance's would be on meta); once published it is bound like a load's."""
    src = SeqSource()
    inst = make("decode", src, role_over={"mode": "placeholder"}, wait_timeout_s=10)
    out: list = []
    thread = threading.Thread(target=lambda: out.append(_run_catching(inst)))
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not (src.skeletons and all(p.numel() == 0 for p in src.skeletons[0].parameters())):
            assert thread.is_alive() and time.monotonic() < deadline, out
            time.sleep(0.005)
        waiting = src.skeletons[0]
        shapes = {n: (p.device.type, p.dtype, p.numel(), type(p), p.requires_grad)
                  for n, p in waiting.named_parameters()}
        assert shapes == {n: ("cpu", torch.float32, 0, nn.Parameter, False) for n in reference().state_dict()}
        assert thread.is_alive()  # still waiting for an owner
        owner = make("prefill", SeqSource())
        saved = owner.run()
    finally:
        thread.join(10)
    (model,) = out
    assert not isinstance(model, BaseException), model
    r = inst.report
    assert (r.mode, r.fallback, r.weight_bytes_allocated) == ("placeholder", None, 0)
    assert r.attach_seconds is not None and r.wait_seconds > 0
    assert src.loads == 0 and src.finished == [True] and model is waiting
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
        {n: tuple(p.shape) for n, p in saved.named_parameters()}
    assert same_bits(model, saved)
    assert_viewing_the_arena(model, inst, published_arena(cache))
    with torch.no_grad():
        assert torch.equal(model(X), reference()(X))


def _run_catching(inst: Instance):
    try:
        return inst.run()
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        return e


class RankSource(SeqSource):
    """One tensor-parallel rank's share of a model, as an SGLang scheduler process would publish it."""

    def __init__(self, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def fingerprint(self, model):
        return dataclasses.replace(super().fingerprint(model), tp_rank=self.tp_rank, tp_size=self.tp_size)


def test_ls_shows_the_ranks_of_one_server_as_one_group(cache, make):
    """A TP-4 server's entries are listed under one line that says how many of its ranks are published."""
    from helpers import cli

    # an owner publishes while its model lives; rank 3 of 4 is missing, which the group line must show
    models = [make("prefill", RankSource(r, 4), key=f"tp-server-tp{r}").run() for r in range(3)]
    models.append(make("prefill", SeqSource(), key="single").run())
    out = cli("ls", "--dir", str(cache))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    group = next((i for i, line in enumerate(lines) if line.startswith("tp-server (3 of 4 ranks)")), None)
    assert group is not None, out.stdout
    assert "cpu_shm" in lines[group] and "live" in lines[group]
    assert [line.split()[0] for line in lines[group + 1:group + 4]] == [f"tp-server-tp{r}" for r in range(3)]
    assert all(line.startswith("  tp-server-tp") for line in lines[group + 1:group + 4])
    assert any(line.startswith("single ") for line in lines)
    records = {r["key"]: r for r in map(json.loads, cli("ls", "--json", "--dir", str(cache)).stdout.splitlines())}
    assert records["tp-server-tp2"]["group"] == "tp-server" and records["tp-server-tp2"]["tp_rank"] == 2
    assert records["single"]["group"] is None and records["single"]["tp_size"] == 1


# ---------------------------------------------------------------- a model spread over several devices
# (the whole round trip needs two GPUs: tests/gpu/test_hf_multi_device.py; here, what a CPU can show)

class SpreadSource(SeqSource):
    """A source whose request lets the engine spread the model (device_map='auto' over GPUs); its load
    leaves the last layer offloaded to the meta device, as a CPU/disk offload does."""

    spreads = True

    def load(self) -> nn.Module:
        model = super().load()
        model[2].to("meta")
        return model

    def placement(self, model):
        return {str(i): next(m.parameters()).device for i, m in enumerate(model)}

    def finish(self, model, *, attached: bool, placement=None):
        self.placed = placement
        return super().finish(model, attached=attached)


def test_a_model_offloaded_beside_its_device_is_refused_and_nothing_is_claimed(cache, make):
    with pytest.raises(Exception) as err:
        make("prefill", SpreadSource()).run()
    assert type(err.value).__name__ == "UnsupportedModel"
    assert "'cpu', 'meta'" in str(err.value) and "not one offloaded to the CPU or disk" in str(err.value)
    assert not list(cache.glob("*/manifest.json")) and not (cache / f"{KEY}-part1").exists()
    model = make("prefill", SpreadSource(), on_unsupported="fallback").run()  # the user's choice: load unshared
    from sharedcache.kit import instance_of

    assert instance_of(model).report.fallback and not list(cache.glob("*/manifest.json"))
    make("prefill", SeqSource()).run()  # the key was given back: a plain save takes it


def _as_part_zero(cache: Path, count: int = 2):
    """Rewrite the published entry's manifest as part 0 of `count` (as a spread save writes its head)."""
    from sharedcache.manifest import PartInfo, write_manifest
    from sharedcache.manifest_parse import read_manifest

    path = cache / KEY / "manifest.json"
    head = dataclasses.replace(read_manifest(path), part=PartInfo(0, count, "ab" * 16, {"0": 0, "1": 0, "2": 1}))
    write_manifest(path, head)
    assert read_manifest(path) == head  # the part record round-trips
    return head


def test_a_spread_entry_needs_every_part_and_a_request_that_spreads(cache, make):
    from sharedcache import ManifestError

    owner = make("prefill", SeqSource()).run()  # its entry lives as long as the model
    assert owner is not None
    _as_part_zero(cache)
    with pytest.raises(FingerprintMismatch) as err:  # asked for one device: cannot use a model spread over two
        make("decode", SeqSource()).run()
    assert "differing fields: devices" in str(err.value)
    with pytest.raises(ManifestError) as err:
        make("decode", SpreadSource()).run()
    assert f"part 1 ({cache / (KEY + '-part1')}) is missing or from another save" in str(err.value)


def test_ls_groups_the_parts_of_a_spread_model(cache, make):
    from helpers import cli

    owner = make("prefill", SeqSource()).run()  # its entry lives as long as the model
    assert owner is not None
    _as_part_zero(cache, count=3)
    out = cli("ls", "--dir", str(cache))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"{KEY} (1 of 3 devices)") for line in lines), out.stdout
    assert any(line.startswith(f"  {KEY} ") for line in lines), out.stdout
    shown = cli("inspect", KEY, "--dir", str(cache))
    assert "0 of 3 of one model spread over GPUs" in shown.stdout and "runs 2 of its modules" in shown.stdout, shown


@pytest.mark.parametrize("field,value,words", [
    ("index", 2, "part.index 2 must be below part.count 2"),
    ("count", 1, "part.count must be an integer in [2, 2**63)"),
    ("group", "../x", "part.group must be 32 hex digits"),
    ("placement", {"0": 7}, "part.placement['0'] must be a part number below 2"),
])
def test_a_bad_part_record_is_refused_naming_it(cache, make, field, value, words):
    from sharedcache import ManifestError
    from sharedcache.manifest_parse import read_manifest

    owner = make("prefill", SeqSource()).run()  # its entry lives as long as the model
    assert owner is not None
    _as_part_zero(cache)
    path = cache / KEY / "manifest.json"
    data = json.loads(path.read_text())
    data["part"][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert words in str(err.value)


def test_a_part_key_given_as_the_key_names_the_head(cache, make):
    from sharedcache import ConfigError
    from sharedcache.manifest import PartInfo, write_manifest
    from sharedcache.manifest_parse import read_manifest

    owner = make("prefill", SeqSource(), key=f"{KEY}-part1").run()
    assert owner is not None
    path = cache / f"{KEY}-part1" / "manifest.json"
    write_manifest(path, dataclasses.replace(read_manifest(path), part=PartInfo(1, 2, "cd" * 16, {"0": 0, "1": 1})))
    with pytest.raises(ConfigError) as err:
        make("decode", SpreadSource(), key=f"{KEY}-part1").run()
    assert f"Attach with cache.key={KEY};" in str(err.value)


def test_a_spread_key_too_long_for_its_parts_is_refused_before_loading(cache, make):
    from sharedcache import ConfigError

    source = SpreadSource()
    with pytest.raises(ConfigError) as err:
        make("prefill", source, key="k" * 125).run()
    assert "too long for a model spread over GPUs" in str(err.value) and source.loads == 0


def test_an_owner_gives_back_every_part_even_when_one_fails_to_close(cache):
    """Giving up a model's parts runs every step: a part whose teardown fails does not keep the next one."""
    from sharedcache.cache import CacheDir
    from sharedcache.ownership import Claim, give_up

    entries = [CacheDir(cache).entry(k) for k in (KEY, f"{KEY}-part1", f"{KEY}-part2")]
    head, broken, last = (Claim.take(e) for e in entries)
    os.close(broken._fd)  # its lock fd is gone: its close raises
    with pytest.raises(OSError):
        give_up([head, broken, last])
    assert not entries[0].claimed() and not entries[2].claimed()


def test_a_spread_owner_unpublishes_every_part_before_it_gives_a_key_up(cache, make):
    """The group's order: no manifest of the model stands by the time any of its keys can be claimed again,
    and the head's key is the last one given up."""
    import dataclasses as dc

    from sharedcache.cache import CacheDir
    from sharedcache.ownership import Claim, give_up

    owner = make("prefill", SeqSource(), key="source").run()  # published while `owner` lives
    published = CacheDir(cache).entry("source").read()
    entries = [CacheDir(cache).entry(k) for k in (KEY, f"{KEY}-part1", f"{KEY}-part2")]
    claims = [Claim.take(e) for e in entries]
    for claim in claims:
        claim.publish(dc.replace(published, key=claim.entry.key))
    seen = []  # at each lock given back: which key, and which manifests still stand
    for claim in claims:
        def release_lock(c=claim, release=claim.release_lock):
            seen.append((c.entry.key, [e.published() for e in entries]))
            release()
        claim.release_lock = release_lock
    give_up(claims)
    assert [key for key, _ in seen] == [e.key for e in reversed(entries)]
    assert all(standing == [False, False, False] for _, standing in seen)
    assert not any(e.claimed() for e in entries) and owner is not None
