"""The serving benchmark's method (bench/sglang_serving.py): the statistics, the requests and their steady
window, SLO attainment and the goodput search, SGLang's batch log lines, and the rules that void or refuse a
comparison. Pure functions, each with a test in tests/test_bench_method.py."""
from __future__ import annotations

import math
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

SETUPS = ("shared", "unshared", "colocated")
LOW_ID = 16  # prompt token ids from here up: clear of the tokenizer's special ids


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


def rounded(x: float | None, nd: int = 3) -> float | None:
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
        return [rounded(self.sent), self.input_len, self.output_len, tokens, rounded(first, 4),
                rounded(percentile(itls, 99), 5), rounded(self.end), self.error and self.error[:200]]


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

def common_points(points: dict[str, Iterable[int | float]]) -> tuple[list, dict[str, list]]:
    """The points every setup ran, and each setup's points that another lacks. A comparison takes the common
    points only, for every setup alike (a best-of across unequal sweeps is not one); the others are listed, and
    no common point at all is refused."""
    sets = {name: set(p) for name, p in points.items()}
    common = sorted(set.intersection(*sets.values())) if sets else []
    one_sided = {n: sorted(p - set(common)) for n, p in sets.items() if p - set(common)}
    if not common:
        detail = "; ".join(f"{n}: {sorted(p)}" for n, p in sets.items())
        raise MethodError(f"[bench] setups have no point in common ({detail}): run the same points for each setup, "
                          "a best-of across unequal sweeps is not a comparison")
    return common, one_sided


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
