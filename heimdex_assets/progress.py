"""Progress of long work, on stderr (so that ``--json`` keeps stdout clean): partitions done / total,
scenes/s and the time left. On a terminal one line is redrawn (``\\r``) at most five times a second;
elsewhere (CI logs, pipes) a plain line is written every 10 s or every 10 % of the work."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


def duration(seconds: float) -> str:
    """``seconds`` as 42s, 3m05s or 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(
    done: int,
    total: int,
    elapsed_s: float,
    *,
    failed: int = 0,
    scenes: int | None = None,
    scenes_total: int | None = None,
    label: str = "",
) -> str:
    """One progress line: bar, share, partitions done (failed ones included) / total, scenes/s and the ETA
    (from the smaller of the shares of scenes and of partitions done), or the time taken once done."""
    share = done / total if total else 1.0
    filled = min(BAR_WIDTH, int(BAR_WIDTH * share))
    parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:4.0%}  {done}/{total} partitions"]
    if failed:
        parts.append(f"{failed} failed")
    measured = elapsed_s >= 1 or (done >= total and elapsed_s > 0)  # no rate from a few milliseconds
    if scenes is not None and measured:
        rate = scenes / elapsed_s
        parts.append(f"{rate:.1f} scenes/s" if rate < 10 else f"{rate:.0f} scenes/s")
    # The share of the work done: by scenes, unless the partitions left hold none (owner assets after videos).
    work = min(share, scenes / scenes_total) if scenes is not None and scenes_total else share
    if done >= total:
        parts.append(f"done in {duration(elapsed_s)}")
    elif work > 0 and measured:
        parts.append(f"ETA {duration(elapsed_s * (1 - work) / work)}")
    else:
        parts.append("ETA ?")
    return ", ".join(parts) + (f"  {label}" if label else "")


class ProgressBar:
    """A progress line for ``total`` partitions (``update`` may raise the total as it becomes known)."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        scenes_total: int | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        redraw_s: float = 0.2,
        plain_every_s: float = 10.0,
    ) -> None:
        self.total, self.label, self.scenes_total = total, label, scenes_total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock, self.redraw_s, self.plain_every_s = clock, redraw_s, plain_every_s
        self.started = clock()
        self.done, self.failed, self.scenes = 0, 0, None if scenes_total is None else 0
        self._last_at: float | None = None
        self._last_tenth = -1
        self._last_line = ""
        self._drawn: tuple | None = None

    def update(self, done: int, *, failed: int = 0, scenes: int | None = None, total: int | None = None) -> None:
        self.done, self.failed, self.total = done, failed, max(total or 0, self.total)
        self.scenes = scenes if scenes is not None else self.scenes
        now, tenth = self.clock(), int(10 * done / self.total) if self.total else 10
        if self._last_at is not None and done < self.total:
            since = now - self._last_at
            if since < (self.redraw_s if self.tty else self.plain_every_s) and (self.tty or tenth == self._last_tenth):
                return
        self._draw(now, tenth)

    def close(self) -> None:
        """Draw the last state (if not drawn yet) and end the line."""
        if self._drawn != self._state():
            self._draw(self.clock(), self._last_tenth)
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()

    def _state(self) -> tuple:
        return self.done, self.failed, self.scenes, self.total

    def _line(self, now: float) -> str:
        return render(
            self.done,
            self.total,
            now - self.started,
            failed=self.failed,
            scenes=self.scenes,
            scenes_total=self.scenes_total,
            label=self.label,
        )

    def _draw(self, now: float, tenth: int) -> None:
        line = self._line(now)
        if self.tty:  # pad over what a longer previous line left on screen
            self.stream.write("\r" + line + " " * max(0, len(self._last_line) - len(line)))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_at, self._last_tenth, self._last_line, self._drawn = now, tenth, line, self._state()
