"""Class saliency maps (Simonyan et al. 2014): |∂ class logit / ∂ input pixel|, for MultiMix's saliency bridge.

The same map guides the segmentation decoder and is what a user is shown as the explanation of a model
with the bridge. Computed in a separate pass with the encoder and classifier in eval mode (BatchNorm
statistics untouched), detached from the training graph: the decoder is guided by it, not trained through it.

This module knows no network class: a network hands in what a map needs (see :class:`SaliencySource`),
so the dependency runs one way, from the network to here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["SaliencySource", "bridge_guide", "class_saliency", "saliency_maps"]


@runtime_checkable
class SaliencySource(Protocol):
    """What a saliency map needs from a network: image → class logits, and the modules on that path."""

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``B×C`` class logits of ``B×1×H×W`` images in [0, 1]."""
        ...

    def saliency_modules(self) -> tuple[nn.Module, ...]:
        """The modules :meth:`class_logits` runs; they are put in eval mode for the saliency pass."""
        ...


def class_saliency(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    class_index: torch.Tensor | None = None,
    eval_modules: Iterable[nn.Module] = (),
) -> torch.Tensor:
    """``B×1×H×W`` maps in [0, 1] (each image scaled by its own maximum) of ``logits_of(images)``.

    ``class_index`` (``B`` long): the class to explain per image; default the predicted (highest-scoring) one.
    ``eval_modules`` are switched to eval mode for the pass and back to their own modes afterwards.
    Works under ``torch.inference_mode`` too (the pass runs outside it on a copy of the images).
    """
    modules = tuple(eval_modules)
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            logits = logits_of(x)
            chosen = logits.argmax(dim=1) if class_index is None else class_index.to(logits.device)
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    saliency = grad.abs()
    return (saliency / saliency.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).detach()


def saliency_maps(model: SaliencySource, images: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`class_saliency` of a network's classifier path (e.g. a ``MultiCheXNet``)."""
    return class_saliency(model.class_logits, images, class_index, model.saliency_modules())


def bridge_guide(model: SaliencySource, images: torch.Tensor) -> torch.Tensor:
    """The saliency bridge's input: the image and its saliency map, ``B×2×H×W``."""
    return torch.cat([images.detach(), saliency_maps(model, images)], dim=1)
