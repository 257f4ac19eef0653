"""Cumulative metrics (MONAI's pattern): call per batch, then ``aggregate()``; ``reset()`` starts over.

Each metric keeps *per-image* buffers (one entry per image, with the image's patient id), so the same
buffers give the point value (:meth:`CumulativeMetric.aggregate`) and the patient-bootstrap interval
(:meth:`CumulativeMetric.bootstrap`, :mod:`multichex.evaluation.bootstrap`). Under ``torchrun`` each rank
feeds its share of the images; ``sync()`` (or ``aggregate(distributed=True)``) gathers every rank's buffers
in rank order, a collective that every rank must call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, bootstrap_statistic, bootstrap_statistics
from multichex.evaluation.metrics.classification import classification_metrics, macro_class_sets
from multichex.evaluation.metrics.detection import detection_map
from multichex.evaluation.metrics.gather import Gather, all_gather_objects, rank_and_world
from multichex.evaluation.metrics.segmentation import SCORE_KEYS, dice_per_image, jaccard_per_image, segmentation_scores

__all__ = [
    "ClassificationMetric", "CumulativeMetric", "DetectionMetric", "SegmentationMetric", "macro_bootstrap",
]

Buffers = dict[str, list[Any]]


class CumulativeMetric:
    """Per-image buffers named ``fields`` plus ``patients``, filled batch by batch."""

    fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._buffers: Buffers = {name: [] for name in (*self.fields, "patients")}

    def __len__(self) -> int:
        return len(self._buffers["patients"])

    @property
    def patients(self) -> list[str]:
        """The patient id of each buffered image (this rank's)."""
        return list(self._buffers["patients"])

    def append(self, patients: Sequence[Any] | None, **items: Sequence[Any]) -> None:
        """Add one batch: ``items[field]`` holds one entry per image; ``patients=None`` makes every image its
        own group (ids unique across ranks)."""
        lengths = {name: len(values) for name, values in items.items()}
        if set(items) != set(self.fields) or len(set(lengths.values())) > 1:
            raise ValueError(f"{type(self).__name__} needs equally long {sorted(self.fields)}, got {lengths}")
        n = next(iter(lengths.values()), 0)
        if patients is None:
            rank, _ = rank_and_world()
            patients = [f"image-{rank}-{len(self) + i}" for i in range(n)]
        if len(patients) != n:
            raise ValueError(f"{len(patients)} patient ids for {n} images")
        for name, values in items.items():
            self._buffers[name].extend(values)
        self._buffers["patients"].extend(str(p) for p in patients)

    def sync(self, gather: Gather = all_gather_objects) -> Buffers:
        """Every rank's buffers, concatenated in rank order (this rank's own buffers stay as they are).

        A collective under ``torch.distributed`` (``all_gather_object``); in one process a copy of the buffers.
        """
        parts = gather(self._buffers)
        return {name: [item for part in parts for item in part[name]] for name in self._buffers}

    def buffers(self, distributed: bool = False, gather: Gather = all_gather_objects) -> Buffers:
        """This rank's buffers (copies of the lists), or with ``distributed`` every rank's (see :meth:`sync`)."""
        return self.sync(gather) if distributed else {name: list(values) for name, values in self._buffers.items()}

    def aggregate(self, distributed: bool = False, gather: Gather = all_gather_objects) -> Any:
        """The metric over every buffered image (of every rank with ``distributed``)."""
        return self.compute(self.buffers(distributed, gather))

    def bootstrap(
        self, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, distributed: bool = False, gather: Gather = all_gather_objects,
    ) -> dict[str, dict[str, Any]]:
        """Patient-bootstrap intervals (name → :func:`~multichex.evaluation.bootstrap.bootstrap_ci`-style dict)."""
        return self.resample(self.buffers(distributed, gather), n_resamples, seed)

    def compute(self, buffers: Buffers) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def resample(self, buffers: Buffers, n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


def macro_bootstrap(
    probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], thresholds: float | Sequence[float], patients: Sequence[str],
    n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Patient-bootstrap of every macro classification metric (``extended``), each averaged over the classes
    where it is defined on the full sample (resamples where one of them is undefined are dropped)."""
    fixed = macro_class_sets(classification_metrics(probs, labels, class_names, thresholds, extended=True))
    return bootstrap_statistics(
        patients,
        lambda idx: classification_metrics(probs[idx], labels[idx], class_names, thresholds, extended=True, macro_classes=fixed)["macro"],
        n_resamples=n_resamples, seed=seed,
    )


class ClassificationMetric(CumulativeMetric):
    """Multi-label probabilities and labels (NaN = unknown) → :func:`classification_metrics`."""

    fields = ("probs", "labels")

    def __init__(self, class_names: Sequence[str], threshold: float | Sequence[float] = 0.5, extended: bool = False) -> None:
        self.class_names, self.threshold, self.extended = list(class_names), threshold, extended
        super().__init__()

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor, patients: Sequence[Any] | None = None) -> torch.Tensor:
        """Buffer ``B×C`` (or ``B``) probabilities ``y_pred`` and labels ``y``; returns ``y_pred``."""
        probs, labels = torch.as_tensor(y_pred).detach().cpu(), torch.as_tensor(y).detach().cpu()
        if probs.ndim == 1:
            probs, labels = probs[:, None], labels[:, None]
        if probs.shape != labels.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} differ in shape")
        self.append(patients, probs=[row.clone() for row in probs], labels=[row.clone() for row in labels])
        return y_pred

    def stacked(self, buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor]:
        """``N×C`` probabilities and labels of the buffered images (empty ``0×C`` without any)."""
        if not buffers["probs"]:
            empty = torch.zeros(0, len(self.class_names))
            return empty, empty.clone()
        return torch.stack(buffers["probs"]), torch.stack(buffers["labels"])

    def compute(self, buffers: Buffers) -> dict[str, Any]:
        probs, labels = self.stacked(buffers)
        return classification_metrics(probs, labels, self.class_names, self.threshold, extended=self.extended)

    def resample(self, buffers: Buffers, n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:
        """``macro_<name>`` → interval of each macro metric, and ``auroc`` of a single class."""
        probs, labels = self.stacked(buffers)
        intervals = {f"macro_{k}": v for k, v in macro_bootstrap(probs, labels, self.class_names, self.threshold, buffers["patients"],
                                                                 n_resamples, seed).items()}
        if len(self.class_names) == 1:
            name = self.class_names[0]
            intervals["auroc"] = bootstrap_statistic(
                buffers["patients"],
                lambda idx: classification_metrics(probs[idx], labels[idx], [name], self.threshold)["per_class"][name]["auroc"],
                n_resamples=n_resamples, seed=seed,
            )
        return intervals


class SegmentationMetric(CumulativeMetric):
    """Binary masks → per-image Dice and Jaccard (and average Hausdorff distance and SSIM with ``surface``)."""

    def __init__(self, surface: bool = True) -> None:
        self.surface = surface
        self.fields = SCORE_KEYS if surface else SCORE_KEYS[:2]  # Dice and Jaccard only
        super().__init__()

    def __call__(self, y_pred: torch.Tensor, y: torch.Tensor, patients: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Buffer the scores of binary ``B×1×H×W`` predictions ``y_pred`` against masks ``y``; returns them."""
        if self.surface:
            scores = segmentation_scores(y_pred, y)
        else:
            dice = dice_per_image(y_pred, y)
            scores = {"dice": dice, "jaccard": jaccard_per_image(y_pred, y, dice=dice)}
        self.append(patients, **{key: values.tolist() for key, values in scores.items()})
        return scores

    def compute(self, buffers: Buffers) -> dict[str, Any]:
        """Mean of each score over the images where it is finite (``None`` if none), and ``n_images``."""
        result: dict[str, Any] = {}
        for key in self.fields:
            values = np.asarray(buffers[key], dtype=float)
            finite = values[np.isfinite(values)]
            result[key] = float(finite.mean()) if finite.size else None
        return {**result, "n_images": len(buffers["patients"]), "n_patients": len(set(buffers["patients"]))}

    def resample(self, buffers: Buffers, n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:
        return {key: bootstrap_ci(np.asarray(buffers[key], dtype=float), buffers["patients"], n_resamples=n_resamples, seed=seed)
                for key in self.fields}


def _triple(found: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes, scores, labels)`` of one image's detections (a ``Detections``, a mapping or a triple)."""
    if isinstance(found, Mapping):
        return found["boxes"], found["scores"], found["labels"]
    if hasattr(found, "boxes"):
        return found.boxes, found.scores, found.labels
    boxes, scores, labels = found
    return boxes, scores, labels


class DetectionMetric(CumulativeMetric):
    """Per-image detections and ground-truth boxes → :func:`detection_map` (mAP at one IoU threshold).

    ``gate_passed`` records, per image, whether the positive-case gate let it through, so the same buffers
    also give the gated pipeline's mAP (:meth:`gated`).
    """

    fields = ("boxes", "scores", "labels", "gt_boxes", "gt_labels", "gate_passed")

    def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5) -> None:
        self.class_names, self.iou_threshold = list(class_names), iou_threshold
        super().__init__()

    def __call__(
        self, y_pred: Sequence[Any], y: Sequence[tuple[torch.Tensor, torch.Tensor]], patients: Sequence[Any] | None = None,
        gate_passed: Sequence[bool] | None = None,
    ) -> Sequence[Any]:
        """Buffer one batch: ``y_pred[i]`` image ``i``'s detections, ``y[i]`` its ``(gt_boxes, gt_labels)``."""
        found = [_triple(d) for d in y_pred]
        passed = [True] * len(found) if gate_passed is None else [bool(p) for p in gate_passed]
        self.append(patients, boxes=[f[0] for f in found], scores=[f[1] for f in found], labels=[f[2] for f in found],
                    gt_boxes=[g[0] for g in y], gt_labels=[g[1] for g in y], gate_passed=passed)
        return y_pred

    def compute(self, buffers: Buffers, idx: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
        pick = (lambda key: buffers[key]) if idx is None else (lambda key: [buffers[key][i] for i in idx])
        return detection_map(pick("boxes"), pick("scores"), pick("labels"), pick("gt_boxes"), pick("gt_labels"), self.class_names,
                             self.iou_threshold)

    @staticmethod
    def gated(buffers: Buffers) -> Buffers:
        """The buffers as the gated pipeline sees them: images the gate rejected keep no detections."""
        empty = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        passed = buffers["gate_passed"]
        return {**buffers, **{key: [v if p else empty[i] for v, p in zip(buffers[key], passed)]
                              for i, key in enumerate(("boxes", "scores", "labels"))}}

    def resample(self, buffers: Buffers, n_resamples: int, seed: int) -> dict[str, dict[str, Any]]:
        """``map`` (every detection) and ``map_gated`` (:meth:`gated`) from the same resamples."""
        sources = {"map": buffers, "map_gated": self.gated(buffers)}
        return bootstrap_statistics(buffers["patients"], lambda idx: {k: self.compute(b, idx)["map"] for k, b in sources.items()},
                                    n_resamples=n_resamples, seed=seed)
