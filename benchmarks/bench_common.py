"""Helpers shared by every benchmark script: timing, background-load checks, code fingerprints, result files.

The scripts are run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they import
this module as ``bench_common``. It needs only the standard library (plus ``torch`` / ``multichex`` inside the
functions that describe the machine or fingerprint the code).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CONTENTION_LIMIT = 0.25  # cores used by other processes above which a measurement is redone / flagged


def log(message: str) -> None:
    """Print ``message`` with a wall-clock time stamp, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- timing


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Call ``fn`` once; its result and the wall seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds per call."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[1] for _ in range(repeats)]


def summary(times: Sequence[float], images_per_call: int) -> dict[str, Any]:
    """Repeats, median / min / max seconds per call and images/s from the median."""
    median = statistics.median(times)
    return {
        "repeats": len(times),
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": images_per_call / median,
    }


def latency(times: Sequence[float], images: int) -> dict[str, Any]:
    """p50 / p95 milliseconds per call, images/s from the p50 and the number of calls."""
    return {"p50_ms": 1000 * percentile(times, 50), "p95_ms": 1000 * percentile(times, 95),
            "images_per_s": images / percentile(times, 50), "calls": len(times)}


# --------------------------------------------------------------------------- background load


class CpuMonitor:
    """Measures how many cores *other* processes kept busy between ``start()`` and ``stop()``.

    System-wide busy time comes from ``/proc/stat``; this process's own CPU time from ``os.times()`` (with
    ``include_children``, also that of its waited-for children: DataLoader workers, subprocesses). With only a
    couple of cores a concurrent job can slow a benchmark by an order of magnitude through thread
    oversubscription, so the benchmarks report this number.
    """

    def __init__(self, include_children: bool = False) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = Path("/proc/stat").exists()
        self.include_children = include_children

    def _busy_s(self) -> float:
        """Busy CPU seconds of the whole machine so far."""
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
        return (sum(values) - idle - guest) / self.hz

    def _own_s(self) -> float:
        """CPU seconds of this process (and its waited-for children if asked)."""
        own = os.times()
        children = own.children_user + own.children_system if self.include_children else 0.0
        return own.user + own.system + children

    def start(self) -> None:
        """Begin a measurement window."""
        if self.available:
            self._t0 = (time.perf_counter(), self._busy_s(), self._own_s())

    def stop(self) -> float | None:
        """Average number of cores used by other processes since ``start()`` (None without /proc/stat)."""
        if not self.available:
            return None
        wall0, busy0, own0 = self._t0
        wall = time.perf_counter() - wall0
        foreign = (self._busy_s() - busy0) - (self._own_s() - own0)
        return max(foreign, 0.0) / max(wall, 1e-9)


@dataclass
class Measurement:
    """One call of a measured function: its result, wall seconds and the other processes' load."""

    result: Any
    wall_s: float
    foreign_cores: float | None


def measured(fn: Callable[[], Any], include_children: bool = False) -> Measurement:
    """Run ``fn`` once under a :class:`CpuMonitor`."""
    monitor = CpuMonitor(include_children)
    monitor.start()
    result, wall = timed(fn)
    return Measurement(result, wall, monitor.stop())


def wait_for_idle(max_wait_s: float, limit_cores: float = CONTENTION_LIMIT, window_s: float = 5.0,
                  verbose: bool = True) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes use less than ``limit_cores`` for one window.

    Returns ``waited_s``, ``idle`` (None when not checked) and the last window's ``foreign_cores``.
    """
    monitor = CpuMonitor()
    if not monitor.available or max_wait_s <= 0:
        return {"waited_s": 0.0, "idle": None, "foreign_cores": None}
    started = time.perf_counter()
    while True:
        monitor.start()
        time.sleep(window_s)
        foreign = monitor.stop()
        waited = time.perf_counter() - started
        if foreign is not None and foreign < limit_cores:
            return {"waited_s": waited, "idle": True, "foreign_cores": foreign}
        if waited >= max_wait_s:
            if verbose:
                log(f"machine still busy after {waited:.0f} s (other processes use {foreign:.2f} cores); benchmarking anyway")
            return {"waited_s": waited, "idle": False, "foreign_cores": foreign}
        if verbose:
            log(f"other processes use {foreign:.2f} cores; waiting for an idle machine ({waited:.0f}/{max_wait_s:.0f} s)")


def least_loaded(fn: Callable[[], Any], retries: int, *, name: str | None = None, deadline: float = math.inf,
                 idle_wait_s: float = 60.0, idle_window_s: float = 5.0, wait_first: bool = False,
                 include_children: bool = False, limit_cores: float = CONTENTION_LIMIT) -> tuple[Measurement, list[Measurement]]:
    """:func:`measured` ``fn``; while other processes used more than ``limit_cores``, wait for idle and redo it.

    At most ``retries`` redos, none after ``deadline`` (``time.perf_counter()`` time); ``wait_first`` also waits
    before the first attempt; ``name`` labels log lines (None: silent). Returns the kept attempt (a clean one,
    else the least loaded, ties within 0.1 core going to the earliest) and all attempts.
    """
    attempts: list[Measurement] = []
    for attempt in range(retries + 1):
        if attempt or wait_first:
            wait_for_idle(idle_wait_s, limit_cores, idle_window_s, verbose=name is not None)
        current = measured(fn, include_children)
        attempts.append(current)
        foreign = current.foreign_cores
        if foreign is None or foreign <= limit_cores or attempt >= retries or time.perf_counter() > deadline:
            break
        if name is not None:
            log(f"{name}: other processes used {foreign:.2f} cores during the measurement; waiting for idle and measuring again")
    best = min(attempts, key=lambda m: (m.foreign_cores is not None and m.foreign_cores > limit_cores,
                                        round(m.foreign_cores or 0.0, 1)))
    return best, attempts


def guarded(name: str, fn: Callable[[], dict], retries: int, deadline: float) -> dict:
    """:func:`least_loaded` for a function returning a result row; the kept row gains ``foreign_cores``,
    ``attempts`` and ``foreign_cores_per_attempt``."""
    best, attempts = least_loaded(fn, retries, name=name, deadline=deadline)
    row = best.result
    row["foreign_cores"] = best.foreign_cores
    row["attempts"] = len(attempts)
    row["foreign_cores_per_attempt"] = [m.foreign_cores for m in attempts]
    return row


# --------------------------------------------------------------------------- code fingerprint and machine


def source_fingerprint() -> str:
    """Short SHA-256 over the package's model and loss sources, to tie numbers to the code they measured."""
    import hashlib

    import multichex

    root = Path(multichex.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("models/**/*.py"), *root.glob("losses/**/*.py")]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def recorded_fingerprint(report: dict) -> str | None:
    """The model + loss fingerprint a results JSON was measured with (``speed.json`` keeps it under
    ``machine.model_source_sha256_12``, ``inference.json`` also as ``code``); ``None`` if it has none."""
    machine = report.get("machine")
    recorded = machine.get("model_source_sha256_12") if isinstance(machine, dict) else None
    return recorded or report.get("code") or None


def stale_results_warning(results_file: Path, current: str | None = None) -> str | None:
    """A warning when the results in ``results_file`` were measured on other model/loss code than the
    package's now (``current``, default :func:`source_fingerprint`); ``None`` when the fingerprints match
    or there is no such file yet."""
    path = Path(results_file)
    if not path.is_file():
        return None
    current = source_fingerprint() if current is None else current
    try:
        recorded = recorded_fingerprint(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded == current:
        return None
    if recorded is None:
        return (f"WARNING: {path} records no model + loss source fingerprint, so its numbers cannot be tied to the "
                f"current code ({current}); rerun the full benchmark on an idle machine before quoting them")
    return (f"WARNING: {path} was measured on model + loss code {recorded}, but the code is now {current}: its numbers "
            f"are stale; rerun the full benchmark on an idle machine before quoting them")


def warn_if_stale(results_file: Path, current: str | None = None) -> bool:
    """Print :func:`stale_results_warning` to stderr if there is one; True when the results are stale."""
    message = stale_results_warning(results_file, current)
    if message:
        print(message, file=sys.stderr, flush=True)
    return message is not None


def check_fingerprint(results_file: Path, only_check: bool) -> int | None:
    """Warn if the committed ``results_file`` is stale. With ``only_check`` (``--check-fingerprint``) return
    the exit code (1 stale, 0 current); otherwise None, and the benchmark goes on."""
    stale = warn_if_stale(results_file)
    if not only_check:
        return None
    if not stale:
        log(f"{results_file} matches the model + loss code ({source_fingerprint()})")
    return int(stale)


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, core count, library versions, thread settings, date and the model + loss fingerprint."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "model_source_sha256_12": source_fingerprint(),
    }


# --------------------------------------------------------------------------- result files


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Markdown table lines: the header, the ``|---|`` rule and one line per row (cells as ``str``)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def results_stem(name: str, quick: bool = False) -> str:
    """``name``, or ``name_quick`` for a smoke run (which must not overwrite the committed results)."""
    return f"{name}_quick" if quick else name


def write_results(out_dir: Path, stem: str, report: dict, markdown: str, *, indent: int = 2,
                  default: Callable[[Any], Any] | None = None) -> tuple[Path, Path]:
    """Write ``stem.json`` (``report``, newline-terminated) and ``stem.md`` into ``out_dir``; both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=indent, default=default) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
