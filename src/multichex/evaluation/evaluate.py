"""Run a model over data sets and compute per-head metrics with patient-bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from multichex.data.record import collate_samples
from multichex.data.sources import CXRDataset
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, bootstrap_statistic, bootstrap_statistics
from multichex.evaluation.metrics import (
    classification_metrics, detection_map, dice_per_image, jaccard_per_image, macro_class_sets, segmentation_scores,
)
from multichex.models.decision import at_or_above
from multichex.models.multichexnet import MultiCheXNet

SEGMENTATION_KEYS = ("dice", "jaccard", "avg_hausdorff", "ssim")  # per-image lists of Collected, keys of metrics["segmentation"]


@dataclass
class Collected:
    """Per-image outputs and labels gathered over an evaluation pass."""

    patients: list[str] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    gate_probs: list[float] = field(default_factory=list)
    gate_labels: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    jaccard: list[float] = field(default_factory=list)
    avg_hausdorff: list[float] = field(default_factory=list)  # pixels; NaN when exactly one mask is empty
    ssim: list[float] = field(default_factory=list)
    dice_patients: list[str] = field(default_factory=list)  # patient of each entry of dice/jaccard/avg_hausdorff/ssim
    det: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("boxes", "scores", "labels", "gt_boxes", "gt_labels", "patients", "gate_passed")})

    @classmethod
    def merge(cls, parts: list["Collected"]) -> "Collected":
        """One collection holding the images of every part (e.g. per-source collections)."""
        merged = cls()
        for part in parts:
            for name in ("patients", "probs", "labels", "gate_probs", "gate_labels", *SEGMENTATION_KEYS, "dice_patients"):
                getattr(merged, name).extend(getattr(part, name))
            for key, values in part.det.items():
                merged.det[key].extend(values)
        return merged


@torch.inference_mode()
def collect(model: MultiCheXNet, datasets: dict[str, CXRDataset], batch_size: int = 16, seg_threshold: float = 0.5,
            surface_metrics: bool = True) -> Collected:
    """One ungated pass of every head over every image (head quality is measured without the gate).

    ``surface_metrics=False`` skips the average Hausdorff distance and SSIM (Dice and Jaccard only): the
    distance transforms cost more than the forward pass on small validation sets, epoch after epoch.
    """
    was_training = model.training
    model.eval()
    out = Collected()
    size = model.config.image_size
    for dataset in datasets.values():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples):
            if batch is None:
                continue
            patients = [m["patient_id"] for m in batch.meta]
            tasks = ["cls", "gate"] + (["seg"] if batch.has_mask.any() else []) + (["det"] if batch.has_boxes.any() else [])
            outputs = model(batch.images, tasks)
            out.patients += patients
            out.probs.append(model.class_probabilities(outputs["cls"]))
            out.labels.append(batch.labels)
            gate_probs = model.gate_probability(outputs)
            out.gate_probs += gate_probs.tolist()
            out.gate_labels += batch.positive.tolist()
            if "seg" in outputs:
                has = batch.has_mask
                predicted = at_or_above(torch.sigmoid(outputs["seg"][has]), seg_threshold).float()
                if surface_metrics:
                    scores = segmentation_scores(predicted, batch.masks[has])
                else:
                    dice = dice_per_image(predicted, batch.masks[has])
                    scores = {"dice": dice, "jaccard": jaccard_per_image(predicted, batch.masks[has], dice=dice)}
                for key, values in scores.items():
                    getattr(out, key).extend(values.tolist())
                out.dice_patients += [p for p, h in zip(patients, has.tolist()) if h]
            if "det" in outputs:
                keep = torch.nonzero(batch.has_boxes).flatten().tolist()
                decoded = model.det.postprocess(outputs["det"][keep], size, score_threshold=0.05, max_detections=50)
                for slot, found in zip(keep, decoded):
                    out.det["boxes"].append(found.boxes)
                    out.det["scores"].append(found.scores)
                    out.det["labels"].append(found.labels)
                    out.det["gt_boxes"].append(batch.boxes[slot])
                    out.det["gt_labels"].append(batch.box_labels[slot])
                    out.det["patients"].append(patients[slot])
                    out.det["gate_passed"].append(bool(at_or_above(gate_probs[slot], model.config.gate.threshold)))
    model.train(was_training)
    return out


def _interval(value_dict: dict[str, Any]) -> dict[str, Any]:
    """The reported part of a bootstrap result, with ``n_skipped``: resamples left out because the
    statistic was undefined on them (e.g. a class of the macro set with one label value only)."""
    interval = {k: value_dict.get(k) for k in ("value", "low", "high", "n_groups", "n_resamples")}
    interval["n_skipped"] = int(value_dict["n_resamples"] - value_dict["n_valid"]) if "n_valid" in value_dict else None
    return interval


def macro_classification_intervals(
    probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], thresholds: float | Sequence[float], patients: Sequence[str],
    n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Patient-bootstrap CIs of every macro classification metric: ``macro_<name>`` → interval.

    The classes a macro value averages are fixed on the full sample: for each metric, the classes where it
    is defined there (for AUROC, the classes whose known labels hold both values). A resample where one of
    those classes is undefined (for AUROC: its known rows carry one label value only, e.g. a rare class's
    few positive patients were not drawn) is *skipped* for that macro statistic rather than averaged over
    fewer classes, so every kept resample averages the same classes as the point estimate. The skipped
    resamples are counted in ``n_skipped`` (``n_resamples - n_skipped`` resamples make the interval); the
    interval is conditional on the rare classes being present, which the count makes visible. Resamples
    are not stratified: a patient's images carry several labels at once, so no stratification keeps
    every class defined while resampling whole patients.
    """
    full = classification_metrics(probs, labels, class_names, thresholds, extended=True)
    fixed = macro_class_sets(full)
    both = bootstrap_statistics(
        patients,
        lambda idx: classification_metrics(probs[idx], labels[idx], class_names, thresholds, extended=True, macro_classes=fixed)["macro"],
        n_resamples=n_resamples, seed=seed,
    )
    return {f"macro_{k}": _interval(v) for k, v in both.items()}


def summarize(
    out: Collected, class_names: list[str], box_classes: list[str], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
    class_thresholds: list[float] | None = None, gate_threshold: float = 0.5, gated_heads: Sequence[str] = ("det",),
) -> dict[str, Any]:
    """Metrics per head; with ``bootstrap > 0``, 95% CIs from ``bootstrap`` resamples of patients (not
    images), the same number for every head.

    Accuracy, F1, precision, recall and F1-N use ``class_thresholds`` (chosen on validation; 0.5 when
    None) and the gate's threshold, each with ``p >= t`` as positive. Every macro classification metric
    gets a ``macro_<name>`` interval (see :func:`macro_classification_intervals`); ``segmentation`` has a
    ``{"value", "low", "high", ...}`` entry per key of ``SEGMENTATION_KEYS`` (mean over images; NaN
    values, i.e. an undefined average Hausdorff distance, are left out). ``detection`` reports the gated
    pipeline's mAP (``map_gated``) only when ``"det"`` is in ``gated_heads`` (the model's
    ``gate.gated_heads``); otherwise the gate never removes boxes and ``map`` is what a user gets.
    """
    thresholds = class_thresholds if class_thresholds is not None else 0.5
    metrics: dict[str, Any] = {}
    if out.probs:
        probs, labels = torch.cat(out.probs), torch.cat(out.labels)
        cls = classification_metrics(probs, labels, class_names, thresholds, extended=True)
        intervals = {f"macro_{k}": {"value": v} for k, v in cls["macro"].items()}
        if bootstrap and any(v is not None for v in cls["macro"].values()):
            intervals = macro_classification_intervals(probs, labels, class_names, thresholds, out.patients, bootstrap, seed)
        metrics["classification"] = {"per_class": cls["per_class"], "macro": cls["macro"], **intervals, "n_images": len(probs)}
        gate_probs, gate_labels = torch.tensor(out.gate_probs), torch.tensor(out.gate_labels)
        def gate_metrics(idx: np.ndarray) -> dict[str, Any]:
            return classification_metrics(gate_probs[idx, None], gate_labels[idx, None], ["positive"], gate_threshold)["per_class"]["positive"]

        gate = gate_metrics(np.arange(len(gate_probs)))
        gate_interval: dict[str, Any] = {"value": gate["auroc"]}
        if bootstrap and gate["auroc"] is not None:
            gate_interval = _interval(bootstrap_statistic(out.patients, lambda idx: gate_metrics(idx)["auroc"], n_resamples=bootstrap, seed=seed))
        metrics["gate"] = {"auroc": gate_interval, "accuracy": gate["accuracy"], "f1": gate["f1"], "n_known": gate["n_known"]}
    if out.dice:
        segmentation: dict[str, Any] = {}
        for key in SEGMENTATION_KEYS:
            per_image = getattr(out, key)
            if len(per_image) != len(out.dice):  # e.g. a hand-built collection with Dice only
                continue
            values = np.asarray(per_image, dtype=float)
            if bootstrap:
                segmentation[key] = _interval(bootstrap_ci(values, out.dice_patients, n_resamples=bootstrap, seed=seed))
            else:
                finite = values[np.isfinite(values)]
                segmentation[key] = {"value": float(finite.mean()) if finite.size else None}
        metrics["segmentation"] = {**segmentation, "n_images": len(out.dice), "n_patients": len(set(out.dice_patients))}
    if out.det["gt_boxes"]:
        metrics["detection"] = _detection_summary(out.det, box_classes, bootstrap, seed, gated="det" in gated_heads)
    return metrics


def _detection_summary(det: dict[str, list], box_classes: list[str], bootstrap: int, seed: int, gated: bool = True) -> dict[str, Any]:
    """mAP@0.5 of the ungated detector (head quality) and, when the gate guards detection (``gated``), of
    the gated pipeline, where images the gate rejects keep no boxes (what a user gets; the gate's misses and
    false passes both count). Both intervals use ``bootstrap`` resamples, like every other head."""
    empty = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    gated_det = {
        "boxes": [b if passed else empty[0] for b, passed in zip(det["boxes"], det["gate_passed"])],
        "scores": [s if passed else empty[1] for s, passed in zip(det["scores"], det["gate_passed"])],
        "labels": [lab if passed else empty[2] for lab, passed in zip(det["labels"], det["gate_passed"])],
    }

    def compute(source: dict[str, list], idx: np.ndarray) -> float | None:
        pick = lambda data, key: [data[key][i] for i in idx]  # noqa: E731
        return detection_map(pick(source, "boxes"), pick(source, "scores"), pick(source, "labels"),
                             pick(det, "gt_boxes"), pick(det, "gt_labels"), box_classes)["map"]

    full = detection_map(det["boxes"], det["scores"], det["labels"], det["gt_boxes"], det["gt_labels"], box_classes)
    everything = np.arange(len(det["gt_boxes"]))
    sources = {"map": det, **({"map_gated": gated_det} if gated else {})}
    intervals = {"map": {"value": full["map"]}, **({"map_gated": {"value": compute(gated_det, everything)}} if gated else {})}
    if bootstrap and full["map"] is not None:
        both = bootstrap_statistics(det["patients"], lambda idx: {key: compute(source, idx) for key, source in sources.items()},
                                    n_resamples=bootstrap, seed=seed)
        intervals = {key: _interval(value) for key, value in both.items()}
    summary = {"per_class": full["per_class"], **intervals, "iou_threshold": 0.5, "n_gt": full["n_gt"], "n_images": len(det["gt_boxes"])}
    if gated:
        summary["n_gate_passed"] = int(sum(det["gate_passed"]))
    return summary


def evaluate_datasets(
    model: MultiCheXNet, datasets: dict[str, CXRDataset], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, batch_size: int = 16,
    per_source: bool = False,
    surface_metrics: bool = True,
) -> dict[str, Any]:
    """Collect and summarise in one call; with ``per_source``, also each data set alone under ``"per_source"``
    (``surface_metrics``: see :func:`collect`)."""
    config = model.config
    names = config.class_names, config.box_classes
    points = {"class_thresholds": config.class_thresholds, "gate_threshold": config.gate.threshold, "gated_heads": config.gate.gated_heads}
    if not per_source:
        return summarize(collect(model, datasets, batch_size, surface_metrics=surface_metrics), *names, bootstrap, seed, **points)
    parts = {key: collect(model, {key: dataset}, batch_size, surface_metrics=surface_metrics) for key, dataset in datasets.items()}
    metrics = summarize(Collected.merge(list(parts.values())), *names, bootstrap, seed, **points)
    metrics["per_source"] = {key: summarize(part, *names, bootstrap, seed, **points) for key, part in parts.items()}
    return metrics
