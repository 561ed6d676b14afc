"""Load a model spread over several GPUs through `hf.from_pretrained` in a fresh process and report what
this process holds: the sharedcache report, where each module runs, the weight memory the process
allocated per GPU, and the logits and greedy tokens of a fixed prompt.

    python tests/gpu/spread_probe.py --role prefill|decode|auto|plain --model-dir M --cache-dir D \
        --device-map '{"model.embed_tokens": 0, ...}' | auto [--dtype bfloat16] [--hold]

With --hold it prints its JSON line after loading, then keeps the model (an owner keeps its entry
published) until a line arrives on stdin. A refusal prints {"error": ..., "message": ...} and exits 2.
Used by tests/gpu/test_hf_multi_device.py and bench/hf_multi_device.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--key", default="spread")
    ap.add_argument("--device-map", required=True, help="a JSON object, or a name such as auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--hold", action="store_true")
    a = ap.parse_args()
    device_map = json.loads(a.device_map) if a.device_map.startswith("{") else a.device_map

    import torch
    from transformers import AutoTokenizer

    from sharedcache import SharedCacheError
    from sharedcache_integrations import hf

    for i in range(torch.cuda.device_count()):  # contexts up first, as a server has them: not part of loading
        torch.empty(1, device=f"cuda:{i}")
    before = [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]
    kwargs = {"device_map": device_map} | ({"dtype": a.dtype} if a.dtype else {})
    t0 = time.perf_counter()
    try:
        model = hf.from_pretrained(a.model_dir, role=a.role, overrides=[f"cache.dir={a.cache_dir}",
                                                                        f"cache.key={a.key}"], **kwargs)
    except SharedCacheError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        sys.exit(2)
    seconds = time.perf_counter() - t0
    allocated = [torch.cuda.memory_allocated(i) - b for i, b in enumerate(before)]
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    inputs = tok("One copy of the weights, spread over two GPUs:", return_tensors="pt").to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    instance = hf.instance_of(model)
    tensors = list(model.named_parameters(remove_duplicate=False))
    print(json.dumps({
        "report": instance.report.to_json() if instance else None,
        "seconds": seconds,
        "weight_memory_allocated": allocated,  # torch's allocator, per GPU, from before the load to after it
        "hf_device_map": {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()},
        "param_devices": sorted({str(t.device) for _, t in tensors}),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "logits_sha256": hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest(),
        "tokens": tokens[0, inputs["input_ids"].shape[1]:].tolist(),
    }), flush=True)
    if a.hold:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
