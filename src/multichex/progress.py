"""Progress output that suits where it goes: a live tqdm bar on a terminal, a few plain lines elsewhere.

A tqdm bar redraws itself with carriage returns many times a second; written into a log file (``multichex
demo > log``, CI) that is thousands of ``\\r`` updates. When the stream is not a terminal,
:func:`progress_bar` returns a :class:`LineProgress` instead, which writes one plain line every ~10 % of
the work (or none, for callers that write their own summary line).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm

DEFAULT_EVERY = 0.1  # LineProgress: a line each time another tenth of the total is done


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """A tqdm-like counter for non-terminal output: a line ``desc: n/total (p%) [postfix], T s`` each time
    another ``every`` fraction of ``total`` is done, and one at :meth:`close` unless the last line already
    said it all. ``every=None`` writes nothing (the caller reports in its own words).

    Supports what this package uses of tqdm: iteration, :meth:`update`, :meth:`set_postfix`, :meth:`close`.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 unit: str = "it", every: float | None = DEFAULT_EVERY, stream: IO[str] | None = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.every = every
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self._started = time.monotonic()
        self._written_at: int | None = None  # the count the last line reported
        self._next = self._threshold(initial)
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _threshold(self, count: int) -> float:
        """The count at which the next line is due (infinity when lines are off or the total is unknown)."""
        if self.every is None or not self.total:
            return float("inf")
        step = max(1.0, self.every * self.total)
        return (count // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next:
            self._write()
            self._next = self._threshold(self.n)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.every is not None and self._written_at != self.n:
            self._write()

    def line(self) -> str:
        """The text of a progress line now."""
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        unit = "" if self.unit == "it" else f" {self.unit}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = "".join(f", {key}={value}" for key, value in self.postfix.items())
        prefix = f"{self.desc}: " if self.desc else ""
        return f"{prefix}{count}{unit}{percent}{postfix}, {time.monotonic() - self._started:.0f} s"

    def _write(self) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(), file=stream, flush=True)
        self._written_at = self.n


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
                 initial: int = 0, unit: str = "it", leave: bool = True, every: float | None = DEFAULT_EVERY,
                 stream: IO[str] | None = None) -> Any:
    """A progress counter over ``iterable`` (or updated by hand): nothing when not ``enabled``, a tqdm bar
    when ``stream`` (default ``sys.stderr``) is a terminal, else a :class:`LineProgress` writing a line every
    ``every`` of the total (``None``: no lines)."""
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=True)
    if is_terminal(stream):
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, unit=unit, every=every, stream=stream)
