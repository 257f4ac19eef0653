"""Box and mask geometry shared by data loading, augmentation and inference."""

from __future__ import annotations

import logging

import numpy as np
import torch
from skimage.measure import label as label_components
from skimage.measure import regionprops

log = logging.getLogger(__name__)
_warned_dropped: set[str] = set()  # sources already warned about, so a training run warns once per image


def boxes_from_mask(mask: np.ndarray | torch.Tensor, min_area: int = 1) -> torch.Tensor:
    """Return one xyxy box (pixel edges, exclusive max) per connected foreground component.

    A box ``[x1, y1, x2, y2]`` covers pixels ``x1 <= x < x2``, ``y1 <= y < y2`` so every foreground
    pixel of a component lies inside its box. Components smaller than ``min_area`` are dropped.
    """
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    array = np.asarray(array)
    if array.ndim < 2 or any(n != 1 for n in array.shape[:-2]):
        raise ValueError(f"mask must be 2-D (H×W, optionally with leading 1-sized axes), got shape {array.shape}")
    array = array.reshape(array.shape[-2:]) > 0.5
    boxes = [
        [region.bbox[1], region.bbox[0], region.bbox[3], region.bbox[2]]
        for region in regionprops(label_components(array, connectivity=2))
        if region.area >= min_area
    ]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Top-left + size boxes (as in NIH and the shared CSVs) to corner boxes."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int, min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip boxes to the image and return ``(clipped, keep)`` where ``keep`` drops boxes thinner than ``min_size``."""
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    return clipped[keep], keep


def validate_boxes(boxes: torch.Tensor, height: int, width: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reject non-finite or inverted boxes with an error naming the source; clip the rest to the image.

    Returns ``(clipped, keep)``: ``keep`` marks the input boxes that survive clipping, so callers can
    drop the matching labels too. Dropping some (not all) of an image's boxes is a warning, once per source.
    """
    if boxes.numel() and not torch.isfinite(boxes).all():
        raise ValueError(f"{source}: box coordinates are not finite")
    if boxes.numel() and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise ValueError(f"{source}: box with zero or negative size: {boxes.tolist()}")
    clipped, keep = clip_boxes(boxes, height, width)
    if boxes.numel() and not keep.any():
        raise ValueError(f"{source}: every box lies outside the {width}×{height} image")
    dropped = int((~keep).sum())
    if dropped and source not in _warned_dropped:
        _warned_dropped.add(source)
        log.warning("%s: %d of %d boxes lie outside the %d×%d image and are dropped", source, dropped, len(keep), width, height)
    return clipped, keep
