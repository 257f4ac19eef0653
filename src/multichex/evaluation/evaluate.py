"""Run a model over data sets and compute per-head metrics with patient-bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from multichex.data.record import collate_samples
from multichex.data.sources import CXRDataset
from multichex.evaluation.bootstrap import bootstrap_ci, bootstrap_statistic
from multichex.evaluation.metrics import classification_metrics, detection_map, dice_per_image
from multichex.models.multichexnet import MultiCheXNet


@dataclass
class Collected:
    """Per-image outputs and labels gathered over an evaluation pass."""

    patients: list[str] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    gate_probs: list[float] = field(default_factory=list)
    gate_labels: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    dice_patients: list[str] = field(default_factory=list)
    det: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("boxes", "scores", "labels", "gt_boxes", "gt_labels", "patients")})


@torch.inference_mode()
def collect(model: MultiCheXNet, datasets: dict[str, CXRDataset], batch_size: int = 16, seg_threshold: float = 0.5) -> Collected:
    """One ungated pass of every head over every image (head quality is measured without the gate)."""
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
            out.probs.append(torch.sigmoid(outputs["cls"]))
            out.labels.append(batch.labels)
            out.gate_probs += model.gate_probability(outputs).tolist()
            out.gate_labels += batch.positive.tolist()
            if "seg" in outputs:
                has = batch.has_mask
                predicted = (torch.sigmoid(outputs["seg"][has]) >= seg_threshold).float()
                out.dice += dice_per_image(predicted, batch.masks[has]).tolist()
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
    model.train(was_training)
    return out


def _interval(value_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: value_dict.get(k) for k in ("value", "low", "high", "n_groups")}


def summarize(out: Collected, class_names: list[str], box_classes: list[str], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics per head; with ``bootstrap > 0``, 95% CIs from resampling patients (not images)."""
    metrics: dict[str, Any] = {}
    if out.probs:
        probs, labels = torch.cat(out.probs), torch.cat(out.labels)
        cls = classification_metrics(probs, labels, class_names)
        macro = cls["macro"]["auroc"]
        interval: dict[str, Any] = {"value": macro}
        if bootstrap and macro is not None:
            interval = _interval(bootstrap_statistic(
                out.patients, lambda idx: classification_metrics(probs[idx], labels[idx], class_names)["macro"]["auroc"],
                n_resamples=bootstrap, seed=seed,
            ))
        metrics["classification"] = {"per_class": cls["per_class"], "macro": cls["macro"], "macro_auroc": interval, "n_images": len(probs)}
        gate_probs, gate_labels = torch.tensor(out.gate_probs), torch.tensor(out.gate_labels)
        def gate_metrics(idx: np.ndarray) -> dict[str, Any]:
            return classification_metrics(gate_probs[idx, None], gate_labels[idx, None], ["positive"])["per_class"]["positive"]

        gate = gate_metrics(np.arange(len(gate_probs)))
        gate_interval: dict[str, Any] = {"value": gate["auroc"]}
        if bootstrap and gate["auroc"] is not None:
            gate_interval = _interval(bootstrap_statistic(out.patients, lambda idx: gate_metrics(idx)["auroc"], n_resamples=bootstrap, seed=seed))
        metrics["gate"] = {"auroc": gate_interval, "accuracy": gate["accuracy"], "f1": gate["f1"], "n_known": gate["n_known"]}
    if out.dice:
        values = np.asarray(out.dice, dtype=float)
        dice = _interval(bootstrap_ci(values, out.dice_patients, n_resamples=bootstrap, seed=seed)) if bootstrap else {"value": float(values.mean())}
        metrics["segmentation"] = {"dice": dice, "n_images": len(values), "n_patients": len(set(out.dice_patients))}
    if out.det["gt_boxes"]:
        det = out.det

        def compute(idx: np.ndarray) -> float | None:
            pick = lambda key: [det[key][i] for i in idx]  # noqa: E731
            return detection_map(pick("boxes"), pick("scores"), pick("labels"), pick("gt_boxes"), pick("gt_labels"), box_classes)["map"]

        full = detection_map(det["boxes"], det["scores"], det["labels"], det["gt_boxes"], det["gt_labels"], box_classes)
        interval = {"value": full["map"]}
        if bootstrap and full["map"] is not None:
            interval = _interval(bootstrap_statistic(det["patients"], compute, n_resamples=min(bootstrap, 200), seed=seed))
        metrics["detection"] = {
            "per_class": full["per_class"], "map": interval, "iou_threshold": 0.5,
            "n_gt": full["n_gt"], "n_images": len(det["gt_boxes"]),
        }
    return metrics


def evaluate_datasets(model: MultiCheXNet, datasets: dict[str, CXRDataset], bootstrap: int = 1000, seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """Collect and summarise in one call."""
    out = collect(model, datasets, batch_size)
    return summarize(out, model.config.class_names, model.config.box_classes, bootstrap, seed)
