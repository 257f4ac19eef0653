"""Evaluation metrics for the three heads: multi-label classification, segmentation, detection.

All functions return plain Python floats / ints / ``None`` so results can go straight into JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import DiceMetric
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score

__all__ = ["classification_metrics", "dice_per_image", "detection_map"]


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


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def classification_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    threshold: float | Sequence[float] = 0.5,
) -> dict[str, Any]:
    """Per-class AUROC / accuracy / F1 for multi-label outputs with unknown labels.

    Args:
        probs: ``B×C`` probabilities in [0, 1].
        labels: ``B×C`` float labels in {0, 1}; NaN = unknown, ignored for that class only.
        class_names: ``C`` names, used as keys of ``per_class``.
        threshold: a probability strictly above it counts as a positive prediction (torchmetrics'
            convention; used for accuracy and F1); one value, or one per class (chosen on validation).

    Returns:
        ``{"per_class": {name: {"auroc", "accuracy", "f1", "n_known", "n_positive"}},
        "macro": {"auroc", "accuracy", "f1"}}``. ``auroc`` is ``None`` when the known rows of that
        class have no positives or no negatives; ``accuracy``/``f1`` are ``None`` when no row is
        known. Macro values average the classes where the metric is defined (``None`` if none).
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
        if n_known > 0:
            entry["accuracy"] = _to_float(binary_accuracy(p, y, threshold=thresholds[c]))
            entry["f1"] = _to_float(binary_f1_score(p, y, threshold=thresholds[c]))
            if 0 < n_pos < n_known:  # AUROC is undefined with a single class among known rows
                entry["auroc"] = _to_float(binary_auroc(p, y))
        per_class[name] = entry

    macro = {
        key: _mean_defined([m[key] for m in per_class.values()]) for key in ("auroc", "accuracy", "f1")
    }
    return {"per_class": per_class, "macro": macro}


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks, one value per image, via MONAI's ``DiceMetric``.

    Args:
        pred: binary ``B×1×H×W`` prediction (bool or {0, 1}).
        target: binary ``B×1×H×W`` ground truth.

    Returns:
        Float tensor ``B``. By definition here Dice = 1 when pred and target are both empty
        (MONAI's default gives NaN there; ``ignore_empty=False`` makes it return 1, and 0 for a
        non-empty prediction on an empty target). Any remaining NaN is mapped to that rule as well.
    """
    pred_b = torch.as_tensor(pred).detach().cpu() > 0.5
    target_b = torch.as_tensor(target).detach().cpu() > 0.5
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
