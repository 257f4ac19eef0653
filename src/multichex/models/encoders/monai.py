"""The MONAI encoder family: MONAI's 2-D ResNets and DenseNet-121, tapped at strides 4, 8, 16, 32.

These are torchvision-style ImageNet architectures (MONAI's implementations, trained from scratch here);
MONAI is imported only when one is built.
"""

from __future__ import annotations

import torch
from torch import nn

from multichex.models.encoders.base import Encoder
from multichex.models.encoders.registry import EncoderSpec, register_encoder

__all__ = ["MonaiDenseNetEncoder", "MonaiResNetEncoder"]


class MonaiResNetEncoder(Encoder):
    """MONAI's 2-D ResNet with its classifier removed, tapped after each residual layer."""

    def __init__(self, depth: int, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks import nets

        builder = {18: nets.resnet18, 34: nets.resnet34, 50: nets.resnet50}[depth]
        net = builder(spatial_dims=2, n_input_channels=in_channels, num_classes=1, conv1_t_size=7, conv1_t_stride=2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = 4 if depth == 50 else 1
        self.out_channels = tuple(w * expansion for w in (64, 128, 256, 512))  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MonaiDenseNetEncoder(Encoder):
    """MONAI's 2-D DenseNet-121, tapped at the end of each dense block (before the transition pooling)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121

        features = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1).features
        self.stem = nn.Sequential(features.conv0, features.norm0, features.relu0, features.pool0)
        self.blocks = nn.ModuleList([features.denseblock1, features.denseblock2, features.denseblock3, features.denseblock4])
        self.transitions = nn.ModuleList([features.transition1, features.transition2, features.transition3])
        self.final_norm = nn.Sequential(features.norm5, nn.ReLU(inplace=False))
        self.out_channels = (256, 512, 1024, 1024)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index < 3:
                outputs.append(x)
                x = self.transitions[index](x)
        outputs.append(self.final_norm(x))
        return outputs


def _resnet(depth: int) -> EncoderSpec:
    expansion = 4 if depth == 50 else 1
    return EncoderSpec(
        name=f"resnet{depth}",
        builder=lambda in_channels=1: MonaiResNetEncoder(depth, in_channels),
        out_channels=tuple(w * expansion for w in (64, 128, 256, 512)),
        family="monai",
        description=f"MONAI ResNet-{depth} (2-D), classifier removed",
    )


RESNET18 = register_encoder(_resnet(18))
RESNET34 = register_encoder(_resnet(34))
RESNET50 = register_encoder(_resnet(50))
DENSENET121 = register_encoder(EncoderSpec(
    name="densenet121", builder=lambda in_channels=1: MonaiDenseNetEncoder(in_channels), out_channels=(256, 512, 1024, 1024),
    family="monai", description="MONAI DenseNet-121 (2-D), tapped after each dense block",
))
