"""Progress of long loops, on the main process only: a tqdm bar on an interactive terminal; else
(``nohup``, ``| tee``, CI) a log line at a bounded rate with the stage, step / total, images/s and
the time left — so that a run without a terminal still says where it is between stage starts.

The rate is one line per ``SPECIALISTS_PROGRESS_SECONDS`` seconds (default 30), plus one closing
line for a loop that lasted long enough to log any.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger(__name__)

PROGRESS_SECONDS_ENV = "SPECIALISTS_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def log_interval() -> float:
    """Seconds between progress lines (``SPECIALISTS_PROGRESS_SECONDS``; default 30)."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        seconds = DEFAULT_SECONDS
    return seconds if math.isfinite(seconds) and seconds >= 0 else DEFAULT_SECONDS


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (where tqdm draws its bar)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float) -> str:
    """``3725.2`` → ``"1:02:05"``."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogProgress:
    """A progress bar that logs: ``update(n, images=k)``, ``close()``; a line at most every ``interval`` s.

    ``images`` counts what the loop processed (for images/s); the time left is extrapolated from
    the rate of ``update`` units since the bar started. ``clock`` is for tests.
    """

    def __init__(self, total: int | None, *, initial: int = 0, desc: str = "", unit: str = "it",
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.initial = total, initial, initial
        self.desc, self.unit = desc or "progress", unit
        self.interval = log_interval() if interval is None else interval
        self.clock = clock
        self.start = self.last = clock()
        self.images = 0
        self.lines = 0

    def update(self, n: int = 1, *, images: int = 0) -> None:
        self.n += n
        self.images += images
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.lines += 1
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """``"generalist: step 120/500 (24%), 35.2 images/s, ETA 0:01:48"``."""
        elapsed = max(now - self.start, 1e-9)
        done = self.n - self.initial
        parts = [f"{self.desc}: {self.unit} {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)"
                                                         if self.total else "")]
        if self.images:
            parts.append(f"{self.images / elapsed:.1f} images/s")
        else:
            parts.append(f"{done / elapsed:.2f} {self.unit}/s")
        if self.total and done > 0:
            parts.append(f"ETA {duration((self.total - self.n) * elapsed / done)}")
        return ", ".join(parts)

    def close(self) -> None:
        """A closing line, for loops that logged at least one line before."""
        if self.lines:
            now = self.clock()
            rate = f", {self.images / max(now - self.start, 1e-9):.1f} images/s" if self.images else ""
            of = f"/{self.total}" if self.total else ""
            log.info("%s: done, %s %d%s in %s%s", self.desc, self.unit, self.n, of, duration(now - self.start), rate)
            self.lines = 0


class _Bar:
    """tqdm with the same ``update(n, images=…)`` as :class:`LogProgress` (tqdm shows its own rate)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def update(self, n: int = 1, *, images: int = 0) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, n: int = 1, *, images: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, *, initial: int = 0, main_process: bool = True, desc: str = "",
                 unit: str = "it", **kwargs: Any):
    """A bar advanced by hand (``.update(n, images=k)``, ``.close()``): tqdm on a terminal, log lines
    otherwise, on the main process; silent elsewhere. ``kwargs`` go to tqdm."""
    if not main_process:
        return _Silent()
    if not on_terminal():
        return LogProgress(total, initial=initial, desc=desc, unit=unit)
    kwargs.setdefault("dynamic_ncols", True)
    return _Bar(tqdm(total=total, initial=initial, desc=desc, unit=unit, **kwargs))


def progress(iterable: Iterable[T], *, main_process: bool = True, total: int | None = None, desc: str = "",
             unit: str = "it", count_images: Callable[[T], int] | None = None, **kwargs: Any) -> Iterable[T]:
    """``iterable`` with progress (see :func:`progress_bar`); ``count_images(item)`` gives images/s."""
    if not main_process:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if on_terminal():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
    return _logged(iterable, LogProgress(total, desc=desc, unit=unit), count_images)


def _logged(iterable: Iterable[T], bar: LogProgress, count_images: Callable[[T], int] | None) -> Iterator[T]:
    try:
        for item in iterable:
            yield item
            bar.update(1, images=count_images(item) if count_images is not None else 0)
    finally:
        bar.close()
