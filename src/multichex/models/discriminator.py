"""APPAU-Net's discriminator: classifies (image, mask) pairs into n real classes or one "predicted mask" class."""

from __future__ import annotations

import torch
from torch import nn


class PairDiscriminator(nn.Module):
    """A small strided CNN on the 2-channel (image, mask) pair → ``n_classes + 1`` logits.

    Index ``n_classes`` (the last) is the "mask predicted by the segmentor" class; the others are the real
    disease classes of a pair whose mask is a ground truth (Imran & Terzopoulos 2019, Fig. 1b).
    """

    def __init__(self, n_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 2
        for width in widths:
            layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(previous, n_classes + 1)
        self.n_classes = n_classes

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` ``B×1×H×W`` in [0, 1], ``masks`` ``B×1×H×W`` probabilities → ``B×(n+1)`` logits."""
        return self.out(self.features(torch.cat([images, masks], dim=1)))
