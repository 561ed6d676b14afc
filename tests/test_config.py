"""Every config group composes; impossible roles are rejected before anything loads."""
from __future__ import annotations

import pytest

from conftest import REPO
from sharedcache import CacheSettings, ConfigError, Mode, Role
from sharedcache.conf import compose, core_role, role_of

ROLES = sorted(p.stem for p in (REPO / "conf" / "role").glob("*.yaml"))


def _role(cfg) -> Role:
    return role_of(cfg)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_composes_and_validates(role):
    cfg = compose([f"role={role}"])
    r = _role(cfg)
    assert r.name == role
    CacheSettings.from_mapping(cfg["cache"])


@pytest.mark.parametrize("group", ["model", "engine", "cache"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
        cfg = compose([f"{group}={option}"])
        CacheSettings.from_mapping(cfg["cache"])


def test_declared_orders():
    assert _role(compose(["role=prefill"])).phases == {"save": ("intercept", "align", "serialize")}
    assert _role(compose(["role=decode"])).phases == {"load": ("intercept", "serialize", "align")}
    auto = _role(compose(["role=auto"]))
    assert auto.mode is Mode.AUTO and set(auto.phases) == {"save", "load"}


def test_cache_key_follows_model():
    assert compose([])["cache"]["key"] == "sc-llama-100m"
    assert compose(["model.path=/models/Llama-3.1-8B/"])["cache"]["key"] == "Llama-3.1-8B"
    assert compose(["cache.key=mine"])["cache"]["key"] == "mine"


@pytest.mark.parametrize("mode,phases,words", [
    ("load", ["intercept", "align", "serialize"], ["phase 'align' needs ['serialize'] before it"]),
    ("save", ["intercept", "serialize", "align"], ["phase 'serialize' needs ['align'] before it"]),
    ("save", ["align", "intercept", "serialize"], ["phase 'align' needs ['intercept'] before it"]),
    ("save", ["intercept", "align"], ["needs phases ['serialize']"]),
    ("load", ["intercept", "serialize", "align", "align"], ["appear more than once"]),
    ("load", ["intercept", "serialize", "bind"], ["unknown phase 'bind'"]),
    ("load", ["intercept", "serialize", "align", "verify"], []),  # optional phase, valid
    ("save", ["intercept", "align", "verify", "serialize"], []),  # checksums published with the manifest
    # verify after serialize would publish twice, the first time without checksums
    ("save", ["intercept", "align", "serialize", "verify"], ["phase 'serialize' needs ['verify'] before it"]),
    ("banana", ["intercept"], ["unknown mode 'banana'"]),
    ("auto", ["intercept", "align", "serialize"], ["phases must give both orders"]),
])
def test_phase_orders(mode, phases, words):
    m = {"name": "r", "mode": mode, "phases": phases}
    if not words:
        Role.from_mapping(m)
        return
    with pytest.raises(ConfigError) as info:
        Role.from_mapping(m)
    for w in words:
        assert w in str(info.value)


def test_readme_phase_table_is_the_registered_steps():
    """The README's table of steps is what the registrations declare (regenerate: python -m sharedcache.phases)."""
    from pathlib import Path

    from sharedcache.phases import STEPS, phase_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("<!-- phase-table -->\n", 1)[1].split("\n<!-- /phase-table -->", 1)[0]
    assert table == phase_table()
    assert {(p, plan) for p, plan in STEPS} == {(p, plan) for p in ("intercept", "align", "serialize", "verify")
                                               for plan in ("save", "adopt", "load")}
    step_modules = {f"sharedcache.{m}" for m in ("steps_save", "steps_load", "steps_adopt")}
    assert all(s.run.__module__ in step_modules for s in STEPS.values())  # real callables, registered


@pytest.mark.parametrize("override,words", [
    ("cache.on_mismatch=maybe", "cache.on_mismatch must be 'error' or 'fallback'"),
    ("cache.alignment=100", "cache.alignment must be a power of two"),
    ("cache.backend=floppy", "unknown cache.backend 'floppy'"),
    ("+cache.colour=red", "unknown cache keys ['colour']"),
])
def test_bad_cache_settings(override, words):
    with pytest.raises(ConfigError) as info:
        CacheSettings.from_mapping(compose([override])["cache"])
    assert words in str(info.value)


def test_wrong_order_is_rejected_by_launch_before_loading(launcher, sc_home, cache_dir):
    proc = launcher.run("decode", "role.phases=[intercept,align,serialize]", model="tiny")
    assert proc.popen.returncode == 2
    out = proc.output()
    assert "phase 'align' needs ['serialize'] before it" in out
    assert proc.report()["ok"] is False and proc.report()["error"] == "ConfigError"  # why, for scripts
    assert list(cache_dir.iterdir()) == [], "nothing may be created before the config is accepted"


def _dry_run(launcher, model: str, *overrides: str) -> str:
    proc = launcher.run(*overrides, "engine=sglang", "engine.dry_run=true", f"model.path={model}")
    assert proc.popen.returncode == 0, proc.output()
    return proc.output()


def test_sglang_servers_by_role_from_config(launcher, models):
    out = _dry_run(launcher, models["tiny"], "decode", "engine.tp_size=2", "engine.base_gpu_id.decode=1",
                   "engine.mem_fraction_static.decode=0.3", "engine.port.decode=31001",
                   "+engine.extra_args.max_running_requests=8", "+engine.extra_args.enable_metrics=true")
    command = out.splitlines()[0]
    assert "-m sglang.launch_server --model-path " + str(models["tiny"]) in command
    for flags in ("--port 31001", "--tp-size 2", "--base-gpu-id 1", "--mem-fraction-static 0.3",
                  "--disaggregation-mode decode", "--disaggregation-transfer-backend mooncake",
                  "--disaggregation-bootstrap-port 8998", "--max-running-requests 8", "--enable-metrics"):
        assert f" {flags}" in command, (flags, command)
    import shlex

    words = shlex.split(command)  # one line a shell takes as it is: VAR=value ... python -m sglang.launch_server ...
    env = dict(w.split("=", 1) for w in words[:words.index("-m") - 1])
    assert env["SGLANG_PLUGINS"] == "sharedcache"
    plugin = env["SHAREDCACHE_SGLANG"]
    from sharedcache_integrations.sglang import load_plugin_config

    cfg = load_plugin_config(plugin)  # what the plugin will read inside SGLang's scheduler processes
    assert cfg.role.mode is Mode.LOAD and cfg.role.name == "decode" and cfg.settings.key == models["tiny"].name
    prefill = _dry_run(launcher, models["tiny"], "prefill").splitlines()[0]
    assert "--disaggregation-mode prefill" in prefill and "--port 30000" in prefill


def test_sglang_router_points_at_the_configured_servers(launcher, models):
    command = _dry_run(launcher, models["tiny"], "router", "engine.port.prefill=31000", "engine.router.port=9000")
    assert ("-m sglang_router.launch_router --pd-disaggregation --prefill http://127.0.0.1:31000 8998 "
            "--decode http://127.0.0.1:30001 --host 127.0.0.1 --port 9000 --mini-lb") in command


def test_sglang_plugin_config_that_is_not_ours_is_a_config_error():
    from sharedcache_integrations.sglang import load_plugin_config

    for raw, words in (("{not json", "not the plugin's JSON"), ('{"role": {}}', "expected the keys"),
                       ('{"role": {"name": "x", "mode": "sideways", "phases": []}, "cache": {}, "report_dir": "/t"}',
                        "sideways")):
        with pytest.raises(ConfigError, match=words):
            load_plugin_config(raw)


@pytest.mark.slow
def test_an_sglang_holder_with_nothing_published_and_an_hf_router_are_refused_with_what_to_do(launcher, models):
    holder = launcher.run("holder", "engine=sglang", f"model.path={models['tiny']}", "cache.wait_timeout_s=1")
    assert holder.popen.returncode == 3, holder.output()  # no sglang needed: the holder starts no server
    assert "waited 1s for entry 'tiny-tp0'" in holder.output() and "role=prefill" in holder.output()
    staged = launcher.run("holder", "engine=sglang", f"model.path={models['tiny']}", "cache.wait_timeout_s=1",
                          "+engine.extra_args.pp_size=2", name="holder-pp")  # keyed per stage, as the ranks are
    assert staged.popen.returncode == 3 and "waited 1s for entry 'tiny-pp0-tp0'" in staged.output(), staged.output()
    router = launcher.run("router")
    assert router.popen.returncode == 2 and "role=router needs engine=sglang" in router.output()


def test_sglang_versions_outside_the_tested_range_are_named_in_one_line():
    from sharedcache_integrations.sglang.compat import SUPPORTED, unsupported_reason

    lo, hi = SUPPORTED
    for inside in (lo, hi, "0.5.20", f"{hi}.post1"):
        assert unsupported_reason(inside) is None, inside
    for outside in ("0.5.16", "0.5.24", "0.6.0", "1.0.0rc1", "garbage"):
        why = unsupported_reason(outside)
        assert why is not None and outside in why and lo in why and hi in why and "\n" not in why
    assert "not installed" in unsupported_reason(None)


@pytest.mark.parametrize("env, named", [
    ({}, []),
    ({"DUMPER_ENABLE": "1", "DUMPER_SERVER_PORT": "-1", "DUMPER_GRAFTER_ENABLE": "0"}, []),  # dumps only: reads
    ({"DUMPER_SERVER_PORT": "0", "DUMPER_SOURCE_PATCHER_CONFIG": "  ", "DUMPER_GRAFTER_ENABLE": " 1"}, []),  # off
    ({"DUMPER_SERVER_PORT": "reuse"}, ["DUMPER_SERVER_PORT=reuse"]),
    ({"DUMPER_SERVER_PORT": " 40000 "}, ["DUMPER_SERVER_PORT= 40000 "]),
    ({"DUMPER_SERVER_PORT": "--5"}, ["DUMPER_SERVER_PORT=--5"]),  # SGLang would fail on it: refused, not a crash
    ({"DUMPER_GRAFTER_ENABLE": "True"}, ["DUMPER_GRAFTER_ENABLE=True"]),
    ({"DUMPER_ENABLE": "1", "DUMPER_SOURCE_PATCHER_CONFIG": "/p.yaml"}, ["DUMPER_SOURCE_PATCHER_CONFIG=/p.yaml"]),
])
def test_a_sharing_sglang_server_refuses_a_dumper_that_can_write_tensors(env, named):
    """SGLang's dumper is read from DUMPER_* as SGLang parses them; the settings that let it write into the model
    (grafter, source patches, a control port that runs a client's filter as Python) refuse a sharing server in
    one line naming each with why; a dumper that only writes dumps is let through."""
    from sharedcache import ConfigError
    from sharedcache_integrations.sglang import check_dumper

    if not named:
        check_dumper(env)
        return
    with pytest.raises(ConfigError) as refused:
        check_dumper(env)
    line = str(refused.value)
    assert all(n in line for n in named) and "\n" not in line and "role=plain" in line, line
    assert "DUMPER_ENABLE=" not in line, line


def test_launch_refuses_a_sharing_sglang_server_with_a_dumper_that_can_write_tensors(launcher, models):
    """Through the launcher (engine.env, or its own environment) the dumper's settings are refused as the plugin
    would, but before SGLang starts: one line, exit 2, sglang installed or not."""
    proc = launcher.run("prefill", "engine=sglang", f"model.path={models['tiny']}",
                        "+engine.env.DUMPER_GRAFTER_ENABLE=1")
    out = proc.output()
    says = "dumper could write into the shared weights on this server: DUMPER_GRAFTER_ENABLE=1: its grafter"
    assert proc.popen.returncode == 2 and says in out, out
    assert "Traceback" not in out and "Load weight begin" not in out, out


def test_sglang_server_refuses_to_start_without_a_supported_sglang(launcher, models):
    """This environment has no sglang: launch.py says so in one line before starting anything."""
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed in this environment; the refusal is for one without it")
    proc = launcher.run("decode", "engine=sglang", f"model.path={models['tiny']}")
    out = proc.output()
    assert proc.popen.returncode == 2 and "sglang is not installed in this Python environment" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1])
def test_a_wait_that_could_never_end_or_start_is_refused(value):
    cache = compose(["cache.dir=/tmp/x"])["cache"]
    with pytest.raises(ConfigError, match="wait_timeout_s must be a finite number"):
        CacheSettings.from_mapping({**cache, "wait_timeout_s": value})


def test_cache_dir_is_per_user_and_named_from_the_uid_without_user(monkeypatch):
    import os

    monkeypatch.setenv("USER", "alice")
    assert compose([])["cache"]["dir"] == "/dev/shm/sharedcache-alice"
    monkeypatch.delenv("USER")  # containers and systemd units: one directory per uid, not a shared 'default'
    assert compose([])["cache"]["dir"] == f"/dev/shm/sharedcache-{os.getuid()}"


def test_launch_help_says_what_roles_and_modes_are_with_examples():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for words in ("== Roles (role=...) ==", "prefill   mode save", "placeholder", "== Examples ==",
                  "sharedcache launch role=decode", "python launch.py", "report.json", "Exit codes",
                  "role: auto, decode", "sharedcache demo"):
        assert words in out.stdout, words
    assert "powered by Hydra" not in out.stdout


def test_a_plain_sglang_command_line_is_switched_on_by_readable_variables(tmp_path):
    """SHAREDCACHE_ROLE (and optionally _KEY, _DIR, _OVERRIDES, _REPORT_DIR) on a plain SGLang command line
    give the plugin the packaged conf's role and cache settings; the key defaults to the model's directory."""
    from sharedcache_integrations.sglang import config_from_switches, switches_env

    env = switches_env("decode", cache_dir=str(tmp_path), overrides=["cache.wait_timeout_s=600"])
    assert env == {"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_DIR": str(tmp_path),
                   "SHAREDCACHE_OVERRIDES": "cache.wait_timeout_s=600"}
    cfg = config_from_switches(env)
    assert cfg.role.name == "decode" and cfg.role.mode is Mode.LOAD and cfg.settings.dir == str(tmp_path)
    assert cfg.settings.wait_timeout_s == 600 and cfg.report_dir is None and cfg.key_from_model
    assert cfg.keyed("llama8b").settings.key == "llama8b" and not cfg.keyed("llama8b").key_from_model
    named = config_from_switches(switches_env("prefill", key="llama8b", report_dir=str(tmp_path / "r")))
    assert (named.role.mode, named.settings.key, named.key_from_model) == (Mode.SAVE, "llama8b", False)
    assert named.report_dir == tmp_path / "r"
    with pytest.raises(ConfigError, match="SHAREDCACHE_ROLE='plain' is not a role an SGLang server can take"):
        config_from_switches({"SHAREDCACHE_ROLE": "plain"})
    with pytest.raises(ConfigError, match="the sharedcache switches do not compose") as e:
        config_from_switches({"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_OVERRIDES": "cache.wait_timout_s=5"})
    assert "SHAREDCACHE_OVERRIDES" in e.value.hint


def test_the_switches_take_any_directory_and_a_key_given_as_an_override(tmp_path):
    from sharedcache_integrations.sglang import config_from_switches

    odd = tmp_path / "c,v2 (copy)"
    cfg = config_from_switches({"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_DIR": str(odd)})
    assert cfg.settings.dir == str(odd)
    keyed = config_from_switches({"SHAREDCACHE_ROLE": "decode", "SHAREDCACHE_OVERRIDES": "cache.key=llama8b"})
    assert keyed.settings.key == "llama8b" and not keyed.key_from_model  # the model's name does not replace it


def test_a_plain_sglang_server_ignores_switches_exported_in_the_shell(tmp_path, monkeypatch, models):
    """A README recipe leaves SHAREDCACHE_ROLE=decode exported: launch.py's plain (and sharing) servers set
    every switch themselves, so it neither turns a plain server into a sharing one nor changes a role."""
    from sharedcache_integrations.sglang import server as sgl

    monkeypatch.setenv("SHAREDCACHE_ROLE", "decode")
    cfg = compose(["role=plain", "engine=sglang", f"model.path={models['tiny']}"])
    plan = sgl.plan_server(cfg, models["tiny"], core_role(cfg), tmp_path)
    assert plan.env["SHAREDCACHE_ROLE"] == "" and plan.env["SHAREDCACHE_SGLANG"] == "" and plan.report_dir is None
    cfg = compose(["role=prefill", "engine=sglang", f"model.path={models['tiny']}"])
    plan = sgl.plan_server(cfg, models["tiny"], core_role(cfg), tmp_path)
    assert plan.env["SHAREDCACHE_ROLE"] == "" and '"name": "prefill"' in plan.env["SHAREDCACHE_SGLANG"]


def test_configured_works_inside_a_hydra_app_of_the_callers_own(tmp_path):
    """A user's own @hydra.main app (Hydra already initialised) can still ask for sharedcache's settings."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sharedcache import configured

    (tmp_path / "config.yaml").write_text("a: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        outer = GlobalHydra.instance().hydra
        role, settings = configured("decode", f"cache.dir={tmp_path}")
        assert role.name == "decode" and settings.dir == str(tmp_path)
        assert GlobalHydra.instance().hydra is outer  # the caller's Hydra is given back


def test_sglang_pd_over_cuda_ipc_sets_mooncakes_transport_for_both_servers(launcher, models):
    import shlex

    for role in ("prefill", "decode"):
        words = shlex.split(_dry_run(launcher, models["tiny"], role, "engine.disaggregation.mooncake_protocol=nvlink_intra")
                            .splitlines()[0])
        env = dict(w.split("=", 1) for w in words[:words.index("-m") - 1])
        assert env["MC_INTRANODE_NVLINK"] == "true", role  # Mooncake's CUDA IPC transport, not its TCP fallback
        assert env["SGLANG_MOONCAKE_CUSTOM_MEM_POOL"] == "INTRA_NODE_NVLINK", role  # metadata on the GPU too
        assert "--disaggregation-transfer-backend mooncake " in " ".join(words) + " "
    plain = _dry_run(launcher, models["tiny"], "plain", "engine.disaggregation.mooncake_protocol=nvlink_intra")
    assert "MC_INTRANODE_NVLINK" not in plain.splitlines()[0], "a server outside PD moves no KV"


@pytest.mark.slow
def test_sglang_transport_that_cannot_apply_is_refused_before_any_server_starts(launcher, models):
    for overrides, words in ((("engine.disaggregation.transfer_backend=mooncake_tcp",
                               "engine.disaggregation.mooncake_protocol=nvlink_intra"),
                              "applies to transfer_backend=mooncake, not 'mooncake_tcp'"),
                             (("engine.disaggregation.mooncake_protocol=carrier_pigeon",),
                              "'carrier_pigeon' is not one this launcher knows")):
        for role in ("decode", "plain", "router"):  # a typo shows before PD, whichever server starts first
            proc = launcher.run(role, "engine=sglang", "engine.dry_run=true", f"model.path={models['tiny']}",
                                *overrides)
            assert proc.popen.returncode == 2, (role, proc.output())
            assert words in proc.output(), role
            assert "sglang.launch_server" not in proc.output() and "launch_router" not in proc.output()


@pytest.mark.parametrize("role", ROLES)
def test_what_the_launcher_starts_for_a_role_is_what_its_yaml_declares(role):
    """launch.py acts on the role's declarations (role_launch, check_engine), for every engine, not on its name."""
    from omegaconf import OmegaConf

    from sharedcache_integrations import launch_checks

    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "role" / f"{role}.yaml"))
    for engine in sorted(launch_checks.ENGINE_CHECKS):
        declared = launch_checks.role_launch(compose([f"role={role}", f"engine={engine}"]))
        assert (declared.name, declared.runs, list(declared.engines), declared.hold, declared.generate) == \
            (raw["name"], raw["launch"]["runs"], raw["launch"]["engines"], raw["hold"], raw["generate"])
        if engine in raw["launch"]["engines"]:
            declared.check_engine(engine)
            continue
        with pytest.raises(ConfigError) as info:
            declared.check_engine(engine)
        assert (info.value.message, info.value.hint) == (f"role={role} {raw['launch']['refusal']['message']}",
                                                         raw["launch"]["refusal"]["hint"])


@pytest.mark.parametrize("override,words", [
    ("role.launch.runs=serve", "role.launch.runs='serve' cannot work: it must be model"),
    ("role.launch.engines=[vllm]", "role.launch.engines=['vllm'] cannot work"),
    ("role.launch.engines=[hf]", "role.launch.refusal=None cannot work"),
    ("role.hold=maybe", "role.hold='maybe' cannot work: it must be true or false"),
    ("role.launch=null", "role 'prefill' declares no launch block"),
    ("role.launch.runs=router", "role.launch.engines=['hf', 'sglang'] cannot work: it must be a list of the engines "
                                "that can start runs=router (sglang)"),  # only SGLang starts a router
])
def test_a_launch_declaration_that_cannot_work_is_one_line(override, words):
    from sharedcache_integrations import launch_checks

    with pytest.raises(ConfigError) as info:
        launch_checks.role_launch(compose([override]))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_role_of_the_users_own_does_what_it_declares_whatever_its_name(launcher, models, tmp_path):
    """Copies of the packaged router and decode under names of the user's own (on Hydra's search path): the
    launcher starts a router for one and refuses engine=hf for the other because their YAML says so."""
    extra = tmp_path / "extra"
    (extra / "role").mkdir(parents=True)
    router = (REPO / "conf" / "role" / "router.yaml").read_text()
    (extra / "role" / "gateway.yaml").write_text(router.replace("name: router", "name: gateway"))
    decode = (REPO / "conf" / "role" / "decode.yaml").read_text().replace("name: decode", "name: mydecode")
    decode = decode.replace("  engines: [hf, sglang]", "  engines: [sglang]").replace(
        "  refusal: null", '  refusal: {message: "serves with engine=sglang only.", hint: "Add engine=sglang."}')
    (extra / "role" / "mydecode.yaml").write_text(decode)
    search = f"hydra.searchpath=[file://{extra}]"
    gateway = _dry_run(launcher, models["tiny"], "gateway", search)
    assert "-m sglang_router.launch_router --pd-disaggregation" in gateway.splitlines()[0]
    mine = launcher.run("mydecode", search, f"model.path={models['tiny']}")
    assert mine.popen.returncode == 2 and "role=mydecode serves with engine=sglang only." in mine.output()
    assert mine.report()["hint"] == "Add engine=sglang."
