"""Detection target assignment: one target per anchor, the best-matching box wins, independent of box order."""

from __future__ import annotations

import pytest
import torch

from multichex.losses.detection import DetectionLoss
from multichex.models.heads.detection import CheXDet

SIZE = 64  # stride 16 → a 4×4 grid


def _loss(anchors: list[list[float]]) -> DetectionLoss:
    torch.manual_seed(0)
    return DetectionLoss(CheXDet((8, 8, 8, 8), num_classes=2, anchors=anchors, image_size=SIZE, stride=16))


def _raw(loss: DetectionLoss) -> torch.Tensor:
    head = loss.head
    return torch.randn(1, head.num_anchors, SIZE // head.stride, SIZE // head.stride, 5 + head.num_classes)


def _targets(loss: DetectionLoss, raw: torch.Tensor, boxes: list[list[float]], labels: list[int]):
    objectness, index, params, classes, gt_boxes = loss.build_targets(raw, [torch.tensor(boxes)], [torch.tensor(labels)])
    assert len(index) == len(set(index)), f"an anchor got more than one target: {index}"
    by_anchor = {slot: (p, c, g.tolist()) for slot, p, c, g in zip(index, params, classes, gt_boxes)}
    return objectness, by_anchor


# Both boxes are centred in cell (row 1, col 1) and match the 16×16 anchor best (the 32×32 one second).
BEST = [16.0, 16.0, 32.0, 32.0]  # 16×16: shape IoU 1.0 with anchor 0
OTHER = [19.0, 13.0, 33.0, 31.0]  # 14×18, centre (26, 22): shape IoU 0.79 with anchor 0, 0.25 with anchor 1


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["best-first", "best-last"])
def test_two_boxes_on_one_anchor_best_keeps_it_other_takes_next_anchor(order):
    loss = _loss([[0.25, 0.25], [0.5, 0.5]])
    raw = _raw(loss)
    boxes, labels = [BEST, OTHER], [0, 1]
    objectness, by_anchor = _targets(loss, raw, [boxes[i] for i in order], [labels[i] for i in order])
    assert set(by_anchor) == {(0, 0, 1, 1), (0, 1, 1, 1)}
    params, label, box = by_anchor[(0, 0, 1, 1)]
    assert box == BEST and label == 0
    torch.testing.assert_close(params, torch.tensor([0.5, 0.5, 0.0, 0.0]))  # centre (24, 24) = cell centre, exact anchor size
    params, label, box = by_anchor[(0, 1, 1, 1)]
    assert box == OTHER and label == 1
    anchor = loss.head.anchors[1]
    torch.testing.assert_close(params, torch.stack([
        torch.tensor(26 / 16 - 1), torch.tensor(22 / 16 - 1), torch.log(14 / anchor[0]), torch.log(18 / anchor[1])
    ]))
    assert objectness.sum() == 2 and objectness[0, 0, 1, 1] == 1 and objectness[0, 1, 1, 1] == 1


def test_loss_does_not_depend_on_box_order():
    loss = _loss([[0.25, 0.25], [0.5, 0.5]])
    raw = _raw(loss)
    first = loss(raw, [torch.tensor([BEST, OTHER])], [torch.tensor([0, 1])], torch.tensor([True]))
    second = loss(raw, [torch.tensor([OTHER, BEST])], [torch.tensor([1, 0])], torch.tensor([True]))
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["best-first", "best-last"])
def test_no_free_anchor_left_the_weaker_box_gets_none(order):
    loss = _loss([[0.25, 0.25]])  # one anchor per cell
    boxes, labels = [BEST, OTHER], [0, 1]
    objectness, by_anchor = _targets(loss, _raw(loss), [boxes[i] for i in order], [labels[i] for i in order])
    assert list(by_anchor) == [(0, 0, 1, 1)]
    assert by_anchor[(0, 0, 1, 1)][2] == BEST and by_anchor[(0, 0, 1, 1)][1] == 0
    assert objectness.sum() == 1


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["centred-first", "centred-last"])
def test_equal_shapes_tie_broken_by_position_not_order(order):
    """Same size, same cell: equal shape IoU; the box centred nearer the cell centre keeps the best anchor."""
    loss = _loss([[0.25, 0.25], [0.5, 0.5]])
    centred, offset = [16.0, 16.0, 32.0, 32.0], [22.0, 10.0, 38.0, 26.0]  # centres (24, 24) and (30, 18)
    boxes, labels = [centred, offset], [0, 1]
    _, by_anchor = _targets(loss, _raw(loss), [boxes[i] for i in order], [labels[i] for i in order])
    assert by_anchor[(0, 0, 1, 1)][2] == centred and by_anchor[(0, 1, 1, 1)][2] == offset


def test_boxes_in_different_cells_or_images_are_unaffected():
    loss = _loss([[0.25, 0.25], [0.5, 0.5]])
    raw = torch.randn(2, 2, 4, 4, 7)
    far = [32.0, 32.0, 48.0, 48.0]  # centre (40, 40): cell (2, 2)
    _, index, _, _, _ = loss.build_targets(raw, [torch.tensor([BEST, far]), torch.tensor([BEST])],
                                           [torch.tensor([0, 1]), torch.tensor([1])])
    assert sorted(index) == [(0, 0, 1, 1), (0, 0, 2, 2), (1, 0, 1, 1)]
