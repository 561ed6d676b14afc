"""Start one instance of a role:  python launch.py role=prefill | role=decode [overrides...]

The prefill (save) loads the model, publishes it and holds it until SIGINT/SIGTERM;
a decode (load) attaches zero-copy, generates greedily from `prompt` and writes
report.json into its Hydra run directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sharedcache import CacheSettings, Role, SharedCacheError, backends
from sharedcache.conf import register_resolvers, role_of

log = logging.getLogger("sharedcache.launch")
register_resolvers()



def process_age() -> float:
    """Seconds since this process started (the kernel's clock, so interpreter start-up counts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def model_dir(model_cfg: dict[str, Any]) -> Path:
    if model_cfg["path"]:
        path = Path(model_cfg["path"]).expanduser()
        if not path.is_dir():
            raise SystemExit(f"[launch] model.path {path} is not a directory. Give a local Hugging Face model "
                             "directory, or leave model.path=null for the embedded default.")
        return path
    from integrations.hf.embedded import EmbeddedSpec, ensure_embedded_model

    emb = model_cfg["embedded"]
    return ensure_embedded_model(Path(emb["dir"]).expanduser(), EmbeddedSpec.from_mapping(emb["spec"]))


def run_hf(cfg: dict[str, Any], role: Role, settings: CacheSettings, out: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from integrations import hf

    path = model_dir(cfg["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = cfg["engine"]
    kwargs = {k: engine[k] for k in ("dtype", "device_map") if engine[k] is not None}
    if str(engine["device_map"] or "cpu").startswith("cuda"):
        # a server brings its CUDA context up at start; it is not part of loading or attaching
        torch.cuda.init()
        torch.empty(1, device=engine["device_map"])
        backends.prepare(torch.device(engine["device_map"]))
    hf.install(role=role, cache=settings)
    try:
        model = getattr(transformers, engine["auto_class"]).from_pretrained(path, **kwargs)
    finally:
        hf.uninstall()
    instance = hf.instance_of(model)
    report = instance.report
    report.extra.update(pid=os.getpid(), run_dir=str(out),
                        versions={"torch": torch.__version__, "transformers": transformers.__version__})
    if cfg["role"]["generate"]:
        report.extra.update(_generate(cfg, model, tokenizer))
    _write_report(out / cfg["report_file"], report.to_json())
    print(report.summary())
    if "generated" in report.extra:
        print(f"  generated: {report.extra['generated']!r}  (tokens {report.extra['generated_tokens']})")
    print(f"  report: {out / cfg['report_file']}", flush=True)
    if cfg["role"]["hold"] and report.mode == "save" and report.fallback is None:
        _hold(instance, settings)
    return report.to_json()


def _generate(cfg: dict[str, Any], model, tokenizer) -> dict[str, Any]:
    """Greedy generation from `prompt`: the logits digest and tokens are what parity checks compare."""
    import torch

    inputs = tokenizer(cfg["prompt"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits
        first_token_age = process_age()
        tokens = model.generate(**inputs, max_new_tokens=cfg["max_new_tokens"],
                                min_new_tokens=cfg["min_new_tokens"], do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    new = tokens[0, inputs["input_ids"].shape[1]:]
    return {
        "generated": tokenizer.decode(new, skip_special_tokens=True),
        "generated_tokens": new.tolist(),
        "logits_sha256": hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest(),
        "prompt": cfg["prompt"],
        "process_to_first_token_seconds": round(first_token_age, 3),
    }


def _hold(instance, settings: CacheSettings) -> None:
    """Own the weights until SIGINT/SIGTERM, then unpublish; attached instances keep working."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"published cache key {settings.key!r} in {settings.dir}. Attach with:\n"
          f"  python launch.py role=decode cache.dir={settings.dir} cache.key={settings.key}\n"
          f"holding the weights (pid {os.getpid()}); stop with Ctrl-C or SIGTERM.", flush=True)
    while not stop.wait(0.2):
        pass
    instance.close()
    print(f"removed entry {settings.key!r}; attached instances keep their mapping.", flush=True)


def _write_report(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM before the prefill starts holding: exit through Python, so the owner's
    finalizers unpublish whatever it already made."""
    raise SystemExit(128 + signum)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cfg = OmegaConf.to_container(dcfg, resolve=True)
    if cfg["engine"].get("cuda_alloc_conf"):
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", cfg["engine"]["cuda_alloc_conf"])
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        # both checked before anything loads: a wrong role or cache config costs nothing
        role = role_of(cfg)
        settings = CacheSettings.from_mapping(cfg["cache"])
        if cfg["engine"]["name"] != "hf":
            raise SystemExit(f"[launch] engine {cfg['engine']['name']!r} is not supported by this build (hf).")
        run_hf(cfg, role, settings, out)
    except SharedCacheError as e:
        log.error("%s", e)  # Hydra's logging shows it on the console and keeps it in the run dir's log
        sys.exit(2)


if __name__ == "__main__":
    main()
