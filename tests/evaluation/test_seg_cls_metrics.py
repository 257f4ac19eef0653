"""Extra segmentation metrics (Jaccard, average Hausdorff, SSIM), precision / recall / F1-N, and
their summaries with patient-bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from multichex.data.registry import read_source
from multichex.data.sources import CXRDataset
from multichex.evaluation.evaluate import (
    SEGMENTATION_KEYS,
    Collected,
    collect,
    summarize,
)
from multichex.evaluation.metrics import (
    average_hausdorff_per_image,
    classification_metrics,
    jaccard_per_image,
    segmentation_scores,
    ssim_per_image,
)
from multichex.models.config import ModelConfig
from multichex.models.multichexnet import MultiCheXNet

NAN = float("nan")


def _masks(*squares: tuple[int, int, int, int] | None, size: int = 8) -> torch.Tensor:
    """``N×1×size×size`` masks, one per ``(row0, row1, col0, col1)`` square (``None`` = empty)."""
    out = torch.zeros(len(squares), 1, size, size)
    for i, sq in enumerate(squares):
        if sq is not None:
            r0, r1, c0, c1 = sq
            out[i, 0, r0:r1, c0:c1] = 1
    return out


SQUARE = (1, 4, 1, 4)  # 3×3 square
SHIFTED = (1, 4, 2, 5)  # the same square one column to the right


def test_identical_masks_score_perfectly() -> None:
    masks = _masks(SQUARE, (2, 7, 0, 3))
    scores = segmentation_scores(masks, masks.clone())
    assert set(scores) == {"dice", "jaccard", "avg_hausdorff", "hd95", "ssim"}
    for key, value in {"dice": 1.0, "jaccard": 1.0, "avg_hausdorff": 0.0, "ssim": 1.0}.items():
        assert scores[key].shape == (2,)
        assert scores[key].tolist() == pytest.approx([value, value]), key


def test_jaccard_by_hand() -> None:
    # 3×3 vs shifted by one column: overlap 6, union 12 → IoU 1/2 (Dice 12/18 = 2/3).
    pred, target = _masks(SHIFTED, (0, 2, 0, 2), None), _masks(SQUARE, (0, 2, 0, 1), None)
    # second: 4 px prediction containing the 2 px target → IoU 2/4; third: both empty → 1.
    assert jaccard_per_image(pred, target).tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert segmentation_scores(pred, target)["dice"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_average_hausdorff_by_hand() -> None:
    # Boundaries are the 8-pixel rings of the 3×3 squares. Shifting by one column, 4 ring pixels of
    # each square lie on the other's ring (distance 0) and 4 are one pixel away → mean 4/8 = 0.5.
    # Two single pixels three columns apart → 3. Empty/empty → 0; one empty → NaN.
    pred = _masks(SHIFTED, (5, 6, 5, 6), None, SQUARE, None)
    target = _masks(SQUARE, (5, 6, 2, 3), None, None, SQUARE)
    out = average_hausdorff_per_image(pred, target)
    assert out[:3].tolist() == pytest.approx([0.5, 3.0, 0.0])
    assert math.isnan(out[3]) and math.isnan(out[4])
    # Symmetric: swapping prediction and truth changes nothing.
    swapped = average_hausdorff_per_image(target, pred)
    assert torch.allclose(out, swapped, equal_nan=True)


def test_ssim() -> None:
    pred = _masks(SQUARE, SHIFTED, None, None)
    target = _masks(SQUARE, SQUARE, None, SQUARE)
    out = ssim_per_image(pred, target)
    assert out[0].item() == pytest.approx(1.0)
    assert out[2].item() == pytest.approx(1.0)  # two empty masks are identical
    assert 0.0 < out[1].item() < 1.0  # overlapping but shifted
    assert out[3].item() < out[1].item()  # missing the square entirely is worse
    # B×H×W input works too, and small images use a smaller window.
    small = torch.zeros(1, 4, 4)
    small[0, 1:3, 1:3] = 1
    assert ssim_per_image(small, small).item() == pytest.approx(1.0)


def test_segmentation_scores_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        segmentation_scores(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


# ---------------------------------------------------------------------------------------------
# Classification: precision, recall, F1 of the negative class
# ---------------------------------------------------------------------------------------------


def test_precision_recall_f1_negative_by_hand() -> None:
    # Class "a": known rows probs [0.9, 0.6, 0.2, 0.7, 0.1], labels [1, 1, 1, 0, 0]; one unknown
    # row (prob 0.95) that would be a false positive if it counted.
    # Threshold 0.5 → preds [1, 1, 0, 1, 0]: TP 2, FN 1, FP 1, TN 1.
    # precision 2/3, recall 2/3, F1-P 2/3, F1-N = 2·1 / (2·1 + 1 + 1) = 1/2.
    # Class "b": all known rows negative, none predicted positive: precision and recall undefined,
    # F1-N = 1 (every negative is a true negative).
    probs = torch.tensor([[0.9, 0.6, 0.2, 0.7, 0.1, 0.95], [0.1, 0.2, 0.3, 0.4, 0.1, 0.2]]).T
    labels = torch.tensor([[1, 1, 1, 0, 0, NAN], [0, 0, 0, 0, 0, NAN]]).T
    out = classification_metrics(probs, labels, ["a", "b"], extended=True)
    a, b = out["per_class"]["a"], out["per_class"]["b"]
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["f1_negative"] == pytest.approx(0.5)
    assert a["n_known"] == 5
    assert b["precision"] is None and b["recall"] is None
    assert b["f1_negative"] == pytest.approx(1.0)
    macro = out["macro"]
    assert macro["precision"] == pytest.approx(2 / 3)  # only "a" is defined
    assert macro["recall"] == pytest.approx(2 / 3)
    assert macro["f1_negative"] == pytest.approx((0.5 + 1.0) / 2)
    json.dumps(out)
    # Without ``extended`` the historic keys are unchanged.
    plain = classification_metrics(probs, labels, ["a", "b"])
    assert set(plain["macro"]) == {"auroc", "accuracy", "f1"}
    assert {k: a[k] for k in plain["per_class"]["a"]} == plain["per_class"]["a"]


def test_extended_metrics_none_without_known_rows() -> None:
    out = classification_metrics(torch.tensor([[0.3]]), torch.tensor([[NAN]]), ["a"], extended=True)
    assert out["per_class"]["a"]["precision"] is None
    assert out["per_class"]["a"]["f1_negative"] is None
    assert out["macro"] == {"auroc": None, "accuracy": None, "f1": None, "precision": None, "recall": None, "f1_negative": None}


# ---------------------------------------------------------------------------------------------
# summarize
# ---------------------------------------------------------------------------------------------


def _collected() -> Collected:
    rng = np.random.default_rng(0)
    out = Collected()
    n = 12
    patients = [f"p{i // 2}" for i in range(n)]  # two images per patient
    labels = torch.tensor(rng.integers(0, 2, size=(n, 2)), dtype=torch.float32)
    labels[0, 1] = NAN
    probs = (labels.nan_to_num(0.5) * 0.6 + torch.tensor(rng.uniform(0, 0.4, size=(n, 2)), dtype=torch.float32)).clamp(0, 1)
    out.patients = patients
    out.probs = [probs[:6], probs[6:]]
    out.labels = [labels[:6], labels[6:]]
    out.gate_probs = probs[:, 0].tolist()
    out.gate_labels = labels[:, 0].tolist()
    squares = [SQUARE, SHIFTED, (2, 6, 2, 6), None, (0, 3, 0, 3), (3, 7, 3, 7)]
    pred = _masks(*squares)
    target = _masks(SQUARE, SQUARE, (2, 5, 2, 5), SQUARE, (0, 3, 0, 3), (3, 7, 2, 7))
    for key, values in segmentation_scores(pred, target).items():
        getattr(out, key).extend(values.tolist())
    out.dice_patients = ["p0", "p0", "p1", "p2", "p3", "p4"]
    return out


def test_summarize_reports_new_metrics_with_intervals() -> None:
    out = _collected()
    assert math.isnan(out.avg_hausdorff[3])  # the empty prediction
    metrics = summarize(out, ["a", "b"], ["box"], bootstrap=50, seed=0)
    seg = metrics["segmentation"]
    for key in SEGMENTATION_KEYS:
        entry = seg[key]
        assert set(entry) == {"value", "low", "high", "n_groups", "n_resamples", "n_skipped"}
        assert entry["n_resamples"] == 50
        assert entry["low"] is not None and entry["low"] <= entry["value"] <= entry["high"]
        assert entry["n_groups"] == 5
    assert seg["dice"]["value"] == pytest.approx(float(np.mean(out.dice)))
    assert seg["jaccard"]["value"] == pytest.approx(float(np.mean(out.jaccard)))
    assert seg["avg_hausdorff"]["value"] == pytest.approx(float(np.nanmean(out.avg_hausdorff)))  # NaN left out
    assert seg["ssim"]["value"] == pytest.approx(float(np.mean(out.ssim)))
    assert seg["n_images"] == 6 and seg["n_patients"] == 5

    cls = metrics["classification"]
    for key in ("precision", "recall", "f1_negative"):
        assert key in cls["per_class"]["a"]
        assert cls["macro"][key] is not None
        interval = cls[f"macro_{key}"]
        assert interval["value"] == pytest.approx(cls["macro"][key])
        assert interval["low"] is not None and interval["low"] <= interval["value"] <= interval["high"]
    for key in ("macro_auroc", "macro_accuracy", "macro_f1"):
        assert key in cls
    json.dumps(metrics)

    plain = summarize(out, ["a", "b"], ["box"], bootstrap=0)
    assert plain["segmentation"]["avg_hausdorff"] == {"value": pytest.approx(float(np.nanmean(out.avg_hausdorff)))}
    assert plain["classification"]["macro_precision"] == {"value": pytest.approx(cls["macro"]["precision"])}


def test_merge_keeps_segmentation_lists_aligned() -> None:
    a, b = _collected(), _collected()
    merged = Collected.merge([a, b])
    for key in (*SEGMENTATION_KEYS, "dice_patients"):
        assert len(getattr(merged, key)) == 12
    assert merged.ssim == a.ssim + b.ssim


def test_summarize_with_dice_only_collection() -> None:
    out = Collected(dice=[1.0, 0.5], dice_patients=["p0", "p1"])  # built by hand, no other metrics
    seg = summarize(out, [], [], bootstrap=0)["segmentation"]
    assert seg == {"dice": {"value": 0.75}, "n_images": 2, "n_patients": 2}


def test_collect_gathers_all_segmentation_metrics(covid_test_root) -> None:
    torch.manual_seed(0)
    classes = ["Mass", "COVID-19", "No Finding"]
    config = ModelConfig(encoder="lite-small", image_size=64, class_names=classes, box_classes=["Mass"], anchors=[[0.2, 0.2]], cls_hidden=64)
    model = MultiCheXNet(config)
    refs = read_source("covid-chestxray", str(covid_test_root))
    out = collect(model, {"covid": CXRDataset(refs, classes, ["Mass"], 64)}, batch_size=8)
    n = len(out.dice)
    assert n > 0 and len(out.dice_patients) == n
    for key in SEGMENTATION_KEYS:
        assert len(getattr(out, key)) == n
    seg = summarize(out, classes, ["Mass"], bootstrap=20)["segmentation"]
    assert all(key in seg and "low" in seg[key] for key in SEGMENTATION_KEYS)
    quick = collect(model, {"covid": CXRDataset(refs, classes, ["Mass"], 64)}, batch_size=8, surface_metrics=False)
    assert quick.dice == out.dice and quick.jaccard == out.jaccard and quick.avg_hausdorff == [] and quick.ssim == []
    assert set(summarize(quick, classes, ["Mass"], bootstrap=0)["segmentation"]) == {"dice", "jaccard", "n_images", "n_patients"}
