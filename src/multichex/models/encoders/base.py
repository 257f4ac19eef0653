"""The interface every CheXEnc backbone implements: images → one feature map per stage."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Encoder"]


class Encoder(nn.Module):
    """Base class: ``forward(x) -> [f4, f8, f16, f32]`` with ``out_channels`` giving their widths."""

    out_channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = (4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_pyramid_inputs(self) -> None:
        """Pyramid input hooks (APPAU-Net); only some families have them."""
        raise ValueError(f"{type(self).__name__} has no pyramid input hooks")
