"""Strong augmentation view for FixMatch-style semi-supervised training on chest X-rays.

The trainer pseudo-labels the *weak* view (:class:`~multichex.data.transforms.JointAugment`) and
trains the model on a *strong* view of the same image toward those pseudo-labels. The strong view
is made here, RandAugment-style: ``n_ops`` operations are drawn without replacement from a pool
of X-ray-safe ops (no colour jitter, no flips — laterality matters on a chest film), each with its
own random strength in ``[0, magnitude]``. Geometric ops (``affine``, ``elastic``) move the image,
its mask and its boxes together, so a pseudo-mask or pseudo-box drawn on the weak view and passed
in as ``mask``/``boxes`` comes back aligned with the strong image; intensity ops and ``cutout``
touch the image only.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a view is reproducible from
its seed; tensors may live on any device (the trainer may call this on a GPU batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from multichex.data.geometry import clip_boxes
from multichex.data.intensity import gaussian_blur, unsharp
from multichex.data.record import CXRBatch
from multichex.data.transforms import transform_boxes

STRONG_OPS: tuple[str, ...] = ("gamma", "contrast", "brightness", "affine", "elastic", "cutout", "noise", "blur", "sharpen")
GEOMETRIC_OPS: frozenset[str] = frozenset({"affine", "elastic"})

Result = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class StrongAugmentConfig:
    """The op pool and each op's range at full strength (``strength = 1``).

    An op applied with strength ``s`` (drawn uniformly from ``[0, magnitude]``) uses ``s`` times
    the range below. Sizes are fractions of the image's longer side so one config fits any
    letterbox size.

    Attributes:
        ops: ops to draw from (default: the whole pool, :data:`STRONG_OPS`).
        n_ops: ops applied per image, drawn without replacement, applied in drawn order.
        magnitude: 0..1, upper bound of every op's random strength.
        gamma: the exponent is ``gamma ** ±s`` (2.0 → [0.5, 2] at full strength).
        contrast: contrast about the image mean is scaled by ``contrast ** ±s``.
        brightness: additive shift ``±s * brightness``.
        rotate_deg, scale, shear_deg, translate: affine ranges; each component is uniform in
            ``±s *`` its range (``scale`` is the relative zoom, ``translate`` a fraction of the side).
        elastic_alpha: largest displacement of the elastic field, fraction of the side.
        elastic_grid: control points per side of the elastic field (fewer = smoother).
        cutout_max_count: 1..this many rectangles per cutout.
        cutout_size: largest rectangle side, fraction of the image side (times ``s``).
        cutout_fill: ``"mean"`` (the image mean) or ``"zero"``.
        noise_std: Gaussian noise standard deviation (times ``s``).
        blur_sigma: Gaussian blur sigma, fraction of the side (times ``s``).
        sharpen_amount: unsharp-mask gain (times ``s``).
        sharpen_sigma: unsharp-mask blur sigma, fraction of the side (at least 0.5 px).
    """

    ops: list[str] = field(default_factory=lambda: list(STRONG_OPS))
    n_ops: int = 2
    magnitude: float = 0.5
    gamma: float = 2.0
    contrast: float = 1.8
    brightness: float = 0.25
    rotate_deg: float = 25.0
    scale: float = 0.25
    shear_deg: float = 15.0
    translate: float = 0.12
    elastic_alpha: float = 0.06
    elastic_grid: int = 5
    cutout_max_count: int = 3
    cutout_size: float = 0.3
    cutout_fill: str = "mean"
    noise_std: float = 0.08
    blur_sigma: float = 0.012
    sharpen_amount: float = 2.0
    sharpen_sigma: float = 0.004

    def __post_init__(self) -> None:
        self.ops = list(self.ops)
        unknown = [op for op in self.ops if op not in STRONG_OPS]
        if unknown:
            raise ValueError(f"unknown strong augmentation op(s) {unknown}; the pool is {list(STRONG_OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"duplicate op in {self.ops}")
        if not 0 <= self.n_ops <= len(self.ops):
            raise ValueError(f"n_ops must be between 0 and the {len(self.ops)} ops given, got {self.n_ops}")
        if not 0.0 <= self.magnitude <= 1.0:
            raise ValueError(f"magnitude must be in [0, 1], got {self.magnitude}")
        if self.cutout_fill not in ("mean", "zero"):
            raise ValueError(f"cutout_fill must be 'mean' or 'zero', got {self.cutout_fill!r}")
        if self.gamma < 1 or self.contrast < 1:
            raise ValueError("gamma and contrast are ranges ≥ 1 (the factor is range ** ±strength)")
        if self.elastic_grid < 2 or self.cutout_max_count < 1:
            raise ValueError("elastic_grid must be ≥ 2 and cutout_max_count ≥ 1")
        if not 0 <= self.scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {self.scale}")


def _affine_forward(height: int, width: int, angle: float, scale: float, shear: float, tx: float, ty: float) -> torch.Tensor:
    """3×3 forward map (rotation · shear · zoom about the centre, then shift) in continuous pixel coords."""
    cx, cy = width / 2.0, height / 2.0
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64)
    shearing = torch.tensor([[1, math.tan(shear), 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    zoom = torch.diag(torch.tensor([scale, scale, 1.0], dtype=torch.float64))
    to_origin = torch.tensor([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=torch.float64)
    back = torch.tensor([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], dtype=torch.float64)
    return back @ rotation @ shearing @ zoom @ to_origin


def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of every pixel centre, ``H×W`` each; pixel ``i`` covers ``[i, i+1)``."""
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return grid_x, grid_y


def _sample(stack: torch.Tensor, src_x: torch.Tensor, src_y: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinearly read ``stack`` (C×H×W) at continuous pixel coordinates (same convention as ``transforms.warp``)."""
    height, width = stack.shape[-2:]
    grid = torch.stack([2 * src_x / width - 1, 2 * src_y / height - 1], dim=-1)[None]
    return F.grid_sample(stack[None], grid, mode="bilinear", padding_mode=padding, align_corners=False)[0]


def _render_boxes(boxes: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """``N×H×W`` fraction of each pixel covered by each box (exact for sub-pixel box edges)."""
    boxes = boxes.to(device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    ys = torch.arange(height, device=device, dtype=torch.float32)
    cov_x = (torch.minimum(boxes[:, 2:3], xs + 1) - torch.maximum(boxes[:, 0:1], xs)).clamp(0, 1)  # N×W
    cov_y = (torch.minimum(boxes[:, 3:4], ys + 1) - torch.maximum(boxes[:, 1:2], ys)).clamp(0, 1)  # N×H
    return cov_y[:, :, None] * cov_x[:, None, :]


def _bounding_boxes(rendered: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy pixel-edge bounding box of ``rendered[n] >= thresholds[n]`` and whether it is non-empty."""
    inside = (rendered >= thresholds[:, None, None]) & (thresholds[:, None, None] > 0)
    rows, cols = inside.any(dim=2), inside.any(dim=1)  # N×H, N×W
    keep = rows.any(dim=1)
    height, width = rendered.shape[-2:]
    row_idx = torch.arange(height, device=rendered.device)
    col_idx = torch.arange(width, device=rendered.device)
    y1 = torch.where(rows, row_idx, height).min(dim=1).values
    y2 = torch.where(rows, row_idx, -1).max(dim=1).values + 1
    x1 = torch.where(cols, col_idx, width).min(dim=1).values
    x2 = torch.where(cols, col_idx, -1).max(dim=1).values + 1
    return torch.stack([x1, y1, x2, y2], dim=-1).float()[keep], keep


class StrongAugment:
    """RandAugment-style strong view of an (already weakly augmented) X-ray with its mask and boxes.

    MONAI's elastic/affine transforms warp an image and a mask with one draw but not boxes, and draw
    from their own RNG, so the shared image+mask+box warp is hand-written on ``F.grid_sample``.
    """

    def __init__(self, config: StrongAugmentConfig | None = None) -> None:
        self.config = config or StrongAugmentConfig()

    # ------------------------------------------------------------------ public API

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        boxes: torch.Tensor | None,
        box_labels: torch.Tensor | None,
        rng: np.random.Generator,
    ) -> Result:
        """Strong view of one ``C×H×W`` image in [0, 1] (``C`` is 1 for X-rays).

        Returns ``(image, mask, boxes, box_labels)``: the image clamped to [0, 1] with the input's
        dtype and shape, the mask still binary, boxes moved with the image (boxes pushed out of the
        image are dropped together with their labels). ``None`` inputs come back as ``None``.
        """
        if image.ndim != 3:
            raise ValueError(f"image must be C×H×W, got {tuple(image.shape)}")
        if mask is not None and mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} differs from image size {tuple(image.shape[-2:])}")
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise ValueError(f"boxes must be N×4, got {tuple(boxes.shape)}")
        c = self.config
        chosen = [c.ops[i] for i in rng.choice(len(c.ops), size=c.n_ops, replace=False)] if c.n_ops else []
        out_dtype = image.dtype
        image = image.float()
        for op in chosen:
            strength = float(rng.uniform(0.0, c.magnitude))
            image, mask, boxes, box_labels = self.apply_op(op, image, mask, boxes, box_labels, strength, rng)
        return image.clamp(0, 1).to(out_dtype), mask, boxes, box_labels

    def batch(
        self,
        images: torch.Tensor,
        masks: torch.Tensor | None,
        boxes: list[torch.Tensor | None] | None,
        box_labels: list[torch.Tensor | None] | None,
        rng: np.random.Generator,
        *,
        has_mask: torch.Tensor | None = None,
        has_boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list | None, list | None]:
        """Strong views of a ``B×C×H×W`` batch with independent draws per image (in batch order).

        ``masks`` is ``B×1×H×W`` or ``None``; rows where ``has_mask`` is False are returned as they
        are. ``boxes``/``box_labels`` are lists of per-image tensors (entries may be ``None``);
        rows where ``has_boxes`` is False (or whose entry is ``None``) are returned as they are.
        """
        out_images = torch.empty_like(images)
        out_masks = masks.clone() if masks is not None else None
        out_boxes = list(boxes) if boxes is not None else None
        out_labels = list(box_labels) if box_labels is not None else None
        for i in range(images.shape[0]):
            mask_i = masks[i] if masks is not None and (has_mask is None or bool(has_mask[i])) else None
            use_boxes = boxes is not None and boxes[i] is not None and (has_boxes is None or bool(has_boxes[i]))
            boxes_i = boxes[i] if use_boxes else None
            labels_i = box_labels[i] if use_boxes and box_labels is not None else None
            image_i, mask_i, boxes_i, labels_i = self(images[i], mask_i, boxes_i, labels_i, rng)
            out_images[i] = image_i
            if mask_i is not None:
                out_masks[i] = mask_i
            if use_boxes:
                out_boxes[i] = boxes_i
                if out_labels is not None:
                    out_labels[i] = labels_i
        return out_images, out_masks, out_boxes, out_labels

    def augment_batch(self, batch: CXRBatch, rng: np.random.Generator) -> CXRBatch:
        """A copy of ``batch`` whose images, masks and boxes are the strong view (other fields shared)."""
        images, masks, boxes, box_labels = self.batch(
            batch.images, batch.masks, batch.boxes, batch.box_labels, rng, has_mask=batch.has_mask, has_boxes=batch.has_boxes
        )
        return replace(batch, images=images, masks=masks, boxes=boxes, box_labels=box_labels)

    def apply_op(
        self,
        op: str,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        boxes: torch.Tensor | None,
        box_labels: torch.Tensor | None,
        strength: float,
        rng: np.random.Generator,
    ) -> Result:
        """Apply one named op at ``strength`` (0..1) to a float image; the image is clamped to [0, 1]."""
        if op not in STRONG_OPS:
            raise ValueError(f"unknown strong augmentation op {op!r}; the pool is {list(STRONG_OPS)}")
        if op == "affine":
            return self._affine(image, mask, boxes, box_labels, strength, rng)
        if op == "elastic":
            return self._elastic(image, mask, boxes, box_labels, strength, rng)
        return getattr(self, f"_{op}")(image, strength, rng).clamp(0, 1), mask, boxes, box_labels

    # ------------------------------------------------------------------ intensity ops (image only)

    def _gamma(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        return image.clamp(0, 1) ** (self.config.gamma ** (s * rng.choice([-1.0, 1.0])))

    def _contrast(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        mean = image.mean()
        return (image - mean) * (self.config.contrast ** (s * rng.choice([-1.0, 1.0]))) + mean

    def _brightness(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        return image + s * self.config.brightness * rng.choice([-1.0, 1.0])

    def _noise(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        generator = torch.Generator(device=image.device).manual_seed(int(rng.integers(0, 2**63 - 1)))
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        return image + s * self.config.noise_std * noise

    def _blur(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        return gaussian_blur(image, s * self.config.blur_sigma * max(image.shape[-2:]))

    def _sharpen(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        sigma = max(0.5, self.config.sharpen_sigma * max(image.shape[-2:]))
        return unsharp(image, s * self.config.sharpen_amount, sigma)

    def _cutout(self, image: torch.Tensor, s: float, rng: np.random.Generator) -> torch.Tensor:
        """Fill 1..``cutout_max_count`` rectangles; labels stay (the model must infer them from context)."""
        c = self.config
        height, width = image.shape[-2:]
        fill = image.mean() if c.cutout_fill == "mean" else image.new_zeros(())
        image = image.clone()
        for _ in range(int(rng.integers(1, c.cutout_max_count + 1))):
            rect_h = max(1, round(rng.uniform(0.5, 1.0) * s * c.cutout_size * height))
            rect_w = max(1, round(rng.uniform(0.5, 1.0) * s * c.cutout_size * width))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            y0, x0 = max(0, round(cy - rect_h / 2)), max(0, round(cx - rect_w / 2))
            image[..., y0 : y0 + rect_h, x0 : x0 + rect_w] = fill
        return image

    # ------------------------------------------------------------------ geometric ops (image + mask + boxes)

    def _affine(self, image, mask, boxes, box_labels, s: float, rng: np.random.Generator) -> Result:
        """Rotation/zoom/shear/shift; boxes via the corner transform of ``transforms.transform_boxes``."""
        c = self.config
        height, width = image.shape[-2:]

        def draw(limit: float) -> float:
            return float(rng.uniform(-1.0, 1.0)) * s * limit

        forward = _affine_forward(
            height, width,
            angle=math.radians(draw(c.rotate_deg)),
            scale=1.0 + draw(c.scale),
            shear=math.radians(draw(c.shear_deg)),
            tx=draw(c.translate) * width,
            ty=draw(c.translate) * height,
        )  # fmt: skip
        inverse = torch.linalg.inv(forward).float().to(image.device)
        grid_x, grid_y = _pixel_centres(height, width, image.device)
        src_x = inverse[0, 0] * grid_x + inverse[0, 1] * grid_y + inverse[0, 2]
        src_y = inverse[1, 0] * grid_x + inverse[1, 1] * grid_y + inverse[1, 2]
        image, mask = self._warp_image_mask(image, mask, src_x, src_y, "zeros")
        if boxes is not None:
            device = boxes.device
            moved, keep = clip_boxes(transform_boxes(boxes.detach().cpu(), forward), height, width, min_size=1e-3)
            boxes = moved.to(device=device, dtype=boxes.dtype)
            box_labels = box_labels[keep.to(box_labels.device)] if box_labels is not None else None
        return image, mask, boxes, box_labels

    def _elastic(self, image, mask, boxes, box_labels, s: float, rng: np.random.Generator) -> Result:
        """Smooth random displacement field: random control-point offsets upsampled bicubically.

        Boxes cannot follow the corner transform here: the field is not affine, so a box's edges
        bend between its corners (the corners do not bound the warped box), and ``grid_sample``
        gives the backward map while corners would need the forward one (an iterative inverse).
        Each box is therefore rendered as a coverage mask, warped with the same field as the image,
        and replaced by the bounding box of the warped mask (at half its peak coverage, so boxes
        thinner than a pixel survive); a box whose mask leaves the image is dropped with its label.
        Boxes come back snapped to whole pixels.
        """
        c = self.config
        height, width = image.shape[-2:]
        side = max(height, width)
        control = rng.uniform(-1.0, 1.0, size=(1, 2, c.elastic_grid, c.elastic_grid)) * s * c.elastic_alpha * side
        control = torch.from_numpy(control.astype(np.float32)).to(image.device)
        field_xy = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)[0]
        grid_x, grid_y = _pixel_centres(height, width, image.device)
        src_x, src_y = grid_x + field_xy[0], grid_y + field_xy[1]
        if boxes is None or len(boxes) == 0:
            image, mask = self._warp_image_mask(image, mask, src_x, src_y, "border")
            return image, mask, boxes, box_labels
        rendered = _render_boxes(boxes, height, width, image.device)
        thresholds = 0.5 * rendered.flatten(1).max(dim=1).values
        warped = _sample(rendered, src_x, src_y, "border")
        image, mask = self._warp_image_mask(image, mask, src_x, src_y, "border")
        moved, keep = _bounding_boxes(warped, thresholds)
        boxes = moved.to(device=boxes.device, dtype=boxes.dtype)
        box_labels = box_labels[keep.to(box_labels.device)] if box_labels is not None else None
        return image, mask, boxes, box_labels

    @staticmethod
    def _warp_image_mask(image, mask, src_x, src_y, padding: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Warp the image (bilinear) and the mask (bilinear, then > 0.5 so it stays binary) in one pass."""
        if mask is None:
            return _sample(image, src_x, src_y, padding), None
        channels = image.shape[0]
        warped = _sample(torch.cat([image, mask.to(image)], dim=0), src_x, src_y, padding)
        return warped[:channels], (warped[channels:] > 0.5).to(mask.dtype)
