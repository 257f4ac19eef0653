"""Strong (FixMatch) augmentation view: alignment of image, mask and boxes, determinism, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multichex.data.record import CXRSample, collate_samples
from multichex.data.strong_augment import (
    STRONG_OPS,
    StrongAugment,
    StrongAugmentConfig,
    _affine_forward,
    _pixel_centres,
    _sample,
)
from multichex.data.transforms import warp

SIZE = 48
LO, HI = 14, 34
SEEDS = list(range(12))
INTENSITY_OPS = ["gamma", "contrast", "brightness", "noise", "blur", "sharpen"]


# --------------------------------------------------------------------------- helpers


def square_scene(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image bright exactly inside a square, the square as mask, its bounds as the one box."""
    mask = torch.zeros(1, size, size)
    mask[:, LO:HI, LO:HI] = 1.0
    image = 0.1 + 0.8 * mask
    return image, mask, torch.tensor([[LO, LO, HI, HI]], dtype=torch.float32), torch.tensor([3])


def mask_bbox(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x1, y1 = torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1])
    x2, y2 = torch.minimum(a[2], b[2]), torch.minimum(a[3], b[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


def assert_aligned(image, mask, boxes, labels, *, contrast_margin: float, image_iou: float | None) -> None:
    """Mask still sits on the bright region and the box closely encloses the mask."""
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    inside, outside = image[mask > 0.5], image[mask < 0.5]
    assert inside.numel() > 50
    assert inside.mean() - outside.mean() > contrast_margin
    if image_iou is not None:
        assert mask_iou(mask[0] > 0.5, image[0] > 0.5) >= image_iou
    assert boxes.shape == (1, 4) and labels.tolist() == [3]
    tight = mask_bbox(mask)
    assert box_iou(boxes[0], tight) >= 0.7
    # the box encloses the mask's bounding box (1 px slack for resampling at the edges)
    assert (boxes[0, :2] <= tight[:2] + 1).all() and (boxes[0, 2:] >= tight[2:] - 1).all()


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("op", ["affine", "elastic"])
@pytest.mark.parametrize("seed", SEEDS)
def test_geometric_op_moves_image_mask_and_box_together(op, seed):
    image, mask, boxes, labels = square_scene()
    augment = StrongAugment(StrongAugmentConfig(ops=[op], n_ops=1, magnitude=1.0))
    out = augment(image, mask, boxes, labels, np.random.default_rng(seed))
    assert not torch.equal(out[0], image)
    assert_aligned(*out, contrast_margin=0.6, image_iou=0.9)


@pytest.mark.parametrize("seed", SEEDS)
def test_geometric_pipeline_keeps_mask_on_bright_region(seed):
    image, mask, boxes, labels = square_scene()
    augment = StrongAugment(StrongAugmentConfig(ops=["affine", "elastic"], n_ops=2, magnitude=1.0))
    out = augment(image, mask, boxes, labels, np.random.default_rng(seed))
    assert not torch.equal(out[1], mask)
    assert_aligned(*out, contrast_margin=0.6, image_iou=0.9)


@pytest.mark.parametrize("seed", SEEDS)
def test_full_pipeline_without_cutout_keeps_alignment(seed):
    image, mask, boxes, labels = square_scene()
    ops = [op for op in STRONG_OPS if op != "cutout"]
    augment = StrongAugment(StrongAugmentConfig(ops=ops, n_ops=3, magnitude=1.0))
    out = augment(image, mask, boxes, labels, np.random.default_rng(seed))
    assert not torch.equal(out[0], image)
    assert_aligned(*out, contrast_margin=0.25, image_iou=None)


@pytest.mark.parametrize("seed", SEEDS)
def test_default_pipeline_keeps_box_on_mask(seed):
    image, mask, boxes, labels = square_scene()
    out_image, out_mask, out_boxes, out_labels = StrongAugment()(image, mask, boxes, labels, np.random.default_rng(seed))
    assert not torch.equal(out_image, image)
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert out_labels.tolist() == [3]
    assert box_iou(out_boxes[0], mask_bbox(out_mask)) >= 0.7


def test_affine_sampler_matches_the_weak_warp_convention():
    image = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    forward = _affine_forward(SIZE, SIZE, angle=0.3, scale=1.1, shear=0.1, tx=2.0, ty=-3.0)
    inverse = torch.linalg.inv(forward).float()
    gx, gy = _pixel_centres(SIZE, SIZE, torch.device("cpu"))
    src_x = inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2]
    src_y = inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2]
    torch.testing.assert_close(_sample(image, src_x, src_y, "zeros"), warp(image, forward, "bilinear"), atol=1e-4, rtol=0)


def test_elastic_boxes_snap_to_pixels_and_keep_thin_boxes():
    image, mask, _, _ = square_scene()
    boxes = torch.tensor([[LO, LO, HI, HI], [5.2, 5.0, 5.6, 20.0]])
    out = StrongAugment().apply_op("elastic", image, mask, boxes, torch.tensor([1, 2]), 0.0, np.random.default_rng(0))
    torch.testing.assert_close(out[2], torch.tensor([[LO, LO, HI, HI], [5.0, 5.0, 6.0, 20.0]]))
    assert out[3].tolist() == [1, 2]
    torch.testing.assert_close(out[1], mask)


def test_boxes_pushed_out_of_the_image_are_dropped_with_their_labels():
    image, mask, _, _ = square_scene()
    boxes = torch.tensor([[LO, LO, HI, HI], [0.0, 0.0, 3.0, 3.0]])
    config = StrongAugmentConfig(ops=["affine"], n_ops=1, magnitude=1.0, rotate_deg=0, scale=0, shear_deg=0, translate=0.5)
    augment = StrongAugment(config)
    dropped = False
    for seed in range(40):
        _, _, out_boxes, out_labels = augment(image, mask, boxes, torch.tensor([1, 2]), np.random.default_rng(seed))
        assert len(out_boxes) == len(out_labels)
        dropped |= len(out_boxes) < 2
    assert dropped


# --------------------------------------------------------------------------- image-only ops


@pytest.mark.parametrize("op", INTENSITY_OPS + ["cutout"])
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_image_only_ops_leave_mask_boxes_and_labels_unchanged(op, seed):
    image, mask, boxes, labels = square_scene()
    augment = StrongAugment(StrongAugmentConfig(ops=[op], n_ops=1, magnitude=1.0))
    out_image, out_mask, out_boxes, out_labels = augment(image, mask, boxes, labels, np.random.default_rng(seed))
    assert torch.equal(out_mask, mask) and torch.equal(out_boxes, boxes) and torch.equal(out_labels, labels)
    if op != "cutout":  # intensity ops keep the bright square brighter than the background
        assert out_image[mask > 0.5].mean() - out_image[mask < 0.5].mean() > 0.3
    # at a fixed, clearly non-zero strength the op does change the image (and only the image)
    strong = augment.apply_op(op, image, mask, boxes, labels, 0.8, np.random.default_rng(seed))
    assert not torch.equal(strong[0], image)
    assert strong[1] is mask and strong[2] is boxes and strong[3] is labels


def test_cutout_fills_rectangles_with_the_mean_or_zero():
    image, mask, boxes, labels = square_scene()
    for fill, expected in (("mean", float(image.mean())), ("zero", 0.0)):
        config = StrongAugmentConfig(ops=["cutout"], n_ops=1, magnitude=1.0, cutout_fill=fill)
        out = StrongAugment(config)(image, mask, boxes, labels, np.random.default_rng(1))[0]
        changed = out != image
        assert changed.any()
        torch.testing.assert_close(out[changed], torch.full_like(out[changed], expected))


# --------------------------------------------------------------------------- determinism and invariants


def test_same_seed_same_view_and_different_seed_different_view():
    image = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    _, mask, boxes, labels = square_scene()
    augment = StrongAugment(StrongAugmentConfig(n_ops=3, magnitude=0.8))
    first = augment(image, mask, boxes, labels, np.random.default_rng(7))
    again = augment(image, mask, boxes, labels, np.random.default_rng(7))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    others = [augment(image, mask, boxes, labels, np.random.default_rng(seed))[0] for seed in range(8, 14)]
    assert all(not torch.equal(first[0], other) for other in others)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", SEEDS)
def test_range_shape_dtype_and_binary_mask(dtype, seed):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((1, 40, 40))).to(dtype)
    mask = torch.from_numpy(rng.random((1, 40, 40)) > 0.6).float()
    augment = StrongAugment(StrongAugmentConfig(n_ops=4, magnitude=1.0))
    out_image, out_mask, out_boxes, out_labels = augment(image, mask, None, None, rng)
    assert out_image.shape == image.shape and out_image.dtype == dtype
    assert 0.0 <= float(out_image.min()) and float(out_image.max()) <= 1.0
    assert out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert out_boxes is None and out_labels is None


# --------------------------------------------------------------------------- batches


def test_batch_draws_per_image_and_leaves_unlabelled_rows_alone():
    image, mask, boxes, labels = square_scene()
    images = image.expand(3, 1, SIZE, SIZE).clone()
    masks = torch.stack([mask, torch.ones_like(mask), mask])  # row 1 has no mask: left as is
    batch_boxes = [boxes, None, torch.zeros(0, 4)]
    batch_labels = [labels, None, torch.zeros(0, dtype=torch.long)]
    augment = StrongAugment(StrongAugmentConfig(ops=["affine", "elastic"], n_ops=1, magnitude=1.0))
    out = augment.batch(images, masks, batch_boxes, batch_labels, np.random.default_rng(0), has_mask=torch.tensor([True, False, True]))
    out_images, out_masks, out_boxes, out_labels = out
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert not torch.equal(out_images[0], out_images[2])  # independent draws for identical inputs
    assert torch.equal(out_masks[1], masks[1])
    assert out_boxes[1] is None and out_labels[1] is None
    assert out_boxes[2].shape == (0, 4) and out_labels[2].shape == (0,)
    assert_aligned(out_images[0], out_masks[0], out_boxes[0], out_labels[0], contrast_margin=0.6, image_iou=0.9)
    assert mask_iou(out_masks[2][0] > 0.5, out_images[2][0] > 0.5) >= 0.9
    again = augment.batch(images, masks, batch_boxes, batch_labels, np.random.default_rng(0), has_mask=torch.tensor([True, False, True]))
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)


def test_batch_without_masks_or_boxes():
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out_images, out_masks, out_boxes, out_labels = StrongAugment().batch(images, None, None, None, np.random.default_rng(0))
    assert out_images.shape == images.shape and out_masks is None and out_boxes is None and out_labels is None
    assert not torch.equal(out_images, images)


def test_augment_batch_respects_has_mask_and_has_boxes():
    image, mask, boxes, labels = square_scene(32)
    samples = [
        CXRSample(image=image, labels=torch.zeros(2), mask=mask, boxes=torch.tensor([[8.0, 8.0, 20.0, 20.0]]), box_labels=labels),
        CXRSample(image=image, labels=torch.zeros(2)),
    ]
    batch = collate_samples(samples)
    out = StrongAugment().augment_batch(batch, np.random.default_rng(3))
    assert out.images.shape == batch.images.shape and not torch.equal(out.images, batch.images)
    assert torch.equal(out.masks[1], batch.masks[1]) and out.boxes[1].shape == (0, 4)
    assert torch.equal(out.has_mask, batch.has_mask) and torch.equal(out.labels, batch.labels)
    assert len(out.boxes[0]) == len(out.box_labels[0])


# --------------------------------------------------------------------------- configuration


def test_unknown_op_and_bad_settings_raise():
    with pytest.raises(ValueError, match="pool is .*gamma.*sharpen"):
        StrongAugmentConfig(ops=["gamma", "hue"])
    with pytest.raises(ValueError, match="pool"):
        StrongAugment().apply_op("solarize", torch.zeros(1, 8, 8), None, None, None, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_ops"):
        StrongAugmentConfig(ops=["gamma"], n_ops=2)
    with pytest.raises(ValueError, match="magnitude"):
        StrongAugmentConfig(magnitude=1.5)
    with pytest.raises(ValueError, match="cutout_fill"):
        StrongAugmentConfig(cutout_fill="noise")


def test_defaults_use_the_whole_pool_without_colour_ops():
    config = StrongAugmentConfig()
    assert config.ops == list(STRONG_OPS) and config.n_ops == 2 and config.magnitude == 0.5
    assert not any("colo" in op or "hue" in op or "satur" in op for op in config.ops)
