"""CheXSeg: a U-Net-style decoder over the encoder's skip features, predicting at stride 4.

Options from the seed papers, each off by default:

* ``attention`` — attention gates on the skip connections (APPAU-Net / Attention U-Net, MONAI's block);
* ``deep_supervision`` — a side output after every decoder stage, each added (upsampled) to the next one,
  the last being the final output (APPAU-Net's progressive side outputs); the sides get their own loss;
* ``saliency_bridge`` — MultiMix's bridge: a class saliency map, concatenated with the image, downsampled
  and added to the input of the first decoder stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.attentionunet import AttentionBlock
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

    def __init__(
        self,
        encoder_channels: tuple[int, ...],
        num_classes: int = 1,
        widths: tuple[int, int, int] = (64, 32, 16),
        attention: bool = False,
        deep_supervision: bool = False,
        saliency_bridge: bool = False,
    ) -> None:
        super().__init__()
        c4, c8, c16, c32 = encoder_channels
        skips, inputs = (c16, c8, c4), (c32, widths[0], widths[1])
        self.blocks = nn.ModuleList([_fuse_block(cin + skip, cout) for cin, skip, cout in zip(inputs, skips, widths)])
        self.gates = (
            nn.ModuleList([AttentionBlock(2, f_int=max(8, skip // 2), f_g=cin, f_l=skip) for cin, skip in zip(inputs, skips)])
            if attention else None
        )
        self.deep_supervision = deep_supervision
        if deep_supervision:  # one 1×1 side head per stage; the last one is the final output
            self.sides = nn.ModuleList([nn.Conv2d(width, num_classes, 1) for width in widths])
        else:
            self.head = nn.Conv2d(widths[2], num_classes, 1)
        self.bridge = None
        if saliency_bridge:
            self.bridge = nn.Sequential(nn.Conv2d(2, c32 + c16, 3, padding=1, bias=False), nn.BatchNorm2d(c32 + c16))
            # Zero-initialised scale: the bridge starts as "add nothing" and the decoder learns how much of the
            # guide to take, instead of starting from a random perturbation of its first stage's input.
            nn.init.zeros_(self.bridge[1].weight)

    def forward(
        self, features: list[torch.Tensor], output_size: tuple[int, int], guide: torch.Tensor | None = None, return_sides: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``B×K×H×W`` at ``output_size``.

        ``guide``: ``B×2×H×W`` (image, saliency) for the saliency bridge (required when it is on).
        ``return_sides`` (deep supervision): also the side outputs before the last, upsampled to
        ``output_size`` and stacked coarse → fine as ``B×(S·K)×H×W``.
        """
        f4, f8, f16, f32 = features
        x = f32
        side: torch.Tensor | None = None
        sides: list[torch.Tensor] = []
        for index, (block, skip) in enumerate(zip(self.blocks, (f16, f8, f4))):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            if self.gates is not None:
                skip = self.gates[index](g=x, x=skip)
            fused = torch.cat([x, skip], dim=1)
            if index == 0 and self.bridge is not None:
                if guide is None:
                    raise ValueError("this segmentation head has a saliency bridge: pass the (image, saliency) guide")
                fused = fused + self.bridge(F.interpolate(guide, size=skip.shape[-2:], mode="area"))
            x = block(fused)
            if self.deep_supervision:
                current = self.sides[index](x)
                side = current if side is None else current + F.interpolate(side, size=x.shape[-2:], mode="bilinear", align_corners=False)
                sides.append(side)
        logits = sides[-1] if self.deep_supervision else self.head(x)
        final = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        if not return_sides:
            return final
        if not self.deep_supervision:
            raise ValueError("side outputs need deep_supervision=True")
        upsampled = [F.interpolate(s, size=output_size, mode="bilinear", align_corners=False) for s in sides[:-1]]
        return final, torch.cat(upsampled, dim=1)
