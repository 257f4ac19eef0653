"""Detection scored with the gate in the loop: rejected images keep no boxes."""

from __future__ import annotations

import pytest
import torch

from multichex.evaluation.evaluate import Collected, _detection_summary


def detections(passed: list[bool]) -> dict[str, list]:
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    det = {k: [] for k in Collected().det}
    for i, gate in enumerate(passed):
        det["boxes"].append(box.clone())
        det["scores"].append(torch.tensor([0.9]))
        det["labels"].append(torch.tensor([0]))
        det["gt_boxes"].append(box.clone() if i % 2 == 0 else torch.zeros(0, 4))  # odd images are negatives
        det["gt_labels"].append(torch.tensor([0]) if i % 2 == 0 else torch.zeros(0, dtype=torch.long))
        det["patients"].append(f"p{i}")
        det["gate_passed"].append(gate)
    return det


def test_gate_passing_everything_changes_nothing():
    summary = _detection_summary(detections([True] * 6), ["Mass"], bootstrap=0, seed=0)
    assert summary["map_gated"]["value"] == pytest.approx(summary["map"]["value"])
    assert summary["n_gate_passed"] == 6


def test_gate_removing_false_positives_raises_map_and_missing_positives_lowers_it():
    base = _detection_summary(detections([True] * 6), ["Mass"], bootstrap=0, seed=0)["map"]["value"]
    perfect = _detection_summary(detections([i % 2 == 0 for i in range(6)]), ["Mass"], bootstrap=0, seed=0)
    assert perfect["map_gated"]["value"] == pytest.approx(1.0)
    assert base < 1.0
    blind = _detection_summary(detections([False] * 6), ["Mass"], bootstrap=0, seed=0)
    assert blind["map_gated"]["value"] == pytest.approx(0.0)


def test_gated_map_gets_a_patient_bootstrap_interval():
    summary = _detection_summary(detections([True, False] * 5), ["Mass"], bootstrap=50, seed=0)
    for key in ("map", "map_gated"):
        assert summary[key]["low"] <= summary[key]["value"] <= summary[key]["high"]
