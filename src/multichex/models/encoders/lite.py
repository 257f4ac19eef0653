"""The ``lite`` encoder family: fast CPU residual encoders with optional pyramid input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multichex.models.encoders.base import Encoder
from multichex.models.encoders.registry import EncoderSpec, register_encoder

__all__ = ["LiteEncoder"]


def _conv_bn_act(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ResidualBlock(nn.Module):
    """Two 3×3 convolutions with a (projected when needed) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_act(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class LiteEncoder(Encoder):
    """Fast CPU encoder: a stride-4 stem (two stride-2 convs) and four light residual stages.

    Full-resolution stages dominate CPU time, so nothing runs above stride 2.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: tuple[int, int, int, int] = (32, 64, 128, 192),
        depths: tuple[int, int, int, int] = (1, 2, 3, 2),
        stem: int = 24,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_act(in_channels, stem, 2), _conv_bn_act(stem, widths[0], 2))
        self.stages = nn.ModuleList()
        previous = widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [_ResidualBlock(previous, width, 1 if index == 0 else 2)]
            blocks += [_ResidualBlock(width, width, 1) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
            previous = width
        self.out_channels = tuple(widths)  # type: ignore[assignment]
        self.in_channels = in_channels
        self.pyramid: nn.ModuleList | None = None

    def add_pyramid_inputs(self) -> None:
        """Pyramid input (Imran & Terzopoulos 2019): stages 2–4 also receive the image average-pooled to
        their input resolution (strides 4, 8, 16), projected by a 3×3 convolution and added to their input,
        so small structures lost by the striding stay visible deeper in the encoder."""
        widths = self.out_channels
        self.pyramid = nn.ModuleList([_conv_bn_act(self.in_channels, widths[i]) for i in range(len(widths) - 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        image = x
        x = self.stem(x)
        features = []
        for index, stage in enumerate(self.stages):
            if self.pyramid is not None and index > 0:
                stride = image.shape[-1] // x.shape[-1]
                x = x + self.pyramid[index - 1](F.avg_pool2d(image, stride))
            x = stage(x)
            features.append(x)
        return features


def _lite(in_channels: int = 1) -> LiteEncoder:
    return LiteEncoder(in_channels)


def _lite_small(in_channels: int = 1) -> LiteEncoder:
    return LiteEncoder(in_channels, widths=(16, 32, 64, 96), depths=(1, 1, 1, 1), stem=16)


LITE = register_encoder(EncoderSpec(
    name="lite", builder=_lite, out_channels=(32, 64, 128, 192), supports_pyramid=True, family="lite",
    description="default CPU encoder: stride-4 stem, four residual stages of depths 1, 2, 3, 2",
))
LITE_SMALL = register_encoder(EncoderSpec(
    name="lite-small", builder=_lite_small, out_channels=(16, 32, 64, 96), supports_pyramid=True, family="lite",
    description="smallest encoder (tests, demos): one residual block per stage",
))
