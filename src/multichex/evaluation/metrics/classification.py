"""Multi-label classification metrics with unknown labels: per-class AUROC, accuracy, F1 and friends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score, binary_stat_scores

from multichex.evaluation.metrics.scalars import mean_all, mean_defined, to_float
from multichex.models.decision import at_or_above

__all__ = ["EXTENDED_KEYS", "classification_metrics", "macro_class_sets"]

EXTENDED_KEYS = ("precision", "recall", "f1_negative")


def classification_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    threshold: float | Sequence[float] = 0.5,
    extended: bool = False,
    macro_classes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Per-class AUROC / accuracy / F1 (and optionally precision / recall / F1-N) for multi-label
    outputs with unknown labels.

    Args:
        probs: ``B×C`` probabilities in [0, 1].
        labels: ``B×C`` float labels in {0, 1}; NaN = unknown, ignored for that class only.
        class_names: ``C`` names, used as keys of ``per_class``.
        threshold: a probability at or above it counts as a positive prediction (``p >= t``, the rule of
            :func:`~multichex.evaluation.thresholds.at_or_above`, as in inference; used for accuracy
            and F1); one value, or one per class (chosen on validation).
        extended: also report, at the same threshold, ``precision`` and ``recall`` of the positive
            class and ``f1_negative`` (F1 of the negative class, "F1-N"; ``f1`` is F1-P), per class
            and as macro averages. Off by default so the result keeps its historic keys.
        macro_classes: metric name → the classes its macro average is over (see
            :func:`macro_class_sets`). The macro value of such a metric is then ``None`` unless the metric is
            defined for every one of those classes, so it is always an average over the same classes (the
            bootstrap passes the set found on the full sample to every resample). Metrics not named here
            average whichever classes define them.

    Returns:
        ``{"per_class": {name: {"auroc", "accuracy", "f1", "n_known", "n_positive"}},
        "macro": {"auroc", "accuracy", "f1"}}`` (+ ``"precision", "recall", "f1_negative"`` in both
        with ``extended``). ``auroc`` is ``None`` when the known rows of that class have no positives
        or no negatives; ``accuracy``/``f1`` are ``None`` when no row is known (``f1`` is 0 when it
        has no true positive, torchmetrics' convention). ``precision`` is ``None`` with no predicted
        positive, ``recall`` with no known positive, ``f1_negative`` when every known row is a true
        positive (no negatives, none predicted). Macro values average the classes where the metric
        is defined (``None`` if none), or exactly ``macro_classes[metric]``.
    """
    probs = torch.as_tensor(probs, dtype=torch.float32).detach().cpu()
    labels = torch.as_tensor(labels, dtype=torch.float32).detach().cpu()
    if probs.ndim == 1:
        probs, labels = probs[:, None], labels[:, None]
    if probs.shape != labels.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} differ in shape")
    if probs.shape[1] != len(class_names):
        raise ValueError(f"{probs.shape[1]} columns but {len(class_names)} class names")

    thresholds = [float(threshold)] * len(class_names) if isinstance(threshold, (int, float)) else [float(t) for t in threshold]
    if len(thresholds) != len(class_names):
        raise ValueError(f"{len(thresholds)} thresholds for {len(class_names)} classes")
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        known = ~torch.isnan(labels[:, c])
        p = probs[known, c]
        y = labels[known, c].round().long()
        n_known = int(known.sum())
        n_pos = int(y.sum())
        entry: dict[str, Any] = {"auroc": None, "accuracy": None, "f1": None, "n_known": n_known, "n_positive": n_pos}
        decided = at_or_above(p, thresholds[c]).long()  # torchmetrics would threshold with p > t
        if n_known > 0:
            entry["accuracy"] = to_float(binary_accuracy(decided, y))
            entry["f1"] = to_float(binary_f1_score(decided, y))
            if 0 < n_pos < n_known:  # AUROC is undefined with a single class among known rows
                entry["auroc"] = to_float(binary_auroc(p, y))
        if extended:
            entry.update(_precision_recall_f1n(decided, y))
        per_class[name] = entry

    keys = ("auroc", "accuracy", "f1") + (EXTENDED_KEYS if extended else ())
    macro = {}
    for key in keys:
        if macro_classes is not None and key in macro_classes:
            macro[key] = mean_all([per_class[name][key] for name in macro_classes[key]])
        else:
            macro[key] = mean_defined([m[key] for m in per_class.values()])
    return {"per_class": per_class, "macro": macro}


def macro_class_sets(result: Mapping[str, Any]) -> dict[str, list[str]]:
    """For a :func:`classification_metrics` result: metric name → the classes where that metric is defined
    (not ``None``), i.e. the classes its macro value averages; pass it back as ``macro_classes`` to average
    the same classes on a resample of the data."""
    per_class = result["per_class"]
    return {key: [name for name, m in per_class.items() if m.get(key) is not None] for key in result["macro"]}


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _precision_recall_f1n(decided: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
    """Precision / recall (positive class) and F1 of the negative class from torchmetrics' confusion
    counts of the 0/1 decisions ``decided``; ``None`` where a ratio has a zero denominator."""
    if len(y) == 0:
        return dict.fromkeys(EXTENDED_KEYS)
    tp, fp, tn, fn, _ = (float(v) for v in binary_stat_scores(decided, y, validate_args=False).tolist())
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1_negative": _ratio(2 * tn, 2 * tn + fn + fp),
    }
