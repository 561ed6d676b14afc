"""`sharedcache ls` and `sharedcache inspect KEY`: look at the cache directory."""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import sys
from typing import Any

from . import __version__
from .cache import CacheDir, Entry
from .collect import sweep, sweep_host_copies
from .conf import literal  # cheap: Hydra is imported only to compose
from .errors import ConfigError, ExitCode, ManifestError, SharedCacheError
from .hostcopy import read_host_copy
from .keys import head_key, split_rank_key


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
                          hint="Check the spelling against `python launch.py --cfg job`, or pass --dir.") from None


def printable(text: object) -> str:
    """Text from a cache directory as one safe line: control characters (terminal escape sequences,
    newlines) are shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


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
    records = [r for r in map(_listing, CacheDir(root).entries()) if r is not None]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no entries in {printable(root)}")
        return 0
    header = ("KEY", "MODEL", "BACKEND", "SIZE", "OWNER", "STATE", "MAPPED BY", "CREATED")
    rows = []
    for group, members in _groups(records):
        if group is not None:  # one server's ranks: a line for the server, its ranks indented below
            rows.append(_group_row(group, members))
        rows += [_row(r, indent=group is not None) for r in members]
    for r in _fit([header] + rows, shutil.get_terminal_size((10**4, 24)).columns if sys.stdout.isatty() else 10**4):
        print("  ".join(r).rstrip())
    for r in records:
        if r["error"]:
            print(printable(f"{r['key']}: {r['error']}"))
    return 0


def _row(r: dict[str, Any], *, indent: bool = False) -> tuple[str, ...]:
    return tuple(printable(c) for c in (
        ("  " if indent else "") + r["key"], r["model"] or "?", r["backend"] or "?", _size(r["size_bytes"]),
        r["owner_pid"] or "?", _state(r), _pids(r["mapped_by"]), r["created"] or "?"))


def _state(r: dict[str, Any]) -> str:
    """The state, who hands the arena on where that is not its owner (`served by <pid>`), and whether a host
    copy can refill it (`+host copy`)."""
    server = r["server_pid"]
    state = f"{r['state']} by {server}" if server is not None and server != r["owner_pid"] else r["state"]
    return state + (" +host copy" if r["host_copy_bytes"] and r["state"] != "host copy only" else "")


def _size(size: int | None) -> str:
    return f"{size / 2**20:.1f}MiB" if size is not None else "?"


def _groups(records: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """Entries in listing order, the ranks of one tensor-parallel server gathered under their group."""
    out: list[tuple[str | None, list[dict[str, Any]]]] = []
    index: dict[str, int] = {}
    for r in records:
        group = r["group"]
        if group is None:
            out.append((None, [r]))
        elif group in index:
            out[index[group]][1].append(r)
        else:
            index[group] = len(out)
            out.append((group, [r]))
    return [(g, sorted(m, key=lambda r: (r["part"] or 0, r["tp_rank"] or 0)) if g is not None else m)
            for g, m in out]


def _group_row(group: str, members: list[dict[str, Any]]) -> tuple[str, ...]:
    """The group's line (a TP server's ranks, or the devices of one spread model): how many of its entries
    are published, their total size, one state if they agree."""
    counts = {m["parts"] for m in members if m["parts"]}
    unit = "devices" if counts else "ranks"
    size = counts or {m["tp_size"] for m in members if m["tp_size"]}
    expected = f" of {size.pop()}" if len(size) == 1 and not any(_pipeline_rank(m["key"]) for m in members) else ""
    states = {m["state"] for m in members}
    sizes = [m["size_bytes"] for m in members]
    return tuple(printable(c) for c in (
        f"{group} ({len(members)}{expected} {unit})", _common(m["model"] for m in members),
        _common(m["backend"] for m in members), _size(None if None in sizes else sum(sizes)), "",
        states.pop() if len(states) == 1 else "mixed", "", min((m["created"] or "?") for m in members)))


def _pipeline_rank(key: str) -> bool:
    """A pipeline stage's rank (`<key>-pp<p>-tp<r>`): its group holds more entries than one stage's TP size."""
    rank = split_rank_key(key)
    return rank is not None and rank[1] is not None


def _common(values) -> str:
    distinct = set(values)
    return str(distinct.pop() or "?") if len(distinct) == 1 else "mixed"


def _listing(entry: Entry) -> dict[str, Any] | None:
    """One published entry as `ls` shows it (None: nothing published there); one bad entry never hides the others."""
    record: dict[str, Any] = {"key": entry.key, "model": None, "backend": None, "size_bytes": None, "owner_pid": None,
                              "state": "?", "server_pid": None, "mapped_by": None, "created": None, "error": None,
                              "group": None, "tp_rank": None, "tp_size": None, "part": None, "parts": None,
                              "host_copy_bytes": None}
    try:
        copy = _host_copy(entry)
        record["host_copy_bytes"] = copy.size if copy is not None else None
        if not entry.published():
            return _host_copy_only(record, copy)
        m = entry.read()
        record.update(model=m.fingerprint.model, backend=m.backend, size_bytes=m.arena.size, owner_pid=m.owner.pid,
                      state=entry.state(m).label, mapped_by=entry.mapped_by(m),
                      server_pid=m.server.pid if m.server is not None else None,
                      created=dt.datetime.fromtimestamp(m.created).strftime("%Y-%m-%d %H:%M:%S"),
                      tp_rank=m.fingerprint.tp_rank, tp_size=m.fingerprint.tp_size)
        rank = split_rank_key(entry.key)  # a parallel server's ranks are keyed <key>-[pp<p>-]tp<r>
        if m.part is not None:  # one device's share of a spread model: grouped under part 0's key
            record.update(group=head_key(entry.key, m.part.index), part=m.part.index, parts=m.part.count)
        elif rank and (m.fingerprint.tp_size > 1 or rank[1] is not None):
            record["group"] = rank[0]
    except (SharedCacheError, OSError) as e:
        record.update(state="corrupt" if isinstance(e, ManifestError) else "refused", error=str(e))
    return record


def _host_copy(entry: Entry):
    """The entry's host copy; an unreadable one is not shown (gc removes it), and never hides the entry."""
    try:
        return read_host_copy(entry.dir) if entry.check() else None
    except ManifestError:
        return None


def _host_copy_only(record: dict[str, Any], copy) -> dict[str, Any] | None:
    """An entry with nothing published but a host copy that the key's next owner refills from."""
    if copy is None:
        return None
    m = copy.manifest
    return {**record, "model": m.fingerprint.model, "backend": m.backend, "size_bytes": m.arena.size,
            "state": "host copy only", "created": dt.datetime.fromtimestamp(m.created).strftime("%Y-%m-%d %H:%M:%S")}


def _pids(pids: list[int] | None) -> str:
    return "n/a" if pids is None else (",".join(map(str, pids)) or "-")


def _fit(rows: list[tuple[str, ...]], columns: int) -> list[list[str]]:
    """Pad the columns; on a terminal narrower than the table, shorten the MODEL column from the left
    (a model path's end is what tells two apart)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    excess = sum(widths) + 2 * (len(widths) - 1) - columns
    if excess > 0:
        widths[1] = max(len(rows[0][1]), widths[1] - excess)
    clip = lambda c, w: c if len(c) <= w else "..." + c[len(c) - w + 3:]  # noqa: E731
    return [[clip(c, w).ljust(w) for c, w in zip(r, widths)] for r in rows]


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
        ("mapped by", _pids(entry.mapped_by(m))),
        ("created", dt.datetime.fromtimestamp(m.created).isoformat(timespec="seconds")),
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
            sp.add_argument("--json", action="store_true", help="one JSON record per entry")
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
