"""Property tests (hypothesis) of the geometry every head relies on: augmentation, letterbox, mask boxes, RLE, IoU/NMS.

Derandomized, so a CI run always checks the same examples; a failure prints the shrunk counterexample.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from monai.data.box_utils import box_iou, non_max_suppression
from scipy import ndimage

from multichex.data.geometry import boxes_from_mask
from multichex.data.rle import decode_rle, encode_rle
from multichex.data.transforms import AugmentConfig, JointAugment, Letterbox, _affine_matrix, transform_boxes

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- strategies


@st.composite
def boxes_in(draw, width: float, height: float, min_size: float = 1.0, max_boxes: int = 6):
    """Float xyxy boxes lying inside a ``width``×``height`` image, at least ``min_size`` on each side."""
    n = draw(st.integers(1, max_boxes))
    rows = []
    for _ in range(n):
        x1 = draw(st.floats(0, width - min_size, allow_nan=False))
        y1 = draw(st.floats(0, height - min_size, allow_nan=False))
        x2 = draw(st.floats(x1 + min_size, width, allow_nan=False))
        y2 = draw(st.floats(y1 + min_size, height, allow_nan=False))
        rows.append([x1, y1, x2, y2])
    return torch.tensor(rows, dtype=torch.float64)


@st.composite
def int_box(draw, width: int, height: int, min_w: int, min_h: int):
    """An integer (pixel-edge) box of at least ``min_w``×``min_h`` inside the image."""
    x1 = draw(st.integers(0, width - min_w))
    y1 = draw(st.integers(0, height - min_h))
    x2 = draw(st.integers(x1 + min_w, width))
    y2 = draw(st.integers(y1 + min_h, height))
    return [x1, y1, x2, y2]


# Masks at least 2×2: see test_boxes_from_mask_accepts_single_row_masks for 1-row / 1-column masks.
masks = st.tuples(st.integers(2, 24), st.integers(2, 24)).flatmap(lambda shape: arrays(np.bool_, shape))
rle_masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(lambda shape: arrays(np.bool_, shape))


def _reference_components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Independent 8-connected component boxes (scipy), xyxy with exclusive max."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s is not None]


# --------------------------------------------------------------------------- affine augmentation


@PROPERTY
@given(
    size=st.sampled_from([32, 64, 256]),
    flip=st.booleans(),
    scale=st.floats(0.5, 2.0),
    tx=st.floats(-0.2, 0.2),
    ty=st.floats(-0.2, 0.2),
    data=st.data(),
)
def test_affine_boxes_then_inverse_return_the_original(size, flip, scale, tx, ty, data):
    boxes = data.draw(boxes_in(size, size))
    forward = _affine_matrix(size, flip, 0.0, scale, tx * size, ty * size)
    there = transform_boxes(boxes, forward)
    assert torch.all(there[:, 2] >= there[:, 0]) and torch.all(there[:, 3] >= there[:, 1])
    # Rotation 0: the enclosing box of mapped corners is exact, so the widths scale exactly.
    assert torch.allclose((there[:, 2] - there[:, 0]).double(), (boxes[:, 2] - boxes[:, 0]) * scale, atol=1e-3)
    back = transform_boxes(there, torch.linalg.inv(forward))
    assert torch.allclose(back.double(), boxes, atol=1.0)
    assert (back.double() - boxes).abs().max() < 1e-2  # far tighter than a pixel in practice


@PROPERTY
@given(
    size=st.sampled_from([32, 64]),
    flip=st.booleans(),
    angle=st.floats(-10, 10),
    scale=st.floats(0.8, 1.2),
    data=st.data(),
)
def test_rotated_boxes_enclose_the_rotated_corners_and_invert_to_a_superset(size, flip, angle, scale, data):
    boxes = data.draw(boxes_in(size, size))
    forward = _affine_matrix(size, flip, math.radians(angle), scale, 0.0, 0.0)
    there = transform_boxes(boxes, forward).double()
    back = transform_boxes(there, torch.linalg.inv(forward)).double()
    # Enclosing boxes of a rotation only grow: the round trip contains the original.
    assert torch.all(back[:, :2] <= boxes[:, :2] + 1e-3) and torch.all(back[:, 2:] >= boxes[:, 2:] - 1e-3)


# --------------------------------------------------------------------------- boxes from masks


@FAST
@given(mask=masks)
def test_boxes_from_mask_are_the_tight_boxes_of_8_connected_components(mask):
    boxes = boxes_from_mask(mask)
    assert boxes.shape[1] == 4 and boxes.dtype == torch.float32
    got = Counter(tuple(int(v) for v in row) for row in boxes.tolist())
    assert got == Counter(_reference_components(mask))
    # Spelled out: every foreground pixel is inside some box, and each box touches its component on all four sides.
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    for component in range(1, count + 1):
        ys, xs = np.nonzero(labels == component)
        tight = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert got[tight] >= 1
    for y, x in zip(*np.nonzero(mask)):
        assert any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in got)


@FAST
@given(mask=masks, min_area=st.integers(1, 6))
def test_boxes_from_mask_min_area_drops_only_small_components(mask, min_area):
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    big = sum(int((labels == c).sum() >= min_area) for c in range(1, count + 1))
    assert len(boxes_from_mask(mask, min_area=min_area)) == big
    assert len(boxes_from_mask(torch.from_numpy(mask.astype(np.float32))[None], min_area=min_area)) == big


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1)])
def test_boxes_from_mask_accepts_single_row_masks(shape):
    mask = np.ones(shape, dtype=bool)
    assert boxes_from_mask(mask).tolist() == [[0.0, 0.0, float(shape[1]), float(shape[0])]]


# --------------------------------------------------------------------------- RLE


@FAST
@given(mask=rle_masks, relative=st.booleans())
def test_rle_round_trips_any_mask(mask, relative):
    code = encode_rle(mask, relative=relative)
    decoded = decode_rle(code, *mask.shape, relative=relative)
    assert decoded.shape == mask.shape and decoded.dtype == np.bool_
    assert np.array_equal(decoded, mask)
    assert (code == "-1") == (not mask.any())
    values = [int(v) for v in code.split()] if mask.any() else []
    assert all(v >= 0 for v in values) and sum(values[1::2]) == int(mask.sum())
    assert all(length > 0 for length in values[1::2])


# --------------------------------------------------------------------------- letterbox


@PROPERTY
@given(
    height=st.integers(8, 160),
    width=st.integers(8, 160),
    size=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_letterbox_keeps_image_mask_and_boxes_aligned(height, width, size, data):
    lb = Letterbox.fit(height, width, size)
    new_h, new_w = lb.inner_size
    assert max(new_h, new_w) == size and 0 <= lb.pad_x and 0 <= lb.pad_y
    assert lb.pad_x + new_w <= size and lb.pad_y + new_h <= size
    # A box big enough to cover at least 3 letterbox pixels each way.
    need = math.ceil(3 / lb.scale)
    assume(need <= min(height, width))
    x1, y1, x2, y2 = data.draw(int_box(width, height, need, need))
    box = torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)
    mask = torch.zeros(1, height, width)
    mask[:, y1:y2, x1:x2] = 1.0

    expected = lb.apply_boxes(box)[0]
    # Tolerance in letterbox pixels: one pixel of resampling plus the scale/rounding mismatch of the inner size.
    tolerance = 1.0 + max(abs(new_w - width * lb.scale), abs(new_h - height * lb.scale)) + 0.01
    for mode in ("bilinear", "nearest"):  # the mask path (bilinear + threshold, as the data set does) and nearest
        boxed = lb.apply_image(mask, mode=mode)
        assert boxed.shape == (1, size, size)
        # Nothing outside the inner area.
        inner = torch.zeros(size, size, dtype=torch.bool)
        inner[lb.pad_y : lb.pad_y + new_h, lb.pad_x : lb.pad_x + new_w] = True
        assert not (boxed[0][~inner] != 0).any()
        found = boxes_from_mask(boxed[0] > 0.5)
        assert len(found) == 1, (mode, found)
        assert torch.allclose(found[0], expected, atol=tolerance), (mode, found[0].tolist(), expected.tolist())

    # Boxes: invert(apply(b)) == b.
    assert torch.allclose(lb.invert_boxes(lb.apply_boxes(box.double())), box.double(), atol=1e-6)
    # Maps: letterboxed mask back to the original grid lands on the original box (within a letterbox pixel there).
    restored = lb.invert_map(lb.apply_image(mask))
    assert restored.shape == (1, height, width)
    back = boxes_from_mask(restored[0] > 0.5)
    assert len(back) == 1
    assert torch.allclose(back[0], box[0], atol=tolerance / lb.scale + 1.0), (back[0].tolist(), box[0].tolist())
    # And the box detected in letterbox space, inverted, agrees with it.
    assert torch.allclose(lb.invert_boxes(boxes_from_mask(lb.apply_image(mask)[0] > 0.5))[0], box[0], atol=tolerance / lb.scale)


# --------------------------------------------------------------------------- IoU and NMS (MONAI)


@FAST
@given(data=st.data())
def test_box_iou_is_symmetric_bounded_and_one_on_itself(data):
    a = data.draw(boxes_in(100, 100, min_size=0.5, max_boxes=8)).float()
    b = data.draw(boxes_in(100, 100, min_size=0.5, max_boxes=8)).float()
    ab, ba = box_iou(a, b), box_iou(b, a)
    assert ab.shape == (len(a), len(b))
    assert torch.allclose(ab, ba.T, atol=1e-6)
    assert torch.all(ab >= 0) and torch.all(ab <= 1 + 1e-6)
    assert torch.allclose(torch.diagonal(box_iou(a, a)), torch.ones(len(a)), atol=1e-5)
    # Translating both sets together does not change IoU.
    shift = torch.tensor([7.0, -3.0, 7.0, -3.0])
    assert torch.allclose(box_iou(a + shift, b + shift), ab, atol=1e-4)


@FAST
@given(data=st.data(), threshold=st.floats(0.05, 0.95))
def test_nms_keeps_a_sorted_non_overlapping_subset_that_explains_the_rest(data, threshold):
    boxes = data.draw(boxes_in(64, 64, min_size=1.0, max_boxes=12)).float()
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 1, width=32), min_size=len(boxes), max_size=len(boxes))))
    keep = non_max_suppression(boxes, scores, threshold)
    keep_list = [int(i) for i in keep]
    assert len(keep_list) >= 1 and len(set(keep_list)) == len(keep_list)
    assert all(0 <= i < len(boxes) for i in keep_list)
    kept_scores = scores[keep_list]
    assert torch.all(kept_scores[:-1] >= kept_scores[1:]), "kept boxes are ordered by score"
    assert float(kept_scores[0]) == float(scores.max())
    iou = box_iou(boxes, boxes)
    for i, first in enumerate(keep_list):
        for second in keep_list[i + 1 :]:
            assert iou[first, second] <= threshold + 1e-6
    # Every suppressed box overlaps a kept box with at least its score by more than the threshold.
    for dropped in set(range(len(boxes))) - set(keep_list):
        assert any(iou[dropped, k] > threshold - 1e-6 and scores[k] >= scores[dropped] for k in keep_list)
    # max_proposals truncates the same ranking.
    assert [int(i) for i in non_max_suppression(boxes, scores, threshold, max_proposals=1)] == keep_list[:1]


# --------------------------------------------------------------------------- joint augmentation


@st.composite
def blob_mask(draw, size: int):
    """A mask of 1-3 filled rectangles and ellipses."""
    mask = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(draw(st.integers(1, 3))):
        x1, y1, x2, y2 = draw(int_box(size, size, 2, 2))
        if draw(st.booleans()):
            mask[y1:y2, x1:x2] = True
        else:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max(1.0, (x2 - x1) / 2), max(1.0, (y2 - y1) / 2)
            mask |= ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    assume(mask.any())
    return mask


@PROPERTY
@given(size=st.sampled_from([32, 48]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_joint_augment_keeps_mask_inside_its_boxes(size, seed, data):
    mask_np = data.draw(blob_mask(size))
    mask = torch.from_numpy(mask_np.astype(np.float32))[None]
    boxes = boxes_from_mask(mask_np)
    labels = torch.arange(len(boxes))
    image = torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed % 1000))
    augment = JointAugment(AugmentConfig(enabled=True, rotate_deg=15.0, scale=(0.8, 1.2), translate=0.1))
    out_image, out_mask, out_boxes, out_labels = augment(image, mask, boxes, labels, np.random.default_rng(seed))

    assert out_image.shape == image.shape and torch.all((out_image >= 0) & (out_image <= 1))
    assert out_mask.shape == mask.shape and set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert len(out_boxes) == len(out_labels) and set(out_labels.tolist()) <= set(labels.tolist())
    assert torch.all(out_boxes >= 0) and torch.all(out_boxes <= size)
    assert torch.all(out_boxes[:, 2] > out_boxes[:, 0]) and torch.all(out_boxes[:, 3] > out_boxes[:, 1])
    ys, xs = torch.nonzero(out_mask[0] > 0.5, as_tuple=True)
    if len(ys) == 0:
        return
    assert len(out_boxes), "mask pixels survived but every box was dropped"
    cx, cy = xs.double() + 0.5, ys.double() + 0.5  # pixel centres
    b = out_boxes.double()
    inside = ((cx[:, None] >= b[None, :, 0] - 1) & (cx[:, None] <= b[None, :, 2] + 1)
              & (cy[:, None] >= b[None, :, 1] - 1) & (cy[:, None] <= b[None, :, 3] + 1)).any(dim=1)
    outside = [(int(x), int(y)) for x, y, ok in zip(xs, ys, inside) if not ok]
    assert not outside, f"augmented mask pixels outside every augmented box (±1 px): {outside[:5]}"


def test_joint_augment_same_seed_same_result():
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:20, 5:15] = 1
    boxes = boxes_from_mask(mask)
    image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    augment = JointAugment()
    first = augment(image, mask, boxes, torch.zeros(1, dtype=torch.long), np.random.default_rng([0, 1, 2]))
    second = augment(image, mask, boxes, torch.zeros(1, dtype=torch.long), np.random.default_rng([0, 1, 2]))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
