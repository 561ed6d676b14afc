"""The main job on the embedded default: a prefill (owner) and a decode (attached) on this machine.

    sharedcache demo [hydra overrides for both, e.g. model=tiny prompt="..."]   (a checkout: python demo.py)

Starts the launcher with role=prefill, waits until it has published, runs it with role=decode,
prints both reports side by side, then stops the prefill with SIGTERM. The cache directory it made
(/dev/shm/sharedcache-demo-*) is removed afterwards; the logs and reports stay under the printed directory.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [  # (label, report key, format)
    ("mode", "mode", str), ("backend", "backend", str), ("tensors", "tensors", str),
    ("weights shared (MiB)", "bytes_shared", lambda b: f"{b / 2**20:.1f}"),
    ("weights this process allocated (MiB)", "weight_bytes_allocated", lambda b: f"{b / 2**20:.1f}"),
    ("normal load (s)", "load_seconds", lambda s: "-" if s is None else f"{s:.3f}"),
    ("phases", "phases", lambda ps: ", ".join(f"{p['name']} {p['seconds'] * 1e3:.1f}ms" for p in ps)),
    ("attach (ms)", "attach_seconds", lambda s: "-" if s is None else f"{s * 1e3:.1f}"),
    ("process start to first token (s)", "process_to_first_token_seconds", lambda s: f"{s:.2f}"),
    ("logits sha256", "logits_sha256", lambda h: h[:16]),
    ("generated tokens", "generated_tokens", lambda t: " ".join(map(str, t))),
    ("generated text", "generated", repr),
]


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(overrides):
        print(__doc__.strip())
        return 0
    work = Path(tempfile.mkdtemp(prefix="sharedcache-demo-"))
    cache = Path(tempfile.mkdtemp(prefix="sharedcache-demo-", dir="/dev/shm"))  # 0700 already
    try:
        return _run(overrides, work, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # the prefill stopped and unpublished: nothing maps it any more


def _run(overrides: list[str], work: Path, cache: Path) -> int:
    from .launch import command, command_env

    common = [f"cache.dir={cache}", *overrides]
    launch, env = command(), command_env()
    print(f"cache dir {cache}; logs and reports under {work}")
    with open(work / "prefill.log", "wb") as log:
        prefill = subprocess.Popen([*launch, "role=prefill", f"hydra.run.dir={work}/prefill", *common],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while not (work / "prefill" / "report.json").exists():
            if prefill.poll() is not None:
                print((work / "prefill.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        if json.loads((work / "prefill" / "report.json").read_text()).get("ok") is False:  # refused, not published
            prefill.wait(60)
            print((work / "prefill.log").read_text(), file=sys.stderr)
            return prefill.returncode or 1
        print(f"prefill (pid {prefill.pid}) published; starting the decode\n")
        decode = subprocess.run([*launch, "role=decode", f"hydra.run.dir={work}/decode", *common], env=env)
        if decode.returncode != 0:
            return decode.returncode
    finally:
        prefill.send_signal(signal.SIGTERM)
        prefill.wait(60)
    pre, dec = (json.loads((work / r / "report.json").read_text()) for r in ("prefill", "decode"))
    width = max(len(r[0]) for r in ROWS)
    column = max(len("prefill (owner)"), *(len(fmt(pre[key])) for _, key, fmt in ROWS))
    print(f"\n{'':{width}}  {'prefill (owner)':<{column}}  decode (attached)")
    for label, key, fmt in ROWS:
        print(f"{label:{width}}  {fmt(pre[key]):<{column}}  {fmt(dec[key])}")
    print(f"\n'process start to first token' counts the interpreter and imports (torch, transformers: seconds on a\n"
          f"CPU), the same for both; what sharing saves is the load: {fmt_load(pre)} to load the prefill's copy,\n"
          f"{fmt_attach(dec)} for the decode to attach to it.")
    same = pre["logits_sha256"] == dec["logits_sha256"] and pre["generated_tokens"] == dec["generated_tokens"]
    print(f"\nparity: {'bit-identical logits and tokens' if same else 'MISMATCH'}")
    return 0 if same else 1


def fmt_load(report: dict) -> str:
    return "-" if report.get("load_seconds") is None else f"{report['load_seconds'] * 1e3:.0f} ms"


def fmt_attach(report: dict) -> str:
    return "-" if report.get("attach_seconds") is None else f"{report['attach_seconds'] * 1e3:.1f} ms"


if __name__ == "__main__":
    sys.exit(main())
