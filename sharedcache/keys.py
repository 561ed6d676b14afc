"""The formats of derived entry keys, each defined once here.

- A model spread over several devices: part 0 under the user's key, part i under `<key>-part<i>`
  (`part_key`, and `head_key` its inverse).
- The ranks of one parallel server: `<key>-tp<r>`, or `<key>-pp<p>-tp<r>` with pipeline parallelism. The
  SGLang plugin keys each rank's entry and names its report files with `rank_key` (exported through
  `sharedcache.kit`); `sharedcache ls` gathers a server's entries with `split_rank_key`."""
from __future__ import annotations

import re


def part_key(key: str, index: int) -> str:
    """The entry key of part `index` of the model published under `key`."""
    return key if index == 0 else f"{key}-part{index}"


def head_key(key: str, index: int) -> str:
    """The key the model is published under, from the key of its part `index` (part_key's inverse)."""
    return key.removesuffix(f"-part{index}") if index else key


_RANK_SUFFIX = re.compile(r"-(?:pp([0-9]+)-)?tp([0-9]+)\Z")


def rank_suffix(*, tp_rank: int, pp_rank: int | None = None) -> str:
    """`tp<r>`, or `pp<p>-tp<r>` when the server runs pipeline stages (`pp_rank` given): how a rank is
    named in keys, report files and messages."""
    tp = f"tp{tp_rank}"
    return tp if pp_rank is None else f"pp{pp_rank}-{tp}"


def rank_key(base: str, *, tp_rank: int, pp_rank: int | None = None) -> str:
    """The key of one rank's entry of the server keyed `base`: `<base>-tp<r>` or `<base>-pp<p>-tp<r>`."""
    return f"{base}-{rank_suffix(tp_rank=tp_rank, pp_rank=pp_rank)}"


def split_rank_key(key: str) -> tuple[str, int | None, int] | None:
    """`rank_key`'s inverse: (base, pp_rank or None, tp_rank), or None for a key without a rank suffix."""
    found = _RANK_SUFFIX.search(key)
    if found is None:
        return None
    pp = found.group(1)
    return key[:found.start()], None if pp is None else int(pp), int(found.group(2))
