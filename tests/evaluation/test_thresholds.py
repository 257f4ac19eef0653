"""Operating points chosen on validation scores."""

from __future__ import annotations

import numpy as np
import pytest

from multichex.evaluation.thresholds import choose_threshold, per_class_thresholds, threshold_sweep

PROBS = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
LABELS = np.array([0, 0, 1, 0, 1, 0, 1, 1], dtype=float)


def test_sweep_counts_by_hand():
    sweep = threshold_sweep(PROBS, LABELS)
    at = {round(t, 2): i for i, t in enumerate(sweep["threshold"])}
    i = at[0.6]  # predicted positive: 0.6, 0.7, 0.8, 0.9 → tp 3, fp 1
    assert sweep["sensitivity"][i] == pytest.approx(3 / 4)
    assert sweep["specificity"][i] == pytest.approx(3 / 4)
    assert sweep["f1"][i] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_youden_f1_and_sensitivity_criteria():
    youden = choose_threshold(PROBS, LABELS, "youden")
    # J = 0.5 at 0.8, 0.6 and 0.35: ties go to the highest score, 0.8, moved halfway to the next score (0.7).
    assert youden["threshold"] == pytest.approx(0.75)
    assert youden["sensitivity"] - (1 - youden["specificity"]) == pytest.approx(0.5)
    sensitive = choose_threshold(PROBS, LABELS, "sensitivity", min_sensitivity=1.0)
    assert sensitive["threshold"] == pytest.approx(0.275) and sensitive["sensitivity"] == 1.0
    assert choose_threshold(PROBS, LABELS, "f1")["f1"] == pytest.approx(max(threshold_sweep(PROBS, LABELS)["f1"]))


def test_unknown_labels_are_ignored_and_one_class_is_refused():
    labels = LABELS.copy()
    labels[0] = np.nan
    assert choose_threshold(PROBS, labels)["n_negative"] == 3
    with pytest.raises(ValueError, match="0 negatives"):
        choose_threshold(PROBS, np.ones(8))
    with pytest.raises(ValueError, match="criterion"):
        choose_threshold(PROBS, LABELS, "accuracy")


def test_perfect_separation_gives_a_perfect_operating_point():
    result = choose_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1.0]))
    assert (result["sensitivity"], result["specificity"]) == (1.0, 1.0) and result["threshold"] == pytest.approx(0.5)


def test_per_class_thresholds_fall_back_where_undefined():
    probs = np.stack([PROBS, PROBS], axis=1)
    labels = np.stack([LABELS, np.zeros(8)], axis=1)
    first, second = per_class_thresholds(probs, labels, "f1", default=0.5)
    assert first == pytest.approx(choose_threshold(PROBS, LABELS, "f1")["threshold"])
    assert second == 0.5
