"""Scoring on the validation images: the one number that picks the best epoch, and the operating points
(gate and per-class thresholds) chosen for the best weights."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multichex.data.sources import CXRDataset
from multichex.device import module_device
from multichex.evaluation.evaluate import collect, evaluate_datasets
from multichex.evaluation.thresholds import choose_threshold, per_class_thresholds
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import load_weights, read_checkpoint, save_checkpoint
from multichex.training.config import BEST_METRICS, TrainConfig

log = logging.getLogger(__name__)

PRIMARY_METRICS = {
    "seg": ("segmentation", "dice"),
    "cls": ("classification", "macro_auroc"),
    "det": ("detection", "map"),
    "gate": ("gate", "auroc"),
}


def score_of(metrics: dict[str, Any], tasks: set[str] | None = None) -> float | None:
    """One number to pick the best epoch: mean of the available primary metrics (Dice, macro AUROC, mAP)
    of the trained ``tasks`` (default: segmentation, classification and detection)."""
    tasks = tasks if tasks is not None else {"seg", "cls", "det"}
    values = [metrics.get(group, {}).get(key, {}).get("value") for task, (group, key) in PRIMARY_METRICS.items() if task in tasks]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The primary validation metrics as flat ``val_*`` columns of the epoch log."""
    return {
        "val_dice": metrics.get("segmentation", {}).get("dice", {}).get("value"),
        "val_macro_auroc": metrics.get("classification", {}).get("macro_auroc", {}).get("value"),
        "val_map50": metrics.get("detection", {}).get("map", {}).get("value"),
        "val_gate_auroc": metrics.get("gate", {}).get("auroc", {}).get("value"),
    }


def selection_score(columns: dict[str, Any], best_metric: str, epoch: int) -> float | None:
    """The number that decides whether this epoch becomes ``best`` (higher wins): the ``best_metric``
    column of the epoch's validation ``columns``, or the epoch itself for ``"last"``; ``None`` (never best)
    when that metric is undefined on the validation images."""
    if best_metric == "last":
        return float(epoch)
    value = columns.get(BEST_METRICS[best_metric])
    return None if value is None or math.isnan(value) else float(value)


def validate(model: MultiCheXNet, val_sets: dict[str, CXRDataset], tasks: set[str], precision: str = "fp32") -> tuple[float | None, dict[str, Any]]:
    """The epoch's score and its log columns (``val_score`` and the flat metrics), without bootstrap, on the
    model's device in ``precision``."""
    metrics = evaluate_datasets(model, val_sets, bootstrap=0, surface_metrics=False, precision=precision)
    score = score_of(metrics, tasks)
    return score, {"val_score": score, **flat_metrics(metrics)}


def select_operating_points(model: MultiCheXNet, best_path: Path, val_sets: dict[str, CXRDataset], config: TrainConfig,
                            precision: str = "fp32") -> dict[str, Any]:
    """Choose the gate threshold and/or per-class thresholds (as ``config`` asks) of the weights in
    ``best_path`` on the validation images and store them in that checkpoint's model config and in
    ``model``'s, so inference, evaluation and teacher forcing use them. Returns what was chosen."""
    header, tensors = read_checkpoint(best_path)
    best = MultiCheXNet(model.config)
    load_weights(best, tensors, best_path)
    collected = collect(best.to(module_device(model)), val_sets, surface_metrics=False, precision=precision)
    chosen_config, chosen = model.config, {}
    if config.select_gate_threshold:
        try:
            choice = choose_threshold(np.asarray(collected.gate_probs), np.asarray(collected.gate_labels),
                                      config.select_gate_threshold, config.min_sensitivity)
        except ValueError as error:  # e.g. a phase whose validation images carry no gate labels
            log.info("gate threshold kept at %.3f: %s", chosen_config.gate.threshold, error)
        else:
            chosen_config = replace(chosen_config, gate=replace(chosen_config.gate, threshold=choice["threshold"]))
            chosen["gate_threshold"] = choice
            log.info("gate threshold %.3f (%s on %d validation images: sensitivity %.2f, specificity %.2f)", choice["threshold"],
                     choice["criterion"], choice["n_positive"] + choice["n_negative"], choice["sensitivity"], choice["specificity"])
    if config.select_class_thresholds and collected.probs:
        thresholds = per_class_thresholds(torch.cat(collected.probs).numpy(), torch.cat(collected.labels).numpy(),
                                          config.select_class_thresholds)
        chosen_config = replace(chosen_config, class_thresholds=thresholds)
        chosen["class_thresholds"] = {"criterion": config.select_class_thresholds, "values": dict(zip(chosen_config.class_names, thresholds))}
    if chosen:
        model.config = best.config = chosen_config
        extra = {k: v for k, v in header.items() if k not in {"format", "model"}}
        save_checkpoint(best_path, best, {**extra, **chosen})
    return chosen
