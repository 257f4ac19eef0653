"""CheXDet loss: objectness BCE, L2 on box parameters (paper eq. 4), optional GIoU, box-class BCE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.data.box_utils import box_pair_giou

from multichex.models.heads.box_coder import BoxCoder
from multichex.models.heads.detection import CheXDet


def _shape_iou(size: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of a (w, h) box with each anchor when both are centred at the same point."""
    inter = torch.minimum(size[0], anchors[:, 0]) * torch.minimum(size[1], anchors[:, 1])
    return inter / (size[0] * size[1] + anchors[:, 0] * anchors[:, 1] - inter)


class DetectionLoss:
    """Assigns each ground-truth box to the anchor of best shape in the cell holding its centre.

    One anchor holds at most one target. When boxes of an image compete for an anchor (same cell,
    same best shape) the box that matches it best keeps it and the others fall back to their
    next-best free anchor of that cell (no target at all when none is free); see :meth:`assign`.

    The loss sees the detector's geometry, not the detector: ``anchors`` (``K×2`` widths and heights in
    input pixels), ``num_classes`` box classes and the :class:`BoxCoder` that the head decodes with (its
    grid stride included); :meth:`for_head` takes all three from a :class:`CheXDet`. Passing the head
    itself as ``anchors`` (the signature of earlier versions) does the same.
    """

    def __init__(self, anchors: torch.Tensor | CheXDet, num_classes: int | None = None, coder: BoxCoder | None = None, *,
                 obj_pos_weight: float = 10.0, giou_weight: float = 0.0, box_weight: float = 1.0) -> None:
        if isinstance(anchors, CheXDet):
            anchors, num_classes, coder = anchors.anchors, anchors.num_classes, anchors.box_coder
        if num_classes is None or coder is None:
            raise TypeError("DetectionLoss needs anchors, num_classes and a BoxCoder (or a CheXDet head)")
        self.anchors = anchors
        self.num_classes = num_classes
        self.coder = coder
        self.obj_pos_weight = obj_pos_weight
        self.giou_weight = giou_weight
        self.box_weight = box_weight

    @classmethod
    def for_head(cls, head: CheXDet, **weights: Any) -> "DetectionLoss":
        """The loss of ``head``: its anchors, box classes and box coder (``weights``: the loss weights)."""
        return cls(head.anchors, head.num_classes, head.box_coder, **weights)

    @property
    def stride(self) -> int:
        """The grid's stride in input pixels."""
        return self.coder.stride

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def head(self) -> "DetectionLoss":
        """The detector geometry this loss reads (``stride``, ``anchors``, ``num_anchors``, ``num_classes``), for
        code written when the loss held the head: those attributes now live on the loss itself."""
        return self

    def assign(self, image_boxes: torch.Tensor, image_labels: torch.Tensor, anchors: torch.Tensor,
               height: int, width: int) -> list[tuple[int, int, int, int]]:
        """``(box index, anchor, row, col)`` for the boxes of one image, at most one box per anchor.

        Greedy over (box, anchor) pairs of the box's cell in order of decreasing shape IoU: a pair is
        taken when its box is not assigned yet and its anchor is free. So each anchor goes to the box
        that matches it best and a box that loses its best anchor takes its next-best free one. Equal
        IoUs are broken by the box centre's distance to the cell centre, then by the box coordinates
        and label, so the result does not depend on the order of the boxes. Returned in anchor order.
        """
        stride = self.stride
        candidates = []
        for i, (box, label) in enumerate(zip(image_boxes, image_labels)):
            row, col = self.coder.cell(box, height, width)
            w, h = (box[2] - box[0]).clamp(min=1.0), (box[3] - box[1]).clamp(min=1.0)
            cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
            distance = (cx / stride - col - 0.5) ** 2 + (cy / stride - row - 0.5) ** 2
            tie = (distance, *(float(v) for v in box.tolist()), int(label))
            for k, iou in enumerate(_shape_iou(torch.stack([w, h]), anchors).tolist()):
                candidates.append((-iou, tie, k, i, row, col))
        candidates.sort()
        taken: set[tuple[int, int, int]] = set()
        done: set[int] = set()
        assigned = []
        for _, _, k, i, row, col in candidates:
            if i in done or (k, row, col) in taken:
                continue
            taken.add((k, row, col))
            done.add(i)
            assigned.append((i, k, row, col))
        return sorted(assigned, key=lambda a: (a[1], a[2], a[3]))

    def build_targets(self, raw: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]):
        """Objectness target ``B×K×H×W``, and for assigned anchors their index, box params and class."""
        batch, num_anchors, height, width, _ = raw.shape
        anchors = self.anchors.to(raw.device)
        objectness = torch.zeros(batch, num_anchors, height, width, device=raw.device)
        index, params, classes, gt_boxes = [], [], [], []
        for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
            assigned = self.assign(image_boxes, image_labels, anchors, height, width)
            if not assigned:
                continue
            chosen, ks, rows, cols = zip(*assigned)
            for i, k, row, col in assigned:
                objectness[b, k, row, col] = 1.0
                index.append((b, k, row, col))
                classes.append(int(image_labels[i]))
                gt_boxes.append(image_boxes[i])
            where = image_boxes.device
            encoded = self.coder.encode(image_boxes[list(chosen)], anchors[list(ks)],
                                        torch.tensor(rows, device=where), torch.tensor(cols, device=where))
            params.extend(encoded.unbind(0))
        return objectness, index, params, classes, gt_boxes

    def __call__(self, raw: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor], has_boxes: torch.Tensor) -> torch.Tensor | None:
        if not has_boxes.any():
            return None
        keep = torch.nonzero(has_boxes).flatten().tolist()
        raw = raw[keep]
        boxes = [boxes[i] for i in keep]
        labels = [labels[i] for i in keep]
        objectness, index, params, classes, gt_boxes = self.build_targets(raw, boxes, labels)
        pos_weight = torch.tensor(self.obj_pos_weight, device=raw.device)
        loss = F.binary_cross_entropy_with_logits(raw[..., 4], objectness, pos_weight=pos_weight)
        if index:
            b, k, r, c = (torch.tensor(v, device=raw.device) for v in zip(*index))
            assigned = raw[b, k, r, c]  # P×(5+C)
            target = torch.stack(params)
            predicted = torch.cat([torch.sigmoid(assigned[:, :2]), assigned[:, 2:4]], dim=1)
            loss = loss + self.box_weight * F.mse_loss(predicted, target)
            class_target = F.one_hot(torch.tensor(classes, device=raw.device), self.num_classes).float()
            loss = loss + F.binary_cross_entropy_with_logits(assigned[:, 5:], class_target)
            if self.giou_weight:
                decoded = self.coder.decode(raw, self.anchors.to(raw.device))[b, k, r, c]
                giou = box_pair_giou(decoded, torch.stack(gt_boxes))
                loss = loss + self.giou_weight * (1 - giou).mean()
        return loss
