"""How much output throughput a prefill + decode pair on one GPU can reach: a band (low, high), from SGLang's own
step times and the decode server's KV pool.

On one GPU the prefill and the decode server take turns on the same SMs, so each request costs the GPU its
prefill plus its share of every decode step it takes part in:

    seconds per request = prefill(1 request) + output_len * step(B) / B

where step(B) is the decode step with B requests at the workload's context. B is what the decode pool admits, a
whole number of requests, less the slots held by requests still in prefill or in KV transfer (the decode
preallocates a request's KV before the prefill writes it). What one request holds is not one number, so the
bound is computed for every combination of:

- admission: `full`, each request holding input + output (its whole output reserved), or `sglang`, SGLang's PD
  decode admission: each running request holds its input and the tokens made so far (output / 2 on average) and
  num_reserved_decode_tokens (--reserve, 512) per active request are kept free;
- slots held by requests in prefill or transfer: 0, and what the served logs show (mean #transfer-req);
- decode steps: `one-batch` (sglang.bench_one_batch on the same card: bench/device/sglang_one_batch.sh), and
  `served` (B / gen throughput of the served decode log lines in seconds when the prefill logged no batch, so
  that the step is the decode's alone);

and the band is the lowest and highest of them, per setup and for the ratio (each ratio taken within one
combination). The prefill term is the one-batch batch-size-1 prefill in every combination. Still optimistic:
no time is counted for switching between the two processes.

    python bench/pd_bound.py --one-batch bench/results/h200-sglang-one-batch-triton.jsonl \
        --serving bench/results/h200-sglang-serving-nvlink.json \
        [--decode-log shared=shared-2.log --decode-log unshared=unshared-2.log --prefill-log shared=shared-1.log ...]
    python bench/pd_bound.py --one-batch bench/results/h100-sglang-one-batch-14b-triton.jsonl \
        --serving bench/results/h100-serving-v2.json --group 14b/77g/2k2k [--concurrency 64]

In a v2 file the requests in transfer are the served cell's steady-window mean; `--concurrency` caps the batch
at a closed-loop point's clients (a bound for that point rather than for saturation).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_method import batch_lines, mean_lengths  # noqa: E402  (one parser of SGLang's log lines)
from serving_results import group_name  # noqa: E402

RESERVED_DECODE_TOKENS = 512  # SGLang's num_reserved_decode_tokens default


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
        lo, hi = (sizes[-2], sizes[-1]) if b > sizes[-1] and len(sizes) > 1 else (lo, hi)
    if lo == hi:
        return steps[lo]
    return steps[lo] + (steps[hi] - steps[lo]) * (b - lo) / (hi - lo)


def ceiling(steps: dict[int, float], b: float, output_len: float) -> float:
    """Output tokens/s with b requests decoding at once (0 if none fits)."""
    if b <= 0:
        return 0.0
    return output_len / (steps[0] + output_len * step_at(steps, b) / b)


def per_request_tokens(admission: str, inp: float, out: float, reserve: int = RESERVED_DECODE_TOKENS) -> float:
    """Pool tokens one decoding request takes under an admission model (see the module's docstring)."""
    if admission == "full":
        return inp + out
    if admission == "sglang":
        return inp + out / 2 + reserve
    raise ValueError(f"unknown admission model {admission!r}")


def admitted(pool: int, per_request: float, held: float = 0) -> int:
    """Requests decoding at once: whole requests the pool admits, less those holding slots in prefill or
    transfer."""
    return max(0, math.floor(pool / per_request) - math.ceil(held))


def theil_sen(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the line through `points` that outliers do not move: the median of the pairwise
    slopes, then the median intercept."""
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in itertools.combinations(points, 2) if x1 != x0]
    if not slopes:
        raise ValueError("a line needs points at two x values at least")
    slope = statistics.median(slopes)
    return statistics.median(y - slope * x for x, y in points), slope


def served_steps(decode_logs: list[str], prefill_logs: list[str] = (), guard_s: float = 2.0,
                 min_sizes: int = 4) -> dict[int, float]:
    """batch size -> decode step (s) from served `Decode batch` lines (step = running / gen throughput), leaving
    out lines within guard_s of a `Prefill batch` line of the given prefill logs (then the step is the decode's
    alone); a robust line (Theil-Sen) through them, given at the batch sizes seen. Empty when the lines show
    fewer than min_sizes batch sizes."""
    busy = sorted(x["t"] for text in prefill_logs for x in batch_lines(text) if x["kind"] == "prefill")
    points = []
    for text in decode_logs:
        for x in batch_lines(text):
            b, tput = x.get("running_req"), x.get("gen_throughput_token_s")
            if x["kind"] != "decode" or not b or not tput or b / tput > 0.5:  # 0.5 s: a line after an idle gap
                continue
            if any(abs(x["t"] - t) <= guard_s for t in busy):  # a few thousand lines: plain scan
                continue
            points.append((b, b / tput))
    sizes = sorted({b for b, _ in points})
    if len(sizes) < min_sizes:
        return {}
    a, c = theil_sen(points)
    return {b: a + c * b for b in sizes}


def mean_in_transfer(decode_log: str, full: float = 0.9) -> float | None:
    """Mean #transfer-req over the decode lines whose pool (in use + preallocated) is at least `full`: the
    slots a saturated decode gives to requests still in prefill or transfer."""
    xs = [x["transfer_req"] for x in batch_lines(decode_log)
          if x["kind"] == "decode" and "transfer_req" in x
          and x.get("token_usage", 0) + x.get("pre_allocated_usage", 0) >= full]
    return statistics.fmean(xs) if xs else None


def band(sources: dict[str, dict[int, float]], pools: dict[str, int], inp: float, out: float,
         held: dict[str, list[float]], reserve: int = RESERVED_DECODE_TOKENS, concurrency: int = 0) -> dict:
    """Every combination of step source x admission x held slots (held[setup][k]: the k-th variant, the same k
    for every setup), per setup the low and high throughput, and for the ratio shared / unshared. With a
    concurrency (a closed-loop point), no more requests decode at once than the clients keep in flight."""
    n_held = min(len(v) for v in held.values()) if held else 1
    variants = []
    for (src, steps), adm, k in itertools.product(sources.items(), ("full", "sglang"), range(n_held)):
        per = per_request_tokens(adm, inp, out, reserve)
        row = {"steps": src, "admission": adm, "held_variant": k, "setups": {}}
        for setup, pool in pools.items():
            h = held.get(setup, [0] * n_held)[k]
            b = admitted(pool, per, h)
            b = min(b, concurrency) if concurrency else b
            row["setups"][setup] = {"batch": b, "held": h, "tok_s": round(ceiling(steps, b, out), 1)}
        variants.append(row)
    out_: dict = {"variants": variants, "setups": {}}
    for setup in pools:
        vals = [v["setups"][setup]["tok_s"] for v in variants]
        out_["setups"][setup] = {"low_tok_s": min(vals), "high_tok_s": max(vals)}
    if {"shared", "unshared"} <= pools.keys():
        ratios = [v["setups"]["shared"]["tok_s"] / v["setups"]["unshared"]["tok_s"] for v in variants
                  if v["setups"]["unshared"]["tok_s"] > 0]
        out_["ratio"] = {"low": round(min(ratios), 3), "high": round(max(ratios), 3)} if ratios else None
    return out_


def _old_format(serving: dict, workload: str) -> dict:
    """Pools, lengths and served best throughputs of a results file of the first serving benchmark."""
    pools, served, lengths = {}, {}, None
    for name, entry in serving["setups"].items():
        decodes = [v for v in entry.get("servers", {}).values() if v["role"] == "decode"]
        if not decodes:
            raise SystemExit(f"[bound] setup {name} has no decode server: the bound is for PD runs")
        pools[name] = decodes[0]["kv_pool_tokens"]
        runs = [r for r in entry.get("runs", []) if r["workload"] == workload]
        if runs:
            lengths = (runs[0]["input_len"], runs[0]["output_len"])
            served[name] = max(r["output_throughput"] for r in runs)
    if lengths is None:
        raise SystemExit(f"[bound] no {workload} run in the serving results")
    return {"pools": pools, "inp": lengths[0], "out": lengths[1], "served": served, "points": {}, "held": {}}


def _v2_format(serving: dict, group: str, concurrency: int = 0) -> dict:
    """At each setup's tuned split of a v2 results file: the decode pool, the served throughput and the requests
    in transfer there (the servers' log statistics of its steady window), at the given concurrency's point, else
    at the best point; the mean lengths."""
    g = serving["groups"].get(group)
    if g is None:
        raise SystemExit(f"[bound] no group {group!r} in the results (groups: {sorted(serving['groups'])})")
    cell = next(c for c in serving["cells"] if group_name(c["model"], c["free_gib"], c["workload"]) == group)
    inp, out = mean_lengths(cell["input_len"], cell["output_len"], cell["range_ratio"])
    pools, served, held, points = {}, {}, {}, {}
    for setup in ("shared", "unshared"):
        s = g["setups"].get(setup)
        if not s or s["tuned_split"] is None or not s["decode_pool_tokens"].get(str(s["tuned_split"])):
            continue
        split = str(s["tuned_split"])
        pools[setup] = s["decode_pool_tokens"][split]
        rows = s["sweeps"].get(split) or s["tune"].get(split, [])  # before the sweeps: the tuning point
        if rows:
            best = next((r for r in rows if r["point"] == concurrency), None) or \
                max(rows, key=lambda r: r["output_tok_s"])
            served[setup] = best["output_tok_s"]
            points[setup] = best["point"]
            held[setup] = best.get("decode", {}).get("decode_in_transfer_mean")
    return {"pools": pools, "inp": inp, "out": out, "served": served, "points": points,
            "held": {k: v for k, v in held.items() if v is not None}}


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"[bound] {what} is SETUP=PATH, not {item!r}")
        out[name] = Path(path).read_text(errors="replace")
    return out


def bound(a) -> dict:
    serving = json.loads(a.serving.read_text())
    found = _v2_format(serving, a.group, a.concurrency) if serving.get("schema") == "serving-v2" \
        else _old_format(serving, a.workload)
    pools, inp, out, served = found["pools"], found["inp"], found["out"], found["served"]
    if a.pools:
        pools = {k: int(v) for k, v in (p.split("=") for p in a.pools.split(","))}
    steps = step_times(a.one_batch, a.one_batch_input or int(inp))
    sources = {"one-batch": steps}
    decode, prefill = _pairs(a.decode_log, "--decode-log"), _pairs(a.prefill_log, "--prefill-log")
    if decode:
        table = served_steps(list(decode.values()), list(prefill.values()), a.guard_s)
        if len(table) >= 2:
            sources["served"] = {0: steps[0], **table}
    # a v2 cell's own steady-window count first: a whole log's saturated lines include the ramp-up, when every
    # request is in transfer at once
    seen = {**{s: mean_in_transfer(text) for s, text in decode.items() if s in pools and s not in found["held"]},
            **found["held"]}
    complete = seen.keys() == pools.keys() and all(v is not None for v in seen.values())
    held = {s: [0.0, seen[s]] if complete else [0.0] for s in pools}
    result = {"lengths": {"input": inp, "output": out}, "pools": pools, "prefill_one_request_s": steps[0],
              "decode_step_s": {src: {k: v for k, v in sorted(t.items()) if k} for src, t in sources.items()},
              "held_in_transfer": held, "concurrency": a.concurrency or None,
              **band(sources, pools, inp, out, held, a.reserve, a.concurrency)}
    for setup, tput in served.items():
        b = result["setups"].get(setup)
        if b:
            b.update({"served_tok_s": tput, "served_point": found["points"].get(setup),
                      "served_share_of_high": round(tput / b["high_tok_s"], 3) if b["high_tok_s"] else None})
    if {"shared", "unshared"} <= pools.keys():  # the first version's single number, for comparison
        legacy = [ceiling(steps, pools[s] / (inp + out), out) for s in ("shared", "unshared")]
        result["legacy_saturated_ceiling_ratio"] = round(legacy[0] / legacy[1], 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one-batch", type=Path, required=True)
    ap.add_argument("--serving", type=Path, required=True, help="a serving results file (first version or v2)")
    ap.add_argument("--workload", default="long-8k", help="first-version files: which workload")
    ap.add_argument("--group", default=None, help="v2 files: which group, e.g. 14b/77g/2k2k")
    ap.add_argument("--one-batch-input", type=int, default=0, help="the one-batch rows' input length (default: "
                    "the workload's mean input)")
    ap.add_argument("--pools", default="", help="decode pools instead of the file's: shared=N,unshared=M")
    ap.add_argument("--decode-log", action="append", default=[], help="SETUP=PATH of a served decode log")
    ap.add_argument("--prefill-log", action="append", default=[], help="SETUP=PATH of a served prefill log")
    ap.add_argument("--guard-s", type=float, default=2.0)
    ap.add_argument("--reserve", type=int, default=RESERVED_DECODE_TOKENS)
    ap.add_argument("--concurrency", type=int, default=0, help="cap the decoding batch at a closed-loop point's "
                    "concurrency (0: saturated, as many as the pool admits)")
    print(json.dumps(bound(ap.parse_args()), indent=2))


if __name__ == "__main__":
    main()
