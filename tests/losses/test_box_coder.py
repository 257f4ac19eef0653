"""The box coder shared by CheXDet and its loss: encode → decode round-trips boxes; network and loss agree."""

from __future__ import annotations

import pytest
import torch

from multichex.data.record import CXRSample, collate_samples
from multichex.losses.detection import DetectionLoss
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.config import ModelConfig
from multichex.models.heads.box_coder import BoxCoder
from multichex.models.heads.detection import CheXDet
from multichex.models.multichexnet import MultiCheXNet

SIZE = 128  # stride 16 → an 8×8 grid


def _boxes(n: int, seed: int) -> torch.Tensor:
    """Random xyxy boxes inside the image, 8 to 60 pixels a side."""
    g = torch.Generator().manual_seed(seed)
    size = 8 + 52 * torch.rand(n, 2, generator=g)
    centre = size / 2 + (SIZE - size) * torch.rand(n, 2, generator=g)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_encode_then_decode_gives_the_boxes_back(stride):
    coder = BoxCoder(stride)
    anchors = torch.tensor([[16.0, 16.0], [32.0, 24.0], [48.0, 64.0]])
    boxes = _boxes(40, seed=stride)
    cells = [coder.cell(box, SIZE // stride, SIZE // stride) for box in boxes]
    rows, cols = (torch.tensor(v) for v in zip(*cells))
    which = torch.arange(len(boxes)) % len(anchors)
    targets = coder.encode(boxes, anchors[which], rows, cols)
    assert ((targets[:, :2] > 0) & (targets[:, :2] < 1)).all()  # centre offsets inside the cell
    # The raw prediction that hits each target exactly: sigmoid⁻¹ of the offsets, the log sizes as they are.
    raw = torch.zeros(len(boxes), len(anchors), SIZE // stride, SIZE // stride, 5)
    raw[torch.arange(len(boxes)), which, rows, cols, :4] = torch.cat([torch.logit(targets[:, :2].double()).float(), targets[:, 2:]], 1)
    decoded = coder.decode(raw, anchors)[torch.arange(len(boxes)), which, rows, cols]
    # Exact (to float rounding) but for centres within offset_eps of a cell border, which encode moves inside.
    inside = ((targets[:, :2] > coder.offset_eps) & (targets[:, :2] < 1 - coder.offset_eps)).all(dim=1)
    assert inside.sum() >= len(boxes) - 3
    torch.testing.assert_close(decoded[inside], boxes[inside], atol=1e-3, rtol=0)
    torch.testing.assert_close(decoded, boxes, atol=coder.offset_eps * stride + 1e-3, rtol=0)


def test_decoding_is_the_heads_and_clamps_sizes():
    torch.manual_seed(0)
    head = CheXDet((8, 8, 8, 8), num_classes=2, anchors=[[0.1, 0.1], [0.3, 0.2]], image_size=SIZE, stride=16)
    raw = 3 * torch.randn(2, 2, 8, 8, 7)
    assert torch.equal(head.decode_boxes(raw), head.box_coder.decode(raw, head.anchors))
    raw[..., 2:4] = 50.0  # far beyond exp(MAX_LOG_SCALE)
    boxes = head.decode_boxes(raw)
    widths = boxes[..., 2] - boxes[..., 0]
    torch.testing.assert_close(widths[0, 1], torch.full((8, 8), float(head.anchors[1, 0] * torch.exp(torch.tensor(4.0)))))


def _reference_params(box: torch.Tensor, anchor: torch.Tensor, row: int, col: int, stride: int) -> torch.Tensor:
    """The loss's target encoding as it was written before the box coder (one box at a time)."""
    w, h = (box[2] - box[0]).clamp(min=1.0), (box[3] - box[1]).clamp(min=1.0)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    offset_x = (cx / stride - col).clamp(1e-3, 1 - 1e-3)
    offset_y = (cy / stride - row).clamp(1e-3, 1 - 1e-3)
    return torch.stack([offset_x, offset_y, torch.log(w / anchor[0]), torch.log(h / anchor[1])])


def test_loss_targets_are_bit_identical_to_the_per_box_encoding():
    torch.manual_seed(1)
    head = CheXDet((8, 8, 8, 8), num_classes=3, anchors=[[0.1, 0.1], [0.3, 0.2]], image_size=SIZE, stride=16)
    loss = DetectionLoss.for_head(head)
    boxes = [_boxes(6, seed=3), _boxes(0, seed=4).reshape(0, 4), _boxes(9, seed=5)]
    labels = [torch.randint(0, 3, (len(b),)) for b in boxes]
    raw = torch.randn(3, 2, 8, 8, 8)
    _, index, params, _, gt = loss.build_targets(raw, boxes, labels)
    assert len(index) == len(params) == len(gt) > 0
    for (_, k, row, col), p, box in zip(index, params, gt):
        assert torch.equal(p, _reference_params(box, head.anchors[k], row, col, head.stride))


def test_the_loss_built_from_tensors_equals_the_loss_built_from_the_head():
    torch.manual_seed(2)
    head = CheXDet((8, 8, 8, 8), num_classes=2, anchors=[[0.1, 0.1], [0.3, 0.2]], image_size=SIZE, stride=16)
    raw = torch.randn(2, 2, 8, 8, 7)
    boxes, labels, has = [_boxes(3, seed=7), _boxes(2, seed=8)], [torch.tensor([0, 1, 1]), torch.tensor([1, 0])], torch.tensor([True, True])
    explicit = DetectionLoss(head.anchors.clone(), 2, BoxCoder(16), giou_weight=0.5)
    legacy = DetectionLoss(head, giou_weight=0.5)
    assert torch.equal(explicit(raw, boxes, labels, has), legacy(raw, boxes, labels, has))
    assert legacy.head.stride == 16 and legacy.head.num_anchors == 2 and legacy.head.num_classes == 2


def test_multitask_loss_from_the_model_or_from_what_it_needs_is_the_same():
    torch.manual_seed(4)
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=64, class_names=["A", "B"], box_classes=["A"], anchors=[[0.2, 0.2]]))
    sample = CXRSample(image=torch.rand(1, 64, 64), labels=torch.tensor([1.0, 0.0]), positive=1.0,
                       mask=(torch.rand(1, 64, 64) > 0.5).float(), boxes=torch.tensor([[8.0, 8.0, 30.0, 40.0]]),
                       box_labels=torch.tensor([0]), meta={"path": "x.png"})
    batch = collate_samples([sample, sample])
    outputs = model(batch.images, ["cls", "gate", "seg", "det"])
    detection = DetectionLoss(model.det.anchors, len(model.config.box_classes), model.det.box_coder, giou_weight=0.3)
    explicit = MultiTaskLoss(cls_activation=model.config.cls_activation, detection=detection)(outputs, batch)
    from_model = MultiTaskLoss.for_model(model, giou_weight=0.3)(outputs, batch)
    legacy = MultiTaskLoss(model, giou_weight=0.3)(outputs, batch)
    assert set(explicit) == {"cls", "gate", "seg", "det", "total"}
    for key in explicit:
        assert torch.equal(explicit[key], from_model[key]) and torch.equal(explicit[key], legacy[key]), key
    with pytest.raises(ValueError, match="detection loss"):
        MultiTaskLoss()(outputs, batch)
