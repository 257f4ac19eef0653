"""What every image decoder shares: :class:`LoadedImage`, :class:`ImageReadError` and the pixel checks and scaling."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_PIXELS",
    "ImageReadError",
    "LoadedImage",
    "check_finite",
    "check_size",
    "finish",
    "luminance",
    "minmax",
    "to_uint8",
]

MAX_PIXELS = 50_000_000
"""Largest width × height accepted; larger declared sizes are refused before decoding."""

_LUMA = np.array([0.299, 0.587, 0.114])


class ImageReadError(ValueError):
    """An image file could not be read; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class LoadedImage:
    """A decoded image: float32 ``H×W`` array in ``[0, 1]`` plus where it came from."""

    array: np.ndarray
    original_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a float array in ``[0, 1]`` to uint8 (NaN → 0, clipped, rounded)."""
    scaled = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def minmax(array: np.ndarray) -> np.ndarray:
    """Min–max scale to float32 ``[0, 1]``; a constant image becomes all zeros."""
    small_int = array.dtype.kind in "uib" and array.dtype.itemsize <= 2
    work = array.astype(np.float32 if small_int else np.float64, copy=False)
    lo, hi = float(work.min()), float(work.max())
    if hi <= lo:
        return np.zeros(work.shape, dtype=np.float32)
    scaled = (work - lo) / (hi - lo)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)


def check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN / inf pixel values."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ImageReadError(str(path), "non-finite pixel values")


def check_size(width: int, height: int, path: Path) -> None:
    """Refuse empty images and images larger than :data:`MAX_PIXELS`."""
    if width <= 0 or height <= 0:
        raise ImageReadError(str(path), f"empty image ({width}×{height} pixels)")
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            str(path),
            f"image too large: {width}×{height} = {width * height} pixels exceeds "
            f"MAX_PIXELS={MAX_PIXELS} (possible decompression bomb)",
        )


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``H×W×3`` (or more channels; extras dropped) array."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


def finish(
    array: np.ndarray,
    path: Path,
    *,
    fmt: str,
    bits: int,
    photometric: str | None,
    spacing: tuple[float, float] | None,
    extra: dict[str, Any] | None = None,
) -> LoadedImage:
    """Wrap a scaled array into a :class:`LoadedImage`."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    meta: dict[str, Any] = {
        "format": fmt,
        "bits_stored": int(bits),
        "photometric": photometric,
        "pixel_spacing": spacing,
        "path": str(path),
    }
    meta.update(extra or {})
    return LoadedImage(array=array, original_size=(array.shape[0], array.shape[1]), meta=meta)
