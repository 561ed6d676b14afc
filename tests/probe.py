"""Attach (or load) a model in a fresh process and report, from this process's own view, where its
tensors live (/proc/self/maps) and how much anonymous memory it grew (/proc/self/smaps_rollup).

    python tests/probe.py --role decode --cache-dir D --model default --home H [--wait-stdin]

With --wait-stdin it prints {"attached": true} after binding and waits for a line on stdin
before generating (so a test can kill the owner in between); the line "write" makes it write into a weight
in place instead and report how that ended. The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def anonymous_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous line in smaps_rollup")


def file_mappings(fragment: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of every mapping whose path contains `fragment`."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and fragment in parts[5]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def write_into_a_weight(model, device) -> None:
    """Told "write": add 1 to a weight in place, report whether it landed or faulted, and exit (a CUDA fault
    leaves this process's context unusable, so nothing else runs)."""
    import os

    import torch

    try:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        answer = "landed"
    except Exception as e:  # noqa: BLE001 - the finding is how the write ended
        answer = f"faulted: {type(e).__name__}: {str(e).splitlines()[0]}"
    print(json.dumps({"write": answer}), flush=True)
    os._exit(0)  # no exit path through a poisoned CUDA context


def main() -> None:
    # what the hand-on decides shows on stderr (a few lines at most: a test reads them, nobody drains more)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("sharedcache.handon").setLevel(logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--model", required=True, help="model config group (embedded model)")
    ap.add_argument("--home", required=True, help="where the tests generated the embedded models")
    ap.add_argument("--override", action="append", default=[])
    ap.add_argument("--wait-stdin", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharedcache_integrations import hf
    from sharedcache import CacheSettings
    from sharedcache.conf import compose, role_of

    cfg = compose([f"role={'plain' if a.role == 'bare' else a.role}", f"cache.dir={a.cache_dir}", f"model={a.model}",
                   f"model.embedded.dir={a.home}/models/{a.model}", *a.override])
    path = cfg["model"]["embedded"]["dir"]
    role = role_of(cfg)
    settings = CacheSettings.from_mapping(cfg["cache"])
    import transformers.generation  # noqa: F401 - imported before measuring: code is not weights
    import transformers.models.llama.modeling_llama  # noqa: F401

    tok = AutoTokenizer.from_pretrained(path)
    engine = cfg["engine"]
    kwargs = {k: engine[k] for k in ("dtype", "device_map") if engine[k] is not None}
    device = torch.device(engine["device_map"] or "cpu")
    inputs = tok(cfg["prompt"], return_tensors="pt").to(device)
    if device.type == "cuda":  # start-up work a server does once, as launch.py does
        from sharedcache import backends

        torch.cuda.init()
        backends.prepare(device)
    if a.role == "bare":  # the baseline: same imports, CUDA context and cuBLAS, no model
        (torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum().item()
        if a.wait_stdin:
            print(json.dumps({"attached": True}), flush=True)
            sys.stdin.readline()
        print(json.dumps({"bare": True}))
        return
    anon_before = anonymous_kb()
    with hf.patched(role=role, cache=settings):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    instance = hf.instance_of(model)
    report = instance.report
    maps = file_mappings(str(Path(a.cache_dir).resolve()))
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    outside = [n for n, t in tensors
               if not any(s <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= e for s, e, _ in maps)]
    region = instance.arena_region
    outside_region = [n for n, t in tensors if region is None or
                      not region[0] <= t.data_ptr() <= t.data_ptr() + t.numel() * t.element_size() <= region[1]]
    if a.wait_stdin:
        with torch.no_grad():
            model(**inputs)  # so that activations and cuBLAS are part of what the test measures
        print(json.dumps({"attached": True}), flush=True)
        if sys.stdin.readline().strip() == "write":
            write_into_a_weight(model, device)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=cfg["max_new_tokens"], do_sample=False,
                                pad_token_id=tok.pad_token_id)
    anon_after = anonymous_kb()
    print(json.dumps({
        "report": report.to_json(),
        "tensor_count": len(tensors),
        "outside_mapping": outside,
        "outside_mapping_cuda": outside_region if device.type == "cuda" else None,
        "mapped_files": sorted({p for _, _, p in maps}),
        "checkpoint_mapped": bool(file_mappings(".safetensors")),
        "anon_growth_bytes": (anon_after - anon_before) * 1024,
        "model_bytes": sum(t.numel() * t.element_size() for t in {id(t): t for _, t in tensors}.values()),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "any_requires_grad": any(t.requires_grad for _, t in tensors),
        "training": model.training,
        "any_meta": any(t.device.type == "meta" for _, t in tensors),
        "logits_sha256": hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest(),
        "tokens": tokens[0, inputs["input_ids"].shape[1]:].tolist(),
    }), flush=True)


if __name__ == "__main__":
    main()
