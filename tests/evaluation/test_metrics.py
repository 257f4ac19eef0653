"""Tests for multichex.evaluation.metrics with hand-computed expected values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from multichex.evaluation.metrics import classification_metrics, detection_map, dice_per_image

NAN = float("nan")

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

# Known rows of class "a": probs [0.1, 0.4, 0.35, 0.8], labels [0, 0, 1, 1].
# AUROC by hand: positive/negative pairs (0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes) = 3/4.
# Threshold 0.5 → preds [0, 0, 0, 1]: accuracy 3/4; TP=1, FP=0, FN=1 → F1 = 2/(2+0+1) = 2/3.
KNOWN_PROBS = [0.1, 0.4, 0.35, 0.8]
KNOWN_LABELS = [0.0, 0.0, 1.0, 1.0]


def test_auroc_ignores_nan_rows() -> None:
    # Two extra rows with unknown labels whose probabilities would change AUROC if they were used.
    probs_a = KNOWN_PROBS + [0.99, 0.01]
    labels_a = KNOWN_LABELS + [NAN, NAN]
    probs = torch.tensor([probs_a, [0.5] * 6]).T
    labels = torch.tensor([labels_a, [1.0, 1.0, NAN, 1.0, NAN, NAN]]).T
    out = classification_metrics(probs, labels, ["a", "b"])

    a = out["per_class"]["a"]
    assert a["auroc"] == pytest.approx(0.75)
    assert a["accuracy"] == pytest.approx(0.75)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["n_known"] == 4
    assert a["n_positive"] == 2

    known_only = classification_metrics(torch.tensor([KNOWN_PROBS]).T, torch.tensor([KNOWN_LABELS]).T, ["a"])
    assert known_only["per_class"]["a"] == a


def test_single_class_auroc_is_none_and_excluded_from_macro() -> None:
    probs = torch.tensor([KNOWN_PROBS, [0.2, 0.9, 0.7, NAN]]).T.nan_to_num(0.5)
    labels = torch.tensor([KNOWN_LABELS, [1.0, 1.0, 1.0, NAN]]).T
    out = classification_metrics(probs, labels, ["a", "only_pos"])
    b = out["per_class"]["only_pos"]
    assert b["auroc"] is None
    assert b["n_known"] == 3 and b["n_positive"] == 3
    # preds at 0.5: [0, 1, 1] vs all positive → accuracy 2/3, F1 = 2*2/(2*2+0+1) = 0.8
    assert b["accuracy"] == pytest.approx(2 / 3)
    assert b["f1"] == pytest.approx(0.8)
    assert out["macro"]["auroc"] == pytest.approx(0.75)  # only class "a" is defined
    assert out["macro"]["accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)
    json.dumps(out)  # plain Python types only


def test_class_with_no_known_rows_and_threshold() -> None:
    probs = torch.tensor([[0.6, 0.3], [0.4, 0.9]])
    labels = torch.tensor([[1.0, NAN], [0.0, NAN]])
    out = classification_metrics(probs, labels, ["a", "unknown"], threshold=0.7)
    assert out["per_class"]["unknown"] == {
        "auroc": None,
        "accuracy": None,
        "f1": None,
        "n_known": 0,
        "n_positive": 0,
    }
    # threshold 0.7: both predicted negative → accuracy 1/2, F1 0 (no true positive)
    assert out["per_class"]["a"]["accuracy"] == pytest.approx(0.5)
    assert out["per_class"]["a"]["f1"] == pytest.approx(0.0)
    assert out["per_class"]["a"]["auroc"] == pytest.approx(1.0)


def test_macro_is_none_when_nothing_defined() -> None:
    out = classification_metrics(torch.tensor([[0.3]]), torch.tensor([[NAN]]), ["a"])
    assert out["macro"] == {"auroc": None, "accuracy": None, "f1": None}


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 2), torch.zeros(2, 3), ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 2), torch.zeros(2, 2), ["a"])


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


def _mask(pixels: list[tuple[int, int]], size: int = 6) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    for y, x in pixels:
        m[0, y, x] = 1
    return m


FOUR = [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        (FOUR[:2], FOUR, 2 * 2 / (2 + 4)),  # 2 px inside a 4 px target → 2/3
        (FOUR, FOUR, 1.0),
        (FOUR, [(4, 4)], 0.0),  # disjoint
        ([(1, 1), (4, 4)], FOUR, 2 * 1 / (2 + 4)),  # 1 px overlap, 1 px FP → 1/3
        ([], [], 1.0),  # both empty: defined as 1
        ([(0, 0)], [], 0.0),  # prediction on an empty target
        ([], FOUR, 0.0),  # missed target
    ],
)
def test_dice_per_image(pred: list, target: list, expected: float) -> None:
    out = dice_per_image(_mask(pred)[None], _mask(target)[None])
    assert out.shape == (1,)
    assert out[0].item() == pytest.approx(expected)


def test_dice_batch_bool_and_no_nan() -> None:
    pred = torch.stack([_mask(FOUR[:2]), _mask([]), _mask(FOUR)]).bool()
    target = torch.stack([_mask(FOUR), _mask([]), _mask(FOUR)]).bool()
    out = dice_per_image(pred, target)
    assert torch.allclose(out, torch.tensor([2 / 3, 1.0, 1.0]))
    assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

T = torch.as_tensor
BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [20.0, 20.0, 30.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]
EMPTY_BOXES = torch.zeros(0, 4)
EMPTY_LABELS = torch.zeros(0, dtype=torch.long)


def _run(preds: list[tuple], gts: list[tuple], names: tuple[str, ...] = ("a", "b"), **kw) -> dict:
    """preds: per image (boxes, scores, labels); gts: per image (boxes, labels)."""
    return detection_map(
        [T(p[0]).reshape(-1, 4).float() for p in preds],
        [T(p[1]).float() for p in preds],
        [T(p[2]).long() for p in preds],
        [T(g[0]).reshape(-1, 4).float() for g in gts],
        [T(g[1]).long() for g in gts],
        list(names),
        **kw,
    )


def test_perfect_predictions() -> None:
    out = _run(
        [([BOX_A, BOX_B], [0.9, 0.8], [0, 1]), ([BOX_B], [0.7], [0])],
        [([BOX_A, BOX_B], [0, 1]), ([BOX_B], [0])],
    )
    assert out["per_class"]["a"] == pytest.approx(1.0)
    assert out["per_class"]["b"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx(1.0)
    assert out["n_gt"] == {"a": 2, "b": 1}
    json.dumps(out)


def test_fp_ranked_above_tp() -> None:
    # Ranked: FP (0.9), TP (0.5); 1 GT. Precision envelope = 0.5 at every recall → AP = 0.5.
    out = _run([([FAR, BOX_A], [0.9, 0.5], [0, 0])], [([BOX_A], [0])], names=["a"])
    assert out["per_class"]["a"] == pytest.approx(0.5)
    assert out["map"] == pytest.approx(0.5)


def test_tp_fp_tp_hand_computed_101_point() -> None:
    # 2 GT; ranked TP, FP, TP: recall [.5, .5, 1], precision [1, .5, 2/3] → envelope [1, 2/3, 2/3].
    # COCO 101-point: recall thresholds 0.00..0.50 (51 points) → 1, 0.51..1.00 (50 points) → 2/3.
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    out = _run([([BOX_A, FAR, BOX_B], [0.9, 0.8, 0.7], [0, 0, 0])], [([BOX_A, BOX_B], [0, 0])], names=["a"])
    assert out["per_class"]["a"] == pytest.approx(expected)


def test_duplicate_detection_is_false_positive() -> None:
    # Same GT hit twice, the duplicate ranked above the 2nd GT's TP:
    # TP, FP(dup), TP → same curve as the test above.
    dup = [0.5, 0.0, 10.5, 10.0]  # IoU with BOX_A = 95/105 > 0.5
    out = _run([([BOX_A, dup, BOX_B], [0.9, 0.8, 0.7], [0, 0, 0])], [([BOX_A, BOX_B], [0, 0])], names=["a"])
    assert out["per_class"]["a"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # Duplicate ranked last: TP, TP, FP → precision 1 up to recall 1 → AP 1.
    out = _run([([BOX_A, BOX_B, dup], [0.9, 0.8, 0.7], [0, 0, 0])], [([BOX_A, BOX_B], [0, 0])], names=["a"])
    assert out["per_class"]["a"] == pytest.approx(1.0)


def test_wrong_label_does_not_match() -> None:
    # Perfect box but class "b" while the GT is class "a": AP(a) = 0, b has no GT → None.
    out = _run([([BOX_A], [0.9], [1])], [([BOX_A], [0])])
    assert out["per_class"]["a"] == pytest.approx(0.0)
    assert out["per_class"]["b"] is None
    assert out["map"] == pytest.approx(0.0)  # mean over classes with GT only


def test_iou_below_threshold_does_not_match() -> None:
    shifted = [6.0, 0.0, 16.0, 10.0]  # IoU with BOX_A = 40/160 = 0.25
    assert _run([([shifted], [0.9], [0])], [([BOX_A], [0])], names=["a"])["map"] == pytest.approx(0.0)
    out = _run([([shifted], [0.9], [0])], [([BOX_A], [0])], names=["a"], iou_threshold=0.2)
    assert out["map"] == pytest.approx(1.0)


def test_image_without_gt_contributes_false_positives() -> None:
    # Image 2 has no GT; its detection (0.9) outranks the TP (0.5) of image 1 → AP 0.5.
    out = _run(
        [([BOX_A], [0.5], [0]), ([BOX_B], [0.9], [0])],
        [([BOX_A], [0]), (EMPTY_BOXES, EMPTY_LABELS)],
        names=["a"],
    )
    assert out["per_class"]["a"] == pytest.approx(0.5)


def test_no_gt_anywhere_gives_none() -> None:
    out = _run([([BOX_A], [0.9], [0])], [(EMPTY_BOXES, EMPTY_LABELS)])
    assert out["per_class"] == {"a": None, "b": None}
    assert out["map"] is None
    assert detection_map([], [], [], [], [], ["a"])["map"] is None


def test_missed_gt_and_no_predictions() -> None:
    # Class a: one of two GT found at rank 1 → envelope 1 up to recall 0.5 → 51/101.
    out = _run(
        [([BOX_A], [0.9], [0]), (EMPTY_BOXES, [], [])],
        [([BOX_A], [0]), ([BOX_B, BOX_A], [0, 1])],
    )
    assert out["per_class"]["a"] == pytest.approx(51 / 101)
    assert out["per_class"]["b"] == pytest.approx(0.0)
    assert out["map"] == pytest.approx((51 / 101) / 2)
    assert not any(isinstance(v, float) and math.isnan(v) for v in out["per_class"].values())


def test_bad_label_raises() -> None:
    with pytest.raises(ValueError):
        _run([([BOX_A], [0.9], [5])], [([BOX_A], [0])])


def test_per_class_thresholds_change_only_their_class():
    probs = torch.tensor([[0.3, 0.3], [0.6, 0.6], [0.2, 0.2], [0.7, 0.7]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    fixed = classification_metrics(probs, labels, ["a", "b"])
    tuned = classification_metrics(probs, labels, ["a", "b"], threshold=[0.5, 0.25])
    assert tuned["per_class"]["a"] == fixed["per_class"]["a"]
    assert tuned["per_class"]["b"]["accuracy"] == pytest.approx(0.75) and fixed["per_class"]["b"]["accuracy"] == pytest.approx(0.5)
    assert tuned["per_class"]["b"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1)) != fixed["per_class"]["b"]["f1"]
    with pytest.raises(ValueError, match="thresholds"):
        classification_metrics(probs, labels, ["a", "b"], threshold=[0.5])
