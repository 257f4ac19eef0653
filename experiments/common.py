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
