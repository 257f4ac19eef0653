"""HD95 per image and the per-class AUROC intervals of the model cards."""

from __future__ import annotations

import math

import torch

from multichex.evaluation.evaluate import class_auroc_intervals
from multichex.evaluation.metrics import hausdorff95_per_image


def square(shift: int = 0, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[0, 8:20, 8 + shift:20 + shift] = 1
    return mask


def test_hd95_is_zero_for_equal_masks_and_the_shift_for_a_moved_one():
    pred = torch.stack([square(), square(3), torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)])
    target = torch.stack([square(), square(), square(), torch.zeros(1, 32, 32)])
    hd = hausdorff95_per_image(pred, target)
    assert hd[0] == 0.0
    assert abs(float(hd[1]) - 3.0) < 1e-6
    assert math.isnan(float(hd[2]))  # one mask empty: undefined
    assert hd[3] == 0.0  # both empty


def test_class_auroc_intervals_cover_the_point_value_and_skip_undefined_classes():
    generator = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.zeros(n, 3)
    labels[::2, 0] = 1
    labels[:, 1] = torch.nan
    labels[:10, 1] = 1  # known positives only: AUROC undefined
    labels[:, 2] = (torch.rand(n, generator=generator) > 0.5).float()
    probs = torch.rand(n, 3, generator=generator)
    probs[:, 0] = labels[:, 0] * 0.5 + 0.25 * torch.rand(n, generator=generator)  # separates class A
    patients = [f"p{i // 2}" for i in range(n)]
    intervals = class_auroc_intervals(probs, labels, ["A", "B", "C"], patients, n_resamples=200, seed=1)
    assert set(intervals) == {"A", "C"}
    assert intervals["A"]["value"] == 1.0 and intervals["A"]["low"] > 0.9999
    c = intervals["C"]
    assert c["low"] <= c["value"] <= c["high"] and c["n_groups"] == 30 and c["n_resamples"] == 200
