"""One progress reporter for every long command (drive push, restore, gc, fsck, scrub,
drive wait); docs/status.md, "Progress".

Three modes, chosen once per report from where progress goes (stderr):

- **terminal** (stderr is a TTY): a tqdm bar with count, rate and ETA, redrawn in place;
- **plain** (stderr is a pipe or a file: cron, a log, CI): one line at a time,
  ``"gc: 1,234/5,000 chunks (25%), 812 chunks/s, ETA 0:00:04"``, printed once the work
  has run :data:`PLAIN_FIRST_S` seconds (a quick run prints nothing) and then every
  :data:`PLAIN_EVERY_S` seconds or at each further :data:`PLAIN_STEP_PCT` % of the total,
  whichever comes first, and a last ``"... done in 0:00:07"`` line if any was printed;
- **off** (``json_mode``: the command's ``--json``): nothing at all, so stdout stays one
  JSON document and stderr stays empty.

Usage (``p`` is also a ``Callable[[int], None]``, the shape of the ``progress``
parameter of the cas/ functions)::

    with progress("drive push", total=queued_bytes, unit="B", json_mode=as_json) as p:
        tier.drain(on_pack=p)            # p(n): n more bytes done
        p.set_total(new_total)           # a total learnt (or grown) on the way

Units: ``"B"`` counts bytes (shown in KiB/MiB/GiB); any other unit counts items
(``"chunks"``, ``"packs"``, ``"files"``). A total of None or 0 means "unknown": the bar
and the lines then show the count and rate without a percentage or an ETA.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

from tools.cli.common import human

PLAIN_FIRST_S = 2.0   # seconds of work before the first plain line
PLAIN_EVERY_S = 2.0   # seconds between plain lines at most
PLAIN_STEP_PCT = 10   # percent of the total between plain lines at most


def _clock(seconds: float) -> str:
    """A duration as H:MM:SS."""
    s = int(max(seconds, 0.0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """A running report; see the module docstring. Call it (or :meth:`update`) with the
    amount just done, in its unit. Not thread-safe: report from one thread."""

    def __init__(self, desc: str, total: int | None, unit: str, mode: str, stream: TextIO) -> None:
        self.desc = desc
        self.unit = unit
        self.mode = mode               # "bar", "plain" or "off"
        self.stream = stream
        self.total = total or 0
        self.done = 0
        self.start = time.monotonic()
        self._last_line = 0.0          # time.monotonic() of the last plain line (0: none yet)
        self._last_step = -1           # the last step of PLAIN_STEP_PCT % reported
        self._bar: tqdm[Any] | None = None
        if mode == "bar":
            is_bytes = unit == "B"
            self._bar = tqdm(total=total or None, desc=desc, unit=unit if is_bytes else f" {unit}",
                             unit_scale=is_bytes,
                             unit_divisor=1024 if is_bytes else 1000, file=stream, leave=True,
                             dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.update(n)

    def update(self, n: int = 1) -> None:
        """``n`` more units done (bytes or items). Past the total, the total grows with
        the count (work queued meanwhile)."""
        if n <= 0:
            return
        self.done += n
        if self.done > self.total > 0:
            self.set_total(self.done)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            self._maybe_line()

    def set_total(self, total: int) -> None:
        """Set the total (units), e.g. once it is known or when it grew."""
        self.total = max(total, self.done)
        if self._bar is not None:
            self._bar.total = self.total or None
            self._bar.refresh()

    def close(self) -> None:
        """End the report: the bar's last state stays on the terminal; in plain mode a
        last line with the elapsed time, if any line was printed."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and self._last_line:
            self._emit(self._text() + f", done in {_clock(time.monotonic() - self.start)}")
            self._last_line = 0.0

    # -- plain lines ---------------------------------------------------------------
    def _maybe_line(self) -> None:
        now = time.monotonic()
        if now - self.start < PLAIN_FIRST_S:
            return
        step = self.done * 100 // self.total // PLAIN_STEP_PCT if self.total else -1
        if self._last_line and now - self._last_line < PLAIN_EVERY_S and step <= self._last_step:
            return
        self._last_line = now
        self._last_step = step
        text = self._text()
        rate = self.done / max(now - self.start, 1e-9)
        text += f", {self._amount(rate)}/s"
        if self.total and rate > 0:
            text += f", ETA {_clock((self.total - self.done) / rate)}"
        self._emit(text)

    def _amount(self, n: float) -> str:
        return human(n, 1) if self.unit == "B" else f"{n:,.0f} {self.unit}"

    def _text(self) -> str:
        if self.unit == "B":
            text = f"{self.desc}: {human(self.done, 1)}"
            if self.total:
                text += f"/{human(self.total, 1)}"
        else:
            text = f"{self.desc}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            text += f" ({100.0 * self.done / self.total:.0f}%)"
        return text

    def _emit(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):   # a closed or broken stderr must not stop the work
            self.mode = "off"


def mode_for(stream: TextIO, json_mode: bool) -> str:
    """The report mode for progress written to ``stream``: "off" with ``json_mode``, "bar"
    on a terminal, "plain" otherwise."""
    if json_mode:
        return "off"
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


@contextmanager
def progress(desc: str, total: int | None = None, unit: str = "B", json_mode: bool = False,
             stream: TextIO | None = None) -> Iterator[Progress]:
    """A :class:`Progress` named ``desc`` (the command, e.g. ``"drive push"``) counting
    ``unit`` (``"B"`` for bytes, else an item name) towards ``total`` (None: unknown),
    written to ``stream`` (default: stderr; stdout keeps the command's result). Closed
    at exit, also when the work raises."""
    out = stream if stream is not None else sys.stderr
    p = Progress(desc, total, unit, mode_for(out, json_mode), out)
    try:
        yield p
    finally:
        p.close()
