"""SIIM-ACR run-length codec: known codes, round trips, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from multichex.data.rle import decode_rle, encode_rle, merge_rle


def test_known_column_major_relative_code():
    mask = np.zeros((5, 4), dtype=bool)
    mask[1:3, 1] = True  # column 1, rows 1–2 → flat index 1*5+1 = 6, length 2
    mask[4, 3] = True  # column 3, row 4 → flat 19; relative to the end of the first run (8) → 11
    assert encode_rle(mask) == "6 2 11 1"
    assert encode_rle(mask, relative=False) == "6 2 19 1"
    assert (decode_rle("6 2 11 1", 5, 4) == mask).all()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("relative", [True, False])
def test_random_masks_round_trip(seed, relative):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 40, size=2)
    mask = rng.random((height, width)) < rng.uniform(0, 0.6)
    assert (decode_rle(encode_rle(mask, relative), height, width, relative) == mask).all()


@pytest.mark.parametrize("code", ["-1", " -1 ", ""])
def test_empty_codes(code):
    assert not decode_rle(code, 6, 7).any()
    assert encode_rle(np.zeros((6, 7))) == "-1"


def test_rows_of_one_image_merge():
    a, b = np.zeros((8, 8), dtype=bool), np.zeros((8, 8), dtype=bool)
    a[0:2, 0:2] = True
    b[5:8, 6] = True
    merged = merge_rle([encode_rle(a), encode_rle(b), "-1"], 8, 8)
    assert (merged == (a | b)).all()


@pytest.mark.parametrize(
    "code, message",
    [("10 5", "overruns"), ("1 2 3", "odd number"), ("1 x", "not a list of integers"), ("-3 2", "negative")],
)
def test_malformed_codes_raise_clearly(code, message):
    with pytest.raises(ValueError, match=message):
        decode_rle(code, 3, 4)
