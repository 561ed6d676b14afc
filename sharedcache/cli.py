"""`sharedcache ls` and `sharedcache inspect KEY`: look at the cache directory."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from typing import Any

from . import __version__
from . import listing
from .cache import CacheDir
from .collect import sweep, sweep_host_copies
from .conf import literal  # cheap: Hydra is imported only to compose
from .errors import ConfigError, ExitCode, SharedCacheError
from .listing import printable


def _cache_dir(args: argparse.Namespace) -> str:
    if args.dir is not None:
        if not args.dir:
            raise ConfigError("--dir is empty.", hint="Give the cache directory, or leave --dir out for cache.dir.")
        return args.dir
    from .conf import compose
    try:
        return compose(args.overrides)["cache"]["dir"]
    except Exception as e:  # noqa: BLE001 - Hydra's errors for bad overrides: one line, not its traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the overrides {args.overrides} do not compose: {first}",
                          hint="Check the spelling against `sharedcache launch --cfg job`, or pass --dir.") from None


# The launcher and the demo live with the integrations (they load models through transformers or SGLang);
# the CLI starts them by module name in this Python, so the core imports none of them.
LAUNCHER = "sharedcache_integrations.launch"
DEMO = "sharedcache_integrations.demo"


def cmd_launch(args: argparse.Namespace) -> int:
    """`sharedcache launch [overrides]`: the launcher (`python launch.py` in a checkout), this process becoming it."""
    os.execv(sys.executable, [sys.executable, "-m", LAUNCHER, *args.overrides])


def cmd_serve(args: argparse.Namespace) -> int:
    """`sharedcache launch role=holder` with the given overrides: the process becomes the holder."""
    extra = [literal("cache.dir", args.dir)] if args.dir else []  # the very directory named, whatever it holds
    os.execv(sys.executable, [sys.executable, "-m", LAUNCHER, "role=holder", *extra, *args.overrides])


def cmd_demo(args: argparse.Namespace) -> int:
    os.execv(sys.executable, [sys.executable, "-m", DEMO, *args.overrides])


def cmd_ls(args: argparse.Namespace) -> int:
    root = _cache_dir(args)
    found = listing.records(CacheDir(root))
    if args.json:  # JSON Lines: one record per entry, a line each
        for r in found:
            print(json.dumps(r))
        return 0
    if not found:
        print(f"no entries in {printable(root)}")
        return 0
    for line in listing.table(found, shutil.get_terminal_size((10**4, 24)).columns if sys.stdout.isatty() else 10**4):
        print(line)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    entry = CacheDir(_cache_dir(args)).entry(args.key)
    m = entry.read()
    if args.json:
        print(json.dumps(m.to_json(), indent=2, sort_keys=True))
        return 0
    out: list[tuple[str, Any]] = [
        ("key", m.key), ("state", entry.state(m).label),
        ("owner", f"pid {m.owner.pid} on {m.owner.host}, uid {m.owner.uid}, boot {m.owner.boot_id[:8]}"),
        *([("served by", f"pid {m.server.pid}, which maps the arena and took over handing it on")]
          if m.server is not None else []),
        ("mapped by", listing.pids(entry.mapped_by(m))),
        ("created", listing.iso_time(m.created)),
        ("backend", f"{m.backend}  handle {m.handle}"), ("device", m.device),
        ("arena", f"{m.arena.size} bytes (granularity {m.arena.granularity}, alignment {m.arena.alignment}), "
                  f"payload {m.payload_bytes} bytes"),
        ("layout digest", m.arena.layout_digest), ("fingerprint", m.fingerprint.digest()),
    ]
    out += [(f"  {k}", v) for k, v in m.fingerprint.to_json().items() if k != "weights"]
    out += [("  weights", f"{name} ({size} bytes)") for name, size, _ in m.fingerprint.weights]
    out.append(("checksums", "yes" if m.checksums else "no"))
    if m.part is not None:
        here = sorted(k for k, v in m.part.placement.items() if v == m.part.index)
        out.append(("part", f"{m.part.index} of {m.part.count} of one model spread over GPUs (save "
                            f"{m.part.group[:8]}); runs {len(here)} of its modules, e.g. {here[:3]}"))
    width = max(len(k) for k, _ in out)
    for k, v in out:
        print(f"{k.ljust(width)}  {printable(v)}")
    shown = m.tensors if args.tensors < 0 else m.tensors[: args.tensors]
    print(f"\ntensors ({len(m.tensors)}):")
    print(f"  {'OFFSET':>12}  {'BYTES':>10}  {'DTYPE':<9} {'SHAPE':<16} NAME")
    for t in shown:
        alias = f"  -> {t.alias_of}" if t.alias_of else ""
        kind = "" if t.kind == "param" else (" [buffer]" if t.persistent else " [buffer, non-persistent]")
        print(f"  {t.offset:>12}  {t.nbytes:>10}  {t.dtype:<9} {str(list(t.shape)):<16} {t.name}{kind}{alias}")
    if len(shown) < len(m.tensors):
        print(f"  ... {len(m.tensors) - len(shown)} more (--tensors -1 shows all)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove entries nothing can use (sharedcache.collect says which, and how it keeps out of an owner's
    or an attacher's way); say what went and what stayed, and why."""
    removed = kept = 0
    verb = "would remove" if args.dry_run else "removed"
    cache = CacheDir(_cache_dir(args))
    verdicts = itertools.chain(sweep(cache, dry_run=args.dry_run),
                               sweep_host_copies(cache, every=args.host_copies, dry_run=args.dry_run))
    for verdict in verdicts:
        if verdict.removed:
            removed += 1
            print(printable(f"{verb} {verdict.key}: {verdict.why}"))
            continue
        kept += verdict.listed
        if verdict.why is not None:
            print(printable(f"{verdict.key} kept: {verdict.why}"))
    print(f"gc: {removed} {verb}, {kept} kept" + (" (dry run: nothing was removed)" if args.dry_run else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sharedcache", description="Start instances that share one copy of model weights; inspect and tidy "
                                        "the shared weight cache.",
        epilog="exit codes: 0 ok; 1 unexpected failure; 2 configuration (fix the command or config); 3 retry later "
               "(no owner yet, key owned); 4 integrity (remove the entry, publish again); 5 the system refused "
               "(disk, permissions, driver); 130 interrupted.")
    p.add_argument("--version", action="version", version=f"sharedcache {__version__}")
    sub = p.add_subparsers(dest="cmd")
    for name, help_ in (("launch", "start an instance of a role: sharedcache launch role=prefill|decode "
                                   "[overrides] (--help: roles, modes, examples)"),
                        ("demo", "a prefill and a decode side by side on the embedded default model"),
                        ("ls", "list cache entries"), ("inspect", "print one entry's manifest"),
                        ("gc", "remove entries nothing can use"),
                        ("serve", "hold a model's weights for others to attach (launch role=holder)")):
        if name in ("launch", "demo"):  # every argument, --help included, is the launcher's (Hydra's)
            sub.add_parser(name, help=help_, add_help=False).add_argument("overrides", nargs=argparse.REMAINDER)
            continue
        sp = sub.add_parser(name, help=help_)
        if name == "ls":
            sp.add_argument("--json", action="store_true",
                            help="JSON Lines: one JSON record per entry, a line each; times in ISO 8601 with offset")
        if name == "gc":
            sp.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
            sp.add_argument("--host-copies", action="store_true",
                            help="also remove every host copy (cache.host_copy) that no live owner holds")
        if name == "inspect":
            sp.add_argument("key")
            sp.add_argument("--tensors", type=int, default=20, help="how many tensors to list (-1: all)")
            sp.add_argument("--json", action="store_true", help="print the raw manifest")
        sp.add_argument("--dir", help="cache directory (default: cache.dir of the composed conf/)")
        sp.add_argument("overrides", nargs="*", default=[], help="Hydra overrides, e.g. cache=... model=tiny")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("launch", "demo"):  # argparse would take a leading --help for itself
        args = argparse.Namespace(cmd=argv[0], overrides=argv[1:])
    else:
        args = p.parse_args(argv)
    if args.cmd is None:  # bare `sharedcache`: what it can do, not argparse's one-line complaint
        p.print_help()
        return ExitCode.CONFIG
    try:
        return {"ls": cmd_ls, "inspect": cmd_inspect, "gc": cmd_gc, "serve": cmd_serve, "launch": cmd_launch,
                "demo": cmd_demo}[args.cmd](args)
    except SharedCacheError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `sharedcache ls | head`: the reader is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
