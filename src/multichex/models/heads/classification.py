"""CheXCls: pooled encoder features → early layers θ_feats → final layer θ_dec → C sigmoid logits."""

from __future__ import annotations

import torch
from torch import nn


class CheXCls(nn.Module):
    """Multi-label classifier. ``feats`` (θ_feats) is kept for transfer learning; ``dec`` (θ_dec) is replaced."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feats = nn.Sequential(nn.Flatten(), nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.dec = nn.Linear(hidden, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.dec(self.feats(self.pool(features[-1])))

    def replace_decoder(self, num_classes: int) -> None:
        """Fresh θ_dec for a new label set (transfer to an unseen disease)."""
        self.dec = nn.Linear(self.dec.in_features, num_classes)


class PositiveCaseGate(nn.Module):
    """First-stage positive/negative classifier (§3.7) on the cached encoder features: one logit."""

    def __init__(self, in_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.net(features[-1]).squeeze(-1)
