"""Sample records, collation and the geometry of boxes, masks, letterbox and joint augmentation.

Property-style tests: each property is checked over many random seeds with plain parametrisation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from multichex.data.geometry import boxes_from_mask, clip_boxes, validate_boxes, xywh_to_xyxy
from multichex.data.record import CXRSample, collate_samples
from multichex.data.transforms import AugmentConfig, JointAugment, Letterbox, normalize_intensity

SEEDS = list(range(25))
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------- helpers


def random_blobs(
    rng: np.random.Generator, size: int = 64, margin: int = 0, count: int | None = None, single_pixels: bool = True
) -> np.ndarray:
    """A bool mask of random ellipses, rectangles (and single pixels), kept ``margin`` px from the border.

    Without ``single_pixels`` every blob is at least 2 px wide and high.
    """
    mask = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    lo, hi = margin, size - margin
    smallest = 1 if single_pixels else 2
    for _ in range(count if count is not None else int(rng.integers(1, 6))):
        kind = rng.integers(0, 3 if single_pixels else 2)
        if kind == 0:
            ry, rx = rng.uniform(2.0, 8, size=2)
            cy = rng.uniform(lo + ry, hi - ry)
            cx = rng.uniform(lo + rx, hi - rx)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        elif kind == 1:
            h, w = rng.integers(smallest, 12, size=2)
            y, x = rng.integers(lo, hi - h), rng.integers(lo, hi - w)
            mask[y : y + h, x : x + w] = True
        else:
            mask[rng.integers(lo, hi), rng.integers(lo, hi)] = True
    return mask


def inside_any(ys: np.ndarray, xs: np.ndarray, boxes: np.ndarray, tolerance: float) -> np.ndarray:
    """For pixels (y, x) covering [x, x+1)×[y, y+1): whether some box contains it (± tolerance)."""
    if len(boxes) == 0:
        return np.zeros(len(ys), dtype=bool)
    x1, y1, x2, y2 = (boxes[:, i][None] for i in range(4))
    xs, ys = xs[:, None], ys[:, None]
    hit = (xs >= x1 - tolerance) & (xs + 1 <= x2 + tolerance) & (ys >= y1 - tolerance) & (ys + 1 <= y2 + tolerance)
    return hit.any(axis=1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------- records


def test_sample_validation_errors_name_the_source():
    with pytest.raises(ValueError, match="1×H×W"):
        CXRSample(image=torch.zeros(3, 8, 8), labels=torch.zeros(2), meta={"path": "bad.png"})
    with pytest.raises(ValueError, match="bad.png"):
        CXRSample(image=torch.zeros(1, 8, 8), labels=torch.zeros(2), mask=torch.zeros(1, 4, 4), meta={"path": "bad.png"})
    with pytest.raises(ValueError, match="N×4"):
        CXRSample(image=torch.zeros(1, 8, 8), labels=torch.zeros(2), boxes=torch.zeros(3))
    with pytest.raises(ValueError, match="box labels"):
        CXRSample(image=torch.zeros(1, 8, 8), labels=torch.zeros(2), boxes=torch.zeros(2, 4), box_labels=torch.zeros(1, dtype=torch.long))


def test_sample_defaults_box_labels_and_patient_id():
    sample = CXRSample(image=torch.zeros(1, 8, 8), labels=torch.zeros(2), boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                       meta={"path": "a.png", "patient_id": "p1"})
    assert sample.box_labels.tolist() == [0]
    assert sample.patient_id == "p1" and sample.source == "a.png"
    assert math.isnan(sample.positive)


def test_collate_drops_none_and_sets_presence_flags():
    a = CXRSample(image=torch.rand(1, 8, 8), labels=torch.tensor([1.0, math.nan]), positive=1.0, mask=torch.ones(1, 8, 8),
                  meta={"path": "a"})
    b = CXRSample(image=torch.rand(1, 8, 8), labels=torch.tensor([math.nan, 0.0]),
                  boxes=torch.tensor([[1.0, 1.0, 3.0, 3.0]]), box_labels=torch.tensor([1]), meta={"path": "b"})
    c = CXRSample(image=torch.rand(1, 8, 8), labels=torch.tensor([0.0, 0.0]), boxes=torch.zeros(0, 4), meta={"path": "c"})
    batch = collate_samples([None, a, None, b, c])
    assert len(batch) == 3 and [m["path"] for m in batch.meta] == ["a", "b", "c"]
    assert batch.has_mask.tolist() == [True, False, False]
    assert batch.has_boxes.tolist() == [False, True, True]
    assert batch.has_labels.tolist() == [[True, False], [False, True], [True, True]]
    assert torch.equal(batch.masks[1], torch.zeros(1, 8, 8))
    assert batch.boxes[0].shape == (0, 4) and batch.boxes[2].shape == (0, 4)
    assert batch.box_labels[1].tolist() == [1]
    assert batch.positive[0] == 1.0 and torch.isnan(batch.positive[1:]).all()
    assert collate_samples([None, None]) is None
    assert collate_samples([]) is None


# --------------------------------------------------------------------------- boxes_from_mask


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_from_mask_cover_every_component(seed):
    rng = np.random.default_rng(seed)
    mask = random_blobs(rng, size=48)
    boxes = boxes_from_mask(mask).numpy()
    components, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    assert len(boxes) == count
    assert boxes.dtype == np.float32
    for component in range(1, count + 1):
        ys, xs = np.nonzero(components == component)
        # One box holds the whole component, and it is tight (exclusive max).
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        assert any(np.array_equal(tight, b) for b in boxes), (tight, boxes)
    ys, xs = np.nonzero(mask)
    assert inside_any(ys, xs, boxes, tolerance=0.0).all()


def test_boxes_from_mask_edge_cases():
    assert boxes_from_mask(np.zeros((8, 8))).shape == (0, 4)
    full = boxes_from_mask(torch.ones(1, 8, 6))
    assert full.tolist() == [[0.0, 0.0, 6.0, 8.0]]
    diag = np.eye(5)  # diagonal pixels are one 8-connected component
    assert boxes_from_mask(diag).tolist() == [[0.0, 0.0, 5.0, 5.0]]
    small = np.zeros((10, 10))
    small[1, 1] = 1
    small[5:8, 5:8] = 1
    assert boxes_from_mask(small, min_area=2).tolist() == [[5.0, 5.0, 8.0, 8.0]]
    with pytest.raises(ValueError, match="2-D"):
        boxes_from_mask(np.zeros((2, 4, 4)))


def test_box_helpers():
    assert xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[1.0, 2.0, 4.0, 6.0]]
    clipped, keep = clip_boxes(torch.tensor([[-5.0, -5.0, 5.0, 5.0], [20.0, 20.0, 30.0, 30.0], [9.5, 0.0, 15.0, 5.0]]), 10, 10)
    assert keep.tolist() == [True, False, False]
    assert clipped.tolist() == [[0.0, 0.0, 5.0, 5.0]]
    with pytest.raises(ValueError, match="img.png"):
        validate_boxes(torch.tensor([[5.0, 5.0, 2.0, 8.0]]), 10, 10, "img.png")
    with pytest.raises(ValueError, match="not finite"):
        validate_boxes(torch.tensor([[math.nan, 0.0, 2.0, 8.0]]), 10, 10, "img.png")
    with pytest.raises(ValueError, match="outside"):
        validate_boxes(torch.tensor([[50.0, 50.0, 60.0, 60.0]]), 10, 10, "img.png")
    clipped, keep = validate_boxes(torch.tensor([[5.0, 5.0, 20.0, 8.0], [30.0, 30.0, 40.0, 40.0]]), 10, 10, "x")
    assert clipped.tolist() == [[5.0, 5.0, 10.0, 8.0]] and keep.tolist() == [True, False]


def test_dropped_boxes_are_a_warning_once_per_image(caplog):
    boxes = torch.tensor([[5.0, 5.0, 20.0, 8.0], [30.0, 30.0, 40.0, 40.0]])
    with caplog.at_level("WARNING", logger="multichex.data.geometry"):
        for _ in range(3):  # e.g. three epochs
            validate_boxes(boxes, 10, 10, "scan-with-stray-box.png")
        validate_boxes(boxes[:1], 10, 10, "scan-inside.png")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["scan-with-stray-box.png: 1 of 2 boxes lie outside the 10×10 image and are dropped"]


# --------------------------------------------------------------------------- joint augmentation


STRONG = AugmentConfig(enabled=True, hflip_p=0.5, rotate_deg=20.0, scale=(0.8, 1.2), translate=0.08)


@pytest.mark.parametrize("config", [AugmentConfig(), STRONG], ids=["default", "strong"])
@pytest.mark.parametrize("seed", SEEDS)
def test_joint_augment_mask_inside_boxes(seed, config):
    size = 64
    rng = np.random.default_rng(1000 + seed)
    mask_np = random_blobs(rng, size=size, margin=14, single_pixels=False)
    mask = torch.from_numpy(mask_np).float()[None]
    image = torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed))
    boxes = boxes_from_mask(mask)
    labels = torch.arange(len(boxes))
    aug_image, aug_mask, aug_boxes, aug_labels = JointAugment(config)(image, mask, boxes, labels, np.random.default_rng(seed))
    assert aug_image.shape == image.shape and aug_mask.shape == mask.shape
    assert float(aug_image.min()) >= 0.0 and float(aug_image.max()) <= 1.0
    assert set(torch.unique(aug_mask).tolist()) <= {0.0, 1.0}
    assert aug_boxes.shape[1] == 4 and len(aug_boxes) == len(aug_labels)
    assert (aug_boxes[:, 2] > aug_boxes[:, 0]).all() and (aug_boxes[:, 3] > aug_boxes[:, 1]).all()
    assert (aug_boxes >= 0).all() and (aug_boxes <= size).all()
    ys, xs = np.nonzero(aug_mask[0].numpy() > 0.5)
    assert len(ys) > 0
    covered = inside_any(ys, xs, aug_boxes.numpy(), tolerance=1.0)
    assert covered.all(), f"{(~covered).sum()} mask pixels outside every box"
    # The same (seed, image) gives the same result: augmentation is reproducible.
    again = JointAugment(config)(image, mask, boxes, labels, np.random.default_rng(seed))
    assert torch.equal(again[0], aug_image) and torch.equal(again[1], aug_mask) and torch.equal(again[2], aug_boxes)


def test_joint_augment_keeps_box_of_surviving_one_pixel_lesion():
    config = AugmentConfig(enabled=True, hflip_p=0.0, rotate_deg=0.0, scale=(0.9, 0.9), translate=0.0, noise_std=0.0)
    mask = torch.zeros(1, 64, 64)
    mask[0, 32, 32] = 1.0
    boxes = boxes_from_mask(mask)
    assert boxes.tolist() == [[32.0, 32.0, 33.0, 33.0]]
    _, aug_mask, aug_boxes, aug_labels = JointAugment(config)(torch.rand(1, 64, 64), mask, boxes, torch.tensor([0]),
                                                              np.random.default_rng(0))
    ys, xs = np.nonzero(aug_mask[0].numpy() > 0.5)
    assert len(ys) == 1, "the lesion pixel is still in the augmented mask"
    assert len(aug_boxes) == 1 and len(aug_labels) == 1
    assert inside_any(ys, xs, aug_boxes.numpy(), tolerance=1.0).all()


def test_joint_augment_pure_flip_is_exact():
    config = AugmentConfig(enabled=True, hflip_p=1.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0,
                           gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0)
    rng = np.random.default_rng(5)
    mask_np = random_blobs(rng, size=32, margin=2)
    mask = torch.from_numpy(mask_np).float()[None]
    image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = boxes_from_mask(mask)
    aug_image, aug_mask, aug_boxes, _ = JointAugment(config)(image, mask, boxes, None, rng)
    torch.testing.assert_close(aug_image, torch.flip(image, dims=[-1]), atol=1e-5, rtol=0)
    assert torch.equal(aug_mask, torch.flip(mask, dims=[-1]))
    expected = torch.stack([32 - boxes[:, 2], boxes[:, 1], 32 - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(aug_boxes, expected, atol=1e-4, rtol=0)


def test_joint_augment_disabled_is_identity():
    image, mask = torch.rand(1, 16, 16), torch.ones(1, 16, 16)
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = JointAugment(AugmentConfig(enabled=False))(image, mask, boxes, None, np.random.default_rng(0))
    assert out[0] is image and out[1] is mask and out[2] is boxes


def test_joint_augment_refuses_non_square():
    with pytest.raises(ValueError, match="square"):
        JointAugment()(torch.rand(1, 16, 20), None, None, None, np.random.default_rng(0))


def test_joint_augment_drops_labels_of_boxes_pushed_out():
    config = AugmentConfig(enabled=True, hflip_p=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, noise_std=0.0)
    augment = JointAugment(config)
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [10.0, 10.0, 14.0, 14.0]])
    labels = torch.tensor([3, 7])
    _, _, out_boxes, out_labels = augment(torch.rand(1, 16, 16), None, boxes, labels, np.random.default_rng(0))
    torch.testing.assert_close(out_boxes, boxes, atol=1e-4, rtol=0)
    assert out_labels.tolist() == [3, 7]


# --------------------------------------------------------------------------- letterbox


@pytest.mark.parametrize("seed", SEEDS)
def test_letterbox_boxes_round_trip(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(20, 400, size=2))
    size = int(rng.choice([32, 64, 256]))
    box = Letterbox.fit(height, width, size)
    x1 = rng.uniform(0, width - 1, 6)
    y1 = rng.uniform(0, height - 1, 6)
    x2 = x1 + rng.uniform(0.5, 1, 6) * (width - x1)
    y2 = y1 + rng.uniform(0.5, 1, 6) * (height - y1)
    original = torch.tensor(np.stack([x1, y1, x2, y2], axis=1), dtype=torch.float32)
    inside = box.apply_boxes(original)
    assert (inside >= -1e-4).all() and (inside <= size + 1e-4).all()
    torch.testing.assert_close(box.invert_boxes(inside), original, atol=1e-4, rtol=0)


@pytest.mark.parametrize("height, width, size", [(90, 60, 64), (60, 90, 64), (300, 200, 64), (40, 25, 64), (61, 97, 32)])
def test_letterbox_geometry(height, width, size):
    box = Letterbox.fit(height, width, size)
    new_h, new_w = box.inner_size
    assert max(new_h, new_w) == size
    assert box.pad_x == (size - new_w) // 2 and box.pad_y == (size - new_h) // 2
    image = box.apply_image(torch.ones(1, height, width))
    assert image.shape == (1, size, size)
    inner = image[:, box.pad_y : box.pad_y + new_h, box.pad_x : box.pad_x + new_w]
    torch.testing.assert_close(inner, torch.ones_like(inner))
    assert float(image.sum()) == pytest.approx(new_h * new_w, rel=1e-5)
    assert Letterbox(**box.to_dict()) == box


@pytest.mark.parametrize("height, width", [(90, 60), (60, 90), (200, 120), (48, 80)])
def test_letterbox_invert_map_recovers_mask(height, width):
    yy, xx = np.mgrid[:height, :width]
    mask = (((yy - height * 0.45) / (height * 0.3)) ** 2 + ((xx - width * 0.55) / (width * 0.3)) ** 2) <= 1
    mask[int(height * 0.1) : int(height * 0.25), int(width * 0.1) : int(width * 0.4)] = True
    box = Letterbox.fit(height, width, 64)
    square = box.apply_image(torch.from_numpy(mask).float()[None])
    back = box.invert_map(square)
    assert back.shape == (1, height, width)
    recovered = back[0].numpy() >= 0.5
    assert iou(recovered, mask) > 0.95


def test_normalize_intensity():
    rng = np.random.default_rng(0)
    array = rng.normal(1000, 200, size=(32, 32))
    out = normalize_intensity(array)
    assert out.shape == array.shape and out.min() == 0.0 and out.max() == 1.0
    assert np.all(normalize_intensity(np.full((4, 4), 7.0)) == 0)
    # Monotone: ordering of pixels is preserved.
    flat, flat_out = array.ravel(), out.ravel()
    order = np.argsort(flat)
    assert np.all(np.diff(flat_out[order]) >= 0)
