"""Per-image metrics of binary masks: Dice, Jaccard, average and 95th-percentile Hausdorff distance, SSIM."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, compute_average_surface_distance, compute_hausdorff_distance
from skimage.metrics import structural_similarity

from multichex.models.decision import at_or_above

SCORE_KEYS = ("dice", "jaccard", "avg_hausdorff", "hd95", "ssim")  # the keys of segmentation_scores, in order

__all__ = ["SCORE_KEYS", "average_hausdorff_per_image", "dice_per_image", "hausdorff95_per_image", "jaccard_per_image",
           "segmentation_scores", "ssim_per_image"]


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, one value per image, via MONAI's ``DiceMetric``.

    Args:
        pred: binary ``B×1×H×W`` prediction (bool or {0, 1}; a probability map is binarised with
            ``p >= 0.5``, the rule of :func:`~multichex.evaluation.thresholds.at_or_above`).
        target: binary ``B×1×H×W`` ground truth.

    Returns:
        Float tensor ``B``. By definition here Dice = 1 when pred and target are both empty
        (MONAI's default gives NaN there; ``ignore_empty=False`` makes it return 1, and 0 for a
        non-empty prediction on an empty target). Any remaining NaN is mapped to that rule as well.
    """
    pred_b = at_or_above(torch.as_tensor(pred).detach().cpu().float(), 0.5)
    target_b = at_or_above(torch.as_tensor(target).detach().cpu().float(), 0.5)
    if pred_b.shape != target_b.shape:
        raise ValueError(f"pred {tuple(pred_b.shape)} and target {tuple(target_b.shape)} differ in shape")
    if pred_b.ndim == 3:  # B×H×W: add the channel dimension
        pred_b, target_b = pred_b[:, None], target_b[:, None]
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = metric(pred_b.float(), target_b.float()).reshape(-1).float()
    # Safety net for the empty/empty case in case a MONAI version still returns NaN.
    both_empty = (pred_b.flatten(1).sum(1) == 0) & (target_b.flatten(1).sum(1) == 0)
    dice = torch.where(torch.isnan(dice) & both_empty, torch.ones_like(dice), dice)
    return torch.nan_to_num(dice, nan=0.0)


def _binary_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both masks as bool ``B×1×H×W`` on the CPU (``B×H×W`` gets a channel dimension); values ``>= 0.5``
    are foreground."""
    pred_b = at_or_above(torch.as_tensor(pred).detach().cpu().float(), 0.5)
    target_b = at_or_above(torch.as_tensor(target).detach().cpu().float(), 0.5)
    if pred_b.shape != target_b.shape:
        raise ValueError(f"pred {tuple(pred_b.shape)} and target {tuple(target_b.shape)} differ in shape")
    if pred_b.ndim == 3:
        pred_b, target_b = pred_b[:, None], target_b[:, None]
    if pred_b.ndim != 4 or pred_b.shape[1] != 1:
        raise ValueError(f"expected binary masks B×1×H×W or B×H×W, got {tuple(pred_b.shape)}")
    return pred_b, target_b


def jaccard_per_image(pred: torch.Tensor, target: torch.Tensor, dice: torch.Tensor | None = None) -> torch.Tensor:
    """Jaccard index (IoU) per image from Dice, ``J = D / (2 - D)``; 1 when both masks are empty
    (as Dice). Pass ``dice`` from :func:`dice_per_image` to avoid recomputing it."""
    d = dice_per_image(pred, target) if dice is None else torch.as_tensor(dice, dtype=torch.float32)
    return d / (2.0 - d)


def _surface_distance_per_image(pred: torch.Tensor, target: torch.Tensor, compute) -> torch.Tensor:
    """``compute(pred, target)`` (a MONAI surface distance) for the images where both masks have pixels;
    0 where both are empty, NaN where exactly one is (undefined; skipped by ``np.nanmean`` and the summaries)."""
    pred_b, target_b = _binary_pair(pred, target)
    pred_any = pred_b.flatten(1).any(1)
    target_any = target_b.flatten(1).any(1)
    out = torch.full((pred_b.shape[0],), float("nan"))
    out[~pred_any & ~target_any] = 0.0
    both = pred_any & target_any
    if both.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated internal argument
            out[both] = compute(pred_b[both].float(), target_b[both].float()).reshape(-1).float()
    return out


def average_hausdorff_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average Hausdorff distance per image, in pixels: MONAI's symmetric average surface distance.

    The boundary pixels of each mask are found by MONAI (mask minus its erosion); the value is the
    mean of the Euclidean distances from every boundary pixel of one mask to the nearest boundary
    pixel of the other, pooled over both directions. Both masks empty → 0; exactly one empty →
    NaN (undefined; skipped by ``np.nanmean`` and by the summaries).
    """
    return _surface_distance_per_image(
        pred, target, lambda p, t: compute_average_surface_distance(p, t, include_background=True, symmetric=True))


def hausdorff95_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance (HD95) per image, in pixels, via MONAI.

    The 95th percentile of the boundary-to-boundary distances in both directions (robust to a few stray
    pixels, unlike the maximum). Both masks empty → 0; exactly one empty → NaN (undefined, skipped).
    """
    return _surface_distance_per_image(
        pred, target, lambda p, t: compute_hausdorff_distance(p, t, include_background=True, percentile=95))


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity of the predicted and true binary masks per image (scikit-image,
    ``data_range=1``, 7×7 uniform window, or the largest odd window that fits smaller images);
    NaN for images under 3 pixels on a side."""
    pred_b, target_b = _binary_pair(pred, target)
    height, width = pred_b.shape[2:]
    side = min(height, width, 7)
    win = side if side % 2 else side - 1
    out = torch.full((pred_b.shape[0],), float("nan"))
    if win < 3:
        return out
    p_np = pred_b[:, 0].numpy().astype(np.float64)
    t_np = target_b[:, 0].numpy().astype(np.float64)
    for i in range(len(out)):
        out[i] = float(structural_similarity(p_np[i], t_np[i], data_range=1.0, win_size=win))
    return out


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image Dice, Jaccard, average Hausdorff distance and HD95 (pixels) and SSIM of binary masks.

    Args:
        pred: binary ``B×1×H×W`` (or ``B×H×W``) prediction.
        target: binary ground truth of the same shape.

    Returns:
        ``{"dice", "jaccard", "avg_hausdorff", "hd95", "ssim"}``, each a float tensor ``B``; see
        :func:`dice_per_image`, :func:`jaccard_per_image`, :func:`average_hausdorff_per_image` and
        :func:`hausdorff95_per_image` (NaN when exactly one mask is empty) and :func:`ssim_per_image`.
    """
    dice = dice_per_image(pred, target)
    return {
        "dice": dice,
        "jaccard": jaccard_per_image(pred, target, dice=dice),
        "avg_hausdorff": average_hausdorff_per_image(pred, target),
        "hd95": hausdorff95_per_image(pred, target),
        "ssim": ssim_per_image(pred, target),
    }
