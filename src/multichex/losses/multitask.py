"""The MultiCheXNet total loss (eq. 9): a weighted sum over the tasks the batch has labels for."""

from __future__ import annotations

import torch

from multichex.data.record import CXRBatch
from multichex.losses.detection import DetectionLoss
from multichex.losses.masked import masked_bce_with_logits, masked_cross_entropy
from multichex.losses.segmentation import deep_supervision_loss, make_segmentation_loss
from multichex.models.multichexnet import MultiCheXNet


class MultiTaskLoss:
    """Per-task losses on one batch; a task with no labels in the batch contributes no term."""

    def __init__(
        self, model: MultiCheXNet, weights: dict[str, float] | None = None, dice_weight: float = 1.0, giou_weight: float = 0.0,
        seg_loss: dict | None = None, seg_side_weights: list[float] | None = None,
    ) -> None:
        """``seg_loss``: ``{"name": ..., **parameters}`` of :func:`make_segmentation_loss` (default BCE + ``dice_weight`` ×
        Dice); ``seg_side_weights``: deep supervision's weights, side outputs coarse → fine, then the final output."""
        self.weights = {"cls": 1.0, "seg": 1.0, "det": 1.0, "gate": 1.0, **(weights or {})}
        spec = dict(seg_loss or {"name": "bce_dice"})
        name = spec.pop("name")
        if name == "bce_dice":
            spec.setdefault("dice_weight", dice_weight)
        self.segmentation = make_segmentation_loss(name, **spec)
        self.side_weights = seg_side_weights
        self.softmax = model.config.cls_activation == "softmax"
        self.detection = DetectionLoss(model.det, giou_weight=giou_weight)

    @staticmethod
    def tasks_for(batch: CXRBatch, trainable: set[str]) -> list[str]:
        """The heads this batch can train: those with at least one label present."""
        present = {
            "cls": bool(batch.has_labels.any()),
            "gate": bool((~torch.isnan(batch.positive)).any()),
            "seg": bool(batch.has_mask.any()),
            "det": bool(batch.has_boxes.any()),
        }
        return [task for task in ("cls", "gate", "seg", "det") if present[task] and task in trainable]

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: CXRBatch, head_batches: dict[str, CXRBatch] | None = None
    ) -> dict[str, torch.Tensor]:
        """``head_batches`` gives the targets of a head that ran on a sub-batch (teacher forcing)."""
        head_batches = head_batches or {}
        seg_batch = head_batches.get("seg", batch)
        det_batch = head_batches.get("det", batch)
        terms: dict[str, torch.Tensor | None] = {}
        if "cls" in outputs:
            classify = masked_cross_entropy if self.softmax else masked_bce_with_logits
            terms["cls"] = classify(outputs["cls"], batch.labels)
        if "gate" in outputs:
            terms["gate"] = masked_bce_with_logits(outputs["gate"], batch.positive)
        if "seg" in outputs and seg_batch.has_mask.any():
            has = seg_batch.has_mask
            sides = outputs.get("seg_sides")
            terms["seg"] = deep_supervision_loss(outputs["seg"][has], sides[has] if sides is not None else None,
                                                 seg_batch.masks[has], self.segmentation, self.side_weights)
        if "det" in outputs:
            terms["det"] = self.detection(outputs["det"], det_batch.boxes, det_batch.box_labels, det_batch.has_boxes)
        losses = {name: value for name, value in terms.items() if value is not None}
        if losses:
            losses["total"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses
