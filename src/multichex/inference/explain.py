"""Grad-CAM++ heat maps for the classifier's predictions (MONAI's ``GradCAMpp`` on the last encoder stage).

Grad-CAM++ rather than Grad-CAM: with a weak or uncertain classifier the plain Grad-CAM map of a class is
often negative everywhere and its ReLU leaves a blank image; Grad-CAM++ weights only the positive gradients
and still shows where the evidence for the class is. The map is an aid for inspecting the model, not a
localisation it was trained for, and not clinical evidence.

A model with MultiMix's saliency bridge is explained by the map its decoder was guided by (the class
saliency map of :mod:`multichex.models.saliency`), not by Grad-CAM++.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from monai.visualize import GradCAMpp
from PIL import Image
from torch import nn

from multichex.data.transforms import Letterbox
from multichex.device import module_device
from multichex.models.multichexnet import MultiCheXNet
from multichex.models.saliency import saliency_maps


class _Anchor(nn.Module):
    """A named point in the graph for Grad-CAM's hooks. It returns a new tensor: hooks on ``nn.Identity``,
    which hands back its input object, see no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _ClassifierPath(nn.Module):
    """Image → class logits through the encoder and CheXCls, with a named anchor on the deepest features."""

    def __init__(self, model: MultiCheXNet) -> None:
        super().__init__()
        self.model = model
        self.last_stage = _Anchor()  # Grad-CAM hooks here: activations and gradients of the deepest features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode(images)
        return self.model.cls([*features[:-1], self.last_stage(features[-1])])


class GradCamExplainer:
    """Grad-CAM++ maps (``S×S`` in [0, 1]) for chosen classes of one letterboxed image.

    One lock guards the hooks and gradients, so concurrent callers (a web server's workers) are serialised.
    """

    def __init__(self, model: MultiCheXNet) -> None:
        if not isinstance(model, MultiCheXNet):
            raise TypeError("Grad-CAM needs the PyTorch model (gradients); the ONNX runtime cannot explain")
        self.model = model
        self.cam = GradCAMpp(nn_module=_ClassifierPath(model), target_layers="last_stage")
        self.lock = threading.Lock()

    def maps(self, image: torch.Tensor, class_indices: list[int]) -> dict[int, np.ndarray]:
        """``image``: ``1×S×S`` in [0, 1]; returns class index → heat map at the network input size (computed
        on the model's device, in fp32)."""
        image = image.to(module_device(self.model))
        if self.model.config.saliency_bridge:
            with self.lock:
                batch = image[None].expand(len(class_indices), *image.shape)
                heats = saliency_maps(self.model, batch, torch.tensor(class_indices, dtype=torch.long))
            return {index: heat[0].float().cpu().numpy() for index, heat in zip(class_indices, heats)}
        result = {}
        with self.lock, torch.enable_grad():
            was_training = self.model.training
            self.model.eval()
            batch = image[None].detach().clone().requires_grad_(True)
            for index in class_indices:
                heat = self.cam(batch, class_idx=index)[0, 0].detach().float().cpu().numpy()
                result[index] = np.nan_to_num(heat, nan=0.0).clip(0.0, 1.0)
            self.model.zero_grad(set_to_none=True)  # the backward passes leave gradients on the weights
            self.model.train(was_training)
        return result


def heatmap_overlay(gray: np.ndarray, heat: np.ndarray, letterbox: Letterbox, alpha: float = 0.45) -> Image.Image:
    """The heat map (network input frame) mapped back to the original image and blended over it in colour."""
    original = letterbox.invert_map(torch.from_numpy(heat)[None])[0].numpy().clip(0.0, 1.0)
    colour = _jet(original)
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)
    blended = (1 - alpha * original[..., None]) * base + alpha * original[..., None] * colour
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8), mode="RGB")


def _jet(values: np.ndarray) -> np.ndarray:
    """A blue → green → red colour ramp (0..255) for values in [0, 1]."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1) * 255
