"""Plain-Python conversions and averages of metric values (so results go straight into JSON)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["mean_all", "mean_defined", "to_float"]


def to_float(x: Any) -> float | None:
    """Convert a scalar tensor / number to a Python float; NaN becomes ``None``."""
    if x is None:
        return None
    value = float(x.item() if isinstance(x, torch.Tensor) else x)
    return None if math.isnan(value) else value


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean over the entries that are not ``None`` (``None`` if there are none)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def mean_all(values: Sequence[float | None]) -> float | None:
    """Mean of every entry; ``None`` if any entry is ``None`` or there are none."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))
