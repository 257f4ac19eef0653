"""Masked classification and segmentation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

_dice = DiceLoss(sigmoid=True, reduction="mean")


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """Binary cross-entropy over known labels only; NaN labels add nothing, not even gradient.

    Returns ``None`` when no label in the batch is known (the caller skips the term).
    """
    known = ~torch.isnan(labels)
    if not known.any():
        return None
    targets = torch.where(known, labels, torch.zeros_like(labels))
    per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pos_weight)
    return (per_element * known).sum() / known.sum()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor | None:
    """Pixel BCE (the paper's L_seg) + MONAI soft Dice, over the images that have a mask."""
    if not has_mask.any():
        return None
    logits, masks = logits[has_mask], masks[has_mask]
    loss = F.binary_cross_entropy_with_logits(logits, masks)
    if dice_weight:
        loss = loss + dice_weight * _dice(logits, masks)
    return loss


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Softmax cross-entropy for one-class-per-image models over the images whose label row names exactly one
    class (one known 1); other rows add nothing. ``None`` when no row qualifies."""
    positive = labels == 1
    single = positive.sum(dim=1) == 1
    if not single.any():
        return None
    return F.cross_entropy(logits[single], positive[single].float().argmax(dim=1))
