"""One training run end to end: train on the train part, keep the best validation epoch, evaluate it on
the held-out test part, write ``metrics.json``.

:func:`train_and_evaluate` is the run shared by ``multichex train`` (:func:`run_training`), each phase of
a staged protocol (:class:`~multichex.training.protocol.ProtocolRunner`) and each point of a few-shot
transfer curve (:func:`~multichex.training.transfer.run_transfer`); they differ only in the arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from multichex.data.sources import CXRDataset
from multichex.evaluation.bootstrap import DEFAULT_BOOTSTRAP
from multichex.evaluation.evaluate import evaluate_datasets
from multichex.fileio import atomic_write_text
from multichex.models.multichexnet import MultiCheXNet
from multichex.training import distributed
from multichex.training.checkpoint import load_model
from multichex.training.config import TrainConfig
from multichex.training.data import build_datasets
from multichex.training.trainer import Trainer

Parts = dict[str, dict[str, CXRDataset]]  # part ("train", "val", "test") → source key → data set
Summary = Callable[[Trainer, "MultiCheXNet | None"], dict[str, Any]]

__all__ = ["Parts", "Summary", "run_training", "train_and_evaluate"]


def train_and_evaluate(
    config: TrainConfig,
    parts: Parts,
    *,
    model: MultiCheXNet | None = None,
    evaluate_on: Collection[str] | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    per_source: bool = False,
    resume: bool = False,
    progress: bool = True,
    summary: Summary | None = None,
    metrics_file: str | None = "metrics.json",
) -> tuple[Path, dict[str, Any]]:
    """Train ``config`` on ``parts["train"]`` (validating on ``parts["val"]``), then score the best
    checkpoint on the test sets; returns the best checkpoint's path and the metrics.

    Args:
        model: the initial weights (default: a fresh network of ``config.model``).
        evaluate_on: the test sources to score (default: every one in ``parts["test"]``); with none the
            metrics hold only what ``summary`` adds.
        bootstrap: patient-bootstrap resamples for the 95% CIs (seeded with ``config.seed``).
        per_source: also score each test source alone (``"per_source"``).
        resume: continue from ``OUT/last.safetensors``.
        summary: extra metrics keys from the trainer and the evaluated model (``None`` when nothing was
            evaluated), e.g. the split sizes or the epochs trained.
        metrics_file: name of the JSON file in ``config.out_dir`` the metrics go to, when there are any
            (``None``: not written).

    Under torchrun every rank trains; rank 0 alone evaluates and writes, the other ranks return ``{}``.
    """
    trainer = Trainer(config, parts.get("train", {}), parts.get("val"), model=model, progress=progress)
    if resume:
        trainer.resume()
    trainer.fit()  # ends with every rank past rank 0's last write of the checkpoints
    out_dir = Path(config.out_dir)
    best = out_dir / "best.safetensors"
    if not distributed.is_main():
        return best, {}
    test = {key: data for key, data in (parts.get("test") or {}).items() if evaluate_on is None or key in evaluate_on}
    metrics: dict[str, Any] = {}
    evaluated = None
    if test:
        evaluated, _ = load_model(best, map_location=trainer.engine.device)
        metrics = evaluate_datasets(evaluated, test, bootstrap=bootstrap, seed=config.seed, per_source=per_source,
                                    precision=trainer.engine.precision)
    if summary is not None:
        metrics.update(summary(trainer, evaluated))
    if metrics_file and metrics:
        atomic_write_text(out_dir / metrics_file, json.dumps(metrics, indent=2))
    return best, metrics


def run_training(config: TrainConfig, resume: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Split, train, then evaluate the best checkpoint on the held-out test patients.

    The run's split is written to ``OUT/split.json`` and recorded (``split_file``, an absolute path) in the
    config of every checkpoint, so ``evaluate --part`` scores exactly these parts. ``metrics.json`` adds the
    part sizes (``split``) and ``epochs_trained``. Under torchrun every rank trains; rank 0 alone writes
    split.json and metrics.json and evaluates (the other ranks return empty metrics)."""
    distributed.init_from_env()
    out_dir = Path(config.out_dir)
    parts = build_datasets(config, out_dir if distributed.is_main() else None)
    config = replace(config, split_file=str((out_dir / "split.json").resolve()))  # what this run used, for `evaluate --part`

    def sizes(trainer: Trainer, _model: MultiCheXNet | None) -> dict[str, Any]:
        split = {part: {name: len(dataset) for name, dataset in sources.items()} for part, sources in parts.items()}
        return {"split": split, "epochs_trained": trainer.epoch}

    return train_and_evaluate(config, parts, resume=resume, progress=progress, summary=sizes)
