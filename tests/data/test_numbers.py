"""``multichex.numbers.finite_or_none``: JSON-safe floats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from multichex.numbers import finite_or_none


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("-inf")])
def test_not_finite_is_none(value):
    assert finite_or_none(value) is None


@pytest.mark.parametrize("value, expected", [(0, 0.0), (1, 1.0), (-2.5, -2.5), (np.float32(0.5), 0.5), (np.int64(3), 3.0), ("0.25", 0.25)])
def test_finite_is_a_python_float(value, expected):
    result = finite_or_none(value)
    assert type(result) is float and result == expected
