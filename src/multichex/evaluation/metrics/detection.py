"""Detection metrics: per-class average precision at one IoU threshold and their mean (mAP)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from multichex.evaluation.metrics.scalars import mean_defined, to_float

__all__ = ["detection_map"]


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
            per_class[class_names[c]] = to_float(ap)

    return {
        "per_class": per_class,
        "map": mean_defined([per_class[n] for n in class_names if n_gt[n] > 0]),
        "n_gt": n_gt,
        "n_pred": n_pred,
        "iou_threshold": float(iou_threshold),
    }
