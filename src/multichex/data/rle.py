"""Run-length codes of binary masks as published by SIIM-ACR (and, in absolute form, by Kaggle).

SIIM-ACR's ``train-rle.csv`` walks the mask **column-major** (down each column, then right) and
stores pairs ``start length`` where each start is an offset **relative to the end of the previous
run**; ``-1`` means an empty mask. numpy has no such codec and the format is two loops, so it is here.
"""

from __future__ import annotations

import numpy as np

EMPTY = "-1"


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}×{width}")


def decode_rle(code: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """Decode one run-length string to a ``height×width`` bool mask (``-1`` or blank → empty).

    Raises ValueError naming the problem when runs overrun the image or the code is malformed.
    """
    _check_size(height, width)
    flat = np.zeros(height * width, dtype=bool)
    code = (code or "").strip()
    if code in ("", EMPTY):
        return flat.reshape(width, height).T
    try:
        numbers = np.array([int(token) for token in code.split()], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"run-length code is not a list of integers: {code[:60]!r}") from error
    if len(numbers) % 2:
        raise ValueError(f"run-length code has an odd number of values ({len(numbers)})")
    position = 0
    for start, length in numbers.reshape(-1, 2):
        if start < 0 or length < 0:
            raise ValueError(f"negative start or length in run-length code: {start} {length}")
        begin = position + start if relative else start
        end = begin + length
        if end > flat.size:
            raise ValueError(f"run-length code overruns a {height}×{width} mask (run ends at {end} > {flat.size})")
        flat[begin:end] = True
        position = end
    return flat.reshape(width, height).T


def encode_rle(mask: np.ndarray, relative: bool = True) -> str:
    """Encode a 2-D mask the way :func:`decode_rle` reads it (``-1`` for an empty mask)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    if len(starts) == 0:
        return EMPTY
    values: list[int] = []
    previous_end = 0
    for start, end in zip(starts, ends):
        values += [int(start - previous_end) if relative else int(start), int(end - start)]
        previous_end = end
    return " ".join(str(v) for v in values)


def merge_rle(codes: list[str], height: int, width: int, relative: bool = True) -> np.ndarray:
    """Union of several rows' codes for one image (SIIM lists one row per pneumothorax region)."""
    mask = np.zeros((height, width), dtype=bool)
    for code in codes:
        mask |= decode_rle(code, height, width, relative)
    return mask
