"""Preprocessing (intensity normalisation, letterbox) and joint image/mask/box augmentation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import skimage.transform
import torch
import torch.nn.functional as F

from multichex.data.geometry import clip_boxes
from multichex.data.intensity import clahe, gaussian_blur, low_resolution, unsharp


def normalize_intensity(array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Robust contrast normalisation to [0, 1] from intensity percentiles.

    Scanners, exports and windowing differ between hospitals; scaling each image by its own
    percentiles makes a 12-bit DICOM, a dark JPEG and an 8-bit PNG land on comparable ranges.
    """
    array = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(array, [low_pct, high_pct])
    if high - low < 1e-6:
        return np.zeros_like(array)
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def degrade_resolution(array: np.ndarray, longest_side: int) -> np.ndarray:
    """Down-sample to ``longest_side`` (anti-aliased) and back to the original size.

    Pooling a 64-px folder with a 512-px one would let a model learn the folder from the blur alone;
    passing both through the same bottleneck removes that cue. Coordinates are unchanged.
    """
    height, width = array.shape
    scale = longest_side / max(height, width)
    if scale >= 1.0:
        return array
    small = skimage.transform.resize(array, (max(1, round(height * scale)), max(1, round(width * scale))), anti_aliasing=True)
    return skimage.transform.resize(small, (height, width), order=1).astype(np.float32)


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``orig_size`` was scaled by ``scale`` and padded into a ``size``×``size`` square."""

    orig_height: int
    orig_width: int
    size: int
    scale: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> "Letterbox":
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        return cls(height, width, size, scale, (size - new_w) // 2, (size - new_h) // 2)

    @property
    def inner_size(self) -> tuple[int, int]:
        return max(1, round(self.orig_height * self.scale)), max(1, round(self.orig_width * self.scale))

    def to_dict(self) -> dict:
        return asdict(self)

    def apply_image(self, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize a ``C×H×W`` tensor into the letterbox square (zero padding)."""
        new_h, new_w = self.inner_size
        kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=mode, **kwargs)[0]
        out = torch.zeros(image.shape[0], self.size, self.size, dtype=resized.dtype)
        out[:, self.pad_y : self.pad_y + new_h, self.pad_x : self.pad_x + new_w] = resized
        return out

    def apply_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        offset = torch.tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=boxes.dtype)
        return boxes * self.scale + offset

    def invert_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes in letterbox pixels → boxes in original image pixels (clipped to the image)."""
        offset = torch.tensor([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=boxes.dtype)
        original = (boxes - offset) / self.scale
        original[:, 0::2] = original[:, 0::2].clamp(0, self.orig_width)
        original[:, 1::2] = original[:, 1::2].clamp(0, self.orig_height)
        return original

    def invert_map(self, prob_map: torch.Tensor) -> torch.Tensor:
        """A ``C×size×size`` map (e.g. mask probabilities) → ``C×orig_H×orig_W``."""
        new_h, new_w = self.inner_size
        inner = prob_map[:, self.pad_y : self.pad_y + new_h, self.pad_x : self.pad_x + new_w]
        return F.interpolate(inner[None].float(), size=(self.orig_height, self.orig_width), mode="bilinear", align_corners=False)[0]


@dataclass
class AugmentConfig:
    """Ranges of the random joint augmentation (all off when ``enabled`` is False).

    The ops after ``noise_std`` widen the intensity range for X-rays from other hospitals (sharper
    or blurrier scanners, processed exports, low-resolution copies); each fires with its own
    probability, 0 (off) by default, so configs that leave them out draw exactly as before.
    """

    enabled: bool = True
    hflip_p: float = 0.5
    rotate_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    gamma: tuple[float, float] = (0.8, 1.25)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    noise_std: float = 0.01
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # pixels of the letterboxed image
    sharpen_p: float = 0.0
    sharpen_amount: tuple[float, float] = (0.3, 1.5)
    clahe_p: float = 0.0
    clahe_clip: tuple[float, float] = (0.005, 0.03)
    low_resolution_p: float = 0.0
    low_resolution_factor: tuple[float, float] = (1.5, 3.0)

    def __post_init__(self) -> None:
        for name in ("blur_p", "sharpen_p", "clahe_p", "low_resolution_p", "hflip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("scale", "gamma", "contrast", "blur_sigma", "sharpen_amount", "clahe_clip", "low_resolution_factor"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"augment.{name} must be a [low, high] range, got {list(value)}")
            object.__setattr__(self, name, value)


def _affine_matrix(size: int, flip: bool, angle: float, scale: float, tx: float, ty: float) -> torch.Tensor:
    """3×3 forward map in continuous pixel coordinates (pixel i covers [i, i+1))."""
    centre = size / 2.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    flip_sign = -1.0 if flip else 1.0
    to_origin = torch.tensor([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], dtype=torch.float64)
    linear = torch.tensor([[cos * flip_sign, -sin, 0], [sin * flip_sign, cos, 0], [0, 0, 1]], dtype=torch.float64)
    back = torch.tensor([[1, 0, centre + tx], [0, 1, centre + ty], [0, 0, 1]], dtype=torch.float64)
    return back @ linear @ to_origin


def warp(image: torch.Tensor, forward: torch.Tensor, mode: str) -> torch.Tensor:
    """Warp a square ``C×S×S`` tensor by a forward pixel-space affine map."""
    size = image.shape[-1]
    # Normalised coords for align_corners=False: u = 2x/S - 1 on continuous pixel coordinates.
    to_norm = torch.tensor([[2 / size, 0, -1], [0, 2 / size, -1], [0, 0, 1]], dtype=torch.float64)
    theta = (to_norm @ torch.linalg.inv(forward) @ torch.linalg.inv(to_norm))[:2].float()
    grid = F.affine_grid(theta[None], [1, image.shape[0], size, size], align_corners=False)
    return F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def transform_boxes(boxes: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Axis-aligned boxes enclosing the affinely mapped corners of each box."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    x1, y1, x2, y2 = boxes.double().unbind(-1)
    corners = torch.stack([torch.stack([x1, y1]), torch.stack([x2, y1]), torch.stack([x1, y2]), torch.stack([x2, y2])])
    homogeneous = torch.cat([corners, torch.ones(4, 1, len(boxes), dtype=torch.float64)], dim=1)  # 4×3×N
    mapped = torch.einsum("ij,kjn->kin", forward, homogeneous)[:, :2]  # 4×2×N
    low, high = mapped.min(dim=0).values, mapped.max(dim=0).values
    return torch.stack([low[0], low[1], high[0], high[1]], dim=-1).float()


class JointAugment:
    """Random flip/rotation/scale/shift applied identically to image, mask and boxes, plus intensity jitter.

    MONAI's box transforms cover flips, zooms and 90° rotations but not one small-angle affine shared
    by an image, its mask and its boxes, so the geometry is written here (and property-tested).
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def sample_matrix(self, size: int, rng: np.random.Generator) -> torch.Tensor:
        c = self.config
        return _affine_matrix(
            size,
            flip=bool(rng.random() < c.hflip_p),
            angle=math.radians(rng.uniform(-c.rotate_deg, c.rotate_deg)),
            scale=rng.uniform(*c.scale),
            tx=rng.uniform(-c.translate, c.translate) * size,
            ty=rng.uniform(-c.translate, c.translate) * size,
        )

    def intensity(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        c = self.config
        image = image.clamp(0, 1) ** rng.uniform(*c.gamma)
        image = (image - 0.5) * rng.uniform(*c.contrast) + 0.5 + rng.uniform(-c.brightness, c.brightness)
        if c.noise_std > 0:
            noise = torch.from_numpy(rng.normal(0.0, c.noise_std, size=tuple(image.shape)).astype(np.float32))
            image = image + noise
        image = image.clamp(0, 1)
        if c.low_resolution_p > 0 and rng.random() < c.low_resolution_p:
            image = low_resolution(image, rng.uniform(*c.low_resolution_factor))
        if c.blur_p > 0 and rng.random() < c.blur_p:
            image = gaussian_blur(image, rng.uniform(*c.blur_sigma))
        if c.sharpen_p > 0 and rng.random() < c.sharpen_p:
            image = unsharp(image, rng.uniform(*c.sharpen_amount), sigma=1.0)
        if c.clahe_p > 0 and rng.random() < c.clahe_p:
            image = clahe(image, clip_limit=rng.uniform(*c.clahe_clip))
        return image.clamp(0, 1)

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        boxes: torch.Tensor | None,
        box_labels: torch.Tensor | None,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not self.config.enabled:
            return image, mask, boxes, box_labels
        size = image.shape[-1]
        if image.shape[-2] != size:
            raise ValueError("JointAugment expects square (letterboxed) images")
        forward = self.sample_matrix(size, rng)
        image = self.intensity(warp(image, forward, "bilinear"), rng)
        if mask is not None:
            mask = (warp(mask, forward, "nearest") > 0.5).float()
        if boxes is not None:
            boxes, keep = clip_boxes(transform_boxes(boxes, forward), size, size, min_size=1e-3)
            box_labels = box_labels[keep] if box_labels is not None else None
        return image, mask, boxes, box_labels
