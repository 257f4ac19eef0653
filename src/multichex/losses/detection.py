"""CheXDet loss: objectness BCE, L2 on box parameters (paper eq. 4), optional GIoU, box-class BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.data.box_utils import box_pair_giou

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
    """

    def __init__(self, head: CheXDet, obj_pos_weight: float = 10.0, giou_weight: float = 0.0, box_weight: float = 1.0) -> None:
        self.head = head
        self.obj_pos_weight = obj_pos_weight
        self.giou_weight = giou_weight
        self.box_weight = box_weight

    def _cell(self, box: torch.Tensor, height: int, width: int) -> tuple[int, int]:
        """``(row, col)`` of the grid cell holding the box centre (clamped to the grid)."""
        stride = self.head.stride
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        col = int(min(max(cx.item() // stride, 0), width - 1))
        row = int(min(max(cy.item() // stride, 0), height - 1))
        return row, col

    def assign(self, image_boxes: torch.Tensor, image_labels: torch.Tensor, anchors: torch.Tensor,
               height: int, width: int) -> list[tuple[int, int, int, int]]:
        """``(box index, anchor, row, col)`` for the boxes of one image, at most one box per anchor.

        Greedy over (box, anchor) pairs of the box's cell in order of decreasing shape IoU: a pair is
        taken when its box is not assigned yet and its anchor is free. So each anchor goes to the box
        that matches it best and a box that loses its best anchor takes its next-best free one. Equal
        IoUs are broken by the box centre's distance to the cell centre, then by the box coordinates
        and label, so the result does not depend on the order of the boxes. Returned in anchor order.
        """
        stride = self.head.stride
        candidates = []
        for i, (box, label) in enumerate(zip(image_boxes, image_labels)):
            row, col = self._cell(box, height, width)
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
        stride = self.head.stride
        anchors = self.head.anchors.to(raw.device)
        objectness = torch.zeros(batch, num_anchors, height, width, device=raw.device)
        index, params, classes, gt_boxes = [], [], [], []
        for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
            for i, k, row, col in self.assign(image_boxes, image_labels, anchors, height, width):
                box, label = image_boxes[i], image_labels[i]
                w, h = (box[2] - box[0]).clamp(min=1.0), (box[3] - box[1]).clamp(min=1.0)
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                objectness[b, k, row, col] = 1.0
                index.append((b, k, row, col))
                offset_x = (cx / stride - col).clamp(1e-3, 1 - 1e-3)
                offset_y = (cy / stride - row).clamp(1e-3, 1 - 1e-3)
                params.append(torch.stack([offset_x, offset_y, torch.log(w / anchors[k, 0]), torch.log(h / anchors[k, 1])]))
                classes.append(int(label))
                gt_boxes.append(box)
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
            class_target = F.one_hot(torch.tensor(classes, device=raw.device), self.head.num_classes).float()
            loss = loss + F.binary_cross_entropy_with_logits(assigned[:, 5:], class_target)
            if self.giou_weight:
                decoded = self.head.decode_boxes(raw)[b, k, r, c]
                giou = box_pair_giou(decoded, torch.stack(gt_boxes))
                loss = loss + self.giou_weight * (1 - giou).mean()
        return loss
