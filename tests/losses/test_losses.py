"""Masked losses: unknown labels contribute neither value nor gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multichex.data.record import CXRSample, collate_samples
from multichex.losses.masked import masked_bce_with_logits, segmentation_loss
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

NAN = math.nan


def test_masked_bce_nan_label_has_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([[1.0, NAN, 0.0], [NAN, NAN, 1.0], [0.0, 1.0, NAN], [1.0, 0.0, 0.0]])
    loss = masked_bce_with_logits(logits, labels)
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    unknown = torch.isnan(labels)
    assert torch.all(logits.grad[unknown] == 0)
    assert torch.all(logits.grad[~unknown] != 0)


def test_masked_bce_value_equals_bce_over_known_entries():
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 2, (5, 4)).float()
    labels[torch.rand(5, 4) < 0.4] = NAN
    labels[0, 0] = 1.0  # at least one known
    known = ~torch.isnan(labels)
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known])
    got = masked_bce_with_logits(logits, labels)
    torch.testing.assert_close(got, expected)


def test_masked_bce_nan_labels_do_not_change_value():
    """Adding unknown entries (with any logits) leaves the loss unchanged."""
    logits = torch.tensor([[2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0]])
    base = masked_bce_with_logits(logits, labels)
    padded = masked_bce_with_logits(torch.tensor([[2.0, -1.0, 50.0, -50.0]]), torch.tensor([[1.0, 0.0, NAN, NAN]]))
    torch.testing.assert_close(base, padded)


def test_masked_bce_all_nan_returns_none():
    logits = torch.randn(3, 2, requires_grad=True)
    assert masked_bce_with_logits(logits, torch.full((3, 2), NAN)) is None


def test_masked_bce_gate_vector():
    """The gate target is a 1-D vector with NaN = unknown."""
    logits = torch.tensor([0.5, -0.3, 1.2], requires_grad=True)
    positive = torch.tensor([1.0, NAN, 0.0])
    loss = masked_bce_with_logits(logits, positive)
    loss.backward()
    assert logits.grad[1] == 0 and logits.grad[0] != 0 and logits.grad[2] != 0
    expected = F.binary_cross_entropy_with_logits(logits.detach()[[0, 2]], positive[[0, 2]])
    torch.testing.assert_close(loss.detach(), expected)


def test_segmentation_loss_ignores_images_without_mask():
    torch.manual_seed(2)
    logits = torch.randn(4, 1, 16, 16, requires_grad=True)
    masks = (torch.rand(4, 1, 16, 16) > 0.5).float()
    has_mask = torch.tensor([True, False, True, False])
    masks[~has_mask] = 0.0
    loss = segmentation_loss(logits, masks, has_mask)
    assert loss is not None
    loss.backward()
    assert torch.all(logits.grad[~has_mask] == 0)
    assert logits.grad[has_mask].abs().sum(dim=(1, 2, 3)).min() > 0


def test_segmentation_loss_value_matches_masked_subset():
    torch.manual_seed(3)
    logits = torch.randn(3, 1, 8, 8)
    masks = (torch.rand(3, 1, 8, 8) > 0.5).float()
    has_mask = torch.tensor([True, False, True])
    full = segmentation_loss(logits, masks, has_mask, dice_weight=0.0)
    expected = F.binary_cross_entropy_with_logits(logits[has_mask], masks[has_mask])
    torch.testing.assert_close(full, expected)
    # Whatever the no-mask image "has" as mask does not matter.
    masks_changed = masks.clone()
    masks_changed[1] = 1.0
    torch.testing.assert_close(segmentation_loss(logits, masks_changed, has_mask), segmentation_loss(logits, masks, has_mask))


def test_segmentation_loss_none_without_masks():
    logits = torch.randn(2, 1, 8, 8)
    assert segmentation_loss(logits, torch.zeros_like(logits), torch.tensor([False, False])) is None


def _sample(labels, positive=NAN, mask=False, boxes=None, size=32):
    return CXRSample(
        image=torch.rand(1, size, size),
        labels=torch.tensor(labels, dtype=torch.float32),
        positive=positive,
        mask=torch.ones(1, size, size) if mask else None,
        boxes=boxes,
        meta={"path": "x.png"},
    )


@pytest.mark.parametrize(
    "samples, expected",
    [
        ([_sample([NAN, NAN]), _sample([NAN, NAN])], []),
        ([_sample([1.0, NAN]), _sample([NAN, NAN])], ["cls"]),
        ([_sample([NAN, NAN], positive=1.0)], ["gate"]),
        ([_sample([NAN, NAN], mask=True), _sample([NAN, NAN])], ["seg"]),
        ([_sample([NAN, NAN], boxes=torch.zeros(0, 4))], ["det"]),
        ([_sample([0.0, 1.0], positive=0.0, mask=True, boxes=torch.tensor([[1.0, 1.0, 9.0, 9.0]]))], ["cls", "gate", "seg", "det"]),
    ],
)
def test_tasks_for_returns_only_labelled_tasks(samples, expected):
    batch = collate_samples(samples)
    assert MultiTaskLoss.tasks_for(batch, {"cls", "gate", "seg", "det"}) == expected


def test_tasks_for_respects_trainable():
    batch = collate_samples([_sample([0.0, 1.0], positive=0.0, mask=True, boxes=torch.tensor([[1.0, 1.0, 9.0, 9.0]]))])
    assert MultiTaskLoss.tasks_for(batch, {"seg"}) == ["seg"]
    assert MultiTaskLoss.tasks_for(batch, set()) == []


def test_multitask_loss_only_terms_with_labels():
    torch.manual_seed(4)
    model = MultiCheXNet(ModelConfig(encoder="lite-small", image_size=32, class_names=["A", "B"], box_classes=["A"]))
    batch = collate_samples([_sample([1.0, NAN], mask=True), _sample([NAN, NAN])])
    loss_fn = MultiTaskLoss(model)
    tasks = loss_fn.tasks_for(batch, {"cls", "gate", "seg", "det"})
    assert tasks == ["cls", "seg"]
    outputs = model(batch.images, tasks)
    losses = loss_fn(outputs, batch)
    assert set(losses) == {"cls", "seg", "total"}
    torch.testing.assert_close(losses["total"], losses["cls"] + losses["seg"])
    losses["total"].backward()
    assert all(p.grad is None for p in model.det.parameters())
    assert all(p.grad is None for p in model.gate.parameters())
    # The second image has no labels at all: its classification logits get no gradient.
    logits = model(batch.images, ["cls"])["cls"]
    logits.retain_grad()
    masked_bce_with_logits(logits, batch.labels).backward()
    assert torch.all(logits.grad[1] == 0) and logits.grad[0, 1] == 0 and logits.grad[0, 0] != 0
