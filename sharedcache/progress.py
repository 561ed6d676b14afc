"""Progress of the slow parts of a run (waiting for an owner, packing the arena), as events.

The core never writes to a terminal itself: it calls the instance's progress callback with a
`Progress` event, at most a few times a second. The launcher renders them as one updating line
on stderr (`TerminalProgress`); integrations inside an engine route them to logging (`log_progress`,
the default).
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

log = logging.getLogger("sharedcache.progress")


@dataclass(frozen=True)
class Progress:
    role: str
    text: str  # what is going on, e.g. "waiting for an owner to publish 'k' in /dev/shm/x (...)"
    done: float
    total: float
    unit: str  # "s" (a wait against its timeout) or "GiB"
    final: bool = False  # the step is over: `text` says how it ended

    def line(self) -> str:
        if self.final:
            return f"[{self.role}] {self.text}"
        if self.unit == "s":
            return f"[{self.role}] {self.text} ... {self.done:4.0f}s / {self.total:.0f}s"
        share = 100 * self.done / self.total if self.total else 100.0
        return f"[{self.role}] {self.text}: {share:5.1f}% ({self.done:.2f} / {self.total:.2f} {self.unit})"


ProgressFn = Callable[[Progress], None]


class LogProgress:
    """Log lines for logs that are read later (files, journald, an engine's log): the first event of a step,
    one whenever what it says changes (e.g. an owner started loading), else one every `every` seconds, and
    the step's end."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last = every, {}  # role -> (when its last line was logged, that line's text)

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        last = self.last.pop(event.role, None) if event.final else self.last.get(event.role)
        if event.final or last is None or now - last[0] >= self.every or event.text != last[1]:
            if not event.final:
                self.last[event.role] = (now, event.text)
            log.info("%s", event.line())


log_progress = LogProgress()  # the default


class TerminalProgress:
    """One updating line on a terminal, clipped to its width (a wrapped line would leave a copy behind at every
    update); the line is ended when its step ends, or by `close` before anything else is printed."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream, self.open = stream, False

    def __call__(self, event: Progress) -> None:
        line = fit(event.line(), shutil.get_terminal_size((80, 24)).columns - 1)
        if event.final:
            if self.open:
                self.stream.write(f"\r{line}{ERASE_LINE}\n")
        else:
            self.stream.write(f"\r{line}{ERASE_LINE}")
        self.open = not event.final
        self.stream.flush()

    def close(self) -> None:
        """End an open line (a run stopped mid-step), so that the next message starts on its own line."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


ERASE_LINE = "\x1b[K"  # clears what a longer earlier line left to the right of the cursor


def fit(line: str, width: int) -> str:
    """`line` in at most `width` characters, shortened in the middle: the role at its start and the counter
    at its end are what an operator reads."""
    if len(line) <= width:
        return line
    tail = min(24, width // 3)
    return line[: max(width - tail - 3, 0)] + "..." + line[len(line) - tail:] if width > 6 else line[:max(width, 0)]


class Throttle:
    """Emits a step's events only once it has run `after` seconds, then every `every` seconds and whenever
    what it says changes; `end` emits the final event only if anything was shown."""

    def __init__(self, emit: ProgressFn, role: str, *, after: float, every: float) -> None:
        self.emit, self.role, self.after, self.every = emit, role, after, every
        self.start = time.monotonic()
        self.last: float | None = None
        self.text = ""

    def update(self, text: str, done: float, total: float, unit: str) -> None:
        now = time.monotonic()
        if now - self.start >= self.after and (self.last is None or now - self.last >= self.every
                                               or text != self.text):
            self.last, self.text = now, text
            self.emit(Progress(self.role, text, done, total, unit))

    def end(self, text: str) -> None:
        if self.last is not None:
            self.emit(Progress(self.role, text, 0, 0, "", final=True))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
