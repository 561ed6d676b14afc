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

The modules beside this one: serving_method (the statistics and the rules), serving_results (merging, summaries,
tables), serving_load (the load generator), serving_servers (launch.py servers, ballast, the machine); this one
runs a call and is the command line. The method, each rule a function with a test in tests/test_bench_method.py:
- steady state: a load lasts window / (1 - 2 trim) s; throughput, latencies and the server-log statistics come
  from the middle window only (`steady_window`); lengths vary uniformly in [ratio x L, L] (SGLang's random range
  ratio), the same request sequence for every setup (seeded by the repeat);
- sweep: closed loop at each concurrency point, the control point included; tune: one saturated point per
  prefill pool size (`--splits`, SGLang's max_total_tokens for the prefill) to pick each setup's split; goodput:
  open-loop Poisson arrivals, the rate bisected (`next_rate`) until the bracket is within 10 %;
- the summary compares setups over the points both ran (`common_points`; the others are listed, not compared)
  and voids a comparison whose control point reads off 1.00 by more than 3 % in any repeat (`control_verdict`),
  that stops short of two points above the unshared decode pool's limit (`saturation_verdict`), or whose setups
  ran at the same time on one host (`overlapping_cells`); fewer than 3 repeats or a window under 120 s (and
  under 8 waves) are listed as deviations;
- the budget (--budget-s) counts load seconds only, never server start-up; --wall-s stops starting cells that
  the call could not finish.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from serving_load import closed_loop, open_loop
from serving_method import (SETUPS, MethodError, batch_lines, batch_stats, cell_attainment, load_seconds,
                            mean_lengths, next_rate, passes, request_specs, rounded, steady_window, window_latencies,
                            window_tokens)
from serving_results import (HEADLINE, VARIANT_MARK, adopt_variant, at_tune_point, build_results, by_point,
                             card_slug, cell_id, fractions_used, merge_docs, method_settings, one_spelling,
                             render_markdown, setting, tuned_split)
from serving_servers import (SERVER_FLAGS, Ballast, GpuFreeSampler, Server, environment, free_port, greedy_probe,
                             head_commit, plain_tokens, process_gpu_mib, read_from, server_gpu_mib, start_setup,
                             wait_quiet)
from sharedcache.files import write_json_atomic  # noqa: E402  (after serving_servers: the repo on the path)

PHASES = ("sweep", "tune", "goodput")
# The method's mem_fraction_static per server, both setups alike. Cells record their fractions, and one of other
# fractions is another measurement (serving_results.setting; cells from before the record ran with LEGACY_MEM).
PREFILL_MEM = 0.90  # its pool is capped by the split
DECODE_MEM = 0.94  # of what is free once the prefill settled: 0.88 until 2026-12-06, when the 14B tuning showed an
# operator would take the smaller headroom (unshared +10.7 %, 1,644.0 against 1,485.1 tok/s at 64 clients) and the
# servers left 374 MiB (shared) and 1,800 MiB (unshared) of the card free at the least (bench/README.md)
COLOCATED_MEM = 0.88


# ---------------------------------------------------------------- one call: one setup, its splits, its cells

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
        """The cells measured so far with this call's server flags: a cell of other flags is measured again
        (both stay in the file when merged), and neither its verdicts nor its rates steer this call."""
        mine = method_settings(self.args.server_flags, mem_fraction(self.args))  # once, not once per cell
        return [c for c in self.known["cells"] + self.part["cells"] if setting(c) == mine[fractions_used(c["setup"])]]

    def done(self, cid: str) -> bool:
        return any(c["id"] == cid for c in self.cells())

    def no_room(self, seconds: float, startup: float = 0.0) -> str | None:
        """Why a load of `seconds`, after a server start of `startup` seconds, may not start now (the budget counts
        load only; the wall counts everything)."""
        if self.load_used + seconds > self.args.budget_s:
            return f"load budget: {self.load_used:.0f} s used of {self.args.budget_s:.0f} s"
        if time.monotonic() - self.t_start + startup + seconds + 30 > self.args.wall_s:
            return f"wall limit: {time.monotonic() - self.t_start:.0f} s of {self.args.wall_s:.0f} s gone"
        return None

    def save(self) -> Path:
        a = self.args
        out = Path(a.out)
        write_json_atomic(out / a.part_name, self.part, indent=1)
        card = card_slug(next((e["gpu_name"] for e in self.part["environments"] if e.get("gpu_name")), ""))
        path = out / f"{card}-serving-v2.json"
        write_results([self.known, self.part], path, a.repeats)
        return path


def write_results(docs: list[dict], path: Path, need_repeats: int) -> dict:
    """Results and parts merged into one results file and its tables, each file whole or not at all (a detached
    run's files are copied out by another call while it goes on)."""
    results = build_results(merge_docs(docs), need_repeats)
    write_json_atomic(path, results, indent=1)
    md = path.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(render_markdown(results))
    os.replace(tmp, md)
    return results


def mem_fraction(args, setup: str | None = None) -> dict[str, float]:
    """The memory fractions of this call (of those `setup`'s servers take, when given)."""
    mem = {"prefill": args.prefill_mem, "decode": args.decode_mem, "colocated": args.colocated_mem}
    return {k: mem[k] for k in fractions_used(setup)} if setup else mem


def cell_base(args, split, phase: str, load: str, point: float, repeat: int) -> dict:
    c = {"model": args.tag, "free_gib": args.free_gib, "workload": args.workload_name, "input_len": args.inp,
         "output_len": args.outp, "range_ratio": args.range_ratio, "setup": args.setup, "split": split,
         "phase": phase, "load": load, "point": point, "repeat": repeat, "seed": args.seed * 1000 + repeat,
         "control_point": args.control_point, "trim": args.trim, "server_flags": args.server_flags,
         "variant": args.variant_name,
         "variant_overrides": args.variant_overrides,
         "slo": {"ttft_s": args.ttft_slo_s, "itl_s": args.itl_slo_ms / 1000},
         "mem_fraction": mem_fraction(args, args.setup)}
    if args.variant_name:  # the method's fractions it is set beside (a headroom variant changes the decode's)
        c["base_mem_fraction"] = {**c["mem_fraction"], **({"decode": DECODE_MEM} if "decode" in c["mem_fraction"]
                                                         else {})}
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
    with GpuFreeSampler() as gpu:
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
                 "gpu_free_mib_min": gpu.free_min_mib(),
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
        begun: set[int] = set()  # the repeats this call has cells of, at most --repeats-per-call
        for repeat in range(repeats):
            for p in points:
                c = cell_base(a, split, a.phase, "concurrency", p, repeat)
                if call.done(c["id"]):
                    continue
                if repeat not in begun and len(begun) >= (a.repeats_per_call or repeats):
                    return
                begun.add(repeat)
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
                         "sweep (or tune) at that split first, run with this call's server flags: the search starts "
                         "from its saturated throughput")
    best = max(statistics.fmean(reps.values()) for reps in by_point(sweep).values())
    return round(best / mean_lengths(call.args.inp, call.args.outp, call.args.range_ratio)[1], 3)


def clip(error: str, head: int = 1000, tail: int = 3000) -> str:
    """An error as the record keeps it: its first line says what happened, its log's last lines around it."""
    return error if len(error) <= head + tail else f"{error[:head]}\n[...]\n{error[-tail:]}"


def record_start(call: Call, split, servers: list[Server], reports: list[dict], error: str | None) -> dict:
    """What the setup's servers are: memory, KV pools, start-up seconds, weight bytes, greedy probe tokens."""
    a = call.args
    start = {"id": f"{a.tag}|{a.free_gib:g}g|{a.setup}|{split}|{time.time():.0f}", "model": a.tag,
             "free_gib": a.free_gib, "setup": a.setup, "split": split, "workloads": [a.workload_name],
             "server_flags": a.server_flags, "variant": a.variant_name, "variant_overrides": a.variant_overrides,
             "mem_fraction": mem_fraction(a, a.setup), "t_epoch": round(time.time(), 1), "host": socket.gethostname(),
             "error": error, "servers": {}}
    models = [s for s in servers if s.role != "router"]
    if error is None:
        used = process_gpu_mib()
        for s, rep in zip(models, reports):
            rank = (rep.get("ranks") or [{}])[0]
            start["servers"][s.name] = {
                "role": s.role, "start_to_ready_s": rounded(s.ready_s, 1), "gpu_memory_mib": server_gpu_mib(s, used),
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


def _cell_seconds(a: argparse.Namespace) -> float:
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
    if why := call.no_room(_cell_seconds(a), startup=expected):
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
            record_start(call, split, servers, [], clip(f"{type(e).__name__}: {e}"))
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
    a.server_flags = one_spelling(a.server_flags)
    a.variant_name, a.variant_overrides = _variant(a)
    a.base_workload, a.base_flags = a.workload_name, a.server_flags
    if a.variant_name:  # apart from the method's cells, under its own workload name
        a.workload_name += f"{VARIANT_MARK}{a.variant_name}"
        a.server_flags += f" {a.variant_overrides}"
    a.commit = a.commit or os.environ.get("SC_COMMIT") or head_commit()
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
    if a.variant_name and (other := {c.get("variant_overrides") for c in call.known["cells"]
                                     if c.get("variant") == a.variant_name} - {a.variant_overrides}):
        raise SystemExit(f"[bench] variant {a.variant_name!r} was measured with other overrides ({sorted(other)}): "
                         "give this one another name")
    a.splits = resolve_splits(call, a.splits)
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


def resolve_splits(call: Call, splits: list[int] | str) -> list[int]:
    """`--splits tuned`: this setup's best split by its tune cells of this call's model, free memory, workload and
    server flags (what the report calls its tuned split), so that a sweep follows a tuning that ran just before
    it in the same detached run."""
    a = call.args
    if splits != "tuned" or a.setup == "colocated":
        return [] if splits == "tuned" else splits
    # a variant runs at the method's tuned split: the tune cells of the method's flags and fractions
    method = method_settings(a.base_flags, {**mem_fraction(a), "decode": DECODE_MEM})[fractions_used(a.setup)]
    mine = [c for c in call.known["cells"] + call.part["cells"] if setting(c) == method and
            (c["model"], c["free_gib"], c["workload"], c["setup"], c["phase"])
            == (a.tag, a.free_gib, a.base_workload, a.setup, "tune")]
    split, how = tuned_split(mine)
    if split is None:
        raise SystemExit(f"[bench] --splits tuned: no tune cells of {a.setup} for {a.tag} / {a.free_gib:g} GiB / "
                         f"{a.base_workload} with the method's server flags and memory fractions; run --phase tune "
                         "first, or give the splits")
    tried = sorted({c["split"] for c in at_tune_point(mine)})
    print(f"[bench] {a.setup}: tuned split {split}, the best of {tried} at its {how}", flush=True)
    return [split]


def cmd_merge(a) -> None:
    """Merge results files and parts into one, the summary computed again."""
    docs = [json.loads(Path(p).read_text()) for p in ([a.into] if Path(a.into).exists() else []) + a.parts]
    _print_headline(write_results(docs, Path(a.into), a.need_repeats))


def cmd_adopt(a) -> None:
    """A variant's cells and starts become the method's, in place, once the method runs what the variant ran."""
    method = method_settings(one_spelling(SERVER_FLAGS),
                             {"prefill": PREFILL_MEM, "decode": DECODE_MEM, "colocated": COLOCATED_MEM})
    doc = json.loads(Path(a.into).read_text())
    try:
        doc, n = adopt_variant(doc, a.variant, method)
    except MethodError as e:
        raise SystemExit(f"[bench] {e}")
    if not n:
        raise SystemExit(f"[bench] no cell of variant {a.variant!r} in {a.into}")
    print(f"[bench] {n} cells of variant {a.variant!r} are the method's now")
    _print_headline(write_results([doc], Path(a.into), a.need_repeats))


def cmd_report(a) -> None:
    stored = json.loads(Path(a.results).read_text())
    results = build_results(stored, a.need_repeats)
    text = render_markdown(results)
    if a.md:
        Path(a.md).write_text(text)
    print(text)
    fresh = json.loads(json.dumps(results))  # as the file would hold it (keys as strings)
    stale = [k for k in (*HEADLINE, "control_ratios", "repeats", "void", "groups") if stored.get(k) != fresh.get(k)]
    if stale:  # the tables come from the code, the file's own summary from the code that wrote it
        print(f"[bench] {a.results}'s summary is older than this code ({', '.join(stale)} differ): write it again "
              f"with `merge --into {a.results} {a.results}`", file=sys.stderr)


def _print_headline(results: dict) -> None:
    keys = (*HEADLINE, "control_ratios", "repeats", "card", "commit", "void")
    print(json.dumps({k: results.get(k) for k in keys}, indent=1))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number, 0 or more, not {text!r}")
    return int(text)


def _splits(text: str) -> list[int] | str:
    return "tuned" if text == "tuned" else _ints(text)


def _variant(a: argparse.Namespace) -> tuple[str | None, str | None]:
    """(name, overrides) of the call's variant, (None, None) for the method's own setup."""
    if sum(map(bool, (a.page_size, a.variant, a.decode_mem != DECODE_MEM))) > 1:
        raise SystemExit("[bench] --page-size, --variant and --decode-mem other than the method's "
                         f"{DECODE_MEM} are each a variant: give one of them")
    if a.decode_mem != DECODE_MEM:  # the decode's headroom: launch.py gets it from the role's overrides
        if a.setup == "colocated":
            raise SystemExit("[bench] --decode-mem sizes a PD decode; the colocated server takes --colocated-mem")
        if not (0 < a.decode_mem < 1) or round(a.decode_mem * 100, 6) != round(a.decode_mem * 100):
            raise SystemExit(f"[bench] --decode-mem is a whole percent between 0 and 1 (e.g. 0.94), not "
                             f"{a.decode_mem}: the variant is named by it")
        return f"dmem{round(a.decode_mem * 100)}", f"engine.mem_fraction_static.decode={a.decode_mem:g}"
    if a.page_size:
        return f"page{a.page_size}", _overrides(f"+engine.extra_args.page_size={a.page_size}", a.server_flags)
    if not a.variant:
        return None, None
    name, _, overrides = a.variant.partition("=")
    if not re.fullmatch(r"[a-z0-9_]+", name) or not overrides.strip():
        raise SystemExit(f"[bench] --variant is NAME=OVERRIDES (NAME of a-z, 0-9, _), not {a.variant!r}")
    return name, _overrides(overrides, a.server_flags)


def _overrides(text: str, server_flags: str) -> str:
    """A variant's overrides as launch.py will get them (split at spaces): each one `+key=value` with no quote or
    space in it, and no key that the server flags already set (Hydra would refuse to add it again, at start)."""
    tokens = text.split()
    bad = [t for t in tokens if not re.fullmatch(r"\+{1,2}[\w.]+=[^'\"\s]*", t)]
    if bad:
        raise SystemExit(f"[bench] a variant's overrides are +key=value with no quotes or spaces: {bad}")
    keys = {t.lstrip("+").partition("=")[0] for t in server_flags.split()}
    if again := [t for t in tokens if t.lstrip("+").partition("=")[0] in keys]:
        raise SystemExit(f"[bench] the server flags set {again} already: change them there (--server-flags), not "
                         "in a variant")
    return " ".join(tokens)


def _workload(text: str) -> tuple[str, tuple[int, int]]:
    name, _, lens = text.partition("=")
    inp, _, outp = lens.partition(":")
    if not (name and inp.isdigit() and outp.isdigit()):
        raise argparse.ArgumentTypeError(f"a workload is NAME=INPUT:OUTPUT (e.g. 2k2k=2048:2048), not {text!r}")
    if VARIANT_MARK in name:
        raise argparse.ArgumentTypeError(f"'{VARIANT_MARK}' in a workload's name marks a variant's: run one with "
                                         f"--variant or --page-size instead of naming it {name!r}")
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
    r.add_argument("--splits", type=_splits, default=[65536], help="prefill KV pools to run, tokens "
                   "(max_total_tokens); 'tuned': the setup's best by its tune cells")
    r.add_argument("--points", type=_ints, default=[8, 16, 32, 48, 64], help="closed-loop concurrencies")
    r.add_argument("--control-point", type=int, default=8, help="below capacity in every setup; 0: none")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--repeats-per-call", type=_count, default=0, help="sweep/tune: at each split, measure cells of "
                   "at most this many repeats (the lowest unfinished first), so that setups run one after the other "
                   "take turns repeat by repeat; 0: all")
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
    r.add_argument("--prefill-mem", type=float, default=PREFILL_MEM,
                   help="prefill mem_fraction_static (its pool is capped by the split)")
    r.add_argument("--decode-mem", type=float, default=DECODE_MEM, help="decode: of what is free once the prefill "
                   "settled (the rest is both servers' headroom); another value is the variant 'dmem<percent>'")
    r.add_argument("--colocated-mem", type=float, default=COLOCATED_MEM)
    r.add_argument("--transfer-backend", default="mooncake")
    r.add_argument("--mooncake-protocol", default="nvlink_intra", help="'' for Mooncake's default (RDMA)")
    r.add_argument("--graph-max-bs", type=int, default=128, help="largest decode batch captured (0: SGLang's)")
    r.add_argument("--server-flags", default=SERVER_FLAGS, help="launch.py overrides for every server")
    r.add_argument("--variant", default="", metavar="NAME=OVERRIDES",
                   help="a variant of the setup: launch.py overrides added to every server (e.g. 'layers8=+engine.env."
                        "SGLANG_DISAGGREGATION_THREAD_POOL_SIZE=8'); its cells and starts go under '<workload>@NAME', "
                        "apart from the method's, and the report sets them beside the default's")
    r.add_argument("--page-size", type=int, default=0,
                   help="SGLang's --page-size on every server, as the variant 'page<N>' (0: none); the method's "
                        "--server-flags set one already: give flags without it")
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
    d = sub.add_parser("adopt", help="a variant's cells become the method's (after the method changed to it)")
    d.add_argument("--into", required=True)
    d.add_argument("variant")
    d.add_argument("--need-repeats", type=int, default=3)
    d.set_defaults(func=cmd_adopt)
    p = sub.add_parser("report", help="print (or write) the tables of a results file, from its cells (the file "
                       "itself is not written: `merge --into F F` writes both again)")
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
