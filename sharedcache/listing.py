"""What `sharedcache ls` shows: one record per entry of a cache directory (the JSON of `ls --json`, a line
each), and the table made of them, a tensor-parallel server's ranks or a spread model's devices gathered under
one line. One bad entry never hides the others: it is listed with its error."""
from __future__ import annotations

import datetime as dt
from typing import Any

from .cache import CacheDir, Entry
from .errors import ManifestError, SharedCacheError
from .hostcopy import read_host_copy
from .keys import head_key, split_rank_key

HEADER = ("KEY", "MODEL", "BACKEND", "SIZE", "OWNER", "STATE", "MAPPED BY", "CREATED")


def printable(text: object) -> str:
    """Text from a cache directory as one safe line: control characters (terminal escape sequences,
    newlines) are shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))



def records(root: CacheDir) -> list[dict[str, Any]]:
    """Every entry with something published or a host copy, in directory order."""
    return [r for r in map(_listing, root.entries()) if r is not None]


def table(found: list[dict[str, Any]], columns: int) -> list[str]:
    """The table's lines fitted to `columns`, then a line for each entry's error."""
    rows = []
    for group, members in _groups(found):
        if group is not None:  # one server's ranks: a line for the server, its ranks indented below
            rows.append(_group_row(group, members))
        rows += [_row(r, indent=group is not None) for r in members]
    lines = ["  ".join(r).rstrip() for r in _fit([HEADER] + rows, columns)]
    return lines + [printable(f"{r['key']}: {r['error']}") for r in found if r["error"]]


def iso_time(timestamp: float) -> str:
    """A manifest's time as ISO 8601 with the local offset (`2026-12-05T22:06:14+00:00`): unambiguous anywhere."""
    return dt.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _when(created: str | None) -> str:
    """The table's CREATED: the local date and time, without the offset."""
    return created[:19].replace("T", " ") if created else "?"


def _row(r: dict[str, Any], *, indent: bool = False) -> tuple[str, ...]:
    return tuple(printable(c) for c in (
        ("  " if indent else "") + r["key"], r["model"] or "?", r["backend"] or "?", _size(r["size_bytes"]),
        r["owner_pid"] or "?", _state(r), pids(r["mapped_by"]), _when(r["created"])))


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
        states.pop() if len(states) == 1 else "mixed", "", _when(min((m["created"] or "?") for m in members))))


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
                      created=iso_time(m.created),
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
            "state": "host copy only", "created": iso_time(m.created)}


def pids(pids: list[int] | None) -> str:
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
