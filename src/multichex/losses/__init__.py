"""Losses that only see the labels that exist."""

from multichex.losses.detection import DetectionLoss
from multichex.losses.masked import masked_bce_with_logits, segmentation_loss
from multichex.losses.multitask import MultiTaskLoss

__all__ = ["DetectionLoss", "MultiTaskLoss", "masked_bce_with_logits", "segmentation_loss"]
