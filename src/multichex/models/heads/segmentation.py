"""CheXSeg: a U-Net-style decoder over the encoder's skip features, predicting at stride 4.

Options from the seed papers, each off by default:

* ``attention`` — attention gates on the skip connections (APPAU-Net / Attention U-Net, MONAI's block);
* ``deep_supervision`` — a side output after every decoder stage, each added (upsampled) to the next one,
  the last being the final output (APPAU-Net's progressive side outputs); the sides get their own loss;
* ``saliency_bridge`` — MultiMix's bridge: a class saliency map, concatenated with the image, downsampled
  and added to the input of the first decoder stage;
* ``refine`` — a correction of the mask logits at stride 2 computed from the image itself and the last
  decoder features, for sharper edges than stride-4 logits give (a lung's errors lie in a band of a few pixels
  along its edge). It can be added to a trained head (:meth:`CheXSeg.add_refinement`): its last layer starts
  at zero, so the head's output is unchanged until it is trained.
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
        refine: bool = False,
    ) -> None:
        super().__init__()
        self.widths = widths
        self.num_classes = num_classes
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
        self.refine: nn.Sequential | None = None
        if refine:
            self.add_refinement()

    def add_refinement(self, width: int = 16) -> None:
        """Add the stride-2 refinement (image + upsampled last decoder features → a logit correction). Its last
        convolution is zero-initialised: the head predicts exactly as before until the refinement is trained."""
        self.refine = nn.Sequential(
            nn.Conv2d(self.widths[2] + 1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, self.num_classes, 1),
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(
        self, features: list[torch.Tensor], output_size: tuple[int, int], guide: torch.Tensor | None = None, return_sides: bool = False,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``B×K×H×W`` at ``output_size``.

        ``guide``: ``B×2×H×W`` (image, saliency) for the saliency bridge (required when it is on).
        ``image``: the ``B×1×H×W`` input images, for the refinement (required when it is on).
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
        if self.refine is not None:
            if image is None:
                raise ValueError("this segmentation head refines its masks from the image: pass the input images")
            half = (output_size[0] // 2, output_size[1] // 2)
            guide_image = F.adaptive_avg_pool2d(image, half)
            decoded = F.interpolate(x, size=half, mode="bilinear", align_corners=False)
            correction = self.refine(torch.cat([decoded, guide_image.to(decoded.dtype)], dim=1))
            final = final + F.interpolate(correction, size=output_size, mode="bilinear", align_corners=False)
        if not return_sides:
            return final
        if not self.deep_supervision:
            raise ValueError("side outputs need deep_supervision=True")
        upsampled = [F.interpolate(s, size=output_size, mode="bilinear", align_corners=False) for s in sides[:-1]]
        return final, torch.cat(upsampled, dim=1)
