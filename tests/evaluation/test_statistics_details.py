"""Statistics details of the evaluation: one bootstrap count for every head, a fixed class set for macro
statistics across resamples, gated mAP only when detection is gated, one threshold convention."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from multichex.data.transforms import Letterbox
from multichex.evaluation import evaluate as evaluate_module
from multichex.evaluation.evaluate import (
    Collected,
    _detection_summary,
    evaluate_datasets,
    summarize,
)
from multichex.evaluation.metrics import classification_metrics, dice_per_image
from multichex.inference.predictor import Predictor, PreparedImage
from multichex.models.config import GateConfig, ModelConfig
from multichex.models.multichexnet import GatedPrediction, assemble_prediction


def _detections(n: int = 8) -> dict[str, list]:
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    det = {k: [] for k in Collected().det}
    for i in range(n):
        det["boxes"].append(box.clone() + i % 3)
        det["scores"].append(torch.tensor([0.9 - 0.05 * i]))
        det["labels"].append(torch.tensor([0]))
        det["gt_boxes"].append(box.clone())
        det["gt_labels"].append(torch.tensor([0]))
        det["patients"].append(f"p{i}")
        det["gate_passed"].append(i % 2 == 0)
    return det


def _with_detection(out: Collected, n: int = 8) -> Collected:
    out.det = _detections(n)
    return out


# --------------------------------------------------------------------------------------------
# a. one bootstrap count for every head
# --------------------------------------------------------------------------------------------


def test_default_bootstrap_count_is_one_setting_of_1000() -> None:
    default = evaluate_module.DEFAULT_BOOTSTRAP
    assert default == 1000
    assert inspect.signature(summarize).parameters["bootstrap"].default == default
    assert inspect.signature(evaluate_datasets).parameters["bootstrap"].default == default


def test_detection_uses_the_same_bootstrap_count_as_the_other_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = evaluate_module.bootstrap_statistics

    def spy(groups, compute, n_resamples=1000, confidence=0.95, seed=0):
        calls.append(n_resamples)
        return real(groups, compute, n_resamples=n_resamples, confidence=confidence, seed=seed)

    monkeypatch.setattr(evaluate_module, "bootstrap_statistics", spy)
    summary = _detection_summary(_detections(), ["Mass"], bootstrap=300, seed=0)
    assert calls == [300]
    for key in ("map", "map_gated"):
        assert summary[key]["n_resamples"] == 300


def test_every_interval_records_the_same_resample_count() -> None:
    out = _with_detection(_classification_collection(n_patients=12))
    out.dice = [0.9, 0.8, 0.7, 0.95]
    out.dice_patients = ["p0", "p1", "p2", "p3"]
    metrics = summarize(out, ["common", "rare"], ["Mass"], bootstrap=250, seed=0)
    assert metrics["classification"]["macro_auroc"]["n_resamples"] == 250
    assert metrics["gate"]["auroc"]["n_resamples"] == 250
    assert metrics["segmentation"]["dice"]["n_resamples"] == 250
    assert metrics["detection"]["map"]["n_resamples"] == 250


# --------------------------------------------------------------------------------------------
# b. macro statistics over a class set fixed on the full sample
# --------------------------------------------------------------------------------------------


def _classification_collection(n_patients: int = 20) -> Collected:
    """One image per patient. ``common`` is perfectly ranked (AUROC 1 in every resample where it is
    defined); ``rare`` has a single positive patient scored lowest (AUROC 0 wherever it is defined),
    so the macro AUROC over both classes is exactly 0.5 and over ``common`` alone 1.0."""
    common = np.array([i % 2 for i in range(n_patients)], dtype=np.float32)
    rare = np.zeros(n_patients, dtype=np.float32)
    rare[0] = 1.0
    labels = torch.tensor(np.stack([common, rare], axis=1))
    p_common = 0.2 + 0.6 * common + 0.01 * np.arange(n_patients) / n_patients
    p_rare = 0.5 + 0.4 * np.arange(n_patients) / n_patients  # patient 0 (the positive) lowest
    probs = torch.tensor(np.stack([p_common, p_rare], axis=1), dtype=torch.float32)
    out = Collected()
    out.patients = [f"p{i}" for i in range(n_patients)]
    out.probs = [probs]
    out.labels = [labels]
    out.gate_probs = probs[:, 0].tolist()
    out.gate_labels = common.tolist()
    return out


def test_macro_auroc_is_always_over_the_classes_defined_in_the_full_sample() -> None:
    out = _classification_collection()
    metrics = summarize(out, ["common", "rare"], [], bootstrap=400, seed=0)
    interval = metrics["classification"]["macro_auroc"]
    assert interval["value"] == pytest.approx(0.5)
    # Every resample that is kept averages both classes: 0.5 each time (the rare class alone missing
    # would give 1.0, i.e. the "common"-only average).
    assert interval["low"] == pytest.approx(0.5)
    assert interval["high"] == pytest.approx(0.5)
    # The rare positive patient is missing from about a third of the resamples: those are skipped and counted.
    assert 0.2 * 400 < interval["n_skipped"] < 0.5 * 400
    assert interval["n_resamples"] == 400


def test_fixed_macro_classes_make_the_macro_undefined_when_one_class_is() -> None:
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.3]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # "b" has no positive: AUROC undefined
    free = classification_metrics(probs, labels, ["a", "b"])
    assert free["macro"]["auroc"] == pytest.approx(1.0)  # without a fixed set: the defined classes
    fixed = classification_metrics(probs, labels, ["a", "b"], macro_classes={"auroc": ["a", "b"]})
    assert fixed["macro"]["auroc"] is None
    only_a = classification_metrics(probs, labels, ["a", "b"], macro_classes={"auroc": ["a"]})
    assert only_a["macro"]["auroc"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# c. gated mAP only when detection is a gated head
# --------------------------------------------------------------------------------------------


def test_map_gated_only_when_detection_is_gated() -> None:
    out = _with_detection(_classification_collection(n_patients=8))
    gated = summarize(out, ["common", "rare"], ["Mass"], bootstrap=0, gated_heads=["det"])["detection"]
    assert "map_gated" in gated and "n_gate_passed" in gated
    ungated = summarize(out, ["common", "rare"], ["Mass"], bootstrap=20, gated_heads=["seg"])["detection"]
    assert "map_gated" not in ungated and "n_gate_passed" not in ungated
    assert ungated["map"]["value"] is not None


def test_evaluate_datasets_takes_the_gated_heads_from_the_model_config(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _with_detection(_classification_collection(n_patients=8))
    monkeypatch.setattr(evaluate_module, "collect", lambda *args, **kwargs: out)
    for heads, expected in ((["seg"], False), (["det"], True), (["seg", "det"], True)):
        config = ModelConfig(class_names=["common", "rare"], box_classes=["Mass"], gate=GateConfig(gated_heads=heads))
        metrics = evaluate_datasets(SimpleNamespace(config=config), {"x": None}, bootstrap=0)
        assert ("map_gated" in metrics["detection"]) is expected, heads


# --------------------------------------------------------------------------------------------
# d. one threshold convention: p >= t is positive, in metrics and in inference
# --------------------------------------------------------------------------------------------


class _NoDetector:
    def postprocess(self, raw, size, score_threshold, iou_threshold):
        return [None] * len(raw)


class _FixedModel:
    """Stands in for a model: fixed class and gate probabilities, and a segmentation probability of
    exactly 0.5 everywhere (logit 0); the real gate logic (:func:`assemble_prediction`) decides."""

    def __init__(self, logits: list[float], gate_prob: float) -> None:
        self.logits = torch.tensor([logits], dtype=torch.float32)
        self.probs = torch.sigmoid(self.logits)
        thresholds = self.probs[0].tolist()  # every class probability exactly at its threshold
        self.config = ModelConfig(class_names=[f"c{i}" for i in range(len(logits))], box_classes=["Mass"], image_size=32,
                                  class_thresholds=thresholds, gate=GateConfig(threshold=gate_prob, gated_heads=["seg"]))
        self.gate_prob = torch.tensor([gate_prob], dtype=torch.float32)

    def eval(self) -> _FixedModel:
        return self

    @staticmethod
    def _run_head(head: str, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(index), 1, 32, 32) if head == "seg" else torch.zeros(len(index), 1)

    def predict(self, images: torch.Tensor, use_gate: bool = True, score_threshold: float = 0.25) -> GatedPrediction:
        return assemble_prediction(self.config, {"cls": self.logits}, self.gate_prob, self._run_head, _NoDetector(), use_gate,
                                   score_threshold, 0.45)


def test_probability_exactly_at_the_threshold_is_decided_the_same_by_metrics_and_inference() -> None:
    model = _FixedModel([1.0, -1.0, 0.0], gate_prob=0.5)
    thresholds = model.config.class_thresholds
    item = PreparedImage(Path("x.png"), None, torch.zeros(1, 32, 32), Letterbox.fit(32, 32, 32))
    result = Predictor(model, mask_threshold=0.5).predict_prepared([item])[0]
    assert result["findings"] == ["c0", "c1", "c2"]  # inference: at the threshold → positive
    assert result["gate"]["positive"] is True  # gate probability 0.5 at threshold 0.5 → passes, seg runs
    assert result["mask_array"] is not None and result["mask_array"].all()  # mask probability 0.5 → foreground

    # metrics: the same probabilities with positive labels are all correct decisions...
    scored = classification_metrics(model.probs, torch.ones(1, 3), model.config.class_names, thresholds, extended=True)
    for name in model.config.class_names:
        assert scored["per_class"][name]["accuracy"] == pytest.approx(1.0)
        assert scored["per_class"][name]["f1"] == pytest.approx(1.0)
        assert scored["per_class"][name]["recall"] == pytest.approx(1.0)
    # ...and with negative labels all wrong (a positive prediction at the threshold)
    negative = classification_metrics(model.probs, torch.zeros(1, 3), model.config.class_names, thresholds, extended=True)
    for name in model.config.class_names:
        assert negative["per_class"][name]["accuracy"] == pytest.approx(0.0)
        assert negative["per_class"][name]["f1_negative"] == pytest.approx(0.0)


def test_gate_metrics_decide_at_the_threshold_like_the_gated_pipeline() -> None:
    out = Collected()
    out.patients = ["p0", "p1"]
    out.probs = [torch.tensor([[0.5], [0.25]])]
    out.labels = [torch.tensor([[1.0], [0.0]])]
    out.gate_probs = [0.5, 0.25]  # the first exactly at the gate threshold
    out.gate_labels = [1.0, 0.0]
    metrics = summarize(out, ["c0"], [], bootstrap=0, gate_threshold=0.5)
    config = ModelConfig(class_names=["c0"], gate=GateConfig(threshold=0.5, gated_heads=["seg", "det"]))
    passed = assemble_prediction(config, {"cls": torch.zeros(2, 1)}, torch.tensor(out.gate_probs), _FixedModel._run_head, _NoDetector(),
                                 True, 0.25, 0.45)
    assert passed.gate_positive.tolist() == [True, False]
    assert metrics["gate"]["accuracy"] == pytest.approx(1.0)  # the gate probability at 0.5 counts as positive
    assert metrics["classification"]["per_class"]["c0"]["accuracy"] == pytest.approx(1.0)


def test_mask_probability_at_the_binarisation_threshold_is_foreground_in_metrics() -> None:
    # Inference keeps a pixel whose probability equals the mask threshold (see the test above); the
    # segmentation metrics binarise a probability map the same way.
    probability = torch.full((1, 1, 8, 8), 0.5)
    target = torch.ones(1, 1, 8, 8)
    assert float(dice_per_image(probability, target)[0]) == pytest.approx(1.0)
