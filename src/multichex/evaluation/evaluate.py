"""Run a model over data sets and compute per-head metrics with patient-bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from multichex.data.record import collate_samples
from multichex.data.sources import CXRDataset
from multichex.device import autocast, module_device, to_cpu_float
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, bootstrap_statistic, bootstrap_statistics
from multichex.evaluation.metrics import (
    ClassificationMetric,
    DetectionMetric,
    SegmentationMetric,
    classification_metrics,
    detection_map,
    macro_bootstrap,
)
from multichex.evaluation.metrics.gather import Gather, all_gather_objects, rank_and_world
from multichex.evaluation.metrics.segmentation import SCORE_KEYS
from multichex.models.config import ModelConfig
from multichex.models.decision import at_or_above
from multichex.models.multichexnet import MultiCheXNet

SEGMENTATION_KEYS = SCORE_KEYS  # ("dice", "jaccard", "avg_hausdorff", "hd95", "ssim"): per-image lists of Collected, keys of metrics["segmentation"]


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
    hd95: list[float] = field(default_factory=list)  # pixels; NaN when exactly one mask is empty
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


@dataclass
class PassMetrics:
    """The cumulative metrics one evaluation pass over a data set fills, one per head."""

    classification: ClassificationMetric
    gate: ClassificationMetric
    segmentation: SegmentationMetric
    detection: DetectionMetric

    @classmethod
    def for_model(cls, config: ModelConfig, surface_metrics: bool = True) -> "PassMetrics":
        thresholds = config.class_thresholds if config.class_thresholds is not None else 0.5
        return cls(
            ClassificationMetric(config.class_names, thresholds, extended=True),
            ClassificationMetric(["positive"], config.gate.threshold),
            SegmentationMetric(surface=surface_metrics),
            DetectionMetric(config.box_classes),
        )

    def reset(self) -> None:
        for metric in (self.classification, self.gate, self.segmentation, self.detection):
            metric.reset()

    def collected(self, distributed: bool = False, gather: Gather = all_gather_objects) -> Collected:
        """The buffers as a :class:`Collected` (every rank's, in rank order, with ``distributed``)."""
        cls, gate = self.classification.buffers(distributed, gather), self.gate.buffers(distributed, gather)
        seg, det = self.segmentation.buffers(distributed, gather), self.detection.buffers(distributed, gather)
        out = Collected(patients=cls["patients"], dice_patients=seg["patients"], det=det)
        if cls["probs"]:
            probs, labels = self.classification.stacked(cls)
            out.probs, out.labels = [probs], [labels]
        gate_probs, gate_labels = self.gate.stacked(gate)
        out.gate_probs, out.gate_labels = gate_probs[:, 0].tolist(), gate_labels[:, 0].tolist()
        for key in self.segmentation.fields:
            setattr(out, key, seg[key])
        return out


def _shard(dataset: CXRDataset, rank: int, world: int) -> Dataset:
    """Rank ``rank``'s contiguous share of ``dataset`` (the shards in rank order are the whole, in order)."""
    n = len(dataset)
    return dataset if world == 1 else Subset(dataset, range(rank * n // world, (rank + 1) * n // world))


def feed(model: MultiCheXNet, dataset: Dataset, metrics: PassMetrics, batch_size: int = 16, seg_threshold: float = 0.5,
         precision: str = "fp32") -> None:
    """One ungated pass of every head over ``dataset``, batch by batch into ``metrics`` (model in eval mode).

    The network runs on its own device in ``precision``; its outputs come back to the CPU as float32, where
    the metrics accumulate (and boxes are decoded) batch by batch."""
    size = model.config.image_size
    device = module_device(model)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples):
        if batch is None:
            continue
        patients = [m["patient_id"] for m in batch.meta]
        tasks = ["cls", "gate"] + (["seg"] if batch.has_mask.any() else []) + (["det"] if batch.has_boxes.any() else [])
        with autocast(device, precision):
            outputs = model(batch.images.to(device, non_blocking=True), tasks)
        outputs = {key: to_cpu_float(value) for key, value in outputs.items()}
        metrics.classification(model.class_probabilities(outputs["cls"]), batch.labels, patients)
        gate_probs = model.gate_probability(outputs)
        metrics.gate(gate_probs, batch.positive, patients)
        if "seg" in outputs:
            has = batch.has_mask
            predicted = at_or_above(torch.sigmoid(outputs["seg"][has]), seg_threshold).float()
            metrics.segmentation(predicted, batch.masks[has], [p for p, h in zip(patients, has.tolist()) if h])
        if "det" in outputs:
            keep = torch.nonzero(batch.has_boxes).flatten().tolist()
            decoded = model.det.postprocess(outputs["det"][keep], size, score_threshold=0.05, max_detections=50)
            metrics.detection(
                decoded, [(batch.boxes[slot], batch.box_labels[slot]) for slot in keep], [patients[slot] for slot in keep],
                gate_passed=[bool(at_or_above(gate_probs[slot], model.config.gate.threshold)) for slot in keep],
            )


@torch.inference_mode()
def collect(model: MultiCheXNet, datasets: dict[str, CXRDataset], batch_size: int = 16, seg_threshold: float = 0.5,
            surface_metrics: bool = True, distributed: bool = False, precision: str = "fp32") -> Collected:
    """One ungated pass of every head over every image (head quality is measured without the gate).

    ``surface_metrics=False`` skips the average Hausdorff distance and SSIM (Dice and Jaccard only): the
    distance transforms cost more than the forward pass on small validation sets, epoch after epoch.
    ``distributed``: under ``torchrun``, every rank (each must call this) scores a contiguous share of each
    data set and gets every rank's images back, in the single-process order. ``precision``: the forward's
    arithmetic (:mod:`multichex.device`), on the model's device.
    """
    was_training = model.training
    model.eval()
    rank, world = rank_and_world() if distributed else (0, 1)
    parts = []
    for dataset in datasets.values():
        metrics = PassMetrics.for_model(model.config, surface_metrics)
        feed(model, _shard(dataset, rank, world), metrics, batch_size, seg_threshold, precision)
        parts.append(metrics.collected(distributed))
    model.train(was_training)
    return Collected.merge(parts)


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
    both = macro_bootstrap(probs, labels, class_names, thresholds, patients, n_resamples=n_resamples, seed=seed)
    return {f"macro_{k}": _interval(v) for k, v in both.items()}


def class_auroc_intervals(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], patients: Sequence[str],
                          n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Patient-bootstrap CI of each class's AUROC (classes whose known labels hold both values): name → interval.

    A resample where a class's known labels hold one value only is skipped for that class (``n_skipped``).
    """
    from torchmetrics.functional.classification import binary_auroc

    known = ~torch.isnan(labels)
    defined = [c for c in range(len(class_names)) if labels[known[:, c], c].unique().numel() == 2]

    def compute(idx: np.ndarray) -> dict[str, float | None]:
        rows_all = torch.as_tensor(idx)
        values: dict[str, float | None] = {}
        for c in defined:
            rows = rows_all[known[rows_all, c]]
            y = labels[rows, c]
            values[class_names[c]] = float(binary_auroc(probs[rows, c], y.long())) if y.unique().numel() == 2 else None
        return values

    if not defined:
        return {}
    return {name: _interval(v) for name, v in bootstrap_statistics(list(patients), compute, n_resamples, seed=seed).items()}


def summarize(
    out: Collected, class_names: list[str], box_classes: list[str], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
    class_thresholds: list[float] | None = None, gate_threshold: float = 0.5, gated_heads: Sequence[str] = ("det",),
) -> dict[str, Any]:
    """Metrics per head; with ``bootstrap > 0``, 95% CIs from ``bootstrap`` resamples of patients (not
    images), the same number for every head.

    Accuracy, F1, precision, recall and F1-N use ``class_thresholds`` (chosen on validation; 0.5 when
    None) and the gate's threshold, each with ``p >= t`` as positive. Every macro classification metric
    gets a ``macro_<name>`` interval (see :func:`macro_classification_intervals`) and each class's AUROC one
    (``auroc_intervals``, :func:`class_auroc_intervals`); ``segmentation`` has a
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
        if bootstrap:
            metrics["classification"]["auroc_intervals"] = class_auroc_intervals(probs, labels, class_names, out.patients, bootstrap, seed)
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
    gated_det = DetectionMetric.gated(det)

    def compute(source: dict[str, list], idx: np.ndarray) -> float | None:
        pick = lambda data, key: [data[key][i] for i in idx]
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
    distributed: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Collect and summarise in one call; with ``per_source``, also each data set alone under ``"per_source"``
    (``surface_metrics``, ``distributed``: see :func:`collect`; with ``distributed`` every rank gets the metrics)."""
    config = model.config
    names = config.class_names, config.box_classes
    points = {"class_thresholds": config.class_thresholds, "gate_threshold": config.gate.threshold, "gated_heads": config.gate.gated_heads}
    if not per_source:
        collected = collect(model, datasets, batch_size, surface_metrics=surface_metrics, distributed=distributed, precision=precision)
        return summarize(collected, *names, bootstrap, seed, **points)
    parts = {key: collect(model, {key: dataset}, batch_size, surface_metrics=surface_metrics, distributed=distributed, precision=precision)
             for key, dataset in datasets.items()}
    metrics = summarize(Collected.merge(list(parts.values())), *names, bootstrap, seed, **points)
    metrics["per_source"] = {key: summarize(part, *names, bootstrap, seed, **points) for key, part in parts.items()}
    return metrics
