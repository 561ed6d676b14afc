"""The serving benchmark's method on the CPU (bench/sglang_serving.py and its serving_* modules, bench/pd_bound.py;
issue 22): the statistics against known values, the steady window, the rules that void or refuse a comparison, the
goodput search, SGLang's log lines as the committed runs wrote them, pd_bound's band on the committed one-batch and
serving results, and the load generator against a small streaming server (a stand-in for SGLang's /generate,
chunked server-sent events)."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import pd_bound as pb  # noqa: E402
import serving_load as sl  # noqa: E402
import serving_method as sm  # noqa: E402
import serving_results as sr  # noqa: E402
import serving_servers as sv  # noqa: E402
import sglang_serving as ss  # noqa: E402
from helpers import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results"
LOGS = RESULTS / "h200-sglang-serving-logs"

# copied from bench/results/h200-sglang-serving-logs/pd-nvlink-shared.tgz (shared-2.log, shared-1.log) and
# replicas-shared.tgz (shared-1.log): a PD decode, a PD prefill and a colocated server's lines
DECODE_LINE = ("[2026-11-28 18:52:50] Decode batch, #running-req: 3, #token: 123041, token usage: 0.46, "
               "pre-allocated usage: 0.37, #prealloc-req: 0, #transfer-req: 13, #retracted-req: 0, cuda graph: True, "
               "gen throughput (token/s): 153.58, #queue-req: 0")
PREFILL_LINE = ("[2026-11-28 18:53:44] Prefill batch, #new-seq: 2, #new-token: 8192, #cached-token: 0, token usage: "
                "0.15, #running-req: 0, #queue-req: 27, #pending-token: 221696, #bootstrap-req: 0, #inflight-req: 2, "
                "#optimistic-req: 0, cuda graph: True, input throughput (token/s): 14700.47")
COLOCATED_LINE = ("[2026-11-28 07:47:48] Decode batch, #running-req: 1, #token: 7696, token usage: 0.05, "
                  "cuda graph: True, gen throughput (token/s): 0.93, #queue-req: 0")


def committed_log(archive: str, member_suffix: str) -> str:
    with tarfile.open(LOGS / archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
        return tar.extractfile(member).read().decode(errors="replace")


# ---------------------------------------------------------------- statistics

def test_t_quantiles_match_the_table_and_interpolate_beyond_it():
    assert sm.t975(1) == 12.706 and sm.t975(2) == 4.303 and sm.t975(30) == 2.042
    assert abs(sm.t975(35) - 2.030) < 0.002  # exact: 2.0301
    assert abs(sm.t975(1000) - 1.962) < 0.002  # exact: 1.9623
    with pytest.raises(ValueError):
        sm.t975(0)


def test_mean_ci_against_known_values():
    m, hw = sm.mean_ci([1, 2, 3])
    assert m == 2 and abs(hw - 4.303 / math.sqrt(3)) < 1e-9  # sd 1, n 3
    m, hw = sm.mean_ci(range(1, 11))
    assert m == 5.5 and abs(hw - 2.262 * 3.0276503540974917 / math.sqrt(10)) < 1e-9
    assert sm.mean_ci([4.0]) == (4.0, None) and sm.mean_ci([]) == (None, None)
    r, hw = sm.ratio_ci(110, 11, 100, 10)
    assert r == pytest.approx(1.1) and hw == pytest.approx(1.1 * math.sqrt(0.02))
    assert sm.percentile([1, 2, 3, 4], 50) == 2.5 and sm.percentile(range(101), 99) == 99


# ---------------------------------------------------------------- the steady window

def request(sent, chunk_times, tokens=None, end=None, error=None, out=None):
    tokens = tokens or list(range(1, len(chunk_times) + 1))
    return sm.Request(0, 100, out or tokens[-1] if tokens else 0, sent, list(zip(chunk_times, tokens)), end, error)


def test_steady_window_excludes_the_first_and_last_share():
    assert sm.steady_window(0, 100, 0.15) == pytest.approx((15, 85))
    assert sm.steady_window(10, 20, 0) == (10, 20)
    assert sm.load_seconds(120, 0.15) == pytest.approx(171.4286, rel=1e-4)
    for bad in ((0, 10, 0.5), (5, 5, 0.1), (0, 10, -0.1)):
        with pytest.raises(ValueError):
            sm.steady_window(*bad)


def test_window_counts_only_tokens_that_arrived_inside_it():
    ramp = request(0.0, [1, 5, 14.9], end=15)        # all before the window
    steady = request(10.0, [16, 20, 50, 84.9, 85])  # 4 inside, the last at hi is out
    batch = request(20.0, [30, 40], tokens=[5, 9])  # a chunk of 5 tokens, then one of 4
    reqs = [ramp, steady, batch]
    assert sm.window_tokens(reqs, 15, 85) == 4 + 9
    lat = sm.window_latencies(reqs, 15, 85)
    assert lat["ttft_ms_p50"] == 10000.0  # only the request sent at 20 s counts (TTFT 10 s)
    gaps = list(batch.gaps())
    assert gaps == [(40, 2.5, 4)]  # a chunk of 4 tokens after 10 s: 2.5 s each


def test_request_summary_and_slo_judgement():
    fast = request(20.0, [20.5, 20.55, 20.6], end=20.6).summary()
    slow_first = request(21.0, [25.0, 25.01], end=25.01).summary()
    jerky = request(22.0, [22.2, 22.4, 22.42], end=22.42).summary()  # one 200 ms gap: its p99 ITL
    failed = request(23.0, [], error="HTTP 400: too long").summary()
    cut_early = request(84.0, []).summary()        # cut at 85 after 1 s without a token: not judged
    cut_late = request(80.0, []).summary()         # cut at 85 after 5 s without a token: a miss
    cut_running = request(30.0, [30.2, 30.25]).summary()  # cut while running, on time so far: met
    reqs = [fast, slow_first, jerky, failed, cut_early, cut_late, cut_running]
    verdicts = [sm.judge(r, 85, 3.0, 0.1) for r in reqs]
    assert verdicts == [True, False, False, False, None, False, True]
    assert sm.attainment(reqs, 15, 85, 85, 3.0, 0.1) == (2, 6)
    assert sm.attainment(reqs, 15, 85, 85, 3.0, 0.3) == (3, 6)  # a looser ITL SLO


def test_request_sequence_is_seeded_and_lengths_vary_in_range():
    a = [s for _, s in zip(range(50), sm.request_specs(7, 2048, 512, 0.5, 128256))]
    b = [s for _, s in zip(range(50), sm.request_specs(7, 2048, 512, 0.5, 128256))]
    assert [(len(x.input_ids), x.output_len, x.input_ids[:3]) for x in a] == \
        [(len(x.input_ids), x.output_len, x.input_ids[:3]) for x in b]
    assert all(1024 <= len(x.input_ids) <= 2048 and 256 <= x.output_len <= 512 for x in a)
    assert len({len(x.input_ids) for x in a}) > 40  # they vary
    assert all(sm.LOW_ID <= t < 128256 for x in a for t in x.input_ids)
    fixed = next(sm.request_specs(7, 100, 10, 1.0, 1000))
    assert (len(fixed.input_ids), fixed.output_len) == (100, 10)
    assert sm.mean_lengths(2048, 2048, 0.5) == (1536, 1536)


# ---------------------------------------------------------------- the rules

def test_setups_are_compared_over_the_points_both_ran_and_the_others_are_named():
    """A best-of across unequal sweeps is no comparison: the saturated ratio takes each setup's best over the
    common points only, the points one setup ran alone are listed, and no common point is refused."""
    assert sm.common_points({"shared": [16, 32, 8], "unshared": [8, 16, 32]}) == ([8, 16, 32], {})
    assert sm.common_points({"shared": [8, 32, 64], "unshared": [8, 16, 32, 64]}) == ([8, 32, 64], {"unshared": [16]})
    with pytest.raises(sm.MethodError, match="no point in common.*shared: \\[32\\]; unshared: \\[16\\]"):
        sm.common_points({"shared": [32], "unshared": [16]})
    cmp = sr.compare({16: {0: 700.0}, 32: {0: 760.0}}, {16: {0: 670.0}, 8: {0: 900.0}}, None)
    assert cmp["points"] == [16] and cmp["one_sided_points"] == {"a": [32], "b": [8]}
    assert cmp["saturated_ratio"] == round(700 / 670, 4)  # not shared's 760 at 32, nor unshared's 900 at 8


def test_a_repeat_counts_once_both_setups_ran_it():
    """A session cut short leaves one setup's repeat without its pair: until the other's is measured, the ratio
    at that point takes the repeats both ran, and the lone repeat is named in the report."""
    unshared_96 = {0: 1647.5, 1: 1620.9}
    cmp = sr.compare({8: {0: 563.0, 1: 561.3}, 96: {0: 2671.7}}, {8: {0: 563.6, 1: 561.5}, 96: unshared_96}, 8)
    assert cmp["per_point"][96] == {"ratio": round(2671.7 / 1647.5, 4), "ci": None, "repeats": 1}
    assert cmp["saturated_ratio"] == round(2671.7 / 1647.5, 4)  # not over the mean of unshared's two repeats
    assert cmp["unpaired_repeats"] == {"b": {96: [1]}} and cmp["control_ratios"] == [0.9989, 0.9996]
    with pytest.raises(sm.MethodError, match=r"different repeats only.*shared ran \{96: \[1\]\}; unshared ran"):
        sr.compare({96: {1: 2600.0}}, {96: {0: 1600.0}}, None, ("shared", "unshared"))
    cmp = sr.compare({8: {0: 563.0}, 48: {0: 1940.0}, 96: {1: 2600.0}},
                     {8: {0: 563.6}, 48: {0: 1640.0}, 96: {0: 1647.5}}, 8)
    assert cmp["points"] == [8, 48] and cmp["unpaired_points"] == [96]  # 96 counts for no saturation, and says so
    cells = sweep("shared", SHARED) + sweep("unshared", UNSHARED)
    lone = [c for c in cells if not (c["setup"] == "shared" and c["point"] == 64 and c["repeat"] == 2)]
    res = sr.build_results({"cells": lone, "starts": [start("unshared", 65536, 40000)], "environments": []})
    summary = res["groups"]["14b/77g/2k2k"]
    assert summary["comparisons"]["tuned"]["per_point"][64]["repeats"] == 2
    assert "repeats one setup ran alone, left out of the ratio until the other's are measured: unshared point 64 " \
           "repeat 2" in summary["deviations"]
    assert "repeats run by unshared alone, left out until the other's are measured: 64 r2" in sr.render_markdown(res)


def test_report_says_when_a_results_files_summary_is_older_than_the_code(tmp_path, capsys):
    """`report` draws its tables from the cells with the current code, and does not write the file: a file whose
    stored summary another version of the code wrote is named, with the command that writes it again."""
    doc = sr.build_results({"cells": sweep("shared", SHARED) + sweep("unshared", UNSHARED),
                            "starts": [start("unshared", 65536, 40000)], "environments": []})
    path = tmp_path / "h100-serving-v2.json"
    path.write_text(json.dumps(doc))
    ss.cmd_report(argparse.Namespace(results=str(path), md=None, need_repeats=3))
    assert "older than this code" not in capsys.readouterr().err
    path.write_text(json.dumps({**doc, "throughput_ratio_14b_2k2k": 1.6349}))
    ss.cmd_report(argparse.Namespace(results=str(path), md=None, need_repeats=3))
    err = capsys.readouterr().err
    assert "summary is older than this code (throughput_ratio_14b_2k2k differ)" in err
    assert f"merge --into {path} {path}" in err


def test_control_point_void_rule():
    assert sm.control_verdict([1.0, 0.98, 1.029]) == (True, None)
    ok, why = sm.control_verdict([1.01, 1.04, 0.99])
    assert not ok and "1.040" in why and "3%" in why
    assert sm.control_verdict([])[0] is False
    assert sm.control_verdict([0.96], tol=0.05) == (True, None)


def test_saturation_and_overlap_rules():
    assert sm.saturation_verdict([8, 16, 32, 48], 17.4) == (True, None)
    ok, why = sm.saturation_verdict([8, 16, 24], 17.4)
    assert not ok and "only 1 point" in why
    assert sm.saturation_verdict([8, 16], None)[0] is False
    cell = lambda cid, setup, t0, host="a": {"id": cid, "setup": setup, "host": host, "t_start_epoch": t0,
                                            "duration_s": 100}
    cells = [cell("s1", "shared", 0), cell("u1", "unshared", 150), cell("u2", "unshared", 50, host="b"),
             cell("s2", "shared", 300), cell("u3", "unshared", 350)]
    assert sm.overlapping_cells(cells) == [("s2", "u3")]


def synthetic_cell(setup, point, repeat, tok_s, split=65536, phase="sweep", ttft=0.5, itl99=0.03, t0=None,
                   window=120.0, decode_mem=ss.DECODE_MEM):
    args = argparse.Namespace(tag="14b", free_gib=77.0, workload_name="2k2k", inp=2048, outp=2048, range_ratio=0.5,
                              setup=setup, seed=1, control_point=8, trim=0.15, ttft_slo_s=3.0, itl_slo_ms=100.0,
                              variant_name=None, variant_overrides=None, server_flags=sv.SERVER_FLAGS,
                              prefill_mem=ss.PREFILL_MEM, decode_mem=decode_mem, colocated_mem=ss.COLOCATED_MEM)
    load = "rate" if phase == "goodput" else "concurrency"
    c = ss.cell_base(args, split, phase, load, point, repeat)
    duration = sm.load_seconds(window, 0.15)
    lo, hi = sm.steady_window(0, duration, 0.15)
    reqs = [[round(lo + k, 3), 2000, 2000, 2000, ttft, itl99, lo + k + 60, None] for k in range(20)]
    order = {"shared": 0, "unshared": 1, "colocated": 2}[setup]
    c.update({"t_start_epoch": t0 if t0 is not None else 1e6 + 10000 * order + 1000 * repeat + point,
              "duration_s": duration, "window_s": [lo, hi], "output_tok_s": tok_s, "host": "h", "waves": 2,
              "requests": reqs, "server_stats": {}, "stopped_early": False, "ttft_ms_p99": ttft * 1000,
              "itl_ms_p99": itl99 * 1000})
    return c


def start(setup, split, pool, free=77.0):
    return {"id": f"{setup}-{split}", "model": "14b", "free_gib": free, "setup": setup, "split": split,
            "workloads": ["2k2k"], "t_epoch": 0, "decode_pool_tokens": pool, "error": None,
            "server_flags": sv.SERVER_FLAGS, "mem_fraction": {"prefill": ss.PREFILL_MEM, "decode": ss.DECODE_MEM,
                                                              "colocated": ss.COLOCATED_MEM}}


PAGE1 = sv.SERVER_FLAGS.replace(" +engine.extra_args.page_size=64", "")  # before the method took page 64
SHARED = {8: 400.0, 16: 760.0, 32: 1300.0, 48: 1500.0, 64: 1520.0}
UNSHARED = {8: 398.0, 16: 700.0, 32: 760.0, 48: 770.0, 64: 765.0}


def sweep(setup, values, repeats=3, control_shift=1.0, **kw):
    out = []
    for r in range(repeats):
        for p, v in values.items():
            shift = control_shift if p == 8 and r == 1 else 1.0
            out.append(synthetic_cell(setup, p, r, v * shift * (1 + 0.002 * r), **kw))
    return out


def test_a_clean_comparison_gives_the_headline_numbers():
    cells = sweep("shared", SHARED) + sweep("unshared", UNSHARED)
    starts = [start("shared", 65536, 300000), start("unshared", 65536, 40000)]  # 40000 / 3072: 13 requests
    res = sr.build_results({"cells": cells, "starts": starts, "environments": [{"gpu_name": "NVIDIA H100 80GB HBM3"}]})
    tuned = res["groups"]["14b/77g/2k2k"]["comparisons"]["tuned"]
    assert tuned["void"] == [] and tuned["repeats"] == 3
    assert res["throughput_ratio_14b_2k2k"] == pytest.approx(1520 / 770, rel=1e-3)
    assert tuned["saturated_point_a"] == 64 and tuned["saturated_point_b"] == 48
    assert len(res["control_ratios"]) == 3 and all(abs(r - 1) < 0.01 for r in res["control_ratios"])
    assert res["repeats"] == 3 and res["card"] == "NVIDIA H100 80GB HBM3" and res["void"] == {}
    for key in sr.HEADLINE:
        assert key in res
    assert res["goodput_ratio_14b_2k2k"] is None and res["feasibility_24b_unshared"] is None  # not measured
    assert res["groups"]["14b/77g/2k2k"]["setups"]["shared"]["concurrency_at_slo"]["65536"] == 64
    assert "| 64 | 3 | 1523.0 |" in sr.render_markdown(res)


def test_a_change_of_server_flags_starts_a_group_over():
    """Cells of other flags are never compared: the newest flags' cells are the group's, the rest are counted."""
    cells = sweep("shared", SHARED) + sweep("unshared", UNSHARED)
    cells[-1]["server_flags"] += " +engine.extra_args.page_size=16"  # the newest cell
    starts = [start("shared", 65536, 300000), start("unshared", 65536, 40000)]
    res = sr.build_results({"cells": cells, "starts": starts, "environments": []})
    group = res["groups"]["14b/77g/2k2k"]
    assert res["throughput_ratio_14b_2k2k"] is None and list(group["setups"]) == ["unshared"]
    assert "29 cells run with older server flags or memory fractions left out (they stay in the file)" in group["deviations"]


def test_tuning_cells_alone_show_in_the_tables():
    """A call that got only as far as tuning (the first call of a model) still reads in the markdown."""
    cells = [synthetic_cell("shared", 64, 0, 1910.8, split=32768, phase="tune")]
    res = sr.build_results({"cells": cells, "starts": [start("shared", 32768, 202631)], "environments": []})
    text = sr.render_markdown(res)
    assert "tuning at split 32768, decode pool 202631 tokens" in text and "| 64 | 1 | 1910.8 |" in text
    assert "- 14b / 77 GiB free, shared at split 32768: " in text  # its start, though it holds no servers' numbers
    assert res["throughput_ratio_14b_2k2k"] is None  # nothing swept: no headline


def test_a_setup_tuned_where_its_clients_capped_it_is_told_to_tune_higher_and_its_higher_point_decides():
    """At 64 clients the shared decode ran every client at each split, so 64 could not rank its splits (a smaller
    prefill pool only adds decode pool the clients cannot fill): the summary says so, and once the setup is tuned
    at a higher point that point alone ranks the splits; the lower one's cells stay in the tables."""
    def tune(split, point, tok_s, batch):
        c = synthetic_cell("shared", point, 0, tok_s, split=split, phase="tune")
        c["server_stats"] = {"decode": {"decode_running_mean": batch}}
        return c

    capped = [tune(32768, 64, 2341.7, 63.4), tune(65536, 64, 2288.1, 59.8)]
    res = sr.build_results({"cells": capped, "starts": [], "environments": []})
    g = res["groups"]["14b/77g/2k2k"]
    assert g["setups"]["shared"]["tuned_split"] == 32768
    assert any("shared's tune point 64 is capped by its clients" in d and "32768 (decode batch 63.4)" in d
               and "65536" not in d and "--tune-point" in d for d in g["deviations"])
    higher = [tune(32768, 96, 2400.0, 74.0), tune(4096, 96, 2300.0, 82.0)]
    capped[1]["output_tok_s"] = 2500.0  # 65536 the best at 64, and the best of every cell pooled: not tried at 96
    res = sr.build_results({"cells": capped + higher, "starts": [], "environments": []})
    g = res["groups"]["14b/77g/2k2k"]
    assert (g["setups"]["shared"]["tuned_split"], g["setups"]["shared"]["tuned_by"]) == (32768, "tune point 96")
    assert not any("capped" in d for d in g["deviations"])
    assert "shared's tuned split is the best of [4096, 32768] at its tune point 96; [65536] were tuned only at " \
        "another point or an earlier setting" in g["deviations"]
    assert [r["point"] for r in g["setups"]["shared"]["tune"]["32768"]] == [64, 96]  # shown, not compared
    unknown = [{**c, "server_stats": {"decode": {"decode_lines": 0}}} for c in higher]  # a log with no decode lines
    g = sr.build_results({"cells": unknown, "starts": [], "environments": []})["groups"]["14b/77g/2k2k"]
    assert any("no decode batch" in d for d in g["deviations"]) and not any("is capped" in d for d in g["deviations"])
    variant = [{**c, "workload": "2k2k@page16", "variant": "page16"} for c in capped]
    res = sr.build_results({"cells": variant, "starts": [], "environments": []})
    assert not any("capped" in d for d in res["groups"]["14b/77g/2k2k@page16"]["deviations"])  # it tunes nothing


def test_a_variant_becomes_the_methods_own_only_when_the_method_runs_what_it_ran(tmp_path, monkeypatch):
    """The method's headroom moved to what the dmem variant ran: its cells and starts join the method's under
    their method ids, each saying what it was measured as; a variant of other settings, or one whose cell the
    method has already, is refused and the file is left as it was."""
    def as_variant(c, mem):
        overrides = f"engine.mem_fraction_static.decode={mem:g}"
        c.update(workload=f"2k2k@dmem{round(mem * 100)}", variant=f"dmem{round(mem * 100)}",
                 variant_overrides=overrides, server_flags=f"{sv.SERVER_FLAGS} {overrides}",
                 base_mem_fraction={"prefill": ss.PREFILL_MEM, "decode": 0.88})
        c["id"] = sr.cell_id(c)
        return c

    old = synthetic_cell("unshared", 64, 0, 1485.1, split=4096, phase="tune", decode_mem=0.88)
    var = as_variant(synthetic_cell("unshared", 64, 0, 1644.0, split=4096, phase="tune",
                                    t0=old["t_start_epoch"] + 100), ss.DECODE_MEM)
    st = {**start("unshared", 4096, 95104), "workloads": [var["workload"]], "variant": var["variant"],
          "variant_overrides": var["variant_overrides"], "server_flags": var["server_flags"]}
    path = tmp_path / "gpu-serving-v2.json"
    path.write_text(json.dumps(sr.build_results({"cells": [old, var], "starts": [st], "environments": []})))
    before = path.read_text()
    monkeypatch.setattr(sys, "argv", ["sglang_serving.py", "adopt", "--into", str(path), "dmem90"])
    with pytest.raises(SystemExit, match="no cell of variant 'dmem90'"):
        ss.main()
    assert path.read_text() == before
    monkeypatch.setattr(sys, "argv", ["sglang_serving.py", "adopt", "--into", str(path), var["variant"]])
    ss.main()
    res = json.loads(path.read_text())
    (adopted,) = [c for c in res["cells"] if c.get("adopted_from_variant")]
    assert adopted["id"] == "14b|77g|2k2k|unshared|4096|tune|conc64|r0" and adopted["workload"] == "2k2k"
    assert adopted["server_flags"] == sv.SERVER_FLAGS and adopted["variant"] is None
    assert adopted["adopted_from_variant"]["id"] == var["id"] and "base_mem_fraction" not in adopted
    assert res["starts"][0]["workloads"] == ["2k2k"] and res["starts"][0]["server_flags"] == sv.SERVER_FLAGS
    g = res["groups"]["14b/77g/2k2k"]
    assert g["setups"]["unshared"]["tune"]["4096"][0]["output_tok_s"] == 1644.0  # the newest setting: the method
    assert g["setups"]["unshared"]["decode_pool_tokens"] == {"4096": 95104}
    assert sum(c["output_tok_s"] == 1485.1 for c in res["cells"]) == 1  # the older fraction's cell stays
    assert "| unshared | 4096 | tune | 64 | 0 | decode 0.88 / prefill 0.9 | same | 1485.1 |" in \
        path.with_suffix(".md").read_text()  # and reads in the tables, marked by its fractions
    method = {("prefill", "decode"): sr.setting({"server_flags": sv.SERVER_FLAGS, "setup": "shared",
                                                 "mem_fraction": {"prefill": ss.PREFILL_MEM, "decode": 0.90}})}
    with pytest.raises(sm.MethodError, match="not the method's"):  # the method is at another headroom
        sr.adopt_variant({"cells": [var], "starts": []}, var["variant"], method)
    method = {("prefill", "decode"): sr.setting(adopted)}
    with pytest.raises(sm.MethodError, match="would replace a measurement"):
        sr.adopt_variant({"cells": [adopted, var], "starts": []}, var["variant"], method)
    page = {**var, "variant": "page16", "variant_overrides": "+engine.extra_args.page_size=16",
            "server_flags": sv.SERVER_FLAGS.replace("page_size=64", "page_size=16")}  # at the method's fractions
    with pytest.raises(sm.MethodError, match="not the method's"):
        sr.adopt_variant({"cells": [page], "starts": []}, "page16", method)
    part = tmp_path / "part.json"  # an older part, from before the adoption: its copy stays out
    part.write_text(json.dumps({"cells": [var], "starts": [st], "environments": []}))
    monkeypatch.setattr(sys, "argv", ["sglang_serving.py", "merge", "--into", str(path), str(part)])
    ss.main()
    again = json.loads(path.read_text())
    assert [c["id"] for c in again["cells"]] == [c["id"] for c in res["cells"]] and not any(
        c.get("variant") for c in again["cells"] + again["starts"])
    assert again["groups"]["14b/77g/2k2k"]["setups"]["unshared"]["decode_pool_tokens"] == {"4096": 95104}


def test_a_variant_is_its_own_group_and_is_compared_side_by_side():
    """Issue 22 item 5: cells of a variant (another SGLang page size, more transfer threads) never enter the
    method's comparison; the table puts them beside the default's cells of the same setup, split and point, with
    what the KV transfer did."""
    def as_variant(c, name):
        overrides = "+engine.extra_args.page_size=16"
        c.update(workload=f"2k2k@{name}", variant=name, variant_overrides=overrides,
                 server_flags=f"{PAGE1} {overrides}")
        c["id"] = sr.cell_id(c)
        return c

    def tuned(name, tok_s, in_transfer, repeat=0):
        c = synthetic_cell("shared", 64, repeat, tok_s, phase="tune")
        c["server_flags"] = PAGE1  # the flags the variants were added to
        c["server_stats"] = {"decode": {"decode_in_transfer_mean": in_transfer, "decode_in_transfer_max": 20},
                             "prefill": {"prefill_pool_use_mean": 0.25, "prefill_pool_use_max": 0.92}}
        return as_variant(c, name) if name else c

    dead = tuned("page16", 0.0, 0.0, repeat=1)
    dead["ttft_ms_p99"] = None  # a server that died in the load: no request got a first token
    variant = [as_variant(c, "page16")
               for c in sweep("shared", SHARED, control_shift=1.2) + sweep("unshared", UNSHARED)]
    for c in variant:
        c["server_flags"] = f"{PAGE1} {c['variant_overrides']}"
    cells = sweep("shared", SHARED) + sweep("unshared", UNSHARED) + variant + \
        [tuned(None, 1910.8, 4.8), tuned("page16", 2100.0, 1.2), dead]
    starts = [start("shared", 65536, 300000), start("unshared", 65536, 40000)]
    res = sr.build_results({"cells": cells, "starts": starts, "environments": []})
    assert res["throughput_ratio_14b_2k2k"] == pytest.approx(1520 / 770, rel=1e-3)  # the variant changes nothing,
    assert res["void"] == {} and len(res["control_ratios"]) == 3  # its voided control included
    assert set(res["groups"]) == {"14b/77g/2k2k", "14b/77g/2k2k@page16"}
    text = sr.render_markdown(res).split("## Variants")[1]
    assert f"- `page16`: `+engine.extra_args.page_size=16`, added to `{PAGE1}`" in text
    assert "| 14b/77g/2k2k | shared | 65536 | tune | 64 | default | 1 | 1910.8 | 500.0 | 4.8/20.0 | None/None " \
        "| 0.25/0.92 |" in text and "| tune | 64 | page16 | 2 | 1050.0 | 500.0 | 0.6/20.0 |" in text
    base = tuned(None, 1.0, 1.0)  # the same cell measured again after the variant, with other flags
    base["server_flags"] += " +engine.extra_args.enable_metrics=true"
    base["t_start_epoch"] += 5000
    res = sr.build_results({"cells": [tuned(None, 1910.8, 4.8), tuned("page16", 2100.0, 1.2), base],
                            "starts": [], "environments": []})
    assert sorted(c["output_tok_s"] for c in res["cells"]) == [1.0, 1910.8, 2100.0]  # the older one stays
    text = sr.render_markdown(res).split("## Variants")[1]  # the variant was added to the older flags: beside them
    assert "| 64 | default | 1 | 1910.8 |" in text and "| 64 | page16 | 1 | 2100.0 |" in text
    assert "1 cells run with older server flags or memory fractions left out (they stay in the file)" in \
        res["groups"]["14b/77g/2k2k"]["deviations"]
    with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
        ss._workload("2k2k@page16=2048:2048")
    def variant(page_size, variant, server_flags=PAGE1, decode_mem=ss.DECODE_MEM, setup="shared"):
        return argparse.Namespace(page_size=page_size, variant=variant, server_flags=server_flags,
                                  decode_mem=decode_mem, setup=setup)

    assert ss._variant(variant(64, "")) == ("page64", "+engine.extra_args.page_size=64")
    assert ss._variant(variant(0, "", decode_mem=0.88)) == ("dmem88", "engine.mem_fraction_static.decode=0.88")
    assert ss._variant(variant(0, "t8=+engine.env.A=1  +engine.env.B=2")) == ("t8", "+engine.env.A=1 +engine.env.B=2")
    for v, says in ((variant(16, "t8=+engine.env.A=1"), "give one"), (variant(0, "T 8=+x=1"), "NAME=OVERRIDES"),
                    (variant(16, "", decode_mem=0.88), "give one"),
                    (variant(0, "", decode_mem=0.88, setup="colocated"), "colocated-mem"),
                    (variant(0, "", decode_mem=0.925), "whole percent"), (variant(0, "", decode_mem=1.2), "whole"),
                    (variant(0, "t8="), "NAME=OVERRIDES"), (variant(0, 't8=+engine.env.A="a b"'), "no quotes"),
                    (variant(0, "t8=engine.env.A=1"), "no quotes"),  # not +key=value
                    (variant(0, "t8=+engine.extra_args.attention_backend=fa3"), "set .* already"),
                    (variant(16, "", f"{PAGE1} +engine.extra_args.page_size=16"), "set .* already"),
                    (variant(16, "", sv.SERVER_FLAGS), "set .* already")):  # the method's flags set a page size
        with pytest.raises(SystemExit, match=says):
            ss._variant(v)


def test_cells_of_other_memory_fractions_are_other_measurements():
    """A change of the method's headroom (the decode's mem fraction) is a change of what the cells measure: the
    older cells stay in the file beside the newer, the summary takes the newest setting's only, and a cell that
    predates the record counts as what it ran with (serving_results.LEGACY_MEM)."""
    legacy = synthetic_cell("shared", 64, 0, 2341.7, split=32768, phase="tune", decode_mem=0.88)
    del legacy["mem_fraction"]
    same = synthetic_cell("shared", 64, 0, 2300.0, split=32768, phase="tune", t0=legacy["t_start_epoch"] + 10,
                          decode_mem=0.88)
    assert sr.setting(same) == sr.setting(legacy)  # 0.9 / 0.88 / 0.88 recorded or not
    merged = sr.merge_docs([{"cells": [legacy]}, {"cells": [same]}])
    assert [c["output_tok_s"] for c in merged["cells"]] == [2300.0] and len(merged["replaced"]) == 1
    other = synthetic_cell("shared", 64, 0, 2500.0, split=32768, phase="tune", t0=legacy["t_start_epoch"] + 20,
                           decode_mem=0.94)
    res = sr.build_results({"cells": [legacy, other], "starts": [], "environments": []})
    assert sorted(c["output_tok_s"] for c in res["cells"]) == [2341.7, 2500.0]  # both kept
    group = res["groups"]["14b/77g/2k2k"]
    assert group["setups"]["shared"]["tune"]["32768"][0]["output_tok_s"] == 2500.0  # the newest setting's alone
    assert "1 cells run with older server flags or memory fractions left out (they stay in the file)" in \
        group["deviations"]
    args = argparse.Namespace(server_flags=sv.SERVER_FLAGS, prefill_mem=0.9, decode_mem=0.88, colocated_mem=0.88)
    call = ss.Call(args, {"cells": [legacy, other]})
    assert call.done(legacy["id"]) and [c["output_tok_s"] for c in call.cells()] == [2341.7]  # not 0.94's cell
    # a fraction that a setup's servers do not take changes nothing of its cells, nor of the others' kind
    plain = synthetic_cell("colocated", 64, 0, 2900.0, split=None, phase="tune", t0=legacy["t_start_epoch"] + 30,
                           decode_mem=0.88)
    plain["mem_fraction"] = {"colocated": 0.9}
    res = sr.build_results({"cells": [legacy, plain], "starts": [], "environments": []})
    group = res["groups"]["14b/77g/2k2k"]
    assert set(group["setups"]) == {"shared", "colocated"} and not any("left out" in d for d in group["deviations"])
    assert sr.setting(legacy) == sr.setting({**legacy, "mem_fraction": {"prefill": 0.9, "decode": 0.88,
                                                                         "colocated": 0.5}})
    args.colocated_mem = 0.5  # a call at another colocated fraction still knows the PD cells as measured
    assert ss.Call(args, {"cells": [legacy]}).done(legacy["id"])


def test_a_variant_is_set_beside_the_method_cells_of_its_own_base_setting():
    """The variants table's default row takes the method's cells of the flags and fractions the variant was added
    to: a headroom variant (dmem88) beside the method's cells of its time, not beside those and a later
    method's mixed."""
    base = synthetic_cell("unshared", 64, 0, 1000.0, split=16384, phase="tune")
    newer = synthetic_cell("unshared", 64, 0, 3000.0, split=16384, phase="tune", t0=base["t_start_epoch"] + 10,
                           decode_mem=0.92)  # the method at other fractions, later
    args = argparse.Namespace(tag="14b", free_gib=77.0, workload_name="2k2k@dmem88", inp=2048, outp=2048,
                              range_ratio=0.5, setup="unshared", seed=1, control_point=8, trim=0.15, ttft_slo_s=3.0,
                              itl_slo_ms=100.0, variant_name="dmem88",
                              variant_overrides="engine.mem_fraction_static.decode=0.88",
                              server_flags=sv.SERVER_FLAGS + " engine.mem_fraction_static.decode=0.88",
                              prefill_mem=0.9, decode_mem=0.88, colocated_mem=0.88)
    variant = ss.cell_base(args, 16384, "tune", "concurrency", 64, 0)
    assert variant["base_mem_fraction"] == {"prefill": 0.9, "decode": ss.DECODE_MEM}
    variant.update({k: base[k] for k in ("t_start_epoch", "duration_s", "window_s", "requests", "server_stats",
                                         "host", "waves", "stopped_early", "ttft_ms_p99", "itl_ms_p99")},
                   output_tok_s=1500.0)
    text = sr.render_markdown(sr.build_results({"cells": [base, newer, variant], "starts": [], "environments": []}))
    table = text.split("## Variants")[1]
    assert "| unshared | 16384 | tune | 64 | default | 1 | 1000.0 |" in table  # not 2000.0, the two mixed
    assert "| unshared | 16384 | tune | 64 | dmem88 | 1 | 1500.0 |" in table


def test_a_server_start_is_counted_against_the_wall_not_the_load_budget():
    args = argparse.Namespace(budget_s=200.0, wall_s=400.0)
    call = ss.Call(args, {"cells": []})
    assert call.no_room(171.0, startup=120.0) is None  # one 171 s cell fits the budget whatever the start takes
    assert "wall limit" in call.no_room(171.0, startup=250.0)
    assert "load budget" in call.no_room(201.0)


def test_a_control_point_off_by_more_than_3_percent_voids_the_run():
    cells = sweep("shared", SHARED, control_shift=1.05) + sweep("unshared", UNSHARED)
    starts = [start("shared", 65536, 300000), start("unshared", 65536, 40000)]
    res = sr.build_results({"cells": cells, "starts": starts, "environments": []})
    assert res["throughput_ratio_14b_2k2k"] is None
    (reason,) = res["void"]["14b/77g/2k2k tuned"]
    assert "control point reads 1.05" in reason


def test_unequal_sweeps_compare_their_common_points_and_short_sweeps_are_refused_in_the_summary():
    shared = {p: v for p, v in SHARED.items() if p != 48}  # shared's best is at 64, which unshared lacks
    unshared = {p: v for p, v in UNSHARED.items() if p != 64}
    res = sr.build_results({"cells": sweep("shared", shared) + sweep("unshared", unshared),
                            "starts": [start("unshared", 65536, 3072 * 12)], "environments": []})
    tuned = res["groups"]["14b/77g/2k2k"]["comparisons"]["tuned"]
    assert tuned["points"] == [8, 16, 32] and tuned["one_sided_points"] == {"shared": [64], "unshared": [48]}
    assert res["throughput_ratio_14b_2k2k"] == pytest.approx(1300 * 1.002 / (760 * 1.002), rel=1e-3)  # at 32 both
    assert "run by shared only, not compared: [64]; run by unshared only, not compared: [48]" in \
        sr.render_markdown(res)
    res = sr.build_results({"cells": sweep("shared", SHARED) + sweep("unshared", {32: 760.0, 48: 770.0, 64: 765.0}),
                            "starts": [start("unshared", 65536, 40000)], "environments": []})  # no control in one
    assert "no control point measured in both setups" in res["void"]["14b/77g/2k2k tuned"]
    res = sr.build_results({"cells": sweep("shared", {16: 760.0}) + sweep("unshared", {8: 398.0, 32: 760.0}),
                            "starts": [start("unshared", 65536, 40000)], "environments": []})
    assert "no point in common" in res["void"]["14b/77g/2k2k tuned"][0]
    assert res["throughput_ratio_14b_2k2k"] is None
    # the same points, but the unshared pool holds 30 requests: only 48 and 64 are past it... then only 64
    res = sr.build_results({"cells": sweep("shared", SHARED) + sweep("unshared", UNSHARED),
                            "starts": [start("unshared", 65536, 3072 * 50)], "environments": []})
    assert "not swept past saturation" in res["void"]["14b/77g/2k2k tuned"][0]


def test_tuned_and_fixed_splits_are_reported_apart():
    cells = (sweep("shared", SHARED, split=65536) + sweep("unshared", UNSHARED, split=65536)
             + sweep("unshared", {p: v * (1.1 if p > 8 else 1) for p, v in UNSHARED.items()}, split=32768)
             + [synthetic_cell("unshared", 64, 0, 700, split=65536, phase="tune"),
                synthetic_cell("unshared", 64, 0, 840, split=32768, phase="tune")])
    starts = [start("unshared", 65536, 40000), start("unshared", 32768, 45000)]
    res = sr.build_results({"cells": cells, "starts": starts, "environments": []})
    g = res["groups"]["14b/77g/2k2k"]
    assert g["setups"]["unshared"]["tuned_split"] == 32768 and g["setups"]["unshared"]["tuned_by"] == "tune point 64"
    assert g["comparisons"]["tuned"]["splits"] == {"shared": 65536, "unshared": 32768}
    assert g["comparisons"]["tuned"]["saturated_ratio"] == pytest.approx(1520 / 847, rel=1e-3)
    assert g["comparisons"]["fixed split 65536"]["saturated_ratio"] == pytest.approx(1520 / 770, rel=1e-3)
    assert res["throughput_ratio_14b_2k2k"] == g["comparisons"]["tuned"]["saturated_ratio"]


def test_fewer_repeats_and_short_windows_are_listed_as_deviations():
    cells = sweep("shared", SHARED, repeats=2, window=60) + sweep("unshared", UNSHARED, repeats=2, window=60)
    res = sr.build_results({"cells": cells, "starts": [start("unshared", 65536, 40000)], "environments": []})
    dev = res["groups"]["14b/77g/2k2k"]["deviations"]
    assert any("window 60 s < 120 s" in d for d in dev) and any("fewer than 3 repeats" in d for d in dev)
    assert res["repeats"] == 2


def test_merging_parts_keeps_the_newer_of_a_cell_measured_twice_with_the_same_flags():
    old = synthetic_cell("shared", 16, 0, 700.0, t0=100)
    new = synthetic_cell("shared", 16, 0, 720.0, t0=200)
    other = synthetic_cell("unshared", 16, 0, 690.0, t0=300)
    merged = sr.merge_docs([{"cells": [new]}, {"cells": [old, other]}])
    assert [c["output_tok_s"] for c in merged["cells"]] == [720.0, 690.0]
    assert merged["replaced"] == [{"id": old["id"], "t_start_epoch": 100, "output_tok_s": 700.0,
                                   "server_flags": sv.SERVER_FLAGS}]
    assert old["id"] == "14b|77g|2k2k|shared|65536|sweep|conc16|r0"
    page1 = synthetic_cell("shared", 16, 0, 600.0, t0=50)  # the same cell with other flags: kept beside, since a
    page1["server_flags"] = "+engine.extra_args.attention_backend=triton"  # variant added to them compares with it
    merged = sr.merge_docs([merged, {"cells": [page1]}])
    assert [c["output_tok_s"] for c in merged["cells"]] == [600.0, 720.0, 690.0] and len(merged["replaced"]) == 1


def test_feasibility_reports_what_the_unshared_setup_did():
    cells = [synthetic_cell("shared", p, r, 100.0 * p, ttft=0.4 if p <= 32 else 4.0) for r in range(3)
             for p in (8, 16, 32, 48)]
    for c in cells:
        c.update(model="24b")
        c["id"] = sr.cell_id(c)
    failed = {**start("unshared", 65536, None), "model": "24b",
              "error": "RuntimeError: unshared-65536-decode did not come up:\n... CUDA out of memory ..."}
    res = sr.build_results({"cells": cells, "starts": [failed, {**start("shared", 65536, 200000), "model": "24b"}],
                            "environments": []})
    assert res["feasibility_24b_shared_concurrency_at_slo"] == 32
    assert res["feasibility_24b_unshared"].startswith("could not start: RuntimeError: unshared-65536-decode did not") \
        and res["feasibility_24b_unshared"].endswith("CUDA out of memory ...")
    failed["error"] = ("RuntimeError: unshared-4096-decode did not come up: torch.OutOfMemoryError: CUDA out of "
                       "memory. Tried to allocate 640.00 MiB.\n[2026-12-06 22:57:58] Received sigquit")
    res = sr.build_results({"cells": cells, "starts": [failed, {**start("shared", 65536, 200000), "model": "24b"}],
                            "environments": []})
    assert res["feasibility_24b_unshared"] == ("could not start: RuntimeError: unshared-4096-decode did not come up: "
                                               "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 640.00 "
                                               "MiB.")  # what it died of, not its log's last lines


# ---------------------------------------------------------------- goodput

def trial(rate: float, capacity: float, window=(15.0, 85.0)) -> list[list]:
    """Synthetic latency records of a Poisson run: below capacity every request is served at once; above it the
    queue grows and each request waits (rate - capacity) x its arrival time more than the one before."""
    n = int(rate * (window[1] - window[0]))
    out = []
    for k in range(n):
        sent = window[0] + k / rate
        wait = max(0.0, (rate - capacity) / capacity * (sent - window[0]))
        out.append([sent, 1000, 100, 100, 0.3 + wait, 0.04, sent + wait + 5, None])
    return out


def test_goodput_search_converges_below_capacity():
    capacity, verdicts, tried = 2.0, {}, []
    while (rate := sm.next_rate(verdicts, hi0=3.0, rel_tol=0.05)) is not None:
        tried.append(rate)
        verdicts[rate] = sm.passes([sm.attainment(trial(rate, capacity), 15, 85, 85, 3.0, 0.06)])
        assert len(tried) < 20
    g = sm.goodput(verdicts)
    assert tried[0] == 3.0 and not verdicts[3.0]
    assert 1.9 <= g <= 2.2 and not any(ok for r, ok in verdicts.items() if r > g + 1e-9)


def test_goodput_grows_while_everything_passes_and_takes_the_pass_below_the_lowest_fail():
    assert sm.next_rate({}, 2.0) == 2.0 and sm.next_rate({}, 2.0, max_rate=1.5) == 1.5
    assert sm.next_rate({2.0: True}, 2.0) == 3.0
    assert sm.next_rate({2.0: True, 3.0: True, 4.5: True, 6.75: True}, 2.0) == 8.0  # capped at 4 x hi0
    assert sm.next_rate({8.0: True}, 2.0) is None
    assert sm.goodput({1.0: True, 2.0: False, 3.0: True}) == 1.0  # a pass above a fail does not count
    assert sm.goodput({1.0: False}) is None
    assert sm.passes([(99, 100)]) and not sm.passes([(98, 100)]) and not sm.passes([(0, 0)])
    assert sm.passes([(50, 50), (48, 50)], need=0.97) and not sm.passes([(50, 50), (48, 50)])


# ---------------------------------------------------------------- SGLang's log lines

def test_log_lines_parse_as_sglang_wrote_them():
    d = sm.parse_batch_line(DECODE_LINE)
    assert d["kind"] == "decode" and d["running_req"] == 3 and d["transfer_req"] == 13 and d["token"] == 123041
    assert d["token_usage"] == 0.46 and d["pre_allocated_usage"] == 0.37 and d["gen_throughput_token_s"] == 153.58
    assert d["cuda_graph"] is True and d["queue_req"] == 0
    assert d["t"] == time.mktime((2026, 11, 28, 18, 52, 50, 0, 0, -1))
    p = sm.parse_batch_line(PREFILL_LINE)
    assert p["kind"] == "prefill" and p["inflight_req"] == 2 and p["queue_req"] == 27 and p["new_token"] == 8192
    assert p["input_throughput_token_s"] == 14700.47 and p["bootstrap_req"] == 0
    c = sm.parse_batch_line(COLOCATED_LINE)
    assert c["running_req"] == 1 and "transfer_req" not in c
    assert sm.parse_batch_line("[2026-11-28 18:51:57] INFO:     127.0.0.1:51394 - \"GET /health HTTP/1.1\" 200") is None
    assert sm.parse_batch_line("[2026-11-28 18:52:50 TP0] " + DECODE_LINE.split("] ", 1)[1])["running_req"] == 3


def test_batch_stats_of_a_committed_run_match_its_recorded_peaks():
    decode = sm.batch_lines(committed_log("pd-nvlink-shared.tgz", "shared-2.log"))
    prefill = sm.batch_lines(committed_log("pd-nvlink-shared.tgz", "shared-1.log"))
    recorded = json.loads((RESULTS / "h200-sglang-serving-nvlink.json").read_text())["setups"]["shared"]["runs"]
    t0, t1 = min(x["t"] for x in decode), max(x["t"] for x in decode) + 1
    st = sm.batch_stats(decode + prefill, t0, t1)
    assert st["decode_running_max"] == max(r["server_log_peaks"]["shared-2"]["running"] for r in recorded) == 24
    assert st["decode_in_transfer_max"] == max(r["server_log_peaks"]["shared-2"]["in_transfer"] for r in recorded)
    assert st["decode_lines"] == sum(1 for x in decode if x["kind"] == "decode") and st["prefill_lines"] > 50
    assert 0 < st["decode_running_mean"] < 24 and st["prefill_inflight_max"] >= 1 and st["prefill_pool_use_max"] < 1
    half = sm.batch_stats(decode, t0, (t0 + t1) / 2)
    assert 0 < half["decode_lines"] < st["decode_lines"]


# ---------------------------------------------------------------- pd_bound

def test_pd_bound_band_on_the_committed_one_batch_results():
    steps = pb.step_times(RESULTS / "h200-sglang-one-batch-triton.jsonl", 7680)
    pools = {"shared": 266904, "unshared": 142405}  # h200-sglang-serving-nvlink.json's decode pools
    assert pb.admitted(pools["shared"], pb.per_request_tokens("full", 7680, 512)) == 32
    assert pb.admitted(pools["unshared"], pb.per_request_tokens("sglang", 7680, 512)) == 16  # 7680 + 256 + 512
    assert pb.admitted(pools["unshared"], 8192, held=1.2) == 15
    no_held = pb.band({"one-batch": steps}, pools, 7680, 512, {"shared": [0], "unshared": [0]})
    ratios = [v["setups"]["shared"]["tok_s"] / v["setups"]["unshared"]["tok_s"] for v in no_held["variants"]]
    assert ratios == pytest.approx([942.7 / 819.3, 938.1 / 804.4], abs=2e-3)  # integer admission: 32/17, 31/16
    held = pb.band({"one-batch": steps}, pools, 7680, 512, {"shared": [0, 2], "unshared": [0, 2]})
    assert held["ratio"]["low"] == pytest.approx(942.7 / 819.3, abs=2e-3) and held["ratio"]["high"] > 1.18
    s = held["setups"]["shared"]
    assert s["low_tok_s"] < s["high_tok_s"] == 942.7


def test_pd_bound_from_the_served_logs_of_the_committed_run():
    a = argparse.Namespace(
        one_batch=RESULTS / "h200-sglang-one-batch-triton.jsonl", serving=RESULTS / "h200-sglang-serving-nvlink.json",
        workload="long-8k", group=None, one_batch_input=0, pools="", guard_s=2.0, reserve=512, decode_log=[],
        prefill_log=[], concurrency=0)
    base = pb.bound(a)
    assert base["legacy_saturated_ceiling_ratio"] == 1.149  # the first version's number, reproduced
    tmp = {}
    for setup in ("shared", "unshared"):
        for i, role in ((1, "prefill"), (2, "decode")):
            tmp[(setup, role)] = committed_log(f"pd-nvlink-{setup}.tgz", f"{setup}-{i}.log")
    served = pb.served_steps([tmp[("shared", "decode")], tmp[("unshared", "decode")]],
                             [tmp[("shared", "prefill")], tmp[("unshared", "prefill")]])
    assert len(served) >= 4 and served[max(served)] > served[min(served)]  # steps grow with the batch
    assert pb.step_at(served, 16) < base["decode_step_s"]["one-batch"][16]  # without prefill beside: faster
    assert pb.mean_in_transfer(tmp[("unshared", "decode")]) > 0
    sources = {"one-batch": pb.step_times(a.one_batch, 7680), "served": {0: base["prefill_one_request_s"], **served}}
    b = pb.band(sources, base["pools"], 7680, 512, {"shared": [0, 16.2], "unshared": [0, 5.3]})
    assert 1.0 < b["ratio"]["low"] < 1.149 < b["ratio"]["high"] < 1.2
    assert len(b["variants"]) == 2 * 2 * 2


def test_theil_sen_ignores_an_outlier():
    pts = [(b, 0.008 + 0.0003 * b) for b in range(1, 20)] + [(5, 1.0)]
    a, c = pb.theil_sen(pts)
    assert a == pytest.approx(0.008, abs=1e-6) and c == pytest.approx(0.0003, abs=1e-7)


# ---------------------------------------------------------------- the load generator against a streaming server

class StreamServer:
    """/generate as SGLang streams it: chunked server-sent events with cumulative meta_info.completion_tokens,
    one token every `step` seconds; a prompt over `max_input` ids gets a 400. Writes SGLang-style `Decode batch`
    lines with the number of running streams to `log` every 0.1 s."""

    def __init__(self, log: Path, step: float = 0.004, max_input: int = 1500) -> None:
        self.port, self.step, self.max_input, self.log = free_port(), step, max_input, log
        self.running = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.ready.wait(5)
        self.stop_log = threading.Event()
        log.touch()  # there from the start: a reader may look before the first line is written
        threading.Thread(target=self._write_log, daemon=True).start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    def _write_log(self) -> None:
        with open(self.log, "a") as f:
            while not self.stop_log.wait(0.1):
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                f.write(f"[{stamp}] Decode batch, #running-req: {self.running}, #token: 0, token usage: 0.10, "
                        f"pre-allocated usage: 0.00, #prealloc-req: 0, #transfer-req: 1, #retracted-req: 0, "
                        f"cuda graph: True, gen throughput (token/s): 100.00, #queue-req: 0\n")
                f.flush()

    async def _handle(self, reader, writer) -> None:
        length, streaming = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = json.loads(await reader.readexactly(length))
        try:
            if len(body["input_ids"]) > self.max_input:
                msg = b'{"error": {"message": "too long"}}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.running, streaming = self.running + 1, True
            for n in range(1, body["sampling_params"]["max_new_tokens"] + 1):
                await asyncio.sleep(self.step)
                event = b'data: {"text": "x\\"completion_tokens\\": 999", "output_ids": [5], ' \
                        b'"meta_info": {"id": "a", "completion_tokens": %d}}\n\n' % n
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.running -= 1 if streaming else 0
            writer.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self.stop_log.set()
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def stream_server(tmp_path):
    server = StreamServer(tmp_path / "decode.log")
    yield server
    server.close()


def test_closed_loop_keeps_the_concurrency_and_cuts_at_the_end(stream_server):
    specs = sm.request_specs(3, 200, 40, 0.5, 5000)
    t0 = time.perf_counter()
    reqs = asyncio.run(sl.closed_loop("127.0.0.1", stream_server.port, specs, 4, 1.0, t0))
    assert 1.0 <= time.perf_counter() - t0 < 1.5
    done = [r for r in reqs if r.end is not None]
    cut = [r for r in reqs if r.end is None]
    assert 1 <= len(cut) <= 4 and all(r.error is None for r in reqs)  # at most one running per client at the end
    assert all(r.chunks[-1][1] == r.output_len for r in done) and len(done) >= 8
    assert [r.chunks[i][1] for r in done[:1] for i in range(3)] == [1, 2, 3]  # the escaped text did not fool it
    assert sm.window_tokens(reqs, 0.15, 0.85) > 0


def test_open_loop_arrivals_drain_and_errors(stream_server):
    specs = sm.request_specs(5, 200, 20, 0.5, 5000)
    t0 = time.perf_counter()
    reqs, stopped = asyncio.run(sl.open_loop("127.0.0.1", stream_server.port, specs, 20.0, 1.0, t0, seed=1,
                                             drain_s=5, lo=0.15, ttft_slo=3.0, allowed_misses=5))
    assert not stopped and 8 <= len(reqs) <= 40 and all(r.end is not None and not r.error for r in reqs)
    gaps = [b.sent - a.sent for a, b in zip(reqs, reqs[1:])]
    assert max(gaps) > 2 * min(gaps)  # exponential, not even, spacing
    long = sm.request_specs(5, 4000, 20, 1.0, 5000)  # over the server's limit: every request refused
    reqs, stopped = asyncio.run(sl.open_loop("127.0.0.1", stream_server.port, long, 50.0, 1.0, time.perf_counter(),
                                             seed=1, drain_s=5, lo=0.0, ttft_slo=3.0, allowed_misses=2))
    assert stopped and 3 <= len(reqs) < 20 and all("HTTP 400" in r.error for r in reqs if r.error)


@pytest.mark.slow
def test_measure_fills_a_cell_from_the_load_and_the_server_log(stream_server, tmp_path):
    args = argparse.Namespace(tag="8b", free_gib=0.0, workload_name="tiny", inp=100, outp=30, range_ratio=0.5,
                              setup="shared", seed=2, control_point=2, trim=0.15, ttft_slo_s=3.0, itl_slo_ms=60.0,
                              window_s=1.4, vocab=5000, slo_share=0.99, drain_s=5, settle_timeout=0.6,
                              variant_name=None, variant_overrides=None, server_flags=sv.SERVER_FLAGS,
                              prefill_mem=ss.PREFILL_MEM, decode_mem=ss.DECODE_MEM, colocated_mem=ss.COLOCATED_MEM)
    fake = argparse.Namespace(port=stream_server.port, log=stream_server.log, name="decode", role="decode")
    deadline = time.monotonic() + 30
    while len(stream_server.log.read_text().splitlines()) < 3:  # a few log lines before the load
        assert time.monotonic() < deadline, "the stream server wrote no log lines"
        time.sleep(0.02)
    cell = ss.measure(ss.cell_base(args, 4096, "sweep", "concurrency", 3, 0), fake, [fake], args)
    assert cell["id"] == "8b|0g|tiny|shared|4096|sweep|conc3|r0" and cell["duration_s"] >= 2.0
    assert cell["window_s"] == pytest.approx([0.3, 1.7]) and cell["output_tok_s"] > 100
    assert cell["requests_failed"] == 0 and cell["attainment"][0] == cell["attainment"][1] > 0
    assert cell["ttft_ms_p99"] < 1000 and 3 <= cell["itl_ms_p50"] < 60
    stats = cell["server_stats"]["decode"]
    assert stats["decode_lines"] >= 5 and stats["decode_in_transfer_mean"] == 1 and stats["decode_running_max"] >= 1
    assert len(cell["requests"][0]) == len(sm.REQUEST_FIELDS)
    res = sr.build_results({"cells": [cell], "starts": [], "environments": []})
    assert res["groups"]["8b/card/tiny"]["setups"]["shared"]["sweeps"]["4096"][0]["repeats"] == 1


class FakeServer:
    """Stands where a launch.py server would, pointing at the streaming server."""

    def __init__(self, role: str, stream: StreamServer) -> None:
        self.role, self.name, self.port, self.log, self.ready_s = role, f"fake-{role}", stream.port, stream.log, 1.0
        self.proc = argparse.Namespace(poll=lambda: None, pid=0)

    def info(self) -> dict:
        return {"kv_pool_tokens": 5000 if self.role == "decode" else 2000, "max_running_requests": 64,
                "memory_usage_gb": 1.0}

    def stop(self) -> None:
        pass


@pytest.mark.slow
def test_one_call_runs_a_sweep_then_a_goodput_search_and_skips_what_is_done(stream_server, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 5000, "max_position_embeddings": 4096}))

    flags = []

    def fake_start(setup, split, args, cache_dir, work, servers):
        flags.append(args.server_flags)
        roles = ("plain",) if setup == "colocated" else ("prefill", "decode", "router")
        servers += [FakeServer(r, stream_server) for r in roles]
        return [{"ranks": [{"weight_bytes_allocated": 0}]}, {"ranks": [{"weight_bytes_allocated": 0}]}]

    monkeypatch.setattr(ss, "start_setup", fake_start)
    monkeypatch.setattr(ss, "greedy_probe", lambda port: [7, 7, 7])
    monkeypatch.setattr(ss, "server_gpu_mib", lambda server, used: 0)
    out = tmp_path / "out"
    base = ["run", "--model", str(model), "--tag", "8b", "--setup", "shared", "--out", str(out), "--splits", "4096",
            "--workload", "tiny=100:20", "--window-s", "0.35", "--settle-timeout", "0.1", "--commit", "abc"]

    def call(*extra):
        monkeypatch.setattr(sys, "argv", ["sglang_serving.py", *base, *extra])
        ss.main()

    call("--points", "2", "--control-point", "1", "--repeats", "2")
    results = json.loads((out / "gpu-serving-v2.json").read_text())
    assert [c["id"].split("|", 6)[-1] for c in results["cells"]] == \
        ["conc1|r0", "conc2|r0", "conc1|r1", "conc2|r1"]  # repeat by repeat over the points
    assert results["starts"][0]["decode_pool_tokens"] == 5000 and results["starts"][0]["probe_tokens"] == [7, 7, 7]
    assert all(c["commit"] == "abc" and c["start_id"] == results["starts"][0]["id"] for c in results["cells"])
    call("--points", "2", "--control-point", "1", "--repeats", "2", "--results", str(out / "gpu-serving-v2.json"))
    again = json.loads((out / "gpu-serving-v2.json").read_text())
    assert len(again["cells"]) == 4 and len(again["starts"]) == 1  # nothing left: no server started
    call("--phase", "goodput", "--rate-max", "40", "--results", str(out / "gpu-serving-v2.json"))
    final = json.loads((out / "gpu-serving-v2.json").read_text())
    rates = [c["point"] for c in final["cells"] if c["phase"] == "goodput"]
    best = sum(c["output_tok_s"] for c in final["cells"] if c["point"] == 2 and c["phase"] == "sweep") / 2
    assert rates == [round(best / 15, 3), 40.0]  # from the sweep's saturated requests/s (mean output 15), up
    g = final["groups"]["8b/card/tiny"]["setups"]["shared"]["goodput"]["4096"]
    assert g["goodput_req_s"] == 40.0 and not g["bracketed"]  # every rate passed, up to --rate-max
    call("--points", "2", "--repeats", "3", "--budget-s", "0.1", "--results", str(out / "gpu-serving-v2.json"))
    assert len(json.loads((out / "gpu-serving-v2.json").read_text())["cells"]) == len(final["cells"])
    other = sv.SERVER_FLAGS + " +engine.extra_args.enable_metrics=true"  # other flags: the cells are measured again
    call("--points", "2", "--control-point", "1", "--repeats", "1", "--server-flags", other,
         "--results", str(out / "gpu-serving-v2.json"))
    again = json.loads((out / "gpu-serving-v2.json").read_text())
    remeasured = {c["id"] for c in again["cells"] if c["server_flags"] == other}
    assert remeasured == {"8b|0g|tiny|shared|4096|sweep|conc1|r0", "8b|0g|tiny|shared|4096|sweep|conc2|r0"}
    assert len(again["cells"]) == len(final["cells"]) + 2 and not again.get("replaced")  # the older flags' stay
    assert "6 cells run with older server flags or memory fractions left out (they stay in the file)" in \
        again["groups"]["8b/card/tiny"]["deviations"]  # the 4 sweep and 2 goodput cells of the first flags
    final = again
    # a start with no room for a cell after it (120 s expected by default, 30 s kept for the files) is not made
    call("--points", "2", "--repeats", "4", "--wall-s", "100", "--results", str(out / "gpu-serving-v2.json"))
    assert len(json.loads((out / "gpu-serving-v2.json").read_text())["starts"]) == len(final["starts"])
    call("--points", "2", "--repeats", "4", "--wall-s", "100", "--start-s", "5",
         "--results", str(out / "gpu-serving-v2.json"))
    assert len(json.loads((out / "gpu-serving-v2.json").read_text())["starts"]) == len(final["starts"]) + 1
    call("--points", "2", "--control-point", "1", "--repeats", "1", "--page-size", "16", "--server-flags", PAGE1,
         "--results", str(out / "gpu-serving-v2.json"))
    paged = json.loads((out / "gpu-serving-v2.json").read_text())
    assert flags[-1].endswith(" +engine.extra_args.page_size=16") and "page_size=16" not in flags[0]
    assert {c["id"] for c in paged["cells"] if c["variant"] == "page16"} == \
        {"8b|0g|tiny@page16|shared|4096|sweep|conc1|r0", "8b|0g|tiny@page16|shared|4096|sweep|conc2|r0"}
    assert paged["starts"][-1]["workloads"] == ["tiny@page16"] and "8b/card/tiny@page16" in paged["groups"]
    threads = "+engine.env.SGLANG_DISAGGREGATION_THREAD_POOL_SIZE=8 +engine.env.SGLANG_DISAGGREGATION_QUEUE_SIZE=1"
    call("--points", "2", "--control-point", "1", "--repeats", "1", "--variant", f"threads8={threads}",
         "--results", str(out / "gpu-serving-v2.json"))
    assert flags[-1].endswith(threads)
    assert "| 8b/0g/tiny | shared | 4096 | sweep | 2 | threads8 | 1 |" in (out / "gpu-serving-v2.md").read_text()
    call("--setup", "colocated", "--points", "2", "--control-point", "1", "--repeats", "1",
         "--results", str(out / "gpu-serving-v2.json"))  # one plain server, no split
    both = json.loads((out / "gpu-serving-v2.json").read_text())
    colocated = [c["id"] for c in both["cells"] if c["setup"] == "colocated"]
    assert colocated == ["8b|0g|tiny|colocated|-|sweep|conc1|r0", "8b|0g|tiny|colocated|-|sweep|conc2|r0"]
    assert both["starts"][-1]["decode_pool_tokens"] == 2000  # the plain server's pool
    assert both["groups"]["8b/card/tiny"]["headline"]["colocated_saturated_tok_s"] > 0


@pytest.mark.slow
def test_a_sweep_follows_the_tuning_and_setups_take_turns_repeat_by_repeat(stream_server, tmp_path, monkeypatch):
    """One detached run per session measures both setups one after the other: `--splits tuned` takes each setup's
    best split from its tune cells (measured just before in the same run), and `--repeats-per-call 1` stops a
    setup after one repeat of its points so that the other setup's same repeat runs on the same machine."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 5000, "max_position_embeddings": 4096}))
    started = []

    def fake_start(setup, split, args, cache_dir, work, servers):
        started.append((setup, split))
        servers += [FakeServer(r, stream_server) for r in ("prefill", "decode", "router")]
        return [{"ranks": [{"weight_bytes_allocated": 0}]}, {"ranks": [{"weight_bytes_allocated": 0}]}]

    monkeypatch.setattr(ss, "start_setup", fake_start)
    monkeypatch.setattr(ss, "greedy_probe", lambda port: [7])
    monkeypatch.setattr(ss, "server_gpu_mib", lambda server, used: 0)
    out = tmp_path / "out"
    results = out / "gpu-serving-v2.json"

    def call(setup, *extra):
        monkeypatch.setattr(sys, "argv", ["sglang_serving.py", "run", "--model", str(model), "--tag", "8b", "--setup",
                                          setup, "--out", str(out), "--workload", "tiny=100:20", "--window-s", "0.35",
                                          "--settle-timeout", "0.1", "--points", "1,2", "--control-point", "1",
                                          "--results", str(results), *extra])
        ss.main()

    def foreign(setup, split, workload="tiny", flags=sv.SERVER_FLAGS, tag="8b"):
        args = argparse.Namespace(tag=tag, free_gib=0.0, workload_name=workload, inp=100, outp=20, range_ratio=0.5,
                                  setup=setup, seed=1, control_point=1, trim=0.15, ttft_slo_s=3.0, itl_slo_ms=60.0,
                                  variant_name=None, variant_overrides=None, server_flags=flags,
                                  prefill_mem=ss.PREFILL_MEM, decode_mem=ss.DECODE_MEM,
                                  colocated_mem=ss.COLOCATED_MEM)
        c = ss.cell_base(args, split, "tune", "concurrency", 2, 0)
        c.update(output_tok_s=1e6, t_start_epoch=1.0, duration_s=1.0, host="h", requests=[], window_s=[0.15, 0.85],
                 waves=9, server_stats={}, stopped_early=False, ttft_ms_p99=1.0, itl_ms_p99=1.0)
        return c

    out.mkdir()  # tune cells that are not shared's of this model, workload and flags: never its tuned split
    results.write_text(json.dumps({"cells": [foreign("unshared", 1024), foreign("shared", 512, workload="tiny@x"),
                                             foreign("shared", 256, flags="+other=1"), foreign("shared", 128, tag="14b")],
                                   "starts": [], "environments": []}))
    with pytest.raises(SystemExit, match="--splits tuned: no tune cells of shared"):
        call("shared", "--splits", "tuned")
    assert started == []  # refused before any server or ballast
    call("shared", "--phase", "tune", "--splits", "2048,4096")
    tune = {c["split"]: c["output_tok_s"] for c in json.loads(results.read_text())["cells"] if c["split"] > 2000}
    best = max(tune, key=tune.get)
    call("shared", "--splits", "tuned", "--repeats", "3", "--repeats-per-call", "1")
    cells = json.loads(results.read_text())["cells"]
    assert started[-1] == ("shared", best)
    assert [(c["split"], c["point"], c["repeat"]) for c in cells if c["phase"] == "sweep"] == [(best, 1, 0), (best, 2, 0)]
    assert cells[-1]["mem_fraction"] == {"prefill": 0.9, "decode": ss.DECODE_MEM}  # what its servers take
    call("shared", "--splits", "tuned", "--repeats", "3", "--repeats-per-call", "1")
    assert [(c["point"], c["repeat"]) for c in json.loads(results.read_text())["cells"] if c["phase"] == "sweep"] == \
        [(1, 0), (2, 0), (1, 1), (2, 1)]  # the next repeat, whole; then the run would go on to the other setup
    call("shared", "--phase", "tune", "--splits", "tuned", "--decode-mem", "0.88")  # a variant: the method's split
    assert started[-1] == ("shared", best)
    variant = [c for c in json.loads(results.read_text())["cells"] if c.get("variant") == "dmem88"]
    assert [(c["workload"], c["split"], c["mem_fraction"]["decode"]) for c in variant] == [("tiny@dmem88", best, 0.88)]


def test_pd_bound_reads_a_v2_results_file(tmp_path):
    cells = sweep("shared", SHARED) + sweep("unshared", UNSHARED)
    for c in cells:
        c["server_stats"] = {"decode": {"decode_in_transfer_mean": 2.0 if c["setup"] == "shared" else 1.0}}
    res = sr.build_results({"cells": cells, "starts": [start("shared", 65536, 300000), start("unshared", 65536, 40000)],
                            "environments": []})
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(res))
    a = argparse.Namespace(one_batch=RESULTS / "h200-sglang-one-batch-triton.jsonl", serving=path, workload=None,
                           group="14b/77g/2k2k", one_batch_input=7680, pools="", guard_s=2.0, reserve=512,
                           decode_log=[], prefill_log=[], concurrency=0)
    out = pb.bound(a)
    assert out["pools"] == {"shared": 300000, "unshared": 40000} and out["lengths"] == {"input": 1536, "output": 1536}
    assert out["held_in_transfer"] == {"shared": [0.0, 2.0], "unshared": [0.0, 1.0]}
    assert out["setups"]["shared"]["served_tok_s"] == pytest.approx(1523.0)
    assert out["setups"]["shared"]["served_point"] == 64
    assert out["ratio"]["low"] <= out["ratio"]["high"] and len(out["variants"]) == 4
    assert max(v["setups"]["shared"]["batch"] for v in out["variants"]) > 64  # the pool admits more than 64
    a.concurrency = 64  # ... than a closed-loop point of 64 clients keeps in flight
    capped = pb.bound(a)
    assert max(v["setups"]["shared"]["batch"] for v in capped["variants"]) == 64
    assert capped["setups"]["shared"]["high_tok_s"] < out["setups"]["shared"]["high_tok_s"]
    a.concurrency = 48  # the served numbers are that point's too, not the best point's
    at48 = pb.bound(a)
    assert at48["setups"]["shared"]["served_point"] == 48 and at48["setups"]["shared"]["served_tok_s"] == \
        pytest.approx(1500.0, abs=5) and max(v["setups"]["shared"]["batch"] for v in at48["variants"]) == 48


def test_pd_bound_takes_the_steady_windows_count_of_requests_in_transfer_over_a_whole_log(tmp_path):
    """A whole decode log's saturated lines include the ramp-up, when every request is in transfer at once (62 of
    64 in the committed 14B run): the band takes the served cell's own steady-window mean instead."""
    cells = [synthetic_cell("shared", 64, 0, 2341.7, split=32768, phase="tune"),
             synthetic_cell("unshared", 64, 0, 1368.1, split=16384, phase="tune")]
    for c, held in zip(cells, (0.554, 0.425)):
        c["server_stats"] = {"decode": {"decode_in_transfer_mean": held}}
    res = sr.build_results({"cells": cells, "starts": [start("shared", 32768, 202816),
                                                       start("unshared", 16384, 68736)], "environments": []})
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(res))
    log = tmp_path / "decode.log"
    log.write_text("[2026-12-06 09:10:47] Decode batch, #running-req: 2, #token: 198624, token usage: 0.49, "
                   "pre-allocated usage: 0.47, #prealloc-req: 0, #transfer-req: 62, #retracted-req: 0, cuda graph: "
                   "True, gen throughput (token/s): 2.93, #queue-req: 0\n")
    a = argparse.Namespace(one_batch=RESULTS / "h100-sglang-one-batch-14b-triton.jsonl", serving=path,
                           workload=None, group="14b/77g/2k2k", one_batch_input=1536, pools="", guard_s=2.0,
                           reserve=512, decode_log=[f"shared={log}"], prefill_log=[], concurrency=0)
    out = pb.bound(a)
    assert out["held_in_transfer"] == {"shared": [0.0, 0.554], "unshared": [0.0, 0.425]}
    assert out["setups"]["unshared"]["served_point"] == 64 and out["ratio"]["high"] > 1.5
    cells[1]["server_stats"] = {}  # no steady-window count for one setup: its log's count, the other's own
    path.write_text(json.dumps(sr.build_results({"cells": cells, "starts": [start("shared", 32768, 202816),
                                                 start("unshared", 16384, 68736)], "environments": []})))
    a.decode_log = [f"shared={log}", f"unshared={log}"]
    assert pb.bound(a)["held_in_transfer"] == {"shared": [0.0, 0.554], "unshared": [0.0, 62.0]}


# the last lines of bench/results/h200-serving-v2-logs/serving-logs-24b-*.tgz (unshared-4096-decode.log): the
# 24B unshared decode running out of memory while it built its copy of the weights
OOM_TAIL = """\
  File "/tmp/site/sglang/srt/layers/quantization/unquant.py", line 190, in create_weights
    torch.empty(
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 640.00 MiB. GPU 0 has a total capacity of 139.80 GiB \
of which 186.38 MiB is free.

[2026-12-06 22:57:58] Received sigquit from a child process. It usually means the child failed.
[2026-12-06 22:57:58] kill_process_tree called: parent_pid=1252, include_parent=True, pid=1252
[2026-12-06 22:58:00,387][decode][sharedcache.launch][ERROR] [sharedcache] the SGLang server exited with code -9 \
before it was ready. Its log above says why.
"""


def test_a_failed_server_is_named_with_what_it_died_of():
    assert sv.failure_cause(OOM_TAIL).startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert sv.failure_cause("[2026-12-06 22:57:58] ValueError seen in a log line\nall well") is None
    long = "RuntimeError: decode did not come up: " + "x" * 5000
    assert ss.clip(long).startswith("RuntimeError: decode did not come up: ") and ss.clip(long).endswith("x" * 3000)


def test_a_server_whose_launch_failed_is_not_taken_for_ready(tmp_path):
    """launch.py writes its report when a server fails too (`"ok": false`); a start that read it as ready went on
    to the router and recorded the refused connection of the dead server, not why it died (the 24B run of
    2026-12-06). A real launch.py, refused at once for a model directory that is not there."""
    args = argparse.Namespace(model=tmp_path / "no-model", tag="24b", bootstrap_port=free_port(),
                              server_flags=sv.SERVER_FLAGS, graph_max_bs=0)
    server = sv.Server("decode", "unshared-4096-decode", args, tmp_path / "cache", tmp_path,
                       *sv.role_overrides("unshared", "decode", 4096, argparse.Namespace(
                           transfer_backend="mooncake", mooncake_protocol="", decode_mem=0.94)))
    try:
        with pytest.raises(RuntimeError) as e:
            server.wait_ready(120)
    finally:
        server.stop()
    head = str(e.value).splitlines()[0]
    assert head.startswith("unshared-4096-decode did not come up: ") and "no-model is not a directory" in head
    assert server.ready_s is None and json.loads((tmp_path / "unshared-4096-decode" / "report.json").read_text())[
        "ok"] is False


@pytest.mark.parametrize("setup", ["shared", "unshared", "colocated"])
def test_each_setups_servers_compose_into_the_sglang_commands_meant(setup, tmp_path):
    """The launch.py overrides of every server, composed with the real config and planned as launch.py does."""
    from sharedcache.conf import compose, core_role
    from sharedcache_integrations import launch_checks
    from sharedcache_integrations.sglang import server as sgl

    args = argparse.Namespace(model=tmp_path, tag="14b", bootstrap_port=23456, server_flags=sv.SERVER_FLAGS,
                              graph_max_bs=128, prefill_mem=ss.PREFILL_MEM, decode_mem=ss.DECODE_MEM,
                              colocated_mem=0.85,
                              transfer_backend="mooncake", mooncake_protocol="nvlink_intra")
    roles = ("plain",) if setup == "colocated" else ("prefill", "decode")
    argvs = {}
    for role in roles:
        overrides = sv.launch_overrides(role, args, tmp_path / "cache", 21000, *sv.role_overrides(setup, role, 65536,
                                                                                                    args))
        cfg = compose(overrides)
        launch_checks.check(cfg, overrides)
        plan = sgl.plan_server(cfg, tmp_path, core_role(cfg), tmp_path)
        argv = plan.argv
        argvs[role] = dict(zip(argv, argv[1:]))
        assert argvs[role]["--port"] == "21000" and "--disable-prefill-cuda-graph" in argv
        assert (plan.report_dir is not None) == (setup == "shared")  # the plugin runs in the shared setup only
        if role != "plain":
            assert plan.env.get("MC_INTRANODE_NVLINK") and argvs[role]["--disaggregation-mode"] == role
            assert argvs[role]["--disaggregation-bootstrap-port"] == "23456"
    if setup == "colocated":
        assert argvs["plain"]["--mem-fraction-static"] == "0.85" and "--disaggregation-mode" not in argvs["plain"]
        assert "--max-total-tokens" not in argvs["plain"] and argvs["plain"]["--cuda-graph-max-bs-decode"] == "128"
        return
    assert argvs["prefill"]["--max-total-tokens"] == "65536" and argvs["prefill"]["--mem-fraction-static"] == "0.9"
    assert "--max-total-tokens" not in argvs["decode"] and argvs["decode"]["--mem-fraction-static"] == \
        str(ss.DECODE_MEM) == "0.94"
    args.decode_mem = 0.92  # the variant 'dmem92': its overrides ride in the flags, the role's own value agrees
    args.server_flags += " " + ss._variant(argparse.Namespace(page_size=0, variant="", decode_mem=0.92,
                                                              server_flags=args.server_flags, setup=setup))[1]
    for role, mem in (("prefill", "0.9"), ("decode", "0.92")):
        overrides = sv.launch_overrides(role, args, tmp_path / "cache", 21000, *sv.role_overrides(setup, role, 65536,
                                                                                                    args))
        cfg = compose(overrides)
        launch_checks.check(cfg, overrides)
        argv = sgl.plan_server(cfg, tmp_path, core_role(cfg), tmp_path).argv
        assert argv[argv.index("--mem-fraction-static") + 1] == mem
    router = sv.launch_overrides("router", args, tmp_path / "cache", 0, *sv.transfer_overrides(args),
                                 "engine.port.prefill=21001", "engine.port.decode=21002", "engine.router.port=21003")
    cfg = compose(router)
    launch_checks.check(cfg, router)
    argv = sgl.plan_router(cfg).argv
    assert argv[argv.index("--prefill") + 1:argv.index("--prefill") + 3] == ["http://127.0.0.1:21001", "23456"]
    assert argv[argv.index("--decode") + 1] == "http://127.0.0.1:21002" and "--mini-lb" in argv


@pytest.mark.parametrize("results, logs", [("h100-recovery-ef53968.json", "run-ef53968.tgz"),
                                           ("h100-recovery.json", "run-4b62b7a.tgz")])
def test_the_committed_h100_recovery_results_are_what_their_logs_say(results, logs):
    """bench/results/h100-recovery*.json: the cut run at ef53968 was rebuilt from its own logs
    (bench/sglang_recovery.py --from-logs), the complete run at 4b62b7a wrote its results itself; rebuilding
    either from its committed logs gives the same headline numbers."""
    import sglang_recovery as rec

    committed = json.loads((RESULTS / results).read_text())
    with rec.unpacked(RESULTS / "h100-recovery-logs" / logs) as run_dir:
        raw = {**rec.from_logs(run_dir), "model": committed["model"]}
    env = committed["environment"]
    again = rec.summarize(raw, {k: env[k] for k in ("gpu_name", "driver", "torch", "sglang", "transformers",
                                                   "commit", "date")})
    for key in ("readopt_load_seconds", "readopt_weight_bytes", "decode_failed_requests_during_restart",
                "host_refill_gbps", "safetensors_load_gbps", "card", "commit", "control_ratio"):
        assert again[key] == committed[key], key
    assert again["raw"]["decode_answers"] > 0 and committed["raw"]["decode_answers"] > 0
    assert again["all_adopted"] and again["readopt_weight_bytes"] == 0 and again["refilled"]


def test_the_report_sets_tuning_points_side_by_side_and_names_whose_count_a_weight_is():
    """Before any sweep, the report says where a run stands (labelled: not the method's ratio), and an unshared
    server's weights are SGLang's own count, since sharedcache is off there."""
    cells = [synthetic_cell("shared", 64, 0, 2341.7, split=32768, phase="tune"),
             synthetic_cell("unshared", 64, 0, 1368.1, split=16384, phase="tune")]
    starts = [dict(start("shared", 32768, 202816), servers={
                  "shared-32768-prefill": {"gpu_memory_mib": 34952, "weight_bytes_allocated": 29056040960,
                                           "kv_pool_tokens": 32768, "memory_usage_gb": {"weight": 27.061}}}),
              dict(start("unshared", 16384, 68736), servers={
                  "unshared-16384-decode": {"gpu_memory_mib": 41986, "weight_bytes_allocated": None,
                                            "kv_pool_tokens": 68736, "memory_usage_gb": {"weight": 27.125}}})]
    res = sr.build_results({"cells": cells, "starts": starts, "environments": []})
    assert res["throughput_ratio_14b_2k2k"] is None  # one point is no sweep
    text = sr.render_markdown(res)
    assert "- tuning point 64, shared / unshared at their tuned splits: 1.71 (2341.7 / 1368.1 tok/s, n 1/1; " \
           "not the method's ratio" in text
    assert "prefill 34952 MiB (weights 27.06 GiB, KV pool 32768 tokens)" in text
    assert "decode 41986 MiB (weights 27.12 GiB by SGLang's count, KV pool 68736 tokens)" in text


# ---------------------------------------------------------------- bench/device/detached.sh

def _detached(*args, env=None):
    import os
    import subprocess
    return subprocess.run(["bash", str(REPO / "bench" / "device" / "detached.sh"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "POLL_S": "0.05", **(env or {})})


def test_a_detached_run_outlives_its_starter_and_is_waited_for_by_later_calls(tmp_path):
    """A serving run longer than one device call: started in a session of its own (the device machine ends a
    call's other processes), refused a second time while it goes on, waited for by later calls that get 75 while
    it runs and its own status once it ended."""
    import os
    d = tmp_path / "run"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    started = _detached("start", d, "sh", "-c", f"echo working; read x < {fifo}; echo done > {d}/out.txt; exit 3")
    assert started.returncode == 0, started.stderr
    pid = int((d / "runner.pid").read_text())
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: it survives the call's process group
    again = _detached("start", d, "true")
    assert again.returncode == 1 and "still going" in again.stderr
    assert _detached("wait", d, 0).returncode == 75  # the call's time is up, the run goes on
    assert _detached("going", d).returncode == 0  # what setup.sh and sglang_serving.sh ask before they start
    with open(fifo, "w") as f:  # the run's work ends
        f.write("x\n")
    waited = _detached("wait", d, 60)
    assert waited.returncode == 3 and "ended with status 3" in waited.stdout
    assert (d / "out.txt").read_text() == "done\n" and "working" in (d / "runner.log").read_text()
    assert _detached("going", d).returncode == 1
    assert _detached("start", d, "true").returncode == 0  # the next run may start once the last one ended


def test_a_detached_run_killed_with_the_machine_is_reported_as_such(tmp_path):
    import os
    import signal
    d = tmp_path / "run"
    fifo = tmp_path / "never"
    os.mkfifo(fifo)
    assert _detached("start", d, "sh", "-c", f"read x < {fifo}").returncode == 0
    os.killpg(int((d / "runner.pid").read_text()), signal.SIGKILL)  # as when the machine goes back
    gone = _detached("wait", d, 60)
    assert gone.returncode == 1 and "killed" in gone.stderr
    assert _detached("wait", tmp_path / "none", 5).returncode == 2  # nothing started there
    assert _detached("wait", d, "soon").returncode == 2 and _detached("stop", d).returncode == 2


def test_the_serving_script_hands_back_a_detached_runs_files_while_it_goes_on(tmp_path):
    """`sglang_serving.sh --wait` in a later device call: the run's log, its parts, the merged results and its
    servers' logs come back while it still runs (75), and again with its status once it ended; a second run is
    refused meanwhile (one setup at a time on a host)."""
    import os
    import subprocess
    import tarfile as tf
    w, out = tmp_path / "w", tmp_path / "out"
    (w / "out" / "work-14b-shared").mkdir(parents=True)
    out.mkdir()
    (w / "runner.tag").write_text("14b-shared-sweep\n")
    (w / "runner.card").write_text("h100\n")
    (w / "runner.work").write_text("work-14b-shared work-14b-unshared\n")  # unshared has no folder yet
    for name in ("serving-v2-part-14b-shared-sweep-1.json", "h100-serving-v2.json", "h100-serving-v2.md"):
        (w / "out" / name).write_text("{}")
    (w / "out" / "work-14b-shared" / "shared-65536-decode.log").write_text("Decode batch\n")
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    assert _detached("start", w, "sh", "-c", f"echo cell one; read x < {fifo}; echo cell two").returncode == 0
    home = tmp_path / "home"  # Triton's kernel cache of the servers, handed back for a later session to carry
    (home / ".triton" / "cache" / "abc123").mkdir(parents=True)
    (home / ".triton" / "cache" / "abc123" / "kernel.cubin").write_bytes(b"\x7fELF" + bytes(64))
    (home / ".triton" / "cache" / "tmp.123").mkdir()  # a kernel Triton is still writing
    (home / ".triton" / "cache" / "tmp.123" / "half.cubin").write_bytes(b"\x7fELF")
    # SGLang's kernels built with nvcc through tvm-ffi, one folder each
    jit = home / ".cache" / "tvm-ffi" / "sgl_kernel_jit_kvcache__arch_9.0a__tvmffi_0.1.11"
    jit.mkdir(parents=True)
    (jit / "sgl_kernel_jit_kvcache.so").write_bytes(b"\x7fELF" + bytes(64))
    (jit / "store_cache.cuda.o").write_bytes(bytes(64))  # the build's leftovers stay behind
    env = {**os.environ, "SERVING_DIR": str(w), "OUT": str(out), "POLL_S": "0.05", "HOME": str(home)}

    def script(*args, call_s):
        return subprocess.run(["bash", str(REPO / "bench" / "device" / "sglang_serving.sh"), *args], cwd=REPO,
                              capture_output=True, text=True, env={**env, "CALL_S": str(call_s)})

    going = script("--wait", call_s=20)  # no time left in this call: hand back what there is
    assert going.returncode == 75, going.stdout + going.stderr
    assert sorted(p.name for p in out.iterdir()) == ["h100-serving-v2.json", "h100-serving-v2.md", "jit-cache.tgz",
                                                     "serving-14b-shared-sweep.log", "serving-logs-14b-shared-sweep.tgz",
                                                     "serving-v2-part-14b-shared-sweep-1.json", "triton-cache.tgz"]
    with tf.open(out / "serving-logs-14b-shared-sweep.tgz") as t:
        assert "work-14b-shared/shared-65536-decode.log" in t.getnames()
    with tf.open(out / "triton-cache.tgz") as t:  # setup.sh unpacks it into ~/.triton/cache
        assert "./abc123/kernel.cubin" in t.getnames() and not any("tmp.123" in n for n in t.getnames())
    with tf.open(out / "jit-cache.tgz") as t:  # and this into ~/.cache/tvm-ffi
        assert [n for n in t.getnames() if not t.getmember(n).isdir()] == \
            ["./sgl_kernel_jit_kvcache__arch_9.0a__tvmffi_0.1.11/sgl_kernel_jit_kvcache.so"]
    packed = (w / "triton-cache.tgz").stat().st_mtime_ns
    assert script("--wait", call_s=20).returncode == 75
    assert (w / "triton-cache.tgz").stat().st_mtime_ns == packed  # no kernel since: handed back, not packed again
    (home / ".triton" / "cache" / "def456").mkdir()
    new = home / ".triton" / "cache" / "def456" / "kernel.cubin"
    new.write_bytes(b"\x7fELF" + bytes(64))
    os.utime(new, ns=(packed + 10**9, packed + 10**9))  # compiled after the pack, whatever the clock's grain
    refused = script("--detach", "14b", "unshared", "sweep", call_s=590)
    assert refused.returncode == 1 and "still going" in refused.stderr
    with open(fifo, "w") as f:
        f.write("x\n")
    ended = script("--wait", call_s=80)
    assert ended.returncode == 0 and "cell two" in (out / "serving-14b-shared-sweep.log").read_text()
    with tf.open(out / "triton-cache.tgz") as t:
        assert {"./abc123/kernel.cubin", "./def456/kernel.cubin"} <= set(t.getnames())


def test_a_detached_run_chains_its_legs_each_knowing_the_cells_of_those_before(tmp_path):
    """`--detach A ++ B ++ C`: one session's run measures a tuning and both setups' sweeps one after the other.
    Each leg gets what is left of RUN_S as its wall, and the parts of the legs before it as known cells (so
    `--splits tuned` sees a tuning measured minutes earlier); a failed leg does not stop the next, and the run
    ends with its status. Here `python3` is a stand-in that records its arguments and writes a part, as the
    serving run does; the plumbing around it is the script's own."""
    import os
    import shlex
    import subprocess
    w, bin_ = tmp_path / "w", tmp_path / "bin"
    (w / "out").mkdir(parents=True)
    (w / "old").mkdir()
    bin_.mkdir()
    (w / "runner.card").write_text("h100\n")
    (w / "old" / "serving-v2-part-14b-shared-tune-1.json").write_text("{}")  # a handed-back earlier run
    calls = tmp_path / "calls.txt"
    (bin_ / "python3").write_text(f"""#!/bin/bash
printf '%s\\x1f' "$@" >> {calls}; echo >> {calls}
while [ $# -gt 0 ]; do case $1 in --setup) setup=$2 ;; --phase) phase=$2 ;; esac; shift; done
echo '{{}}' > {w}/out/serving-v2-part-14b-$setup-$phase-$RANDOM.json
read -t 0.01 stdin_line && echo "read from stdin: $stdin_line" >&2  # a leg's stdin is not the legs file
sleep 1.1
[ $setup = unshared ] && [ $phase = tune ] && exit 3
exit 0
""")
    (bin_ / "python3").chmod(0o755)
    legs = [["14b", "unshared", "tune", "--splits", "8192"],
            ["14b", "unshared", "sweep", "--splits", "tuned", "--variant", "x=+a=1 +b=2"],
            ["14b", "shared", "sweep", "--splits", "tuned"]]
    (w / "legs").write_text("".join(shlex.join(leg) + "\n" for leg in legs))
    env = {**os.environ, "SERVING_DIR": str(w), "RUN_S": "900", "COMMIT": "abc",
           "PATH": f"{bin_}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(REPO / "bench" / "device" / "sglang_serving.sh"), "--legs", str(w / "legs")],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 3, run.stdout + run.stderr  # the failed first leg's status, after all three ran
    argv = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]
    assert [(a[a.index("--setup") + 1], a[a.index("--phase") + 1]) for a in argv] == \
        [("unshared", "tune"), ("unshared", "sweep"), ("shared", "sweep")]
    assert argv[1][-4:] == ["--splits", "tuned", "--variant", "x=+a=1 +b=2"]  # words kept whole
    walls = [float(a[a.index("--wall-s") + 1]) for a in argv]
    assert 890 <= walls[0] <= 900 and walls[0] > walls[1] > walls[2]  # what is left of RUN_S, each time
    assert "read from stdin" not in run.stderr
    assert all(a[a.index("--commit") + 1] == "abc" and a[a.index("--model") + 1] == "/tmp/llama14b" for a in argv)

    def known(a):
        return [Path(x).name for x in a[a.index("--results") + 1:a.index("--wall-s")]]

    assert known(argv[0]) == ["h100-serving-v2.json", "latest.json", "serving-v2-part-14b-shared-tune-1.json"]
    assert any(n.startswith("serving-v2-part-14b-unshared-tune-") for n in known(argv[1]))  # the leg before
    assert sum(n.startswith("serving-v2-part-14b-unshared-") for n in known(argv[2])) == 2
    assert run.stdout.count("[serving] leg 14b") == 3
    calls.unlink()
    short = subprocess.run(["bash", str(REPO / "bench" / "device" / "sglang_serving.sh"), "--legs", str(w / "legs")],
                           cwd=REPO, capture_output=True, text=True, env={**env, "RUN_S": "200"})
    assert short.returncode == 0 and short.stdout.count("not started, 200 s of the run's wall left") == 3
    assert not calls.exists()  # no leg without room for a start and a cell


def test_legs_are_checked_before_anything_starts(tmp_path):
    import os
    import subprocess
    env = {**os.environ, "SERVING_DIR": str(tmp_path / "w"), "OUT": str(tmp_path)}

    def script(*args):
        return subprocess.run(["bash", str(REPO / "bench" / "device" / "sglang_serving.sh"), *args], cwd=REPO,
                              capture_output=True, text=True, env=env)

    for args, says in ((["14b", "shared", "sweep", "++", "14b", "unshared", "sweep"], "need --detach"),
                       (["--detach", "14b", "shared", "sweep", "++", "8b", "unshared", "sweep"], "one model per run"),
                       (["--detach", "14b", "shared", "sweep", "++", "14b", "both", "sweep"], "SETUP is"),
                       (["--detach", "14b", "shared", "sweep", "++", "14b", "unshared", "measure"], "PHASE is"),
                       (["--detach", "14b", "shared", "sweep", "++"], "usage")):
        r = script(*args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
    assert not (tmp_path / "w").exists()  # nothing written, nothing started


def test_the_cards_free_memory_is_sampled_while_a_load_runs(tmp_path, monkeypatch):
    """How much of the headroom the KV pools left the servers took, as nvidia-smi samples the card (its lowest
    free memory over the load); a CPU run without nvidia-smi records none instead of failing."""
    import os
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/bash\ntrap '' INT TERM\necho \"$@\" > %s\nfor free in 11559 7349 9559 junk; do "
                    "echo $free; sleep 0.02; done\nwhile :; do sleep 0.1; done\n" % (tmp_path / "args"))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with sv.GpuFreeSampler(period_ms=20, stop_timeout_s=0.3) as gpu:
        deadline = time.monotonic() + 10
        while len(gpu.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert gpu.free_min_mib() == 7349 and gpu.proc.poll() is not None  # stopped with the load, though it hung
    assert (tmp_path / "args").read_text().split()[:3] == ["-i", "3", "--query-gpu=memory.free"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with sv.GpuFreeSampler() as none:
        pass
    assert none.free_min_mib() is None
