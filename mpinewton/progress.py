"""Progress lines for long loops (data conversion), without dependencies.

``Progress(total, "import")`` with ``update(n)`` after every block prints, at
most once per ``min_interval`` seconds and once at the end::

    import: 12,345/50,000 rows (24%) 3.1 s, eta 9.6 s

On a terminal the line is redrawn in place (carriage return); otherwise (a log file, a
batch job) every printed update is a line of its own, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Rate-limited progress of ``total`` items (rows, images) on ``stream``.

    ``update(n)`` adds ``n`` done items; a line is printed when ``min_interval``
    seconds have passed since the last one, and always when the count reaches
    ``total``. ``close()`` ends the line (on a terminal) and prints the final
    count if it was not printed yet. ``enabled=False`` prints nothing (e.g. on
    ranks other than 0, or with ``--quiet``). Usable as a context manager.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        min_interval: float = 1.0,
        *,
        unit: str = "rows",
        enabled: bool = True,
    ) -> None:
        if total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        self.total = int(total)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.min_interval = float(min_interval)
        self.unit = unit
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = self.start
        self._printed_done = -1  # the count shown by the last line
        self._width = 0  # length of the last line on a terminal (to blank it on redraw)
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty()) if callable(isatty) else False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; print a line if it is time (or the end)."""
        self.done += int(n)
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if self.done >= self.total or now - self._last_print >= self.min_interval:
            self._print(now)

    def close(self) -> None:
        """Print the final count (if not shown yet) and end the line on a terminal."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._printed_done != self.done:
            self._print(time.perf_counter())
        if self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The progress line for the current count (without line ending)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (f"{self.label}: {self.done:,d}/{self.total:,d} {self.unit} ({pct:.0f}%) "
                f"{elapsed:.1f} s")
        if self.done >= self.total:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            return text + (f", {rate:,.0f} {self.unit}/s" if rate else "")
        if self.done > 0:
            return text + f", eta {elapsed * (self.total - self.done) / self.done:.1f} s"
        return text + ", eta ?"

    def _print(self, now: float) -> None:
        text = self.line(now)
        if self._tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = now
        self._printed_done = self.done
