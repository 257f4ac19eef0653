"""Operating points chosen on validation data (gate threshold, per-class decision thresholds).

Hand-written: a threshold sweep over the sorted scores is a few lines of numpy, and neither MONAI nor
torchmetrics picks an operating point by a criterion such as "highest threshold with sensitivity ≥ s".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multichex.models.decision import at_or_above

CRITERIA = ("youden", "f1", "sensitivity")
__all__ = ["CRITERIA", "at_or_above", "choose_threshold", "per_class_thresholds", "threshold_sweep"]


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray, criterion: str = "f1", default: float = 0.5) -> list[float]:
    """One threshold per column of ``B×C`` probabilities; ``default`` where a class lacks positives or negatives."""
    thresholds = []
    for c in range(probs.shape[1]):
        try:
            thresholds.append(choose_threshold(probs[:, c], labels[:, c], criterion)["threshold"])
        except ValueError:
            thresholds.append(default)
    return thresholds


def threshold_sweep(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, precision and F1 at every distinct score used as threshold (``p >= t``)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    probs, labels = probs[known], labels[known] > 0.5
    thresholds = np.unique(probs)[::-1]  # descending: each step admits more positives
    predicted = at_or_above(probs[None, :], thresholds[:, None])
    tp = (predicted & labels).sum(1)
    fp = (predicted & ~labels).sum(1)
    positives, negatives = labels.sum(), (~labels).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / positives
        specificity = 1 - fp / negatives
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (positives - tp)), 0.0)
    return {"threshold": thresholds, "sensitivity": sensitivity, "specificity": specificity, "precision": precision, "f1": f1}


def choose_threshold(probs: np.ndarray, labels: np.ndarray, criterion: str = "youden", min_sensitivity: float = 0.95) -> dict[str, Any]:
    """The threshold that maximises Youden's J or F1 (ties: the highest), or the highest one with
    sensitivity ≥ ``min_sensitivity``.

    The chosen score is moved halfway to the next lower score, so ``p >= t`` (the package's rule, see
    :func:`at_or_above`) and ``p > t`` agree on the validation images and new images near the boundary are
    not decided by a tie.

    Returns ``{"threshold", "criterion", "sensitivity", "specificity", "f1", "n_positive", "n_negative"}``.
    Raises ``ValueError`` when the known labels lack positives or negatives (no operating point exists).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    labels = np.asarray(labels, dtype=np.float64)
    known = labels[~np.isnan(labels)]
    n_positive, n_negative = int((known > 0.5).sum()), int((known <= 0.5).sum())
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"cannot choose a threshold from {n_positive} positives and {n_negative} negatives")
    sweep = threshold_sweep(probs, labels)
    if criterion == "youden":
        index = int(np.argmax(sweep["sensitivity"] + sweep["specificity"] - 1))
    elif criterion == "f1":
        index = int(np.argmax(sweep["f1"]))
    else:
        index = int(np.argmax(sweep["sensitivity"] >= min_sensitivity))  # first (highest) threshold reaching it
    scores = sweep["threshold"]
    lower = scores[index + 1] if index + 1 < len(scores) else max(0.0, scores[index] - 1e-3)
    return {
        "threshold": float((scores[index] + lower) / 2),
        "criterion": criterion,
        "sensitivity": float(sweep["sensitivity"][index]),
        "specificity": float(sweep["specificity"][index]),
        "f1": float(sweep["f1"][index]),
        "n_positive": n_positive,
        "n_negative": n_negative,
    }
