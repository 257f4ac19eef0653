"""Intensity operations on image tensors shared by the weak and the strong augmentation.

Each takes a ``C×H×W`` float tensor in [0, 1] on any device and returns one of the same shape;
the caller clamps. CLAHE runs through scikit-image on the CPU (no torch implementation is
maintained in our dependencies) and comes back on the input's device.
"""

from __future__ import annotations

import numpy as np
import skimage.exposure
import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d, separable_filtering


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with ``sigma`` in pixels (identity below 1e-3 px)."""
    if sigma <= 1e-3:
        return image
    kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0)
    kernel = (kernel / kernel.sum()).to(device=image.device, dtype=image.dtype)
    return separable_filtering(image[None], [kernel, kernel], mode="replicate")[0]


def unsharp(image: torch.Tensor, amount: float, sigma: float) -> torch.Tensor:
    """Unsharp mask: ``image + amount · (image − blur(image, sigma))``."""
    return image + amount * (image - gaussian_blur(image, sigma))


def clahe(image: torch.Tensor, clip_limit: float = 0.01, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation per channel (``tiles``×``tiles`` regions)."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    kernel = max(8, max(array.shape[-2:]) // tiles)
    out = np.stack([skimage.exposure.equalize_adapthist(channel, kernel_size=kernel, clip_limit=clip_limit) for channel in array])
    return torch.from_numpy(out.astype(np.float32)).to(device=image.device, dtype=image.dtype)


def low_resolution(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample by ``factor`` (> 1, anti-aliased) and back: a blurrier, lower-resolution scan."""
    if factor <= 1.0:
        return image
    height, width = image.shape[-2:]
    small = (max(1, round(height / factor)), max(1, round(width / factor)))
    reduced = F.interpolate(image[None], size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False)[0]
