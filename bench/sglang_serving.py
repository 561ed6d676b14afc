"""Serving benchmark, method v2 (issue 22): SGLang's prefill and decode servers on one GPU sharing one copy of
the weights ("shared"), the same PD pair each loading its own copy ("unshared"), and one colocated server with
one copy ("colocated"), all started through launch.py, measured so that a ratio between them holds
(../shared/DESIGN.md, "Measuring serving"; bench/README.md, "Serving method (v2)").

A *cell* is one load run: (model, free GiB, workload, setup, split, phase, point, repeat). One call runs one
setup of one model end to end and skips the cells its results file already holds; calls merge by cell:

    python bench/sglang_serving.py run --model /tmp/llama14b --tag 14b --setup shared --free-gib 77 \
        --phase tune --splits 32768,65536,131072 --out $OUT
    python bench/sglang_serving.py run ... --phase sweep --splits 65536 --points 8,16,32,48,64 --repeats 3
    python bench/sglang_serving.py run ... --phase goodput --splits 65536
    python bench/sglang_serving.py merge --into bench/results/h100-serving-v2.json $OUT/serving-v2-part-*.json
    python bench/sglang_serving.py report bench/results/h100-serving-v2.json

The method, each rule a function below with a test in tests/test_bench_method.py:
- steady state: a load lasts window / (1 - 2 trim) s; throughput, latencies and the server-log statistics come
  from the middle window only (`steady_window`); lengths vary uniformly in [ratio x L, L] (SGLang's random range
  ratio), the same request sequence for every setup (seeded by the repeat);
- sweep: closed loop at each concurrency point, the control point included; tune: one saturated point per
  prefill pool size (`--splits`, SGLang's max_total_tokens for the prefill) to pick each setup's split; goodput:
  open-loop Poisson arrivals, the rate bisected (`next_rate`) until the bracket is within 10 %;
- the summary refuses setups that differ in points (`check_same_points`) and voids a comparison whose control
  point reads off 1.00 by more than 3 % in any repeat (`control_verdict`), that stops short of two points above
  the unshared decode pool's limit (`saturation_verdict`), or whose setups ran at the same time on one host
  (`overlapping_cells`); fewer than 3 repeats or a window under 120 s (and under 8 waves) are listed as
  deviations;
- the budget (--budget-s) counts load seconds only, never server start-up; --wall-s stops starting cells that
  the call could not finish.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]
SERVER_FLAGS = ("+engine.extra_args.attention_backend=triton +engine.extra_args.sampling_backend=pytorch "
                "+engine.extra_args.grammar_backend=none +engine.extra_args.disable_prefill_cuda_graph=true")
SETUPS = ("shared", "unshared", "colocated")
PHASES = ("sweep", "tune", "goodput")
LOW_ID = 16  # prompt token ids from here up: clear of the tokenizer's special ids

sys.path.insert(0, str(REPO / "tests"))  # one free_port and one SGLang request helper for tests and benchmarks
from helpers import free_port, sglang_healthy, sglang_request  # noqa: E402


class MethodError(ValueError):
    """A comparison the method refuses to make (the message says which rule and what differs)."""


# ---------------------------------------------------------------- statistics

# Student's t, two-sided 95 % (0.975 quantile), df = 1..30; beyond, linear in 1/df to the normal's 1.960
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T975_TAIL = ((30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table values, 3 decimals)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, not {df}")
    if df <= 30:
        return _T975[df - 1]
    for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:]):
        if df <= d1:
            x0, x1, x = 1 / d0, (0.0 if d1 == math.inf else 1 / d1), 1 / df
            return t0 + (t1 - t0) * (x0 - x) / (x0 - x1)
    return 1.960


def mean_ci(values: Iterable[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of its 95 % confidence interval, t-distribution); the half-width is None below 2 values."""
    xs = [float(v) for v in values]
    if not xs:
        return None, None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def ratio_ci(a: float, a_hw: float | None, b: float, b_hw: float | None) -> tuple[float, float | None]:
    """a / b and the half-width of its interval, from the two relative half-widths (first-order propagation)."""
    r = a / b
    if a_hw is None or b_hw is None:
        return r, None
    return r, r * math.sqrt((a_hw / a) ** 2 + (b_hw / b) ** 2)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------- requests and the steady-state window

@dataclass
class Spec:
    """One request of the seeded sequence: the same for every setup."""
    index: int
    input_ids: list[int]
    output_len: int


def request_specs(seed: int, inp: int, out: int, ratio: float, vocab: int) -> Iterator[Spec]:
    """Request k of `seed`: input and output lengths uniform in [max(1, int(L x ratio)), L] (SGLang's random
    range ratio; 1 = fixed lengths), random token ids."""
    k = 0
    while True:
        rng = random.Random(f"{seed}:{k}")
        n_in = rng.randint(max(1, int(inp * ratio)), inp)
        n_out = rng.randint(max(1, int(out * ratio)), out)
        yield Spec(k, [rng.randrange(LOW_ID, vocab) for _ in range(n_in)], n_out)
        k += 1


def mean_lengths(inp: int, out: int, ratio: float) -> tuple[float, float]:
    return (max(1, int(inp * ratio)) + inp) / 2, (max(1, int(out * ratio)) + out) / 2


@dataclass
class Request:
    """What one request did: times in seconds from the load's start; chunks are (time, completion tokens so far)."""
    index: int
    input_len: int
    output_len: int
    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    end: float | None = None
    error: str | None = None

    def gaps(self) -> Iterator[tuple[float, float, int]]:
        """(time, inter-token latency, tokens) per chunk after the first: a chunk of n tokens spreads its gap."""
        for (t0, c0), (t1, c1) in zip(self.chunks, self.chunks[1:]):
            if c1 > c0:
                yield t1, (t1 - t0) / (c1 - c0), c1 - c0

    def summary(self) -> list:
        """The compact record kept in the results (REQUEST_FIELDS)."""
        itls = [g for _, g, n in self.gaps() for _ in range(n)]
        first = self.chunks[0][0] - self.sent if self.chunks else None
        tokens = self.chunks[-1][1] if self.chunks else 0
        return [_r(self.sent), self.input_len, self.output_len, tokens, _r(first, 4),
                _r(percentile(itls, 99), 5), _r(self.end), self.error and self.error[:200]]


REQUEST_FIELDS = ("sent_s", "input_len", "output_len", "tokens", "ttft_s", "itl_p99_s", "end_s", "error")


def steady_window(start: float, stop: float, trim: float = 0.15) -> tuple[float, float]:
    """The part of a load [start, stop] that counts: the first and last `trim` of it excluded."""
    if not 0 <= trim < 0.5 or stop <= start:
        raise ValueError(f"no steady window in [{start}, {stop}] with trim {trim}")
    span = stop - start
    return start + trim * span, stop - trim * span


def load_seconds(window_s: float, trim: float) -> float:
    """How long a load must last for its steady window to be window_s."""
    return window_s / (1 - 2 * trim)


def window_tokens(requests: Iterable[Request], lo: float, hi: float) -> int:
    """Output tokens that arrived in [lo, hi) (a chunk's tokens count at its arrival)."""
    total = 0
    for r in requests:
        prev = 0
        for t, c in r.chunks:
            if lo <= t < hi:
                total += c - prev
            prev = c
    return total


def window_latencies(requests: list[Request], lo: float, hi: float) -> dict:
    """TTFT of the requests sent in [lo, hi), inter-token latencies of the tokens that arrived in it (ms)."""
    ttfts = [r.chunks[0][0] - r.sent for r in requests if lo <= r.sent < hi and r.chunks]
    itls = [g for r in requests for t, g, n in r.gaps() if lo <= t < hi for _ in range(n)]
    e2e = [r.end - r.sent for r in requests if lo <= r.sent < hi and r.end is not None and not r.error]
    ms = (lambda v: None if v is None else round(v * 1000, 2))
    return {"ttft_ms_p50": ms(percentile(ttfts, 50)), "ttft_ms_p99": ms(percentile(ttfts, 99)),
            "itl_ms_p50": ms(percentile(itls, 50)), "itl_ms_p99": ms(percentile(itls, 99)),
            "e2e_ms_p50": ms(percentile(e2e, 50))}


# ---------------------------------------------------------------- SLO attainment and goodput

def judge(req: list, cut: float, ttft_slo: float, itl_slo: float) -> bool | None:
    """Did a request (a compact record) meet the SLO: first token within ttft_slo and its own ITL p99 within
    itl_slo? A request cut by the load's end (`cut`, no error) is judged on what it showed; one cut before its
    first token is a miss only if it had already waited longer than ttft_slo, else it is not judged (None)."""
    sent, _, _, _, ttft, itl99, _, error = req
    if error:
        return False
    if ttft is None:
        return False if cut - sent > ttft_slo else None
    return ttft <= ttft_slo and (itl99 is None or itl99 <= itl_slo)


def attainment(requests: list[list], lo: float, hi: float, cut: float, ttft_slo: float,
               itl_slo: float) -> tuple[int, int]:
    """(requests that met the SLO, requests judged), over those sent in [lo, hi)."""
    verdicts = [judge(r, cut, ttft_slo, itl_slo) for r in requests if lo <= r[0] < hi]
    judged = [v for v in verdicts if v is not None]
    return sum(judged), len(judged)


def cell_attainment(cell: dict, ttft_slo: float | None = None, itl_slo: float | None = None) -> tuple[int, int]:
    """A cell's attainment at its own SLO, or at the one given; a run stopped early for misses met none."""
    slo = cell["slo"]
    ttft_slo = slo["ttft_s"] if ttft_slo is None else ttft_slo
    itl_slo = slo["itl_s"] if itl_slo is None else itl_slo
    lo, hi = cell["window_s"]
    met, judged = attainment(cell["requests"], lo, hi, cell["duration_s"], ttft_slo, itl_slo)
    return (0, max(judged, 1)) if cell.get("stopped_early") else (met, judged)


def passes(counts: Iterable[tuple[int, int]], need: float = 0.99) -> bool:
    """Pooled over repeats: at least `need` of the judged requests met the SLO (and some were judged)."""
    met = judged = 0
    for m, j in counts:
        met, judged = met + m, judged + j
    return judged > 0 and met >= need * judged


def goodput(verdicts: dict[float, bool]) -> float | None:
    """The highest passing rate below the lowest failing one (None: no rate passed below it)."""
    failing = [r for r, ok in verdicts.items() if not ok]
    ceiling = min(failing) if failing else math.inf
    ok = [r for r, v in verdicts.items() if v and r < ceiling]
    return max(ok) if ok else None


def next_rate(verdicts: dict[float, bool], hi0: float, rel_tol: float = 0.1, grow: float = 1.5,
              max_rate: float | None = None) -> float | None:
    """The next request rate to try, or None once the goodput is bracketed within rel_tol (or the rate passing
    at max_rate). Starts at hi0 (an estimate of capacity), bisects between the best pass and the lowest fail,
    and grows by `grow` while everything passes."""
    cap = max_rate if max_rate is not None else 4 * hi0
    if not verdicts:
        return round(min(hi0, cap), 3)
    failing = [r for r, ok in verdicts.items() if not ok]
    lo = goodput(verdicts) or 0.0
    if not failing:
        nxt = round(min(lo * grow, cap), 3)
        return None if nxt <= lo else nxt
    hi = min(failing)
    if hi - lo <= rel_tol * hi:
        return None
    mid = round((lo + hi) / 2, 3)
    return None if mid in verdicts else mid


# ---------------------------------------------------------------- SGLang's log lines

_BATCH_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[^\]]*\] (Prefill|Decode) batch, (.*)$")
_FIELD = re.compile(r"\s*([^:]+):\s*(\S+)\s*$")


def _field_name(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lstrip("#").lower()).strip("_")


def parse_batch_line(line: str) -> dict | None:
    """One `Prefill batch` / `Decode batch` line of an SGLang server's log as {"t": epoch seconds (local time, as
    SGLang writes it), "kind": "prefill" | "decode", field: number}, fields named from the labels
    ('#running-req' -> running_req, 'token usage' -> token_usage, 'gen throughput (token/s)' ->
    gen_throughput_token_s); None for any other line."""
    m = _BATCH_LINE.match(line.strip())
    if not m:
        return None
    out: dict = {"t": time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")), "kind": m.group(2).lower()}
    for part in m.group(3).split(", "):
        f = _FIELD.match(part)
        if not f:
            continue
        value = f.group(2)
        try:
            out[_field_name(f.group(1))] = float(value) if "." in value else int(value)
        except ValueError:
            out[_field_name(f.group(1))] = value == "True" if value in ("True", "False") else value
    return out


def batch_lines(text: str) -> list[dict]:
    return [p for p in map(parse_batch_line, text.splitlines()) if p]


def _describe(values: list[float], prefix: str, *, p50: bool = False, peak: bool = False) -> dict:
    if not values:
        return {}
    out = {f"{prefix}_mean": round(statistics.fmean(values), 3)}
    if p50:
        out[f"{prefix}_p50"] = percentile(values, 50)
    if peak:
        out[f"{prefix}_max"] = max(values)
    return out


def batch_stats(lines: list[dict], lo: float, hi: float) -> dict:
    """What a server did in [lo, hi) (epoch seconds; lines carry whole seconds, so lo is taken down to one):
    decode running batch (mean, p50), requests in KV transfer and preallocated, pool use; prefill requests in
    flight, queued, pool use. Means are over log lines: decode lines come every decode_log_interval steps,
    prefill lines once per prefill batch."""
    sel = [x for x in lines if math.floor(lo) <= x["t"] < hi]
    dec = [x for x in sel if x["kind"] == "decode"]
    pre = [x for x in sel if x["kind"] == "prefill"]
    col = (lambda xs, k: [x[k] for x in xs if isinstance(x.get(k), (int, float))])
    out: dict = {"decode_lines": len(dec), "prefill_lines": len(pre)}
    out.update(_describe(col(dec, "running_req"), "decode_running", p50=True, peak=True))
    out.update(_describe(col(dec, "transfer_req"), "decode_in_transfer", peak=True))
    out.update(_describe(col(dec, "prealloc_req"), "decode_prealloc"))
    out.update(_describe(col(dec, "queue_req"), "decode_queue"))
    out.update(_describe(col(dec, "token_usage"), "decode_pool_use", peak=True))
    out.update(_describe(col(dec, "pre_allocated_usage"), "decode_prealloc_use", peak=True))
    out.update(_describe(col(dec, "retracted_req"), "decode_retracted", peak=True))
    out.update(_describe(col(dec, "gen_throughput_token_s"), "decode_gen_tok_s"))
    out.update(_describe(col(pre, "inflight_req"), "prefill_inflight", peak=True))
    out.update(_describe(col(pre, "queue_req"), "prefill_queue", peak=True))
    out.update(_describe(col(pre, "token_usage"), "prefill_pool_use", peak=True))
    out.update(_describe(col(pre, "running_req"), "prefill_running"))
    return out


# ---------------------------------------------------------------- the method's rules

def check_same_points(points: dict[str, Iterable[int | float]]) -> list:
    """The points every setup ran, which must be the same: a comparison across unequal sweeps is refused."""
    sets = {name: sorted(set(p)) for name, p in points.items()}
    first = next(iter(sets.values()), [])
    if any(p != first for p in sets.values()):
        detail = "; ".join(f"{n}: {p}" for n, p in sets.items())
        raise MethodError(f"[bench] setups differ in points ({detail}): run the missing points for each setup, "
                          "a best-of across unequal sweeps is not a comparison")
    return first


def control_verdict(ratios: list[float], tol: float = 0.03) -> tuple[bool, str | None]:
    """The below-capacity control point must read 1.00 +/- tol between setups in every repeat, or the run is
    void (both setups hold every request there, so a difference is the card, the host or the harness)."""
    if not ratios:
        return False, "no control point measured in both setups"
    off = [r for r in ratios if abs(r - 1) > tol]
    if off:
        return False, (f"control point reads {', '.join(f'{r:.3f}' for r in off)} between setups, outside "
                       f"1.00 +/- {tol:.0%}: something other than the setups differs")
    return True, None


def saturation_verdict(points: Iterable[int], pool_limit: float | None, need: int = 2) -> tuple[bool, str | None]:
    """The sweep must go at least `need` points past the unshared decode pool's limit (in requests)."""
    if pool_limit is None:
        return False, "the unshared decode pool's size is not known"
    above = [p for p in points if p > pool_limit]
    if len(above) < need:
        return False, (f"only {len(above)} point(s) above the unshared decode pool's limit of {pool_limit:.1f} "
                       f"requests (need {need}): not swept past saturation")
    return True, None


def overlapping_cells(cells: list[dict]) -> list[tuple[str, str]]:
    """Pairs of cells of different setups that ran at the same time on one host."""
    spans = sorted((c["host"], c["t_start_epoch"], c["t_start_epoch"] + c["duration_s"], c["setup"], c["id"])
                   for c in cells)
    out = []
    for i, (host, t0, t1, setup, cid) in enumerate(spans):
        for host2, u0, _, setup2, cid2 in spans[i + 1:]:
            if host2 != host or u0 >= t1:
                break
            if setup2 != setup:
                out.append((cid, cid2))
    return out


def method_deviations(cell: dict, min_window: float = 120, min_waves: float = 8) -> list[str]:
    out = []
    lo, hi = cell["window_s"]
    if hi - lo < min_window - 1e-6 and (cell.get("waves") or 0) < min_waves:
        out.append(f"window {hi - lo:.0f} s < {min_window:.0f} s and {cell.get('waves')} waves < {min_waves:.0f}")
    if cell["range_ratio"] >= 1 and cell["load"] == "concurrency":
        out.append("fixed lengths under a closed loop: requests may move in lock-step")
    return out


# ---------------------------------------------------------------- results: cells, merging, summaries

def cell_id(c: dict) -> str:
    split = c["split"] if c["split"] is not None else "-"
    return (f"{c['model']}|{c['free_gib']:g}g|{c['workload']}|{c['setup']}|{split}|{c['phase']}|"
            f"{c['load'][:4]}{c['point']:g}|r{c['repeat']}")


def group_name(model: str, free_gib: float, workload: str) -> str:
    return f"{model}/{round(free_gib)}g/{workload}" if free_gib else f"{model}/card/{workload}"


def merge_docs(docs: Iterable[dict]) -> dict:
    """Cells, server starts and environments of several runs in one: a cell measured again replaces the older
    one (by start time), which is listed under `replaced`."""
    cells: dict[str, dict] = {}
    starts: dict[str, dict] = {}
    envs: dict[str, dict] = {}
    replaced = []
    for doc in docs:
        replaced += doc.get("replaced", [])
        for s in doc.get("starts", []):
            starts[s["id"]] = s
        for e in doc.get("environments", []):
            envs[json.dumps(e, sort_keys=True)] = e
        for c in doc.get("cells", []):
            old = cells.get(c["id"])
            if old is not None and old["t_start_epoch"] != c["t_start_epoch"]:
                newer, older = (c, old) if c["t_start_epoch"] > old["t_start_epoch"] else (old, c)
                replaced.append({"id": older["id"], "t_start_epoch": older["t_start_epoch"],
                                 "output_tok_s": older["output_tok_s"]})
                c = newer
            cells[c["id"]] = c
    unique = {(r["id"], r["t_start_epoch"]): r for r in replaced}
    return {"cells": sorted(cells.values(), key=lambda c: c["t_start_epoch"]),
            "starts": sorted(starts.values(), key=lambda s: s["t_epoch"]),
            "environments": list(envs.values()), "replaced": list(unique.values())}


def by_point(cells: list[dict]) -> dict[float, dict[int, float]]:
    """point -> repeat -> output tokens/s."""
    out: dict[float, dict[int, float]] = defaultdict(dict)
    for c in cells:
        out[c["point"]][c["repeat"]] = c["output_tok_s"]
    return dict(out)


def compare(a: dict[float, dict[int, float]], b: dict[float, dict[int, float]], control: float | None) -> dict:
    """Setup a against setup b over the same points (else MethodError): the ratio at each point, the ratio of
    their saturated throughputs (each one's highest mean over those points), the control point's ratio per repeat
    (paired by repeat: the same request sequence)."""
    points = check_same_points({"a": a, "b": b})
    stats = {p: (mean_ci(a[p].values()), mean_ci(b[p].values())) for p in points}
    per_point = {}
    for p, ((ma, ha), (mb, hb)) in stats.items():
        r, hw = ratio_ci(ma, ha, mb, hb)
        per_point[p] = {"ratio": round(r, 4), "ci": _r(hw, 4), "repeats": min(len(a[p]), len(b[p]))}
    best_a = max(points, key=lambda p: stats[p][0][0])
    best_b = max(points, key=lambda p: stats[p][1][0])
    r, hw = ratio_ci(*stats[best_a][0], *stats[best_b][1])
    out = {"points": points, "per_point": per_point, "saturated_ratio": round(r, 4), "saturated_ci": _r(hw, 4),
           "saturated_point_a": best_a, "saturated_point_b": best_b,
           "repeats": min(pp["repeats"] for pp in per_point.values())}
    if control is not None and control in a:
        common = sorted(set(a[control]) & set(b[control]))
        out["control_point"] = control
        out["control_ratios"] = [round(a[control][k] / b[control][k], 4) for k in common]
    return out


def point_rows(cells: list[dict]) -> list[dict]:
    """One row per point of a sweep: throughput mean and CI over repeats, latencies, SLO, server statistics."""
    rows = []
    for p in sorted({c["point"] for c in cells}):
        cs = [c for c in cells if c["point"] == p]
        m, hw = mean_ci(c["output_tok_s"] for c in cs)
        row = {"point": p, "repeats": len(cs), "output_tok_s": _r(m, 1), "ci": _r(hw, 1),
               "slo_met": passes(cell_attainment(c) for c in cs)}
        for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"):
            row[k] = _r(statistics.fmean(c[k] for c in cs if c.get(k) is not None), 1) \
                if any(c.get(k) is not None for c in cs) else None
        for role in sorted({r for c in cs for r in c.get("server_stats", {})}):
            merged: dict[str, list] = defaultdict(list)
            for c in cs:
                for k, v in c["server_stats"].get(role, {}).items():
                    merged[k].append(v)
            row[role] = {k: _r(statistics.fmean(v), 3) for k, v in merged.items()}
        rows.append(row)
    return rows


def tuned_split(cells: list[dict]) -> tuple[object, str] | tuple[None, None]:
    """A setup's best prefill pool: the highest mean at the tune point, or (no tune cells) the highest saturated
    sweep throughput; with how it was chosen."""
    tune = defaultdict(list)
    for c in cells:
        if c["phase"] == "tune":
            tune[c["split"]].append(c["output_tok_s"])
    if tune:
        return max(tune, key=lambda s: statistics.fmean(tune[s])), "tune point"
    sweeps = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["phase"] == "sweep":
            sweeps[c["split"]][c["point"]].append(c["output_tok_s"])
    if not sweeps:
        return None, None
    best = {s: max(statistics.fmean(v) for v in pts.values()) for s, pts in sweeps.items()}
    return max(best, key=best.get), "saturated sweep"


def setup_goodput(cells: list[dict]) -> dict:
    """Per split: each tried rate's verdict (pooled over repeats), the goodput, and whether a failing rate
    brackets it."""
    out = {}
    for split in {c["split"] for c in cells}:
        rates = defaultdict(list)
        for c in cells:
            if c["split"] == split:
                rates[c["point"]].append(cell_attainment(c))
        verdicts = {r: passes(v) for r, v in rates.items()}
        out[split] = {"verdicts": {f"{r:g}": v for r, v in sorted(verdicts.items())},
                      "goodput_req_s": goodput(verdicts), "bracketed": not all(verdicts.values())}
    return out


def concurrency_at_slo(cells: list[dict]) -> float | None:
    """The highest concurrency at which this point and every lower one met the SLO (pooled over repeats)."""
    best = None
    for p in sorted({c["point"] for c in cells}):
        if not passes(cell_attainment(c) for c in cells if c["point"] == p):
            break
        best = p
    return best


def _select(cells: list[dict], setup: str, phase: str, split=...) -> list[dict]:
    return [c for c in cells if c["setup"] == setup and c["phase"] == phase and (split is ... or c["split"] == split)]


def _pool_limit(starts: list[dict], setup: str, split, per_request: float) -> float | None:
    pools = [s["decode_pool_tokens"] for s in starts if s["setup"] == setup and s["split"] == split
             and s.get("decode_pool_tokens")]
    return pools[-1] / per_request if pools else None


def _judge_pair(cells: list[dict], starts: list[dict], ss, us, control, tol: float) -> dict:
    """The shared sweep at split ss against the unshared one at us, with the rules that can void it."""
    a = by_point(_select(cells, "shared", "sweep", ss))
    b = by_point(_select(cells, "unshared", "sweep", us))
    if not a or not b:
        return {"missing": f"sweep of {'shared' if not a else 'unshared'} at split {ss if not a else us}"}
    try:
        cmp = compare(a, b, control)
    except MethodError as e:
        return {"void": [str(e)]}
    void = []
    ok, why = control_verdict(cmp.get("control_ratios", []), tol)
    if not ok:
        void.append(why)
    first = cells[0]
    limit = _pool_limit(starts, "unshared", us, sum(mean_lengths(first["input_len"], first["output_len"],
                                                                 first["range_ratio"])))
    ok, why = saturation_verdict(cmp["points"], limit)
    if not ok:
        void.append(why)
    both = _select(cells, "shared", "sweep", ss) + _select(cells, "unshared", "sweep", us)
    clash = overlapping_cells(both)
    if clash:
        void.append(f"setups measured at the same time on one host: {clash[:3]}")
    return {**cmp, "splits": {"shared": ss, "unshared": us}, "unshared_pool_limit_requests": _r(limit, 1),
            "void": void}


def _goodput_at(setup_summary: dict):
    g = setup_summary.get("goodput", {})
    pick = str(setup_summary.get("tuned_split"))
    if pick in g:
        return g[pick]["goodput_req_s"], pick
    found = [(v["goodput_req_s"], s) for s, v in g.items() if v["goodput_req_s"] is not None]
    return max(found) if found else (None, None)


def _setup_summary(cells: list[dict], starts: list[dict], setup: str) -> dict:
    cs = [c for c in cells if c["setup"] == setup]
    split, how = tuned_split(cs)
    splits = sorted({c["split"] for c in cs}, key=str)
    return {"tuned_split": split, "tuned_by": how,
            "sweeps": {str(s): point_rows(_select(cs, setup, "sweep", s)) for s in splits
                       if _select(cs, setup, "sweep", s)},
            "tune": {str(s): point_rows(_select(cs, setup, "tune", s)) for s in splits
                     if _select(cs, setup, "tune", s)},
            "goodput": {str(k): v for k, v in setup_goodput(_select(cs, setup, "goodput")).items()},
            "concurrency_at_slo": {str(s): concurrency_at_slo(_select(cs, setup, "sweep", s)) for s in splits
                                   if _select(cs, setup, "sweep", s)},
            "decode_pool_tokens": {str(s["split"]): s.get("decode_pool_tokens") for s in starts
                                   if s["setup"] == setup},
            "start_errors": [s["error"] for s in starts if s["setup"] == setup and s.get("error")]}


def _unshared_outcome(summary: dict | None) -> str | None:
    if summary is None:
        return None
    if summary["start_errors"] and not summary["sweeps"]:
        error = summary["start_errors"][-1]
        head = error.splitlines()[0] if error else ""
        return f"could not start: {head}" + (f" ... {error[-500:]}" if len(error) > len(head) else "")
    split = str(summary["tuned_split"])
    rows = summary["sweeps"].get(split)
    if not rows:
        return None
    best = max(rows, key=lambda r: r["output_tok_s"])
    return (f"served at split {split}: highest concurrency within the SLO "
            f"{summary['concurrency_at_slo'].get(split)}, saturated {best['output_tok_s']} tok/s at {best['point']:g}")


def group_summary(cells: list[dict], starts: list[dict], need_repeats: int = 3, tol: float = 0.03) -> dict:
    """Everything one (model, free memory, workload) shows: per setup its sweeps, tuning and goodput; shared
    against unshared at their tuned splits and at every split both swept (labelled fixed); the colocated
    baseline; feasibility; what voids the comparison and what departs from the method."""
    setups = {s: _setup_summary(cells, starts, s) for s in SETUPS
              if any(c["setup"] == s for c in cells) or any(x["setup"] == s for x in starts)}
    control = next((c["control_point"] for c in cells if c.get("control_point") is not None), None)
    comparisons = {}
    sh, un = setups.get("shared"), setups.get("unshared")
    if sh and un and sh["tuned_split"] is not None and un["tuned_split"] is not None:
        comparisons["tuned"] = _judge_pair(cells, starts, sh["tuned_split"], un["tuned_split"], control, tol)
        comparisons["tuned"]["same_split"] = sh["tuned_split"] == un["tuned_split"]
        for split in sorted(set(sh["sweeps"]) & set(un["sweeps"])):
            raw = next(c["split"] for c in cells if str(c["split"]) == split)
            if raw != sh["tuned_split"] or raw != un["tuned_split"]:  # else it is the tuned pair itself
                comparisons[f"fixed split {split}"] = _judge_pair(cells, starts, raw, raw, control, tol)
    tuned = comparisons.get("tuned", {})
    g_sh, g_un = _goodput_at(sh or {}), _goodput_at(un or {})
    clean = "saturated_ratio" in tuned and not tuned["void"]
    at_slo = (sh or {}).get("concurrency_at_slo", {})
    headline = {"throughput_ratio": tuned["saturated_ratio"] if clean else None,
                "goodput_ratio": round(g_sh[0] / g_un[0], 4) if g_sh[0] and g_un[0] else None,
                "goodput_splits": {"shared": g_sh[1], "unshared": g_un[1]},
                "shared_concurrency_at_slo": at_slo.get(str(sh["tuned_split"])) if sh else None,
                "unshared_outcome": _unshared_outcome(un)}
    deviations = sorted({d for c in cells for d in method_deviations(c)})
    counts = Counter((c["setup"], str(c["split"]), c["point"]) for c in cells if c["phase"] == "sweep")
    short = [f"{s} split {sp} point {p:g}" for (s, sp, p), n in sorted(counts.items()) if n < need_repeats]
    if short:
        deviations.append(f"fewer than {need_repeats} repeats: {', '.join(short)}")
    colocated = setups.get("colocated")
    if colocated and colocated["sweeps"]:
        rows = colocated["sweeps"][str(colocated["tuned_split"])]
        headline["colocated_saturated_tok_s"] = max(r["output_tok_s"] for r in rows)
        headline["colocated_goodput_req_s"] = _goodput_at(colocated)[0]
    return {"setups": setups, "comparisons": comparisons, "headline": headline, "deviations": deviations}


# the top-level keys: (model tag, GiB free, workload, what of that group's headline)
HEADLINE = {"throughput_ratio_14b_2k2k": ("14b", 77, "2k2k", "throughput_ratio"),
            "goodput_ratio_14b_2k2k": ("14b", 77, "2k2k", "goodput_ratio"),
            "throughput_ratio_8b_44g_2k2k": ("8b", 44, "2k2k", "throughput_ratio"),
            "feasibility_24b_shared_concurrency_at_slo": ("24b", 77, "2k2k", "shared_concurrency_at_slo"),
            "feasibility_24b_unshared": ("24b", 77, "2k2k", "unshared_outcome")}


def card_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the results file's prefix."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", gpu_name or "")
    return m.group(1).lower() if m else "gpu"


def build_results(doc: dict, need_repeats: int = 3, tol: float = 0.03) -> dict:
    """The results file: the issue's top-level keys (null where not measured, or void: `void` says why), every
    group's summary, and the merged cells and starts they come from."""
    doc = merge_docs([doc])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in doc["cells"]:
        groups[(c["model"], round(c["free_gib"]), c["workload"])].append(c)
    for s in doc["starts"]:  # a setup that could not start has no cells, but its group exists
        for w in s.get("workloads", []):
            groups.setdefault((s["model"], round(s["free_gib"]), w), [])
    summaries = {}
    for (model, free, workload), cs in sorted(groups.items()):
        st = [s for s in doc["starts"] if (s["model"], round(s["free_gib"])) == (model, free)]
        summaries[group_name(model, free, workload)] = group_summary(cs, st, need_repeats, tol) if cs else \
            {"setups": {}, "comparisons": {}, "deviations": [],
             "headline": {"unshared_outcome": _unshared_outcome(_setup_summary([], st, "unshared"))}}
    out: dict = {"schema": "serving-v2"}
    void, labels, ratios, repeats = {}, [], [], []
    for key, (model, free, workload, what) in HEADLINE.items():
        g = summaries.get(group_name(model, free, workload), {})
        out[key] = g.get("headline", {}).get(what)
    for g, summary in summaries.items():
        for label, cmp in summary["comparisons"].items():
            if cmp.get("void"):
                void[f"{g} {label}"] = cmp["void"]
            for k, r in enumerate(cmp.get("control_ratios", [])):
                ratios.append(r)
                labels.append(f"{g} {label} repeat {k}")
            if label == "tuned" and "repeats" in cmp:
                repeats.append(cmp["repeats"])
    gpus = sorted({e.get("gpu_name") for e in doc["environments"] if e.get("gpu_name")})
    commits = sorted({c.get("commit") for c in doc["cells"] if c.get("commit")})
    out.update({"control_ratios": ratios, "control_ratio_labels": labels, "repeats": min(repeats) if repeats else 0,
                "card": ", ".join(gpus) or None, "commit": ", ".join(commits) or None, "void": void,
                "groups": summaries, "request_fields": list(REQUEST_FIELDS), **doc})
    return out


def render_markdown(results: dict) -> str:
    """The tables of a results file: per group and setup, each split's sweep; the comparisons; the headline."""
    lines = ["# Serving v2: tables (generated by `bench/sglang_serving.py report`)", ""]
    lines += [f"- `{k}`: {results.get(k)}" for k in (*HEADLINE, "repeats", "card", "commit")]
    lines += [f"- void: {g}: {'; '.join(v)}" for g, v in results.get("void", {}).items()]
    lines += ["", "Machines:", ""] + [f"- {_environment(e)}" for e in results.get("environments", [])]
    lines += ["", "Server starts (where the GPU memory goes):", ""] + [_start_line(s) for s in results.get("starts", [])]
    for g, summary in results.get("groups", {}).items():
        lines += ["", f"## {g}", "", f"headline: `{json.dumps(summary['headline'])}`", ""]
        lines += [f"- deviation: {d}" for d in summary["deviations"]]
        for setup, s in summary["setups"].items():
            lines += ["", f"### {setup} (tuned split {s['tuned_split']}, by {s['tuned_by']})", ""]
            for phase in ("tune", "sweeps"):
                for split, rows in s[phase].items():
                    lines += [f"{'tuning' if phase == 'tune' else 'sweep'} at split {split}, decode pool "
                              f"{s['decode_pool_tokens'].get(split)} tokens:", "", *_TABLE_HEAD]
                    lines += [_row(r) for r in rows] + [""]
            for split, g_ in s["goodput"].items():
                lines.append(f"goodput at split {split}: {g_['goodput_req_s']} req/s "
                             f"({'bracketed' if g_['bracketed'] else 'not bracketed'}); rates {g_['verdicts']}")
        for label, cmp in summary["comparisons"].items():
            lines += ["", f"**shared / unshared, {label}**: saturated {cmp.get('saturated_ratio')} "
                      f"± {cmp.get('saturated_ci')}; control {cmp.get('control_ratios')}; "
                      f"void: {cmp.get('void') or 'no'}; per point: "
                      + ", ".join(f"{p}: {v['ratio']}" for p, v in cmp.get("per_point", {}).items())]
    return "\n".join(lines) + "\n"


def _environment(e: dict) -> str:
    ballast = e.get("ballast") or {}
    keys = ("driver", "torch", "cuda", "sglang", "transformers", "mooncake-transfer-engine-cuda13", "sglang-router")
    return (f"{e.get('gpu_name')} ({e.get('date')}, commit {str(e.get('commit'))[:7]}): "
            + ", ".join(f"{k} {e[k]}" for k in keys if e.get(k))
            + (f"; ballast leaves {ballast['free_gib']} GiB of {ballast['card_gib']}" if ballast else ""))


def _start_line(s: dict) -> str:
    """One server start: each server's NVML memory, its weights and KV pool; or why it could not start."""
    head = f"- {s['model']} / {s['free_gib']:g} GiB free, {s['setup']} at split {s['split']}"
    if s.get("error"):
        return f"{head}: could not start: {s['error'].splitlines()[0][:300] if s['error'] else ''}"
    servers = [f"{name.rsplit('-', 1)[-1]} {v.get('gpu_memory_mib')} MiB (weights "
               f"{(v.get('weight_bytes_allocated') or 0) / 2**30:.2f} GiB, KV pool {v.get('kv_pool_tokens')} tokens"
               + (f", attached in {v['attach_seconds']:.2f} s" if v.get("attach_seconds") else "") + ")"
               for name, v in s.get("servers", {}).items()]
    return f"{head}: " + "; ".join(servers)


_TABLE_HEAD = ("| point | n | out tok/s | ±95 % | TTFT p99 ms | ITL p99 ms | SLO | decode batch mean/p50 "
               "| in transfer | prefill in flight | pool use (decode/prefill) |",
               "|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    st = {}
    for role in ("decode", "prefill", "server"):
        st.update(r.get(role, {}))
    cols = [f"{r['point']:g}", r["repeats"], r["output_tok_s"], r["ci"], r["ttft_ms_p99"], r["itl_ms_p99"],
            "met" if r["slo_met"] else "missed", f"{st.get('decode_running_mean')}/{st.get('decode_running_p50')}",
            st.get("decode_in_transfer_mean"), st.get("prefill_inflight_mean"),
            f"{st.get('decode_pool_use_mean')}/{st.get('prefill_pool_use_mean')}"]
    return "| " + " | ".join(str(c) for c in cols) + " |"


# ---------------------------------------------------------------- the load generator (asyncio, no dependencies)

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_TOKENS_KEY = b'"completion_tokens":'


async def _chunked(reader: asyncio.StreamReader):
    """The body of an HTTP/1.1 response in chunked transfer encoding, chunk by chunk."""
    while True:
        line = await reader.readline()
        if not line:
            return
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def _until_eof(reader: asyncio.StreamReader):
    while data := await reader.read(1 << 16):
        yield data


async def http_events(host: str, port: int, path: str, body: bytes, on_event) -> None:
    """POST `body` (JSON) to http://host:port/path and hand each server-sent event's payload to on_event; an
    HTTP error raises RuntimeError with the server's answer. One connection per request, closed on return or
    cancellation (a cancelled request is dropped by the server)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (path.encode(), host.encode(), port, len(body)) + body)
        await writer.drain()
        status = (await reader.readline()).split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        body_iter = _chunked(reader) if "chunked" in headers.get("transfer-encoding", "") else _until_eof(reader)
        code = int(status[1]) if len(status) > 1 else 0
        if code != 200:
            text = b"".join([d async for d in body_iter])
            raise RuntimeError(f"HTTP {code}: {text[:400].decode(errors='replace')}")
        buf = b""
        async for data in body_iter:
            buf += data
            while m := _EVENT_END.search(buf):
                on_event(buf[:m.start()])
                buf = buf[m.end():]
        if buf.strip():
            on_event(buf)
    finally:
        writer.close()


def completion_tokens(event: bytes) -> int | None:
    """The cumulative completion_tokens an SGLang /generate stream event carries (None: none)."""
    i = event.rfind(_TOKENS_KEY)
    if i < 0:
        return None
    m = re.match(rb"\s*(\d+)", event[i + len(_TOKENS_KEY):])
    return int(m.group(1)) if m else None


async def send_request(host: str, port: int, spec: Spec, t0: float, sink: list[Request]) -> Request:
    """One streamed /generate request (greedy, ignore_eos: exactly spec.output_len tokens), recorded in sink."""
    req = Request(spec.index, len(spec.input_ids), spec.output_len, time.perf_counter() - t0)
    sink.append(req)
    body = json.dumps({"input_ids": spec.input_ids, "stream": True, "sampling_params": {
        "max_new_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": True}}).encode()

    def on_event(event: bytes) -> None:
        event = event.strip()
        if event.startswith(b"data:"):
            event = event[5:].strip()
        if not event or event == b"[DONE]":
            return
        n = completion_tokens(event)
        if n is None:
            if b'"error"' in event:
                req.error = event[:300].decode(errors="replace")
            return
        if not req.chunks or n > req.chunks[-1][1]:
            req.chunks.append((time.perf_counter() - t0, n))

    try:
        await http_events(host, port, "/generate", body, on_event)
        req.end = time.perf_counter() - t0
        got = req.chunks[-1][1] if req.chunks else 0
        if got < spec.output_len and not req.error:
            req.error = f"the stream ended after {got} of {spec.output_len} tokens"
    except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as e:
        req.error = f"{type(e).__name__}: {e}"[:300]
    return req


async def closed_loop(host: str, port: int, specs: Iterator[Spec], concurrency: int, duration: float,
                      t0: float) -> list[Request]:
    """`concurrency` clients, each sending its next request when the last one ends, until `duration` s after
    t0; requests still running then are cut (cancelled: no end, no error)."""
    sink: list[Request] = []

    async def client() -> None:
        while time.perf_counter() - t0 < duration:
            req = await send_request(host, port, next(specs), t0, sink)
            if req.error:
                await asyncio.sleep(0.5)  # a server refusing everything must not spin the loop

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.wait(tasks, timeout=max(0.0, duration - (time.perf_counter() - t0)))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return sink


def early_misses(sink: list[Request], now: float, lo: float, ttft_slo: float) -> int:
    """Requests sent from lo on that already missed the TTFT SLO (or failed)."""
    n = 0
    for r in sink:
        if r.sent < lo:
            continue
        first = r.chunks[0][0] - r.sent if r.chunks else None
        if r.error or (first is not None and first > ttft_slo) or (first is None and now - r.sent > ttft_slo):
            n += 1
    return n


async def open_loop(host: str, port: int, specs: Iterator[Spec], rate: float, duration: float, t0: float, *,
                    seed: int, drain_s: float, lo: float, ttft_slo: float,
                    allowed_misses: float) -> tuple[list[Request], bool]:
    """Poisson arrivals at `rate` per second for `duration` s, then up to drain_s for the last ones to finish.
    Stops early (True) once more than allowed_misses requests of the window already missed the TTFT SLO: the
    rate fails whatever follows."""
    rng = random.Random(f"arrivals:{seed}")
    sink: list[Request] = []
    tasks: list[asyncio.Task] = []
    at = rng.expovariate(rate)
    stopped = False
    while at < duration:
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_request(host, port, next(specs), t0, sink)))
        if early_misses(sink, time.perf_counter() - t0, lo, ttft_slo) > allowed_misses:
            stopped = True
            break
        at += rng.expovariate(rate)
    if tasks and not stopped:
        await asyncio.wait(tasks, timeout=drain_s)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return sink, stopped


# ---------------------------------------------------------------- servers (launch.py), ballast, probes

def launch_overrides(role: str, args, cache_dir: Path, port: int, *overrides: str) -> list[str]:
    """launch.py's overrides for one server of the benchmark (the run directory aside)."""
    cmd = [f"role={role}", "engine=sglang", f"model.path={args.model}", f"cache.dir={cache_dir}",
           f"cache.key=bench-{args.tag}", "cache.wait_timeout_s=900",
           f"engine.disaggregation.bootstrap_port={args.bootstrap_port}", *args.server_flags.split(), *overrides]
    if role != "router":
        cmd.append(f"engine.port.{role}={port}")
        if args.graph_max_bs and role != "prefill":
            cmd.append(f"+engine.extra_args.cuda_graph_max_bs_decode={args.graph_max_bs}")
    return cmd


class Server:
    """One `launch.py engine=sglang role=<role>` process (an SGLang server, or the PD router)."""

    def __init__(self, role: str, name: str, args, cache_dir: Path, work: Path, *overrides: str,
                 port: int | None = None) -> None:
        self.role, self.name, self.port = role, name, port or free_port()
        self.run_dir, self.log = work / name, work / f"{name}.log"
        (self.run_dir / "report.json").unlink(missing_ok=True)  # an earlier run's would read as ready
        self.cmd = [sys.executable, str(REPO / "launch.py"),
                    *launch_overrides(role, args, cache_dir, self.port, *overrides), f"hydra.run.dir={self.run_dir}"]
        self.t0 = time.monotonic()
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float) -> dict:
        report = self.run_dir / "report.json"
        deadline = time.monotonic() + timeout
        while not report.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not come up:\n" + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        self.ready_s = time.monotonic() - self.t0
        return json.loads(report.read_text())

    def info(self) -> dict:
        data = sglang_request(self.port, "/server_info", timeout=60)
        state = (data.get("internal_states") or [{}])[0]
        return {"kv_pool_tokens": data.get("max_total_num_tokens"),
                "max_running_requests": state.get("effective_max_running_requests_per_dp"),
                "memory_usage_gb": state.get("memory_usage")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nvidia_smi(*query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:  # a CPU smoke run
        return ""


def process_gpu_mib() -> dict[str, int]:
    """pid -> MiB of GPU memory, added up over the GPUs the process uses (nvidia-smi lists one row each)."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    used: dict[str, int] = {}
    for pid, mib in (line.split(", ") for line in out.strip().splitlines() if line):
        used[pid] = used.get(pid, 0) + int(mib)
    return used


def server_gpu_mib(server: Server, used: dict[str, int]) -> int:
    """GPU memory of the processes in this server's process tree."""
    import psutil

    tree = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
    return sum(used.get(str(p), 0) for p in tree)


PROBE_IDS = [1, 400, 1200, 33, 7000, 15, 298, 4096, 61, 2]
PLAIN_TOKENS = REPO / "bench" / "results" / "h200-sglang-gpu-tests.json"  # a plain server's, the 8B checkpoint


def greedy_probe(port: int, timeout: float = 120) -> list[int] | None:
    """The 16 greedy tokens the server (or router) on `port` answers to PROBE_IDS."""
    body = {"input_ids": PROBE_IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    return sglang_request(port, "/generate", body, timeout=timeout).get("output_ids")


def plain_tokens() -> list[int]:
    return json.loads(PLAIN_TOKENS.read_text())["tokens"]


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def wait_quiet(paths: list[Path], quiet_s: float = 3, timeout: float = 180) -> float:
    """Seconds until none of the logs grew for quiet_s (the servers finished or dropped the last load's
    requests), at most timeout."""
    t0 = time.monotonic()
    sizes, still = None, 0.0
    while time.monotonic() - t0 < timeout:
        now = [p.stat().st_size if p.exists() else 0 for p in paths]
        still = still + 0.5 if now == sizes else 0.0
        if still >= quiet_s:
            break
        sizes = now
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)


class Ballast:
    """A process holding GPU memory until the benchmark ends, so that a larger card offers the servers the
    free memory of a smaller one (--free-gib): the memory split, and where KV capacity binds, then match
    the card the targets were set for, while compute stays this card's."""

    CODE = """
import sys, torch
target = float(sys.argv[1]) * 2**30
held = []
while torch.cuda.mem_get_info()[0] - target >= 2**30:
    held.append(torch.empty(2**30, dtype=torch.uint8, device="cuda"))
rest = int(torch.cuda.mem_get_info()[0] - target) // 2**21 * 2**21
if rest > 0:
    held.append(torch.empty(rest, dtype=torch.uint8, device="cuda"))
free, total = torch.cuda.mem_get_info()
print(f"{free / 2**30:.3f} {total / 2**30:.3f} {sum(t.numel() for t in held) / 2**30:.3f}", flush=True)
sys.stdin.read()
"""

    def __init__(self, free_gib: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(free_gib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 3:
            self.close()
            raise RuntimeError(f"the ballast process could not leave {free_gib} GiB free on the GPU")
        self.free_gib, self.total_gib, self.held_gib = (float(x) for x in line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it exits when its stdin ends
            self.proc.wait(60)


def transfer_overrides(args) -> tuple[str, ...]:
    out = (f"engine.disaggregation.transfer_backend={args.transfer_backend}",)
    if args.mooncake_protocol:
        out += (f"engine.disaggregation.mooncake_protocol={args.mooncake_protocol}",)
    return out


def role_overrides(setup: str, role: str, split, args) -> tuple[str, ...]:
    """launch.py overrides of one server of a setup: its cache mode, memory and (prefill) pool size."""
    own = () if setup == "shared" else ("role.mode=off", "role.phases=[]")  # the roles' servers, no cache
    if role == "plain":
        return (*own, f"engine.mem_fraction_static.plain={args.colocated_mem}")
    mem = args.prefill_mem if role == "prefill" else args.decode_mem
    pool = (f"+engine.extra_args.max_total_tokens={split}",) if role == "prefill" and split else ()
    return (*own, *transfer_overrides(args), f"engine.mem_fraction_static.{role}={mem}", *pool)


def start_router(args, servers: list[Server], cache_dir: Path, work: Path, name: str) -> Server:
    """sglang-router's PD router in front of the setup's prefill and decode servers, once it answers."""
    port = free_port()
    router = Server("router", name, args, cache_dir, work, *transfer_overrides(args),
                    f"engine.port.prefill={servers[0].port}", f"engine.port.decode={servers[1].port}",
                    f"engine.router.port={port}", port=port)
    router.wait_ready(args.ready_timeout)  # launch.py reports as soon as the router process runs
    deadline = time.monotonic() + args.ready_timeout
    while not sglang_healthy(port):
        if router.proc.poll() is not None or time.monotonic() > deadline:
            router.stop()
            raise RuntimeError("the PD router did not come up:\n" + router.log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    return router


def start_setup(setup: str, split, args, cache_dir: Path, work: Path, servers: list[Server]) -> list[dict]:
    """The setup's servers, ready, appended to `servers` (the caller stops them). shared: prefill owns the
    weights and the decode attaches, started at once (it sizes its pool once the owner settled); unshared: each
    loads its copy, the decode once the prefill is ready (a plain server sizes from what is free then);
    colocated: one plain server."""
    tag = f"{setup}-{split or 'all'}"
    roles = ("plain",) if setup == "colocated" else ("prefill", "decode")

    def server(role: str) -> Server:
        s = Server(role, f"{tag}-{role}", args, cache_dir, work, *role_overrides(setup, role, split, args))
        servers.append(s)
        return s

    if setup == "shared":
        both = [server(r) for r in roles]
        reports = [s.wait_ready(args.ready_timeout) for s in both]
    else:
        reports = []
        for r in roles:
            reports.append(server(r).wait_ready(args.ready_timeout))
    if setup != "colocated":
        servers.append(start_router(args, servers[-2:], cache_dir, work, f"{tag}-router"))
    return reports


# ---------------------------------------------------------------- one call: one setup, its splits, its cells

def environment(args) -> dict:
    import torch

    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    name_uuid = nvidia_smi("-i", index, "--query-gpu=name,uuid,driver_version", "--format=csv,noheader").split(", ")
    versions = {}
    for pkg in ("sglang", "transformers", "mooncake-transfer-engine-cuda13", "sglang-router"):
        try:
            import importlib.metadata as m

            versions[pkg] = m.version(pkg)
        except Exception:  # noqa: BLE001 - a package this environment lacks
            versions[pkg] = None
    return {"gpu_name": name_uuid[0] or None, "gpu_uuid": name_uuid[1] if len(name_uuid) > 1 else None,
            "driver": name_uuid[2] if len(name_uuid) > 2 else None, "host": socket.gethostname(),
            "torch": torch.__version__, "cuda": torch.version.cuda, **versions, "date": time.strftime("%Y-%m-%d"),
            "commit": args.commit, "ballast": args.ballast_info}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass
class Call:
    """This call's state: the cells known before it (skipped), the ones it measured, its load seconds."""
    args: argparse.Namespace
    known: dict
    part: dict = field(default_factory=lambda: {"environments": [], "starts": [], "cells": []})
    load_used: float = 0.0
    start_s: float = 0.0  # the longest server start of this call so far: what the next one is expected to take
    t_start: float = field(default_factory=time.monotonic)

    def cells(self) -> list[dict]:
        return self.known["cells"] + self.part["cells"]

    def done(self, cid: str) -> bool:
        return any(c["id"] == cid for c in self.cells())

    def no_room(self, seconds: float) -> str | None:
        """Why a load of `seconds` may not start now (budget counts load only; wall counts everything)."""
        if self.load_used + seconds > self.args.budget_s:
            return f"load budget: {self.load_used:.0f} s used of {self.args.budget_s:.0f} s"
        if time.monotonic() - self.t_start + seconds + 30 > self.args.wall_s:
            return f"wall limit: {time.monotonic() - self.t_start:.0f} s of {self.args.wall_s:.0f} s gone"
        return None

    def save(self) -> Path:
        a = self.args
        out = Path(a.out)
        (out / a.part_name).write_text(json.dumps(self.part, indent=1))
        results = build_results(merge_docs([self.known, self.part]), a.repeats)
        card = card_slug(next((e["gpu_name"] for e in self.part["environments"] if e.get("gpu_name")), ""))
        path = out / f"{card}-serving-v2.json"
        path.write_text(json.dumps(results, indent=1))
        path.with_suffix(".md").write_text(render_markdown(results))
        return path


def cell_base(args, split, phase: str, load: str, point: float, repeat: int) -> dict:
    c = {"model": args.tag, "free_gib": args.free_gib, "workload": args.workload_name, "input_len": args.inp,
         "output_len": args.outp, "range_ratio": args.range_ratio, "setup": args.setup, "split": split,
         "phase": phase, "load": load, "point": point, "repeat": repeat, "seed": args.seed * 1000 + repeat,
         "control_point": args.control_point, "trim": args.trim,
         "slo": {"ttft_s": args.ttft_slo_s, "itl_s": args.itl_slo_ms / 1000}}
    c["id"] = cell_id(c)
    return c


def _drive(cell: dict, port: int, args, duration: float, lo: float, hi: float, t0: float):
    specs = request_specs(cell["seed"], args.inp, args.outp, args.range_ratio, args.vocab)
    if cell["load"] == "concurrency":
        return asyncio.run(closed_loop("127.0.0.1", port, specs, int(cell["point"]), duration, t0)), False
    allowed = (1 - args.slo_share) * cell["point"] * (hi - lo)
    return asyncio.run(open_loop("127.0.0.1", port, specs, cell["point"], duration, t0, seed=cell["seed"],
                                 drain_s=args.drain_s, lo=lo, ttft_slo=args.ttft_slo_s, allowed_misses=allowed))


def measure(cell: dict, target: Server, watch: list[Server], args) -> dict:
    """Run one cell's load against `target` and fill in what it showed; `watch`: the model servers whose log
    lines give the batch statistics of the steady window."""
    duration = load_seconds(args.window_s, args.trim)
    lo, hi = steady_window(0.0, duration, args.trim)
    offsets = {s.name: s.log.stat().st_size for s in watch}
    t0, epoch = time.perf_counter(), time.time()
    reqs, stopped = _drive(cell, target.port, args, duration, lo, hi, t0)
    ran = time.perf_counter() - t0
    completed = [r for r in reqs if r.end is not None and not r.error]
    errors = [r.error for r in reqs if r.error]
    cell.update({"t_start_epoch": round(epoch, 3), "duration_s": round(ran, 2), "load_s": round(duration, 2),
                 "window_s": [round(lo, 3), round(hi, 3)], "stopped_early": stopped,
                 "output_tok_s": round(window_tokens(reqs, lo, hi) / (hi - lo), 2),
                 "tokens_in_window": window_tokens(reqs, lo, hi), "requests_sent": len(reqs),
                 "requests_completed": len(completed), "requests_failed": len(errors), "first_error": errors[:1],
                 "waves": round(len(completed) / cell["point"], 2) if cell["load"] == "concurrency" else None,
                 **window_latencies(reqs, lo, hi),
                 "server_stats": {("server" if s.role == "plain" else s.role):
                                  batch_stats(batch_lines(read_from(s.log, offsets[s.name])), epoch + lo, epoch + hi)
                                  for s in watch},
                 "requests": [r.summary() for r in sorted(reqs, key=lambda r: r.sent)]})
    cell["attainment"] = list(cell_attainment(cell))
    cell["settle_s"] = wait_quiet([s.log for s in watch], timeout=args.settle_timeout)
    return cell


def planned(call: Call, split) -> Iterator[dict]:
    """The cells of this call's phase at `split` that are not measured yet, in order: repeat by repeat over the
    points (so that a drift in time touches every point alike); goodput: the next rate of the bisection."""
    a = call.args
    if a.phase in ("sweep", "tune"):
        points = sorted(set(a.points) | ({a.control_point} if a.phase == "sweep" and a.control_point else set()))
        points = [a.tune_point] if a.phase == "tune" else points
        repeats = a.tune_repeats if a.phase == "tune" else a.repeats
        for repeat in range(repeats):
            for p in points:
                c = cell_base(a, split, a.phase, "concurrency", p, repeat)
                if not call.done(c["id"]):
                    yield c
        return
    while (rate := next_rate(_rate_verdicts(call, split), _rate_hi(call, split), a.goodput_tol,
                             max_rate=a.rate_max)) is not None:
        for repeat in range(a.goodput_repeats):
            c = cell_base(a, split, "goodput", "rate", rate, repeat)
            if not call.done(c["id"]):
                yield c


def _mine(call: Call, split, phase: str) -> list[dict]:
    a = call.args
    return [c for c in call.cells() if (c["model"], c["free_gib"], c["workload"], c["setup"], c["split"], c["phase"])
            == (a.tag, a.free_gib, a.workload_name, a.setup, split, phase)]


def _rate_verdicts(call: Call, split) -> dict[float, bool]:
    rates = defaultdict(list)
    for c in _mine(call, split, "goodput"):
        rates[c["point"]].append(cell_attainment(c))
    return {r: passes(v, call.args.slo_share) for r, v in rates.items() if len(v) >= call.args.goodput_repeats}


def _rate_hi(call: Call, split) -> float:
    """Where the bisection starts: --rate-hi, or the setup's saturated sweep throughput in requests/s."""
    if call.args.rate_hi:
        return call.args.rate_hi
    sweep = _mine(call, split, "sweep") or _mine(call, split, "tune")
    if not sweep:
        raise SystemExit(f"[bench] goodput of {call.args.setup} at split {split} needs --rate-hi, or this setup's "
                         "sweep (or tune) at that split first: the search starts from its saturated throughput")
    best = max(statistics.fmean(reps.values()) for reps in by_point(sweep).values())
    return round(best / mean_lengths(call.args.inp, call.args.outp, call.args.range_ratio)[1], 3)


def record_start(call: Call, split, servers: list[Server], reports: list[dict], error: str | None) -> dict:
    """What the setup's servers are: memory, KV pools, start-up seconds, weight bytes, greedy probe tokens."""
    a = call.args
    start = {"id": f"{a.tag}|{a.free_gib:g}g|{a.setup}|{split}|{time.time():.0f}", "model": a.tag,
             "free_gib": a.free_gib, "setup": a.setup, "split": split, "workloads": [a.workload_name],
             "t_epoch": round(time.time(), 1), "host": socket.gethostname(), "error": error, "servers": {}}
    models = [s for s in servers if s.role != "router"]
    if error is None:
        used = process_gpu_mib()
        for s, rep in zip(models, reports):
            rank = (rep.get("ranks") or [{}])[0]
            start["servers"][s.name] = {
                "role": s.role, "start_to_ready_s": _r(s.ready_s, 1), "gpu_memory_mib": server_gpu_mib(s, used),
                "weight_bytes_allocated": rank.get("weight_bytes_allocated"),
                "attach_seconds": rank.get("attach_seconds"), **s.info()}
        pools = [v["kv_pool_tokens"] for v in start["servers"].values() if v["role"] in ("decode", "plain")]
        start["decode_pool_tokens"] = pools[0] if pools else None
        start["prefill_pool_tokens"] = next((v["kv_pool_tokens"] for v in start["servers"].values()
                                             if v["role"] == "prefill"), None)
        start["probe_tokens"] = greedy_probe(servers[-1].port)
        if a.tag == "8b":
            start["probe_equal_plain_server"] = start["probe_tokens"] == plain_tokens()
    call.part["starts"].append(start)
    return start


def _cell_seconds(a) -> float:
    """The longest a cell of this call's phase may take: its load, and an open loop's drain."""
    return load_seconds(a.window_s, a.trim) + (a.drain_s if a.phase == "goodput" else 0)


def run_split(call: Call, split) -> None:
    """Start the setup at this split, run its pending cells while the budget lasts, stop it."""
    a = call.args
    pending = planned(call, split)
    cell = next(pending, None)
    if cell is None:
        print(f"[bench] {a.setup} split {split}: nothing left to measure", flush=True)
        return
    # a start that leaves no room for one cell after it would spend the call's device time on nothing
    expected = call.start_s or a.start_s
    if why := call.no_room(_cell_seconds(a) + expected):
        print(f"[bench] {a.setup} split {split}: not started ({why}, counting a start of {expected:.0f} s before "
              "its first cell)", flush=True)
        return
    work = Path(a.out) / f"work-{a.tag}-{a.setup}"
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/dev/shm"))
    a.bootstrap_port = a.fixed_bootstrap_port or free_port()  # a fresh one per start: no port left lingering
    # a server that neither comes up nor fails must not outlast the call: then its log says what it did
    a.ready_timeout = max(60.0, min(a.ready_timeout_cap, a.wall_s - (time.monotonic() - call.t_start) - 60))
    servers: list[Server] = []
    try:
        try:
            t0 = time.monotonic()
            reports = start_setup(a.setup, split, a, cache_dir, work, servers)
            call.start_s = max(call.start_s, time.monotonic() - t0)
            start = record_start(call, split, servers, reports, None)
        except (RuntimeError, OSError, ValueError) as e:  # what the setup did instead is the result
            record_start(call, split, servers, [], f"{type(e).__name__}: {e}"[-4000:])
            call.save()
            return
        call.save()
        watch = [s for s in servers if s.role != "router"]
        while cell is not None:
            if why := call.no_room(_cell_seconds(a)):
                print(f"[bench] stopping before {cell['id']}: {why}", flush=True)
                break
            cell.update({"start_id": start["id"], "host": start["host"], "commit": a.commit,
                         "gpu_uuid": call.part["environments"][-1].get("gpu_uuid")})
            measure(cell, servers[-1], watch, a)
            call.load_used += cell["duration_s"]
            call.part["cells"].append(cell)
            call.save()
            print(f"[bench] {cell['id']}: {cell['output_tok_s']} tok/s, TTFT p99 {cell['ttft_ms_p99']} ms, "
                  f"ITL p99 {cell['itl_ms_p99']} ms, SLO {cell['attainment']}", flush=True)
            if dead := [s.name for s in servers if s.proc.poll() is not None]:
                start["error"] = f"died during the load: {dead}"
                break
            cell = next(pending, None)
    finally:
        for s in reversed(servers):
            s.stop()
        subprocess.run(["rm", "-rf", str(cache_dir)])
        call.save()


def _load_known(paths: list[str]) -> dict:
    docs = []
    for p in paths:
        path = Path(p)
        if path.exists():
            docs.append(json.loads(path.read_text()))
            print(f"[bench] known cells from {path}: {len(docs[-1].get('cells', []))}", flush=True)
    return merge_docs(docs)


def cmd_run(a) -> None:
    a.inp, a.outp = a.lengths
    a.commit = a.commit or os.environ.get("SC_COMMIT") or _commit()
    a.itl_slo_ms = a.itl_slo_ms or (60.0 if a.tag.startswith("8b") else 100.0)
    a.tune_point = a.tune_point or max(a.points)
    a.fixed_bootstrap_port, a.ready_timeout_cap = a.bootstrap_port, a.ready_timeout
    config = json.loads((Path(a.model) / "config.json").read_text())
    a.vocab = config["vocab_size"]
    context = config.get("max_position_embeddings")
    if context and a.inp + a.outp > context:
        raise SystemExit(f"[bench] workload {a.workload_name} asks {a.inp} + {a.outp} tokens of a model whose context "
                         f"is {context}: the server would reject every request.")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.part_name = f"serving-v2-part-{a.tag}-{a.setup}-{a.phase}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    call = Call(a, _load_known(a.results))
    ballast = Ballast(a.free_gib) if a.free_gib else None
    a.ballast_info = ballast and {"free_gib": ballast.free_gib, "card_gib": ballast.total_gib,
                                  "held_gib": ballast.held_gib}
    try:
        call.part["environments"].append(environment(a))
        for split in (a.splits if a.setup != "colocated" else [None]):
            run_split(call, split)
    finally:
        if ballast:
            ballast.close()
    path = call.save()
    print(f"[bench] {len(call.part['cells'])} cells measured, {call.load_used:.0f} s of load; results: {path}")


def cmd_merge(a) -> None:
    """Merge results files and parts into one, the summary computed again."""
    docs = [json.loads(Path(p).read_text()) for p in ([a.into] if Path(a.into).exists() else []) + a.parts]
    results = build_results(merge_docs(docs), a.need_repeats)
    Path(a.into).write_text(json.dumps(results, indent=1))
    Path(a.into).with_suffix(".md").write_text(render_markdown(results))
    _print_headline(results)


def cmd_report(a) -> None:
    results = build_results(json.loads(Path(a.results).read_text()), a.need_repeats)
    text = render_markdown(results)
    if a.md:
        Path(a.md).write_text(text)
    print(text)


def _print_headline(results: dict) -> None:
    keys = (*HEADLINE, "control_ratios", "repeats", "card", "commit", "void")
    print(json.dumps({k: results.get(k) for k in keys}, indent=1))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _workload(text: str) -> tuple[str, tuple[int, int]]:
    name, _, lens = text.partition("=")
    inp, _, outp = lens.partition(":")
    if not (name and inp.isdigit() and outp.isdigit()):
        raise argparse.ArgumentTypeError(f"a workload is NAME=INPUT:OUTPUT (e.g. 2k2k=2048:2048), not {text!r}")
    return name, (int(inp), int(outp))


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="measure one setup's cells (one device call)")
    r.add_argument("--model", required=True, help="checkpoint folder (bench/make_model.py)")
    r.add_argument("--tag", required=True, help="the model's name in the results: 8b, 14b, 24b")
    r.add_argument("--setup", choices=SETUPS, required=True)
    r.add_argument("--phase", choices=PHASES, default="sweep")
    r.add_argument("--out", required=True, help="this call's part, the merged results and the server logs")
    r.add_argument("--results", nargs="*", default=[], help="results files or parts whose cells are done (skipped)")
    r.add_argument("--workload", type=_workload, default=("2k2k", (2048, 2048)), help="NAME=INPUT:OUTPUT")
    r.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in [ratio x L, L] (1: fixed)")
    r.add_argument("--splits", type=_ints, default=[65536], help="prefill KV pools to run, tokens (max_total_tokens)")
    r.add_argument("--points", type=_ints, default=[8, 16, 32, 48, 64], help="closed-loop concurrencies")
    r.add_argument("--control-point", type=int, default=8, help="below capacity in every setup; 0: none")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--tune-point", type=int, default=0, help="the tune phase's concurrency (default: largest point)")
    r.add_argument("--tune-repeats", type=int, default=1)
    r.add_argument("--window-s", type=float, default=120, help="steady window per load (the load is longer by trims)")
    r.add_argument("--trim", type=float, default=0.15, help="share of the load excluded at each end")
    r.add_argument("--ttft-slo-s", type=float, default=3.0)
    r.add_argument("--itl-slo-ms", type=float, default=0, help="default 60 for 8b*, 100 for larger models")
    r.add_argument("--slo-share", type=float, default=0.99, help="share of requests that must meet the SLO")
    r.add_argument("--rate-hi", type=float, default=0, help="goodput: first rate tried (default: saturated sweep)")
    r.add_argument("--rate-max", type=float, default=None)
    r.add_argument("--goodput-repeats", type=int, default=1)
    r.add_argument("--goodput-tol", type=float, default=0.1, help="stop once the bracket is within this share")
    r.add_argument("--drain-s", type=float, default=120, help="open loop: wait this long for the last requests")
    r.add_argument("--settle-timeout", type=float, default=180, help="after a load, wait for quiet server logs")
    r.add_argument("--free-gib", type=float, default=0.0, help="hold GPU memory so that the servers find this much "
                   "free (a larger card standing in for a smaller one; 0: the whole card)")
    r.add_argument("--prefill-mem", type=float, default=0.90, help="prefill mem_fraction_static (its pool is capped "
                   "by the split)")
    r.add_argument("--decode-mem", type=float, default=0.88, help="decode: of what is free once the prefill settled")
    r.add_argument("--colocated-mem", type=float, default=0.88)
    r.add_argument("--transfer-backend", default="mooncake")
    r.add_argument("--mooncake-protocol", default="nvlink_intra", help="'' for Mooncake's default (RDMA)")
    r.add_argument("--graph-max-bs", type=int, default=128, help="largest decode batch captured (0: SGLang's)")
    r.add_argument("--server-flags", default=SERVER_FLAGS, help="launch.py overrides for every server")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--budget-s", type=float, default=3600, help="load seconds this call may spend (not start-up)")
    r.add_argument("--wall-s", type=float, default=1e9, help="start no cell that would end after this many seconds")
    r.add_argument("--start-s", type=float, default=120,
                   help="seconds a setup's start is expected to take until one in this call was timed: no start "
                        "without room for it and one cell")
    r.add_argument("--ready-timeout", type=float, default=900)
    r.add_argument("--bootstrap-port", type=int, default=0)
    r.add_argument("--commit", default=None)
    r.set_defaults(func=cmd_run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    m = sub.add_parser("merge", help="merge parts into a results file (its summary computed again)")
    m.add_argument("--into", required=True)
    m.add_argument("parts", nargs="+")
    m.add_argument("--need-repeats", type=int, default=3)
    m.set_defaults(func=cmd_merge)
    p = sub.add_parser("report", help="print (or write) the tables of a results file")
    p.add_argument("results")
    p.add_argument("--md", default=None)
    p.add_argument("--need-repeats", type=int, default=3)
    p.set_defaults(func=cmd_report)
    a = ap.parse_args()
    if a.command == "run":
        a.workload_name, a.lengths = a.workload
    a.func(a)


if __name__ == "__main__":
    main()
