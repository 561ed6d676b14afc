"""How much output throughput a prefill + decode pair on one GPU can reach, from SGLang's own step times.

On one GPU the prefill and the decode server take turns on the same SMs, so each long request costs the GPU its
prefill plus its share of every decode step it takes part in:

    seconds per request = prefill(1 request) + output_len * step(B) / B

where step(B) is the decode step time with B requests at the workload's context, and B is at most what the decode
server's KV pool holds. Both terms come from `sglang.bench_one_batch` on the same card (a static batch, no server,
no sharedcache: bench/device/sglang_one_batch.sh). The pools come from the serving benchmark's result. The bound
says what the pools can buy, and how far the served numbers are from it. It is a little optimistic: the steps are
measured over the first 64 output tokens, while a served request's context grows to input + output, and it counts
no time for the KV transfer or for switching between the two processes.

    python bench/pd_bound.py --one-batch bench/results/h200-sglang-one-batch-triton.jsonl \
        --serving bench/results/h200-sglang-serving-nvlink.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def step_times(path: Path, input_len: int) -> dict[int, float]:
    """batch size -> median decode step (s), and 0 -> prefill of one request (s)."""
    steps: dict[int, float] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["input_len"] != input_len:
            continue
        steps[r["batch_size"]] = r["median_decode_latency"]
        if r["batch_size"] == 1:
            steps[0] = r["prefill_latency"]
    if 0 not in steps or len(steps) < 3:
        raise SystemExit(f"[bound] {path} has no batch-size-1 run or too few batch sizes at input {input_len}")
    return steps


def step_at(steps: dict[int, float], b: float) -> float:
    """Linear between the measured batch sizes, and along the last two past the largest."""
    sizes = sorted(k for k in steps if k > 0)
    lo = max((s for s in sizes if s <= b), default=sizes[0])
    hi = min((s for s in sizes if s >= b), default=sizes[-1])
    if lo == hi:
        lo, hi = (sizes[-2], sizes[-1]) if b > sizes[-1] else (lo, hi)
    if lo == hi:
        return steps[lo]
    return steps[lo] + (steps[hi] - steps[lo]) * (b - lo) / (hi - lo)


def ceiling(steps: dict[int, float], b: float, output_len: int) -> float:
    """Output tokens/s with b requests decoding at once."""
    return output_len / (steps[0] + output_len * step_at(steps, b) / b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one-batch", type=Path, required=True)
    ap.add_argument("--serving", type=Path, required=True)
    ap.add_argument("--workload", default="long-8k")
    ap.add_argument("--target", type=float, default=1.25)
    a = ap.parse_args()
    serving = json.loads(a.serving.read_text())
    runs = {name: [r for r in e.get("runs", []) if r["workload"] == a.workload] for name, e in serving["setups"].items()}
    first = next((r for rs in runs.values() for r in rs), None)
    if first is None:
        raise SystemExit(f"[bound] {a.serving} has no {a.workload} run")
    inp, out = first["input_len"], first["output_len"]
    steps = step_times(a.one_batch, inp)
    rows = {}
    for name, entry in serving["setups"].items():
        decodes = [v for v in entry["servers"].values() if v["role"] == "decode"]
        if not decodes:
            raise SystemExit(f"[bound] setup {name} of {a.serving} has no decode server: the bound is for PD runs")
        decode = decodes[0]
        held = decode["kv_pool_tokens"] / (inp + out)  # the decode batch once the load saturates the pool
        best = max(runs[name], key=lambda r: r["output_throughput"], default=None)
        at_best = best and ceiling(steps, min(held, best["concurrency_per_client"]), out)
        rows[name] = {"decode_pool_tokens": decode["kv_pool_tokens"], "requests_the_pool_holds": round(held, 1),
                      "saturated_ceiling_tok_s": round(ceiling(steps, held, out), 1),
                      "served_best_tok_s": best and best["output_throughput"],
                      "served_best_concurrency": best and best["concurrency_per_client"],
                      "ceiling_at_that_concurrency_tok_s": at_best and round(at_best, 1),
                      "served_share_of_that_ceiling": best and round(best["output_throughput"] / at_best, 3)}
    result = {"prefill_one_request_s": steps[0], "decode_step_s": {k: v for k, v in sorted(steps.items()) if k},
              "setups": rows}
    if {"shared", "unshared"} <= rows.keys():
        base = rows["unshared"]["saturated_ceiling_tok_s"]
        result["saturated_ceiling_ratio"] = round(rows["shared"]["saturated_ceiling_tok_s"] / base, 3)
        result["ceiling_ratio_at_largest_measured_batch"] = round(ceiling(steps, max(steps), out) / base, 3)
        need = next((b for b in range(1, 513) if ceiling(steps, b, out) >= a.target * base), None)
        result[f"decode_batch_for_{a.target}x"] = need
        # beyond the largest batch measured, step(B) is the last two points' line carried on
        result[f"decode_batch_for_{a.target}x_extrapolated"] = need is None or need > max(steps)
        result[f"decode_pool_tokens_for_{a.target}x"] = need and need * (inp + out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
