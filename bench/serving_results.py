"""The serving benchmark's results (bench/sglang_serving.py): cells merged across calls, per model and
workload each setup's sweeps, tuning and goodput, shared against unshared under the method's rules, the
issue's headline keys, and the markdown tables."""
from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from typing import Iterable

from serving_method import (SETUPS, MethodError, REQUEST_FIELDS, cell_attainment, common_points, control_verdict,
                            goodput, mean_ci, mean_lengths, method_deviations, overlapping_cells, passes, ratio_ci,
                            rounded, saturation_verdict)


# ---------------------------------------------------------------- results: cells, merging, summaries

def cell_id(c: dict) -> str:
    split = c["split"] if c["split"] is not None else "-"
    return (f"{c['model']}|{c['free_gib']:g}g|{c['workload']}|{c['setup']}|{split}|{c['phase']}|"
            f"{c['load'][:4]}{c['point']:g}|r{c['repeat']}")


def group_name(model: str, free_gib: float, workload: str) -> str:
    return f"{model}/{round(free_gib)}g/{workload}" if free_gib else f"{model}/card/{workload}"


LEGACY_MEM = {"prefill": 0.9, "decode": 0.88, "colocated": 0.88}  # what cells that do not record theirs ran with


def fractions_used(setup: str) -> tuple[str, ...]:
    """The memory fractions a setup's servers take: a PD pair the prefill's and the decode's, colocated its own."""
    return ("colocated",) if setup == "colocated" else ("prefill", "decode")


def fraction_values(setup: str, mem: dict | None) -> dict[str, float]:
    """The fractions a record's setup ran with (those it does not record: LEGACY_MEM's)."""
    mem = mem or LEGACY_MEM
    return {k: mem.get(k, LEGACY_MEM[k]) for k in sorted(fractions_used(setup))}


def fractions(setup: str, mem: dict | None) -> str:
    """The same, as one comparable value (part of a record's `setting`)."""
    return json.dumps(fraction_values(setup, mem), sort_keys=True)


def one_spelling(flags: str) -> str:
    """Server flags as records compare them: one spelling per set of flags, whatever the whitespace."""
    return " ".join(flags.split())


def method_settings(flags: str, mem: dict[str, float]) -> dict[tuple[str, ...], tuple[str | None, str]]:
    """The setting a PD pair and a colocated server run with these flags and fractions (by `fractions_used`), to
    match records against."""
    return {fractions_used(s): setting({"server_flags": flags, "setup": s, "mem_fraction": mem})
            for s in ("shared", "colocated")}


def setting(x: dict) -> tuple[str | None, str]:
    """What a cell or start ran with besides its id: the servers' flags and the memory fractions its setup's
    servers take. Another setting is another measurement (kept beside, never mixed)."""
    return x.get("server_flags"), fractions(x["setup"], x.get("mem_fraction"))


def base_setting(c: dict) -> tuple[str | None, str]:
    """The method's setting that a variant's cell was added to: its flags without the variant's overrides, and
    the method's fractions when it ran (`base_mem_fraction`; a variant of the flags ran at them)."""
    flags = (c.get("server_flags") or "").removesuffix(f" {c.get('variant_overrides')}")
    return flags, fractions(c["setup"], c.get("base_mem_fraction") or c.get("mem_fraction"))


def merge_docs(docs: Iterable[dict]) -> dict:
    """Cells, server starts and environments of several runs in one: a cell measured again with the same server
    flags replaces the older one (by start time), which is listed under `replaced`; one measured with other flags
    stays beside it (the older flags' cells are what a variant added to them is compared with)."""
    docs = list(docs)
    cells: dict[tuple, dict] = {}
    starts: dict[str, dict] = {}
    envs: dict[str, dict] = {}
    replaced = []
    adopted = {(x["adopted_from_variant"]["id"], x.get("t_start_epoch", x.get("t_epoch"))) for doc in docs
               for kind in ("cells", "starts") for x in doc.get(kind, []) if x.get("adopted_from_variant")}
    for doc in docs:
        replaced += doc.get("replaced", [])
        for s in doc.get("starts", []):
            if s.get("variant") and (s["id"], s.get("t_epoch")) in adopted:
                continue  # an older copy of a start that is the method's now (adopt_variant)
            starts[s["id"]] = s
        for e in doc.get("environments", []):
            envs[json.dumps(e, sort_keys=True)] = e
        for c in doc.get("cells", []):
            if c.get("variant") and (c["id"], c.get("t_start_epoch")) in adopted:
                continue  # an older copy of a cell that is the method's now
            key = (c["id"], *setting(c))
            old = cells.get(key)
            if old is not None and old["t_start_epoch"] != c["t_start_epoch"]:
                newer, older = (c, old) if c["t_start_epoch"] > old["t_start_epoch"] else (old, c)
                replaced.append({"id": older["id"], "t_start_epoch": older["t_start_epoch"],
                                 "output_tok_s": older["output_tok_s"], "server_flags": older.get("server_flags")})
                c = newer
            cells[key] = c
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


def paired(a: dict[float, dict[int, float]], b: dict[float, dict[int, float]],
           names: tuple[str, str] = ("a", "b")) -> tuple[dict, dict, dict]:
    """Each point's repeats that both setups ran, and per setup the repeats it ran alone at a point both ran.
    Repeat k of either setup serves the same seeded requests, on the same machine where one session can run both:
    one setup's mean over repeats 0 and 1 against the other's over repeat 0 alone would compare other requests and
    other sessions, so a repeat counts once both setups have it."""
    pa, pb, alone = {}, {}, {}
    for p in set(a) & set(b):
        both = sorted(set(a[p]) & set(b[p]))
        if both:
            pa[p], pb[p] = {k: a[p][k] for k in both}, {k: b[p][k] for k in both}
        for name, side in zip(names, (a, b)):
            if extra := sorted(set(side[p]) - set(both)):
                alone.setdefault(name, {})[p] = extra
    return pa, pb, alone


def compare(a: dict[float, dict[int, float]], b: dict[float, dict[int, float]], control: float | None,
            names: tuple[str, str] = ("a", "b")) -> dict:
    """Setup a against setup b over the points both ran (none: MethodError), each over the repeats both ran there
    (`paired`): the ratio at each point, the ratio of their saturated throughputs (each one's highest mean over
    those points), the control point's ratio per repeat (the same request sequence); points only one of them ran,
    and repeats one of them ran alone, are listed under the setups' names, not compared."""
    common, one_sided = common_points(dict(zip(names, (a, b))))
    a, b, alone = paired(a, b, names)
    if not a:
        ran = "; ".join(f"{n} ran {pts}" for n, pts in alone.items())
        raise MethodError("[bench] the setups ran their common points in different repeats only (point: repeats; "
                          f"{ran}): measure the other setup's repeat of each point before comparing")
    points = sorted(a)
    stats = {p: (mean_ci(a[p].values()), mean_ci(b[p].values())) for p in points}
    per_point = {}
    for p, ((ma, ha), (mb, hb)) in stats.items():
        r, hw = ratio_ci(ma, ha, mb, hb)
        per_point[p] = {"ratio": round(r, 4), "ci": rounded(hw, 4), "repeats": min(len(a[p]), len(b[p]))}
    best_a = max(points, key=lambda p: stats[p][0][0])
    best_b = max(points, key=lambda p: stats[p][1][0])
    r, hw = ratio_ci(*stats[best_a][0], *stats[best_b][1])
    out = {"points": points, "per_point": per_point, "saturated_ratio": round(r, 4), "saturated_ci": rounded(hw, 4),
           "saturated_point_a": best_a, "saturated_point_b": best_b,
           "repeats": min(pp["repeats"] for pp in per_point.values()), "one_sided_points": one_sided,
           "unpaired_repeats": alone, "unpaired_points": sorted(set(common) - set(points))}
    if control is not None and control in a:  # else no control ratio: the run is void
        out["control_point"] = control
        out["control_ratios"] = [round(a[control][k] / b[control][k], 4) for k in sorted(a[control])]
    return out


def point_rows(cells: list[dict]) -> list[dict]:
    """One row per point of a sweep: throughput mean and CI over repeats, latencies, SLO, server statistics."""
    rows = []
    for p in sorted({c["point"] for c in cells}):
        cs = [c for c in cells if c["point"] == p]
        m, hw = mean_ci(c["output_tok_s"] for c in cs)
        row = {"point": p, "repeats": len(cs), "output_tok_s": rounded(m, 1), "ci": rounded(hw, 1),
               "slo_met": passes(cell_attainment(c) for c in cs)}
        free = [c["gpu_free_mib_min"] for c in cs if c.get("gpu_free_mib_min") is not None]
        row["gpu_free_mib_min"] = min(free) if free else None
        for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"):
            row[k] = rounded(statistics.fmean(c[k] for c in cs if c.get(k) is not None), 1) \
                if any(c.get(k) is not None for c in cs) else None
        for role in sorted({r for c in cs for r in c.get("server_stats", {})}):
            merged: dict[str, list] = defaultdict(list)
            for c in cs:
                for k, v in c["server_stats"].get(role, {}).items():
                    merged[k].append(v)
            row[role] = {k: rounded(statistics.fmean(v), 3) for k, v in merged.items()}
        rows.append(row)
    return rows


def tune_point(cells: list[dict]) -> float | None:
    """A setup's tune point: the highest concurrency its tune cells ran (a tuning moved up past a point where its
    clients, not its pool, capped it: `tuning_deviations`); tune cells at lower points are shown, not compared."""
    return max((c["point"] for c in cells if c["phase"] == "tune"), default=None)


def at_tune_point(cells: list[dict]) -> list[dict]:
    """The tune cells that rank a setup's splits: those at its tune point."""
    top = tune_point(cells)
    return [c for c in cells if c["phase"] == "tune" and c["point"] == top]


def tuned_split(cells: list[dict]) -> tuple[object, str] | tuple[None, None]:
    """A setup's best prefill pool: the highest mean at its tune point, or (no tune cells) the highest saturated
    sweep throughput; with how it was chosen."""
    tune = defaultdict(list)
    at_top = at_tune_point(cells)
    for c in at_top:
        tune[c["split"]].append(c["output_tok_s"])
    if tune:
        return max(tune, key=lambda s: statistics.fmean(tune[s])), f"tune point {at_top[0]['point']:g}"
    sweeps = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["phase"] == "sweep":
            sweeps[c["split"]][c["point"]].append(c["output_tok_s"])
    if not sweeps:
        return None, None
    best = {s: max(statistics.fmean(v) for v in pts.values()) for s, pts in sweeps.items()}
    return max(best, key=best.get), "saturated sweep"


def _by_size(split) -> tuple:
    """Splits in size order (a colocated cell's None last)."""
    return split is None, split or 0


CAPPED_SHARE = 0.95  # a decode batch this close to the clients means they, not the decode pool, capped the load


def tuning_deviations(cells: list[dict], earlier: list[dict], setup: str) -> list[str]:
    """What keeps a setup's tuning from ranking its splits, from its tune cells (`cells`) and those of an earlier
    setting (`earlier`): a tune point at which the decode ran (nearly) every client, so that a larger decode pool
    could not show its gain there; one whose decode batch is not known; splits tuned elsewhere (a lower point, an
    earlier setting) but not at the tune point, which the tuned split did not have to beat."""
    at_top = at_tune_point(cells)
    if not at_top:
        return []
    top = at_top[0]["point"]
    batches = defaultdict(list)  # split -> the decode's mean running batch of each tune cell at the tune point
    for c in at_top:
        batch = ((c.get("server_stats") or {}).get("decode") or {}).get("decode_running_mean")
        if batch is not None:
            batches[c["split"]].append(batch)
    out = []
    capped = [(s, round(statistics.fmean(b), 1)) for s, b in sorted(batches.items(), key=lambda kv: _by_size(kv[0]))
              if statistics.fmean(b) >= CAPPED_SHARE * top]
    if capped:
        out.append(f"{setup}'s tune point {top:g} is capped by its clients, not its decode pool, at split(s) "
                   + ", ".join(f"{s} (decode batch {b:g})" for s, b in capped)
                   + ": its splits are not ranked by capacity there; tune it at a higher point (--tune-point)")
    if not batches:
        out.append(f"{setup}'s tune point {top:g}: no decode batch in its cells' server logs, so whether its clients "
                   "capped it is not known")
    tuned = sorted({c["split"] for c in at_top}, key=_by_size)
    elsewhere = sorted({c["split"] for c in [*cells, *earlier]} - set(tuned), key=_by_size)
    if elsewhere:
        out.append(f"{setup}'s tuned split is the best of {tuned} at its tune point {top:g}; {elsewhere} were tuned "
                   "only at another point or an earlier setting")
    return out


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
        cmp = compare(a, b, control, ("shared", "unshared"))
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
    return {**cmp, "splits": {"shared": ss, "unshared": us}, "unshared_pool_limit_requests": rounded(limit, 1),
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
        # the head says what the server died of since 2026-12-06; an older one ends "did not come up:", its log after
        return f"could not start: {head}" + (f" ... {error[-500:]}" if head.endswith(":") else "")
    split = str(summary["tuned_split"])
    rows = summary["sweeps"].get(split)
    if not rows:
        return None
    best = max(rows, key=lambda r: r["output_tok_s"])
    return (f"served at split {split}: highest concurrency within the SLO "
            f"{summary['concurrency_at_slo'].get(split)}, saturated {best['output_tok_s']} tok/s at {best['point']:g}")


def group_summary(cells: list[dict], starts: list[dict], need_repeats: int = 3, tol: float = 0.03,
                  variant: bool = False, earlier: list[dict] = ()) -> dict:
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
    if not variant:  # a variant's tune cells sit beside the method's; they choose no split
        for s in ("shared", "unshared"):
            deviations += tuning_deviations(_select(cells, s, "tune"), _select(earlier, s, "tune"), s)
    if alone := tuned.get("unpaired_repeats"):
        dropped = tuned.get("unpaired_points")
        deviations.append("repeats one setup ran alone, left out of the ratio until the other's are measured: "
                          + "; ".join(f"{n} point {p:g} repeat {'/'.join(map(str, ks))}"
                                      for n, pts in alone.items() for p, ks in sorted(pts.items()))
                          + (f" (so points {', '.join(f'{p:g}' for p in dropped)} are not compared at all, and "
                             "count for no saturation)" if dropped else ""))
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


def older_rows(older: list[dict], current: list[dict]) -> list[dict]:
    """The cells a group's newest setting left out, one line each: what an earlier tuning showed stays readable
    beside the method's numbers, marked by what it ran with."""
    flags = {c.get("server_flags") for c in current}
    rows = []
    for c in older:
        stats = (c.get("server_stats") or {}).get("decode", {})
        mem = fraction_values(c["setup"], c.get("mem_fraction"))
        rows.append({"id": c["id"], **{k: c[k] for k in ("setup", "split", "phase", "point", "repeat")},
                     "fractions": mem, "same_flags": c.get("server_flags") in flags,
                     "output_tok_s": c["output_tok_s"], "ttft_ms_p99": c.get("ttft_ms_p99"),
                     "decode_running_mean": stats.get("decode_running_mean"),
                     "gpu_free_mib_min": c.get("gpu_free_mib_min")})
    return rows


def card_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the results file's prefix."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", gpu_name or "")
    return m.group(1).lower() if m else "gpu"


def current_flags(cells: list[dict], starts: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """A group's cells and starts of its newest server flags, and the cells of other flags left out: a change of
    flags starts the group's method over (its tuning, sweeps and goodput alike), never mixes with it."""
    newest = max(cells, key=lambda c: c["t_start_epoch"], default=None) or max(starts, key=lambda s: s["t_epoch"],
                                                                                default={})
    flags = newest.get("server_flags")
    current = {}  # PD or colocated -> its newest setting of these flags (one kind's fractions leave the other's be)
    timed = [(c["t_start_epoch"], c) for c in cells] + [(s["t_epoch"], s) for s in starts]
    for _, x in sorted([(t, x) for t, x in timed if x.get("server_flags") == flags], key=lambda tx: tx[0]):
        current[fractions_used(x["setup"])] = setting(x)
    kept, older = [], []
    for c in cells:
        (kept if setting(c) == current.get(fractions_used(c["setup"])) else older).append(c)
    return kept, [s for s in starts if setting(s) == current.get(fractions_used(s["setup"]))], older


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
        st = [s for s in doc["starts"] if (s["model"], round(s["free_gib"])) == (model, free)
              and workload in s.get("workloads", [workload])]  # a variant's starts are its own
        cs, st, older = current_flags(cs, st)
        summary = group_summary(cs, st, need_repeats, tol, _is_variant(workload), older) if cs else \
            {"setups": {}, "comparisons": {}, "deviations": [],
             "headline": {"unshared_outcome": _unshared_outcome(_setup_summary([], st, "unshared"))}}
        if older:
            summary["deviations"].append(f"{len(older)} cells run with older server flags or memory fractions left "
                                         "out (they stay in the file)")
            summary["older_cells"] = older_rows(older, cs)
        summaries[group_name(model, free, workload)] = summary
    out: dict = {"schema": "serving-v2"}
    void, labels, ratios, repeats = {}, [], [], []
    for key, (model, free, workload, what) in HEADLINE.items():
        g = summaries.get(group_name(model, free, workload), {})
        out[key] = g.get("headline", {}).get(what)
    for g, summary in summaries.items():
        if _is_variant(g):
            continue  # a variant is reported beside the method's numbers, never in them
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
    lines += ["", "Machines:", ""] + list(dict.fromkeys(f"- {_environment(e)}"  # one line per distinct machine
                                                         for e in results.get("environments", [])))
    lines += ["", "Server starts (where the GPU memory goes):", ""]
    lines += [_start_line(s) for s in results.get("starts", [])]
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
                      + ", ".join(f"{p}: {v['ratio']}" for p, v in cmp.get("per_point", {}).items())
                      + _one_sided(cmp.get("one_sided_points")) + _unpaired(cmp.get("unpaired_repeats"))]
        lines += _tune_point_lines(summary["setups"])
        if summary.get("older_cells"):
            lines += ["", "Cells of an earlier setting (left out of the above; flags: the same as above or other):",
                      "", "| setup | split | phase | point | repeat | fractions | flags | out tok/s | TTFT p99 ms "
                      "| decode batch mean | GPU free min MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['setup']} | {r['split']} | {r['phase']} | {r['point']:g} | {r['repeat']} | "
                      f"{' / '.join(f'{k} {v:g}' for k, v in r['fractions'].items())} | "
                      f"{'same' if r['same_flags'] else 'other'} | {r['output_tok_s']} | {r['ttft_ms_p99']} | "
                      f"{r['decode_running_mean']} | {r['gpu_free_mib_min']} |" for r in summary["older_cells"]]
    lines += variant_lines(results.get("cells", []))
    return "\n".join(lines) + "\n"


def _one_sided(points: dict | None) -> str:
    return "".join(f"; run by {n} only, not compared: {p}" for n, p in (points or {}).items())


def _unpaired(repeats: dict | None) -> str:
    return "".join(f"; repeats run by {n} alone, left out until the other's are measured: "
                   + ", ".join(f"{p:g} r{'/'.join(map(str, ks))}" for p, ks in sorted(pts.items()))
                   for n, pts in (repeats or {}).items())


def _tune_point_lines(setups: dict) -> list[str]:
    """Shared beside unshared at their tuned splits' tuning points, before any sweep: where the run stands, labelled
    so that it is not read as the method's ratio (one point, no control, no repeats required)."""
    if not {"shared", "unshared"} <= set(setups):
        return []
    rows = [{r["point"]: r for r in setups[k]["tune"].get(str(setups[k]["tuned_split"]), [])}
            for k in ("shared", "unshared")]
    points = sorted(set(rows[0]) & set(rows[1]))
    return [f"- tuning point {p:g}, shared / unshared at their tuned splits: "
            f"{rows[0][p]['output_tok_s'] / rows[1][p]['output_tok_s']:.2f} ({rows[0][p]['output_tok_s']} / "
            f"{rows[1][p]['output_tok_s']} tok/s, n {rows[0][p]['repeats']}/{rows[1][p]['repeats']}; not the "
            "method's ratio: one point, no control point, no sweep)" for p in points if rows[1][p]["output_tok_s"]]


VARIANT_MARK = "@"  # '<workload>@<variant>': a variant's cells, never in the method's comparisons


def _is_variant(group_or_workload: str) -> bool:
    return VARIANT_MARK in group_or_workload


def base_workload(c: dict) -> str:
    """The workload a cell runs, without its variant's mark."""
    return c["workload"].split(VARIANT_MARK)[0]


_FRACTION_OVERRIDE = re.compile(r"\+{0,2}engine\.mem_fraction_static\.(\w+)=(\S+)")


def flags_less_fractions(flags: str, mem: dict) -> str | None:
    """A record's server flags without the memory-fraction overrides that its recorded fractions hold already (a
    headroom variant's); None when one of them disagrees with the record."""
    kept = []
    for token in flags.split():
        if m := _FRACTION_OVERRIDE.fullmatch(token):
            if mem.get(m.group(1)) != float(m.group(2)):
                return None
            continue
        kept.append(token)
    return " ".join(kept)


def adopt_variant(doc: dict, name: str, method: dict[str, tuple]) -> tuple[dict, int]:
    """The cells and starts of variant `name` as the method's own, once the method changed to what the variant ran
    (e.g. its decode headroom): the same servers, started with the same settings, so the same measurement. Each
    keeps what it was measured as (`adopted_from_variant`). Refused, with nothing changed, for a variant whose
    setting is not the method's now (`method`: PD / colocated -> setting) or whose cell the method already has."""
    taken = {(c["id"], *setting(c)) for c in doc.get("cells", []) if not c.get("variant")}
    out = {**doc, "cells": [], "starts": []}
    n = 0
    for kind in ("cells", "starts"):
        for x in doc.get(kind, []):
            if x.get("variant") != name:
                out[kind].append(x)
                continue
            flags = flags_less_fractions(x.get("server_flags") or "", x.get("mem_fraction") or {})
            now = (flags, fractions(x["setup"], x.get("mem_fraction")))
            if now != method[fractions_used(x["setup"])]:
                raise MethodError(f"variant {name!r} ran {x['id']} with flags {flags!r} and fractions {now[1]}, not "
                                  f"the method's {method[fractions_used(x['setup'])]}: change the method first "
                                  "(DECODE_MEM, SERVER_FLAGS), or leave the variant a variant")
            y = {k: v for k, v in x.items() if k != "base_mem_fraction"}
            y.update(server_flags=flags, variant=None, variant_overrides=None,
                     adopted_from_variant={"name": name, "overrides": x.get("variant_overrides"),
                                           "id": x["id"], "base_mem_fraction": x.get("base_mem_fraction")})
            if kind == "cells":
                y["workload"] = base_workload(x)
                y["id"] = cell_id(y)
                if (y["id"], *setting(y)) in taken:
                    raise MethodError(f"the method has {y['id']} with this setting already: variant {name!r}'s "
                                      "cell would replace a measurement, not join it")
                n += 1
            else:
                y["workloads"] = [w.split(VARIANT_MARK)[0] for w in x.get("workloads", [])]
            out[kind].append(y)
    return out, n


def variant_lines(cells: list[dict]) -> list[str]:
    """Variants (issue 22 item 5: SGLang's page size, the KV transfer's threads) each beside the method's own setup
    at the same setup, split, phase and point, run with the flags the variant added its overrides to."""
    pairs: dict[tuple, list[dict]] = defaultdict(list)  # (where, name, overrides, base setting) -> its cells
    defaults: dict[tuple, list[dict]] = defaultdict(list)  # (where, setting) -> the method's cells
    for c in cells:
        if c.get("variant"):
            pairs[(_where(c), c["variant"], c.get("variant_overrides"), base_setting(c))].append(c)
        else:
            defaults[(_where(c), setting(c))].append(c)
    if not pairs:
        return []
    lines = ["", "## Variants (each beside the method's own cells run with the server flags it was added to)", ""]
    lines += [f"- `{name}`: `{overrides}`, added to `{base[0]}`" + ("" if base[1] == fractions("shared", None)
                                                                   else f" at memory fractions {base[1]}")
              for name, overrides, base in sorted({k[1:] for k in pairs}, key=str)]
    lines += ["", "| model/GiB/workload | setup | split | phase | point | variant | n | out tok/s | TTFT p99 ms "
              "| in transfer mean/max | prefill in flight mean/max | prefill pool use mean/max |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (where, name, _, base), vs in sorted(pairs.items(), key=lambda kv: str(kv[0])):
        if (where, base) in defaults:  # else nothing to compare it with (yet)
            lines += [_variant_row(where, "default", defaults[(where, base)]), _variant_row(where, name, vs)]
    return lines


def _where(c: dict) -> tuple:
    return c["model"], round(c["free_gib"]), base_workload(c), c["setup"], str(c["split"]), c["phase"], c["point"]


def _variant_row(where: tuple, name: str, cs: list[dict]) -> str:
    model, free, base, setup, split, phase, point = where
    (r,) = point_rows(cs)  # the cells of one point: their means as the sweeps' tables have them

    def mean_max(role: str, stat: str) -> str:
        return f"{r.get(role, {}).get(stat + '_mean')}/{r.get(role, {}).get(stat + '_max')}"

    cols = [f"{model}/{free}g/{base}", setup, split, phase, f"{point:g}", name, r["repeats"], r["output_tok_s"],
            r["ttft_ms_p99"], mean_max("decode", "decode_in_transfer"), mean_max("prefill", "prefill_inflight"),
            mean_max("prefill", "prefill_pool_use")]
    return "| " + " | ".join(str(c) for c in cols) + " |"


def _environment(e: dict) -> str:
    ballast = e.get("ballast") or {}
    keys = ("driver", "torch", "cuda", "sglang", "transformers", "mooncake-transfer-engine-cuda13", "sglang-router")
    return (f"{e.get('gpu_name')} ({e.get('date')}, commit {(e.get('commit') or 'unknown')[:7]}): "
            + ", ".join(f"{k} {e[k]}" for k in keys if e.get(k))
            + (f"; ballast leaves {ballast['free_gib']} GiB of {ballast['card_gib']}" if ballast else ""))


def _start_line(s: dict) -> str:
    """One server start: each server's NVML memory, its weights and KV pool; or why it could not start."""
    head = f"- {s['model']} / {s['free_gib']:g} GiB free, {s['setup']} at split {s['split']}" \
        + (f", variant {s['variant']}" if s.get("variant") else "")
    if s.get("error"):
        return f"{head}: could not start: {s['error'].splitlines()[0][:300] if s['error'] else ''}"
    servers = [f"{name.rsplit('-', 1)[-1]} {v.get('gpu_memory_mib')} MiB (weights {_weights(v)}, "
               f"KV pool {v.get('kv_pool_tokens')} tokens"
               + (f", attached in {v['attach_seconds']:.2f} s" if v.get("attach_seconds") else "") + ")"
               for name, v in s.get("servers", {}).items()]
    return f"{head}: " + "; ".join(servers)


def _weights(server: dict) -> str:
    """The weights a server holds: what sharedcache allocated for it, or, with sharedcache off (unshared,
    colocated), what SGLang counted at its load."""
    if server.get("weight_bytes_allocated") is not None:
        return f"{server['weight_bytes_allocated'] / 2**30:.2f} GiB"
    counted = (server.get("memory_usage_gb") or {}).get("weight")
    return f"{counted:.2f} GiB by SGLang's count" if counted is not None else "unknown"


_TABLE_HEAD = ("| point | n | out tok/s | ±95 % | TTFT p99 ms | ITL p99 ms | SLO | decode batch mean/p50 "
               "| in transfer | prefill in flight | pool use (decode/prefill) | GPU free min MiB |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(r: dict) -> str:
    st = {}
    for role in ("decode", "prefill", "server"):
        st.update(r.get(role, {}))
    cols = [f"{r['point']:g}", r["repeats"], r["output_tok_s"], r["ci"], r["ttft_ms_p99"], r["itl_ms_p99"],
            "met" if r["slo_met"] else "missed", f"{st.get('decode_running_mean')}/{st.get('decode_running_p50')}",
            st.get("decode_in_transfer_mean"), st.get("prefill_inflight_mean"),
            f"{st.get('decode_pool_use_mean')}/{st.get('prefill_pool_use_mean')}", r.get("gpu_free_mib_min")]
    return "| " + " | ".join(str(c) for c in cols) + " |"
