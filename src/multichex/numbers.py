"""Small numeric conversions shared by every layer (no project imports: safe to use from anywhere)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_or_none"]


def finite_or_none(x: Any) -> float | None:
    """``x`` as a Python float, or ``None`` when it is None, NaN or ±inf (JSON has no such numbers)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None
