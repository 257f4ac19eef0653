"""Helpers shared by the experiment scripts (run them from the repository root; they import this file by path)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], log: Path) -> float:
    """Run a command in the repository root with its output in ``log``; exits on failure; returns wall seconds."""
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode:
        sys.exit(f"command failed ({result.returncode}), see {log}")
    return round(time.monotonic() - started, 1)


def dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]…``, or None where a key is missing (metrics JSON files differ by run)."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def ci_cell(value: dict | float | None) -> str:
    """A metric for a markdown table: ``0.941 [0.914, 0.965]`` from a bootstrap interval, a bare value, or ``–``."""
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    if not value or value.get("value") is None:
        return "–"
    if value.get("low") is None:
        return f"{value['value']:.3f}"
    return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
