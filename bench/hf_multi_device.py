"""A transformers model spread over two GPUs (device_map="auto"): plain load vs prefill (load + publish one
arena per GPU) vs decode (attach every part), each its own process (tests/gpu/spread_probe.py), side by side
in one run. Per process and GPU: memory from NVML; plus load/attach seconds, weight bytes allocated, and
logits and greedy tokens compared.

    python bench/hf_multi_device.py --model-dir /tmp/llama8b --out bench/results/h200-hf-multi-device
    (bench/device/hf_multi_device.sh runs it on the device machine)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from serving_servers import REPO, nvidia_smi  # bench/ is this script's directory

PROBE = REPO / "tests" / "gpu" / "spread_probe.py"


def nvml_mib_by_gpu(pid: int) -> list[int]:
    """MiB that process `pid` holds on each GPU, in the GPUs' index order (NVML, through nvidia-smi)."""
    gpus = nvidia_smi("--query-gpu=index,uuid", "--format=csv,noheader")
    order = {uuid.strip(): int(i) for i, uuid in (line.split(",") for line in gpus.splitlines())}
    apps = nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits")
    used = [0] * len(order)
    for line in apps.splitlines():
        p, uuid, mib = (x.strip() for x in line.split(","))
        if int(p) == pid:
            used[order[uuid]] += int(mib)
    return used


def held(role: str, model_dir: str, cache_dir: str, device_map: str, tokens: int) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, str(PROBE), "--role", role, "--model-dir", model_dir, "--cache-dir",
                             cache_dir, "--device-map", device_map, "--tokens", str(tokens), "--hold"],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"{role} probe failed (exit {proc.returncode}); see its stderr above")
    out = json.loads(line)
    if "error" in out:
        raise SystemExit(f"{role} refused: {out['message']}")
    out["nvml_mib"] = nvml_mib_by_gpu(proc.pid)
    return proc, out


def row(name: str, out: dict) -> dict:
    r = out["report"] or {}
    return {"process": name, "mode": r.get("mode"), "seconds": round(out["seconds"], 3),
            "attach_seconds": r.get("attach_seconds"), "load_seconds": r.get("load_seconds"),
            "weight_bytes_allocated": r.get("weight_bytes_allocated"), "parts": r.get("parts", []),
            "nvml_mib_by_gpu": out["nvml_mib"], "torch_allocated_by_gpu": out["weight_memory_allocated"],
            "hf_device_map_devices": sorted(set(out["hf_device_map"].values())),
            "logits_sha256": out["logits_sha256"], "tokens": out["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device-map", default="auto")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", required=True, help="path without suffix: writes .json and .md")
    a = ap.parse_args()
    import torch
    import transformers

    cache_dir = tempfile.mkdtemp(prefix="sc-spread-", dir="/dev/shm")
    rows = []
    plain, p = held("plain", a.model_dir, cache_dir, a.device_map, a.tokens)
    rows.append(row("plain (its own copy)", p))
    plain.communicate("go\n")
    owner, pre = held("prefill", a.model_dir, cache_dir, a.device_map, a.tokens)
    rows.append(row("prefill (owner)", pre))
    decode, dec = held("decode", a.model_dir, cache_dir, a.device_map, a.tokens)
    rows.append(row("decode (attached)", dec))
    decode.communicate("go\n")
    owner.communicate("go\n")
    driver = nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader").splitlines()
    result = {
        "machine": platform.node(), "gpus": driver, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "transformers": transformers.__version__, "model_dir": a.model_dir, "device_map": a.device_map,
        "rows": rows,
        "logits_equal": len({r["logits_sha256"] for r in rows}) == 1,
        "tokens_equal": len({tuple(r["tokens"]) for r in rows}) == 1,
        "decode_weight_bytes_allocated": dec["report"]["weight_bytes_allocated"],
        "attach_vs_plain_load": round(dec["seconds"] / p["seconds"], 4),
    }
    Path(a.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(a.out + ".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    spread = len(r["rows"][0]["hf_device_map_devices"])  # the GPUs the model runs on, not the machine's count
    seen = f"; CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}" if r.get("cuda_visible_devices") else ""
    lines = [f"# transformers model spread over {spread} GPUs (device_map={r['device_map']!r})", "",
             f"{r['gpus'][0]} (x{len(r['gpus'])} on the machine{seen}); torch {r['torch']}, "
             f"transformers {r['transformers']}; model "
             f"{r['model_dir']}. Each row is its own process, in this order, side by side in one run "
             "(`bench/hf_multi_device.py`).", "",
             "| process | from_pretrained (s) | attach (s) | weight bytes allocated | NVML MiB per GPU | parts |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        parts = ", ".join(f"{p['device']}: {p['bytes'] / 2**30:.2f} GiB" for p in x["parts"]) or "-"
        lines.append(f"| {x['process']} | {x['seconds']:.2f} | {x['attach_seconds'] if x['attach_seconds'] is not None else '-'} "
                     f"| {x['weight_bytes_allocated']:,} | {' / '.join(f'{m:,}' for m in x['nvml_mib_by_gpu'])} | {parts} |")
    lines += ["", f"Logits equal across the three: {r['logits_equal']}; greedy tokens equal: {r['tokens_equal']}. "
              f"Decode's from_pretrained took {r['attach_vs_plain_load']:.4f}x the plain load's time.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
