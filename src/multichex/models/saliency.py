"""Class saliency maps (Simonyan et al. 2014): |∂ class logit / ∂ input pixel|, for MultiMix's saliency bridge.

The same map guides the segmentation decoder and is what a user is shown as the explanation of a model
with the bridge. Computed in a separate pass with the encoder and classifier in eval mode (BatchNorm
statistics untouched), detached from the training graph: the decoder is guided by it, not trained through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from multichex.models.multichexnet import MultiCheXNet


def saliency_maps(model: "MultiCheXNet", images: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
    """``B×1×H×W`` maps in [0, 1] (each image scaled by its own maximum).

    ``class_index`` (``B`` long): the class to explain per image; default the predicted (highest-scoring) one.
    Works under ``torch.inference_mode`` too (the pass runs outside it on a copy of the images).
    """
    modules = (model.encoder, model.cls)
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            logits = model.cls(model.encode(x))
            chosen = logits.argmax(dim=1) if class_index is None else class_index.to(logits.device)
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    saliency = grad.abs()
    return (saliency / saliency.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).detach()


def bridge_guide(model: "MultiCheXNet", images: torch.Tensor) -> torch.Tensor:
    """The saliency bridge's input: the image and its saliency map, ``B×2×H×W``."""
    return torch.cat([images.detach(), saliency_maps(model, images)], dim=1)
