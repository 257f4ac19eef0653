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
    """Assigns each ground-truth box to the anchor of best shape in the cell holding its centre."""

    def __init__(self, head: CheXDet, obj_pos_weight: float = 10.0, giou_weight: float = 0.0, box_weight: float = 1.0) -> None:
        self.head = head
        self.obj_pos_weight = obj_pos_weight
        self.giou_weight = giou_weight
        self.box_weight = box_weight

    def build_targets(self, raw: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]):
        """Objectness target ``B×K×H×W``, and for assigned anchors their index, box params and class."""
        batch, num_anchors, height, width, _ = raw.shape
        stride = self.head.stride
        anchors = self.head.anchors.to(raw.device)
        objectness = torch.zeros(batch, num_anchors, height, width, device=raw.device)
        index, params, classes, gt_boxes = [], [], [], []
        for b, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
            for box, label in zip(image_boxes, image_labels):
                w, h = (box[2] - box[0]).clamp(min=1.0), (box[3] - box[1]).clamp(min=1.0)
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                col = int(min(max(cx.item() // stride, 0), width - 1))
                row = int(min(max(cy.item() // stride, 0), height - 1))
                k = int(_shape_iou(torch.stack([w, h]), anchors).argmax())
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
