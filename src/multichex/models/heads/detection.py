"""CheXDet: an anchor-based grid head (objectness, box, class per anchor), its decoding and NMS.

YOLO-style: each cell of the stride-``s`` grid predicts, for each of ``K`` anchor shapes,
``(tx, ty, tw, th, objectness, class logits…)``; the centre is ``(cell + sigmoid(t)) · s`` and the
size is ``anchor · exp(t)`` (the :class:`~multichex.models.heads.box_coder.BoxCoder`, which the
detection loss shares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data.box_utils import batched_nms
from torch import nn

from multichex.models.heads.box_coder import MAX_LOG_SCALE, BoxCoder

__all__ = ["MAX_LOG_SCALE", "BoxCoder", "CheXDet", "Detections"]


@dataclass
class Detections:
    """Decoded boxes of one image (xyxy pixels of the network input)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


class CheXDet(nn.Module):
    """Grid detection head on the stride-``stride`` encoder features."""

    def __init__(
        self,
        encoder_channels: tuple[int, ...],
        num_classes: int,
        anchors: list[tuple[float, float]],
        image_size: int,
        stride: int = 16,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.level = {4: 0, 8: 1, 16: 2, 32: 3}[stride]
        self.num_classes = num_classes
        self.box_coder = BoxCoder(stride)  # shared with the detection loss, which encodes its targets with it
        # Anchors are fractions of the training image size, stored in pixels.
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32) * image_size, persistent=False)
        cin = encoder_channels[self.level] + (encoder_channels[self.level + 1] if self.level < 3 else 0)
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(hidden, len(anchors) * (5 + num_classes), 1)
        nn.init.constant_(self.out.bias, 0.0)
        with torch.no_grad():  # start with low objectness so early training is not flooded by false positives
            self.out.bias.view(len(anchors), 5 + num_classes)[:, 4] = -4.0

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Raw predictions ``B×K×H×W×(5+C)``."""
        x = features[self.level]
        if self.level < 3:
            deeper = nn.functional.interpolate(features[self.level + 1], size=x.shape[-2:], mode="nearest")
            x = torch.cat([x, deeper], dim=1)
        raw = self.out(self.body(x))
        batch, _, height, width = raw.shape
        return raw.view(batch, self.num_anchors, 5 + self.num_classes, height, width).permute(0, 1, 3, 4, 2)

    def decode_boxes(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw predictions → xyxy boxes ``B×K×H×W×4`` in input pixels (:meth:`BoxCoder.decode`)."""
        return self.box_coder.decode(raw, self.anchors)

    def postprocess(
        self,
        raw: torch.Tensor,
        image_size: int,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        max_detections: int = 20,
    ) -> list[Detections]:
        """Score = objectness × class probability; class-aware NMS (MONAI ``batched_nms``)."""
        boxes = self.decode_boxes(raw).clamp(0, image_size)
        scores_all = torch.sigmoid(raw[..., 4:5]) * torch.sigmoid(raw[..., 5:])
        results = []
        for image_boxes, image_scores in zip(boxes.flatten(1, 3), scores_all.flatten(1, 3)):
            scores, labels = image_scores.max(dim=-1)
            keep = scores >= score_threshold
            image_boxes, scores, labels = image_boxes[keep], scores[keep], labels[keep]
            valid = (image_boxes[:, 2] - image_boxes[:, 0] > 1) & (image_boxes[:, 3] - image_boxes[:, 1] > 1)
            image_boxes, scores, labels = image_boxes[valid], scores[valid], labels[valid]
            if len(scores):
                kept = batched_nms(image_boxes, scores, labels, iou_threshold, max_proposals=max_detections)
                kept = torch.as_tensor(kept, dtype=torch.long)
                image_boxes, scores, labels = image_boxes[kept], scores[kept], labels[kept]
            results.append(Detections(image_boxes, scores, labels))
        return results
