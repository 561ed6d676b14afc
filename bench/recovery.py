"""A prefill's restart after SIGKILL, with a decode attached throughout (issue 23), on one machine:

    python bench/recovery.py --out DIR [--model default] [--backends cpu_shm cpu_memfd] [--repeats 3]

Per backend and repeat, every instance a real `launch.py` process on a fresh cache directory:
  1. prefill A loads the model the normal way and publishes it;
  2. a decode attaches (tests/probe.py) and stays attached;
  3. A is killed with SIGKILL; with cpu_memfd, the time until the decode serves the arena (hand-on);
  4. prefill B starts and takes the arena over (adopted, 0 weight bytes) or, if it could not, loads;
  5. the decode generates: its tokens and logits must equal A's;
  6. B stops (unpublishes); prefill C loads the normal way again: the control, whose load must match A's.
Weight load = the normal load's seconds (A, C) against the adopting run's phases (B); start-to-report =
the whole process, Python and torch start-up included. Writes recovery.json and recovery.md into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Run:
    """One launch.py process and its Hydra run directory."""

    def __init__(self, role: str, overrides: list[str], work: Path, name: str) -> None:
        self.dir, self.t0 = work / name, time.perf_counter()
        self.log = open(work / f"{name}.log", "wb")
        self.popen = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), f"role={role}", *overrides,
                                       f"hydra.run.dir={self.dir}"], cwd=ROOT, stdout=self.log,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def report(self, timeout: float = 600) -> tuple[dict, float]:
        """The run's report.json and the seconds from start to it."""
        path, deadline = self.dir / "report.json", time.monotonic() + timeout
        while not path.exists():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.dir.name} ended ({self.popen.returncode}) without a report: "
                                   f"{Path(self.log.name).read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)
        return json.loads(path.read_text()), time.perf_counter() - self.t0

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        code = self.popen.wait(120)
        self.log.close()
        return code


def _probe(cache: Path, model: str, home: Path) -> subprocess.Popen:
    probe = subprocess.Popen([sys.executable, str(ROOT / "tests" / "probe.py"), "--role", "decode", "--cache-dir",
                              str(cache), "--model", model, "--home", str(home), "--wait-stdin"], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if json.loads(probe.stdout.readline() or "{}") != {"attached": True}:
        raise RuntimeError(f"the decode did not attach: {probe.stderr.read()[-3000:]}")
    return probe


def _hand_on_seconds(entry_dir: Path, pid: int, since: float, timeout: float = 30) -> float | None:
    """Seconds from `since` until the manifest names `pid` as the arena's server (None: never)."""
    from sharedcache.manifest_parse import read_manifest

    while time.perf_counter() - since < timeout:
        try:
            server = read_manifest(entry_dir / "manifest.json").server
        except Exception:  # noqa: BLE001 - mid-rewrite: look again
            server = None
        if server is not None and server.pid == pid:
            return time.perf_counter() - since
        time.sleep(0.002)
    return None


def one_repeat(backend: str, model: str, home: Path, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="sc-recovery-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    os.chmod(cache, 0o700)
    common = [f"model={model}", f"model.embedded.dir={home}/models/{model}", f"cache.dir={cache}",
              f"cache.backend={backend}"]
    try:
        a = Run("prefill", common, work, "a")
        rep_a, wall_a = a.report()
        probe = _probe(cache, model, home)
        try:
            t_kill = time.perf_counter()
            a.stop(signal.SIGKILL)
            entry = cache / rep_a["key"]
            hand_on = _hand_on_seconds(entry, probe.pid, t_kill) if backend == "cpu_memfd" else None
            b = Run("prefill", common, work, "b")
            rep_b, wall_b = b.report()
            out, err = probe.communicate("go\n", timeout=600)
            decode = json.loads(out.strip().splitlines()[-1]) if probe.returncode == 0 else {"error": err[-2000:]}
        finally:
            probe.kill()
        b.stop()
        c = Run("prefill", common, work, "c")
        rep_c, wall_c = c.report()
        c.stop()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"load_seconds_a": rep_a["load_seconds"], "load_seconds_c": rep_c["load_seconds"],
            "adopted": rep_b["adopted"], "adopt_seconds": rep_b["attach_seconds"],
            "adopt_weight_bytes": rep_b["weight_bytes_allocated"], "plain_weight_bytes": rep_a["weight_bytes_allocated"],
            "start_to_report_a": wall_a, "start_to_report_b": wall_b, "start_to_report_c": wall_c,
            "hand_on_seconds": hand_on, "decode_failed": "error" in decode,
            "decode_tokens_equal": decode.get("tokens") == rep_a["generated_tokens"],
            "logits_equal": rep_b["logits_sha256"] == rep_a["logits_sha256"] == decode.get("logits_sha256"),
            "bytes": rep_a["bytes_shared"]}


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> dict:
    load_a, load_c, adopt = _mean(rows, "load_seconds_a"), _mean(rows, "load_seconds_c"), _mean(rows, "adopt_seconds")
    return {"repeats": len(rows), "readopt_load_seconds": adopt, "reload_seconds": load_a,
            "control_ratio": load_a / load_c if load_a and load_c else None,
            "readopt_weight_bytes": max(r["adopt_weight_bytes"] for r in rows),
            "all_adopted": all(r["adopted"] for r in rows),
            "decode_failed_requests_during_restart": sum(r["decode_failed"] for r in rows),
            "tokens_and_logits_equal": all(r["decode_tokens_equal"] and r["logits_equal"] for r in rows),
            "hand_on_seconds": _mean(rows, "hand_on_seconds"),
            "start_to_report_plain": _mean(rows, "start_to_report_a"),
            "start_to_report_adopting": _mean(rows, "start_to_report_b"), "runs": rows}


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "gpu": None, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# A prefill's restart after SIGKILL, a decode attached throughout ({result['model']} model)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}; commit {m['commit']}. Means of "
             f"{result['repeats']} repeats; every instance a `launch.py` process (bench/recovery.py).", "",
             "| backend | normal load (s) | take-over (s) | control load ratio | weight bytes taken over | "
             "hand-on (s) | start to report: load / take-over (s) | decode failures | tokens and logits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["backends"].items():
        hand = f"{r['hand_on_seconds']:.3f}" if r["hand_on_seconds"] is not None else "n/a (file stays)"
        lines.append(f"| {name} | {r['reload_seconds']:.3f} | {r['readopt_load_seconds']:.3f} | "
                     f"{r['control_ratio']:.2f} | {r['readopt_weight_bytes']} | {hand} | "
                     f"{r['start_to_report_plain']:.1f} / {r['start_to_report_adopting']:.1f} | "
                     f"{r['decode_failed_requests_during_restart']} | "
                     f"{'equal' if r['tokens_and_logits_equal'] else 'DIFFER'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="default", help="embedded model config group (tiny, default)")
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("SHAREDCACHE_HOME", "~/.cache/sharedcache")))
    ap.add_argument("--backends", nargs="+", default=["cpu_shm", "cpu_memfd"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    home = a.home.expanduser()
    result = {"model": a.model, "machine": machine(), "repeats": a.repeats, "backends": {}}
    for backend in a.backends:
        rows = []
        for i in range(a.repeats):
            work = Path(tempfile.mkdtemp(prefix=f"recovery-{backend}-{i}-"))
            rows.append(one_repeat(backend, a.model, home, work))
            print(backend, i, json.dumps({k: v for k, v in rows[-1].items() if k != "bytes"}), flush=True)
        result["backends"][backend] = summarize(rows)
    (a.out / "recovery.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "recovery.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
