"""Evaluation metrics for the three heads: multi-label classification, segmentation, detection.

All functions return plain Python floats / ints / ``None`` so results can go straight into JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import DiceMetric, compute_average_surface_distance
from skimage.metrics import structural_similarity
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score, binary_stat_scores

from multichex.models.decision import at_or_above

__all__ = [
    "classification_metrics",
    "dice_per_image",
    "detection_map",
    "average_hausdorff_per_image",
    "jaccard_per_image",
    "macro_class_sets",
    "segmentation_scores",
    "ssim_per_image",
]

EXTENDED_KEYS = ("precision", "recall", "f1_negative")


def _to_float(x: Any) -> float | None:
    """Convert a scalar tensor / number to a Python float; NaN becomes ``None``."""
    if x is None:
        return None
    value = float(x.item() if isinstance(x, torch.Tensor) else x)
    return None if math.isnan(value) else value


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean over the entries that are not ``None`` (``None`` if there are none)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _mean_all(values: Sequence[float | None]) -> float | None:
    """Mean of every entry; ``None`` if any entry is ``None`` or there are none."""
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


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
            entry["accuracy"] = _to_float(binary_accuracy(decided, y))
            entry["f1"] = _to_float(binary_f1_score(decided, y))
            if 0 < n_pos < n_known:  # AUROC is undefined with a single class among known rows
                entry["auroc"] = _to_float(binary_auroc(p, y))
        if extended:
            entry.update(_precision_recall_f1n(decided, y))
        per_class[name] = entry

    keys = ("auroc", "accuracy", "f1") + (EXTENDED_KEYS if extended else ())
    macro = {}
    for key in keys:
        if macro_classes is not None and key in macro_classes:
            macro[key] = _mean_all([per_class[name][key] for name in macro_classes[key]])
        else:
            macro[key] = _mean_defined([m[key] for m in per_class.values()])
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


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, one value per image, via MONAI's ``DiceMetric``.

    Args:
        pred: binary ``B×1×H×W`` prediction (bool or {0, 1}; a probability map is binarised with
            ``p >= 0.5``, the rule of :func:`~multichex.evaluation.thresholds.at_or_above`).
        target: binary ``B×1×H×W`` ground truth.

    Returns:
        Float tensor ``B``. By definition here Dice = 1 when pred and target are both empty
        (MONAI's default gives NaN there; ``ignore_empty=False`` makes it return 1, and 0 for a
        non-empty prediction on an empty target). Any remaining NaN is mapped to that rule as well.
    """
    pred_b = at_or_above(torch.as_tensor(pred).detach().cpu().float(), 0.5)
    target_b = at_or_above(torch.as_tensor(target).detach().cpu().float(), 0.5)
    if pred_b.shape != target_b.shape:
        raise ValueError(f"pred {tuple(pred_b.shape)} and target {tuple(target_b.shape)} differ in shape")
    if pred_b.ndim == 3:  # B×H×W: add the channel dimension
        pred_b, target_b = pred_b[:, None], target_b[:, None]
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = metric(pred_b.float(), target_b.float()).reshape(-1).float()
    # Safety net for the empty/empty case in case a MONAI version still returns NaN.
    both_empty = (pred_b.flatten(1).sum(1) == 0) & (target_b.flatten(1).sum(1) == 0)
    dice = torch.where(torch.isnan(dice) & both_empty, torch.ones_like(dice), dice)
    return torch.nan_to_num(dice, nan=0.0)


def _binary_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both masks as bool ``B×1×H×W`` on the CPU (``B×H×W`` gets a channel dimension); values ``>= 0.5``
    are foreground."""
    pred_b = at_or_above(torch.as_tensor(pred).detach().cpu().float(), 0.5)
    target_b = at_or_above(torch.as_tensor(target).detach().cpu().float(), 0.5)
    if pred_b.shape != target_b.shape:
        raise ValueError(f"pred {tuple(pred_b.shape)} and target {tuple(target_b.shape)} differ in shape")
    if pred_b.ndim == 3:
        pred_b, target_b = pred_b[:, None], target_b[:, None]
    if pred_b.ndim != 4 or pred_b.shape[1] != 1:
        raise ValueError(f"expected binary masks B×1×H×W or B×H×W, got {tuple(pred_b.shape)}")
    return pred_b, target_b


def jaccard_per_image(pred: torch.Tensor, target: torch.Tensor, dice: torch.Tensor | None = None) -> torch.Tensor:
    """Jaccard index (IoU) per image from Dice, ``J = D / (2 - D)``; 1 when both masks are empty
    (as Dice). Pass ``dice`` from :func:`dice_per_image` to avoid recomputing it."""
    d = dice_per_image(pred, target) if dice is None else torch.as_tensor(dice, dtype=torch.float32)
    return d / (2.0 - d)


def average_hausdorff_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average Hausdorff distance per image, in pixels: MONAI's symmetric average surface distance.

    The boundary pixels of each mask are found by MONAI (mask minus its erosion); the value is the
    mean of the Euclidean distances from every boundary pixel of one mask to the nearest boundary
    pixel of the other, pooled over both directions. Both masks empty → 0; exactly one empty →
    NaN (undefined; skipped by ``np.nanmean`` and by the summaries).
    """
    pred_b, target_b = _binary_pair(pred, target)
    pred_any = pred_b.flatten(1).any(1)
    target_any = target_b.flatten(1).any(1)
    out = torch.full((pred_b.shape[0],), float("nan"))
    out[~pred_any & ~target_any] = 0.0
    both = pred_any & target_any
    if both.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated internal argument
            asd = compute_average_surface_distance(pred_b[both].float(), target_b[both].float(), include_background=True, symmetric=True)
        out[both] = asd.reshape(-1).float()
    return out


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity of the predicted and true binary masks per image (scikit-image,
    ``data_range=1``, 7×7 uniform window, or the largest odd window that fits smaller images);
    NaN for images under 3 pixels on a side."""
    pred_b, target_b = _binary_pair(pred, target)
    height, width = pred_b.shape[2:]
    side = min(height, width, 7)
    win = side if side % 2 else side - 1
    out = torch.full((pred_b.shape[0],), float("nan"))
    if win < 3:
        return out
    p_np = pred_b[:, 0].numpy().astype(np.float64)
    t_np = target_b[:, 0].numpy().astype(np.float64)
    for i in range(len(out)):
        out[i] = float(structural_similarity(p_np[i], t_np[i], data_range=1.0, win_size=win))
    return out


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image Dice, Jaccard, average Hausdorff distance (pixels) and SSIM of binary masks.

    Args:
        pred: binary ``B×1×H×W`` (or ``B×H×W``) prediction.
        target: binary ground truth of the same shape.

    Returns:
        ``{"dice", "jaccard", "avg_hausdorff", "ssim"}``, each a float tensor ``B``; see
        :func:`dice_per_image`, :func:`jaccard_per_image`, :func:`average_hausdorff_per_image`
        (NaN when exactly one mask is empty) and :func:`ssim_per_image`.
    """
    dice = dice_per_image(pred, target)
    return {
        "dice": dice,
        "jaccard": jaccard_per_image(pred, target, dice=dice),
        "avg_hausdorff": average_hausdorff_per_image(pred, target),
        "ssim": ssim_per_image(pred, target),
    }


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _as_np(x: torch.Tensor | np.ndarray | None, shape_tail: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Tensor / array → numpy of ``dtype``; ``None`` or empty → an empty array with ``shape_tail``."""
    if x is None:
        return np.zeros((0, *shape_tail), dtype=dtype)
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0:
        return np.zeros((0, *shape_tail), dtype=dtype)
    return arr.astype(dtype).reshape(-1, *shape_tail)


def detection_map(
    pred_boxes: list[torch.Tensor],
    pred_scores: list[torch.Tensor],
    pred_labels: list[torch.Tensor],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    class_names: list[str],
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-class average precision at one IoU threshold, and their mean (mAP).

    Uses MONAI's COCO-style evaluation (``matching_batch`` + ``COCOMetric``; no torchvision
    needed): per image and class, detections are matched greedily by descending score to the
    unmatched ground-truth box of highest IoU with IoU >= ``iou_threshold``; unmatched detections,
    duplicates of an already matched box and detections of the wrong class are false positives.
    Images with no ground-truth boxes still contribute their detections as false positives.
    AP is the COCO 101-point interpolated area under the precision envelope (recall 0, 0.01, ..., 1).
    No per-image cap on the number of detections is applied.

    Args:
        pred_boxes: per image, ``N×4`` boxes ``(x1, y1, x2, y2)`` in pixels.
        pred_scores: per image, ``N`` confidence scores.
        pred_labels: per image, ``N`` class indices into ``class_names``.
        gt_boxes: per image, ``M×4`` boxes ``(x1, y1, x2, y2)``.
        gt_labels: per image, ``M`` class indices.
        class_names: the box classes.
        iou_threshold: minimum IoU for a match.

    Returns:
        ``{"per_class": {name: AP or None}, "map": float or None, "n_gt": {name: int},
        "n_pred": {name: int}, "iou_threshold": float}``; a class's AP is ``None`` when it has no ground-truth box, and
        ``map`` averages the classes with at least one ground-truth box (``None`` if none has).
    """
    n_images = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == len(pred_labels) == len(gt_labels) == n_images):
        raise ValueError("pred_boxes, pred_scores, pred_labels, gt_boxes and gt_labels need one entry per image")

    pb = [_as_np(b, (4,), np.float32) for b in pred_boxes]
    ps = [_as_np(s, (), np.float32).reshape(-1) for s in pred_scores]
    pl = [_as_np(lab, (), np.int64).reshape(-1) for lab in pred_labels]
    gb = [_as_np(b, (4,), np.float32) for b in gt_boxes]
    gl = [_as_np(lab, (), np.int64).reshape(-1) for lab in gt_labels]
    for i in range(n_images):
        if not (len(pb[i]) == len(ps[i]) == len(pl[i])) or len(gb[i]) != len(gl[i]):
            raise ValueError(f"image {i}: boxes, scores and labels differ in length")
        for lab in (pl[i], gl[i]):
            if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
                raise ValueError(f"image {i}: box label outside 0..{len(class_names) - 1}")

    n_classes = len(class_names)
    n_gt = {name: int(sum(int((g == c).sum()) for g in gl)) for c, name in enumerate(class_names)}
    n_pred = {name: int(sum(int((p == c).sum()) for p in pl)) for c, name in enumerate(class_names)}
    per_class: dict[str, float | None] = dict.fromkeys(class_names)

    # Evaluate only the classes that have ground truth (AP is per class, so dropping detections of
    # other classes changes nothing) - this also avoids MONAI's "no gt found" warnings.
    evaluated = [c for c, name in enumerate(class_names) if n_gt[name] > 0]
    if n_images > 0 and evaluated:
        remap = np.full(n_classes, -1, dtype=np.int64)
        remap[evaluated] = np.arange(len(evaluated))
        keep = [remap[lab] >= 0 for lab in pl]
        pb = [b[k] for b, k in zip(pb, keep)]
        ps = [s[k] for s, k in zip(ps, keep)]
        pl = [remap[lab[k]] for lab, k in zip(pl, keep)]
        gl = [remap[lab] for lab in gl]
        names = [f"c{i}" for i in range(len(evaluated))]

        max_det = max(1, max(len(s) for s in ps))  # no per-image cap on detections
        coco = COCOMetric(
            classes=names,
            iou_list=(iou_threshold,),
            iou_range=(iou_threshold, iou_threshold, 0.05),  # a single threshold
            max_detection=(max_det,),
            per_class=True,
            verbose=False,
        )
        matched = matching_batch(
            iou_fn=box_iou,
            iou_thresholds=coco.iou_thresholds,
            pred_boxes=pb,
            pred_classes=pl,
            pred_scores=ps,
            gt_boxes=gb,
            gt_classes=gl,
            max_detections=max_det,
        )
        results, _ = coco(matched)
        for i, c in enumerate(evaluated):
            ap = results[f"{names[i]}_AP_IoU_{iou_threshold:.2f}_MaxDet_{max_det}"]
            per_class[class_names[c]] = _to_float(ap)

    return {
        "per_class": per_class,
        "map": _mean_defined([per_class[n] for n in class_names if n_gt[n] > 0]),
        "n_gt": n_gt,
        "n_pred": n_pred,
        "iou_threshold": float(iou_threshold),
    }
