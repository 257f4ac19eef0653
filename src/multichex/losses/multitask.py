"""The MultiCheXNet total loss (eq. 9): a weighted sum over the tasks the batch has labels for."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from multichex.data.record import CXRBatch
from multichex.losses.detection import DetectionLoss
from multichex.losses.masked import masked_bce_with_logits, masked_cross_entropy
from multichex.losses.segmentation import deep_supervision_loss, make_segmentation_loss

if TYPE_CHECKING:
    from multichex.models.multichexnet import MultiCheXNet

CLS_ACTIVATIONS = ("sigmoid", "softmax")


def float32_outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads' raw outputs in float32. Mixed precision (bf16/fp16 autocast) ends here: every loss (BCE,
    Dice's sums over a mask, the detector's box terms, the few-label terms) is computed in fp32, where a
    16-bit sum over 65,536 mask pixels or a log of a tiny probability would lose the signal."""
    return {key: value.float() for key, value in outputs.items()}


class MultiTaskLoss:
    """Per-task losses on one batch; a task with no labels in the batch contributes no term.

    The loss works on output and label tensors only. What it needs to know of the network is given to it:
    ``cls_activation`` (``"sigmoid"``: masked BCE per class; ``"softmax"``: cross-entropy over one class per
    image) and ``detection``, the :class:`DetectionLoss` built with the detector's anchors and box coder.
    :meth:`for_model` takes both from a :class:`MultiCheXNet`; so does passing the network as ``model``.
    """

    def __init__(
        self, model: "MultiCheXNet | None" = None, weights: dict[str, float] | None = None, dice_weight: float = 1.0,
        giou_weight: float = 0.0, seg_loss: dict | None = None, seg_side_weights: list[float] | None = None, *,
        cls_activation: str = "sigmoid", detection: DetectionLoss | None = None,
    ) -> None:
        """``seg_loss``: ``{"name": ..., **parameters}`` of :func:`make_segmentation_loss` (default BCE + ``dice_weight`` ×
        Dice); ``seg_side_weights``: deep supervision's weights, side outputs coarse → fine, then the final output;
        ``giou_weight``: the GIoU term of the detection loss built from ``model`` (an explicit ``detection``
        brings its own)."""
        if model is not None:
            cls_activation = model.config.cls_activation
            detection = DetectionLoss.for_head(model.det, giou_weight=giou_weight) if detection is None else detection
        if cls_activation not in CLS_ACTIVATIONS:
            raise ValueError(f"cls_activation must be one of {CLS_ACTIVATIONS}, got {cls_activation!r}")
        self.weights = {"cls": 1.0, "seg": 1.0, "det": 1.0, "gate": 1.0, **(weights or {})}
        spec = dict(seg_loss or {"name": "bce_dice"})
        name = spec.pop("name")
        if name == "bce_dice":
            spec.setdefault("dice_weight", dice_weight)
        self.segmentation = make_segmentation_loss(name, **spec)
        self.side_weights = seg_side_weights
        self.softmax = cls_activation == "softmax"
        self.detection = detection

    @classmethod
    def for_model(
        cls, model: "MultiCheXNet", weights: dict[str, float] | None = None, dice_weight: float = 1.0, giou_weight: float = 0.0,
        seg_loss: dict | None = None, seg_side_weights: list[float] | None = None,
    ) -> "MultiTaskLoss":
        """The loss of ``model``: its classification activation and a detection loss of its CheXDet head's geometry."""
        return cls(None, weights, dice_weight, giou_weight, seg_loss, seg_side_weights, cls_activation=model.config.cls_activation,
                   detection=DetectionLoss.for_head(model.det, giou_weight=giou_weight))

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
        outputs = float32_outputs(outputs)
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
            if self.detection is None:
                raise ValueError("a detection output reached a MultiTaskLoss without a detection loss (pass detection=DetectionLoss(...))")
            terms["det"] = self.detection(outputs["det"], det_batch.boxes, det_batch.box_labels, det_batch.has_boxes)
        losses = {name: value for name, value in terms.items() if value is not None}
        if losses:
            losses["total"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses
