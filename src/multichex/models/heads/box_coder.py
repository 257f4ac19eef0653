"""Box coder of the CheXDet anchor grid: xyxy boxes ↔ per-anchor regression deltas ``(tx, ty, tw, th)``.

One coder serves both sides, as MONAI's detection ``BoxCoder`` is shared by its network and its loss:
:class:`~multichex.models.heads.detection.CheXDet` decodes its raw predictions with :meth:`BoxCoder.decode`
and the detection loss encodes its regression targets with :meth:`BoxCoder.encode`, so the two cannot
drift apart.

The grid is YOLO-style: a box centred in cell ``(row, col)`` of the stride-``s`` grid has its centre at
``(col + sigmoid(tx), row + sigmoid(ty)) · s`` and its size ``anchor · exp(tw, th)``. The encoded centre
is the value ``sigmoid(t)`` should take (the offset inside the cell, kept inside ``(0, 1)``), the encoded
size is ``log(size / anchor)``.
"""

from __future__ import annotations

import torch

MAX_LOG_SCALE = 4.0  # decoded sizes are anchor · exp(t) with t clamped to ±MAX_LOG_SCALE
OFFSET_EPS = 1e-3  # encoded centre offsets lie in [OFFSET_EPS, 1 − OFFSET_EPS]
MIN_SIZE = 1.0  # encoded widths and heights are at least one pixel


class BoxCoder:
    """Encodes boxes as grid deltas and decodes deltas back to boxes, for a grid of stride ``stride`` pixels.

    Anchors are passed to each call (``K×2`` or ``N×2`` widths and heights in pixels), so the coder holds no
    tensors and follows whatever device and dtype its callers' anchors live on.
    """

    def __init__(self, stride: int, max_log_scale: float = MAX_LOG_SCALE, offset_eps: float = OFFSET_EPS) -> None:
        self.stride = stride
        self.max_log_scale = max_log_scale
        self.offset_eps = offset_eps

    def __repr__(self) -> str:
        return f"BoxCoder(stride={self.stride}, max_log_scale={self.max_log_scale}, offset_eps={self.offset_eps})"

    def cell(self, box: torch.Tensor, height: int, width: int) -> tuple[int, int]:
        """``(row, col)`` of the cell of a ``height × width`` grid that holds the centre of one xyxy box
        (clamped to the grid)."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        col = int(min(max(cx.item() // self.stride, 0), width - 1))
        row = int(min(max(cy.item() // self.stride, 0), height - 1))
        return row, col

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Regression targets ``N×4`` (centre offsets in the cell, log size ratios) of ``N`` xyxy boxes,
        each relative to its anchor (``N×2``) in its cell (``rows``, ``cols``: ``N`` integers)."""
        w = (boxes[:, 2] - boxes[:, 0]).clamp(min=MIN_SIZE)
        h = (boxes[:, 3] - boxes[:, 1]).clamp(min=MIN_SIZE)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        offset_x = (cx / self.stride - cols).clamp(self.offset_eps, 1 - self.offset_eps)
        offset_y = (cy / self.stride - rows).clamp(self.offset_eps, 1 - self.offset_eps)
        return torch.stack([offset_x, offset_y, torch.log(w / anchors[:, 0]), torch.log(h / anchors[:, 1])], dim=1)

    def decode(self, raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Raw predictions ``B×K×H×W×(≥4)`` (deltas first) → xyxy boxes ``B×K×H×W×4`` in input pixels,
        for ``K×2`` anchors."""
        _, _, height, width, _ = raw.shape
        ys, xs = torch.meshgrid(torch.arange(height, device=raw.device), torch.arange(width, device=raw.device), indexing="ij")
        cx = (xs + torch.sigmoid(raw[..., 0])) * self.stride
        cy = (ys + torch.sigmoid(raw[..., 1])) * self.stride
        anchor_w = anchors[:, 0].view(1, -1, 1, 1)
        anchor_h = anchors[:, 1].view(1, -1, 1, 1)
        w = anchor_w * torch.exp(raw[..., 2].clamp(-self.max_log_scale, self.max_log_scale))
        h = anchor_h * torch.exp(raw[..., 3].clamp(-self.max_log_scale, self.max_log_scale))
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
