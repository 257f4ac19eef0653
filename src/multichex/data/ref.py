"""The record reference: :class:`SampleRef` says where one image lives and which labels its data set gives it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multichex.data.io import ImageReadError, read_image
from multichex.data.rle import merge_rle

__all__ = ["SampleRef", "read_mask"]


@dataclass
class SampleRef:
    """Where one image lives and the labels its data set gives it (absent task = None / missing key)."""

    image_path: Path
    dataset: str
    patient_id: str
    findings: dict[str, float] = field(default_factory=dict)
    positive: float = math.nan
    mask_path: Path | list[Path] | None = None  # several paths are merged (e.g. left + right lung)
    mask_rle: list[str] | None = None  # SIIM-style column-major relative RLE rows, merged; ["-1"] = empty mask
    boxes_xywh: list[tuple[float, float, float, float]] | None = None
    box_names: list[str] | None = None
    mask_box_label: str | None = None
    resample_to: int | None = None  # degrade the image to this longest side before use (see SourceConfig)
    extra: dict[str, Any] = field(default_factory=dict)


def read_mask(ref: SampleRef, height: int, width: int) -> np.ndarray | None:
    """The ref's mask as an ``height×width`` bool array (union of files or RLE rows), or None if it has none."""
    if ref.mask_rle is not None:
        try:
            return merge_rle(ref.mask_rle, height, width)
        except ValueError as error:
            raise ImageReadError(ref.image_path, f"bad run-length mask: {error}") from error
    if ref.mask_path is None:
        return None
    paths = ref.mask_path if isinstance(ref.mask_path, list) else [ref.mask_path]
    merged = np.zeros((height, width), dtype=bool)
    for path in paths:
        array = read_image(path).array
        if array.shape != (height, width):
            raise ImageReadError(path, f"mask size {array.shape} differs from image size {(height, width)}")
        merged |= array > 0.5
    return merged
