"""CheXEnc backbones behind one registry; every encoder returns features at strides 4, 8, 16, 32."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ENCODERS: dict[str, Callable[..., "Encoder"]] = {}


def register_encoder(name: str) -> Callable:
    def wrap(builder: Callable[..., "Encoder"]) -> Callable[..., "Encoder"]:
        ENCODERS[name] = builder
        return builder

    return wrap


def get_encoder(name: str, in_channels: int = 1, pyramid: bool = False) -> "Encoder":
    """Build a registered encoder by name (``list_encoders()`` shows the choices).

    ``pyramid``: also feed the image, downsampled, into the later encoder stages (APPAU-Net's pyramid
    input); only the ``lite`` encoders have the hooks for it.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}")
    encoder = ENCODERS[name](in_channels=in_channels)
    if pyramid:
        if not isinstance(encoder, LiteEncoder):
            raise ValueError(f"pyramid_input needs a lite encoder, not {name!r}")
        encoder.add_pyramid_inputs()
    return encoder


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


class Encoder(nn.Module):
    """Base class: ``forward(x) -> [f4, f8, f16, f32]`` with ``out_channels`` giving their widths."""

    out_channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = (4, 8, 16, 32)


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


register_encoder("lite")(lambda in_channels=1: LiteEncoder(in_channels))
register_encoder("lite-small")(lambda in_channels=1: LiteEncoder(in_channels, widths=(16, 32, 64, 96), depths=(1, 1, 1, 1), stem=16))
register_encoder("resnet18")(lambda in_channels=1: MonaiResNetEncoder(18, in_channels))
register_encoder("resnet34")(lambda in_channels=1: MonaiResNetEncoder(34, in_channels))
register_encoder("resnet50")(lambda in_channels=1: MonaiResNetEncoder(50, in_channels))
register_encoder("densenet121")(lambda in_channels=1: MonaiDenseNetEncoder(in_channels))
