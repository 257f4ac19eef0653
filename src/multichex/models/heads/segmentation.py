"""CheXSeg: a U-Net-style decoder over the encoder's skip features, predicting at stride 4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fuse_block(cin: int, cout: int) -> nn.Sequential:
    """1×1 reduction of the concatenated features, then one 3×3 convolution.

    Kept light on purpose: the decoder runs at stride 4, where every channel costs the most, and the
    point of the shared encoder is that heads are cheap next to it.
    """
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class CheXSeg(nn.Module):
    """Upsample the deepest features, fuse each skip (stride 16 → 8 → 4), predict logits, resize to the input."""

    def __init__(self, encoder_channels: tuple[int, ...], num_classes: int = 1, widths: tuple[int, int, int] = (64, 32, 16)) -> None:
        super().__init__()
        c4, c8, c16, c32 = encoder_channels
        self.blocks = nn.ModuleList([
            _fuse_block(c32 + c16, widths[0]),
            _fuse_block(widths[0] + c8, widths[1]),
            _fuse_block(widths[1] + c4, widths[2]),
        ])
        self.head = nn.Conv2d(widths[2], num_classes, 1)

    def forward(self, features: list[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        f4, f8, f16, f32 = features
        x = f32
        for block, skip in zip(self.blocks, (f16, f8, f4)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=output_size, mode="bilinear", align_corners=False)
