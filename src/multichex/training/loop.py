"""The training loop: masked multi-task steps, alternating or joint schedules, validation, checkpoints, resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from multichex.data.sources import CXRDataset
from multichex.data.samplers import AlternatingBatches, JointBatches
from multichex.evaluation.evaluate import collect, evaluate_datasets
from multichex.evaluation.thresholds import choose_threshold, per_class_thresholds
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import read_checkpoint, restore_training_state, save_checkpoint, load_weights
from multichex.models.config import TASKS
from multichex.training.config import MODULES, TrainConfig
from multichex.training.teacher_forcing import ForcingCounts, select_for_head

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


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


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Trains a :class:`MultiCheXNet` on per-source data sets, writing ``last``/``best`` checkpoints and a CSV log."""

    def __init__(
        self,
        config: TrainConfig,
        train_sets: dict[str, CXRDataset],
        val_sets: dict[str, CXRDataset] | None = None,
        model: MultiCheXNet | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed, config.deterministic)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = model or MultiCheXNet(config.model)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_sets = train_sets
        self.val_sets = val_sets or {}
        self.progress = progress
        self._freeze()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"nothing to train: trainable={config.trainable}")
        self.trained_tasks = {t for t in TASKS if any(p.requires_grad for p in getattr(self.model, t).parameters())}
        self.optimizer = make_optimizer(config, params)
        self.loss = MultiTaskLoss(self.model, config.loss_weights, config.dice_weight, config.giou_weight)
        if config.schedule == "single" and len(train_sets) != 1:
            raise ValueError(f"schedule 'single' takes one data set, got {sorted(train_sets)}")
        schedule = JointBatches if config.schedule == "joint" else AlternatingBatches
        self.batches = schedule(train_sets, config.batch_size, config.seed, config.num_workers)
        self.steps_per_epoch = config.steps_per_epoch or self.batches.default_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.epoch = 0
        self.best_score: float | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped_batches = 0
        self.writer = _tensorboard_writer(self.out_dir) if config.tensorboard else None
        self.forcing = ForcingCounts()

    def _lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at a global step: linear warm-up, then cosine decay to 1% (or constant)."""
        if self.config.lr_schedule == "constant":
            return 1.0
        warmup = max(1, self.config.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        total = max(warmup + 1, self.config.epochs * self.steps_per_epoch)
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    def _freeze(self) -> None:
        """Only the listed modules (``encoder``) or sub-modules (``cls.dec``) get gradients."""
        self.model.requires_grad_(False)
        for name in self.config.trainable:
            try:
                self.model.get_submodule(name).requires_grad_(True)
            except AttributeError as error:
                raise ValueError(f"trainable: the model has no module {name!r}") from error

    def _train_mode(self) -> None:
        """Modules that train are in train mode; wholly frozen ones stay in eval mode (BatchNorm statistics
        and dropout untouched), down to the sub-modules of a partly trained head."""
        self.model.train()
        for name in MODULES:
            module = getattr(self.model, name)
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
                continue
            for child in module.children():
                params = list(child.parameters())
                if params and not any(p.requires_grad for p in params):
                    child.eval()

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a ``last`` checkpoint: weights, optimizer, RNG, epoch, best score, history."""
        path = Path(path) if path else self.out_dir / "last.safetensors"
        header, tensors = read_checkpoint(path)
        load_weights(self.model, tensors, path)
        restore_training_state(self.optimizer, header, tensors)
        state = header.get("trainer", {})
        self.epoch = int(state.get("epoch", 0))
        self.scheduler.last_epoch = int(state.get("global_step", self.epoch * self.steps_per_epoch))
        self.best_score = state.get("best_score")
        self.history = state.get("history", [])
        log.info("resumed %s at epoch %d", path, self.epoch)

    def _checkpoint(self, name: str, with_optimizer: bool) -> Path:
        extra = {
            "train_config": self.config.to_dict(),
            "trainer": {"epoch": self.epoch, "global_step": self.scheduler.last_epoch, "best_score": self.best_score, "history": self.history},
        }
        return save_checkpoint(self.out_dir / f"{name}.safetensors", self.model, extra, self.optimizer if with_optimizer else None)

    def train_step(self, batch) -> dict[str, float] | None:
        tasks = self.loss.tasks_for(batch, self.trained_tasks)
        if not tasks:
            return None
        images = batch.images
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        forced = self.config.teacher_forcing
        if forced is None or not set(tasks) & set(forced.heads):
            outputs = self.model(images, tasks)
            losses = self.loss(outputs, batch)
        else:
            outputs, head_batches = self._forced_forward(images, batch, tasks)
            losses = self.loss(outputs, batch, head_batches)
        if "total" not in losses:
            return None
        total = losses["total"]
        if not torch.isfinite(total):
            values = {k: float(v.detach()) for k, v in losses.items()}
            paths = [m["path"] for m in batch.meta][:3]
            if self.config.on_nonfinite_loss == "stop":
                raise FloatingPointError(f"non-finite loss {values} on batch {paths} (epoch {self.epoch + 1})")
            self.skipped_batches += 1
            log.warning("non-finite loss %s on batch %s; batch skipped", values, paths)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def _forced_forward(self, images: torch.Tensor, batch, tasks: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One encoder pass; the gated heads run only on the images teacher forcing selects."""
        forced = self.config.teacher_forcing
        size = images.shape[-2:]
        features = self.model.encode(images)
        outputs = self.model.run_heads(features, [t for t in tasks if t not in forced.heads], size)
        with torch.no_grad():
            detached = [f.detach() for f in features]
            gate_passed = self.model.gate_probability(self.model.run_heads(detached, self.model.gate_tasks(), size)) >= self.model.config.gate.threshold
        rng = np.random.default_rng([self.config.seed, self.scheduler.last_epoch])
        head_batches = {}
        for head in (t for t in tasks if t in forced.heads):
            chosen = select_for_head(batch, head, gate_passed, forced, rng, self.forcing)
            if chosen.any():
                rows = torch.nonzero(chosen).flatten()
                outputs.update(self.model.run_heads([f[rows] for f in features], [head], size))
                head_batches[head] = batch.select(chosen)
        return outputs, head_batches

    def fit(self) -> list[dict[str, Any]]:
        """Train for the configured epochs (or until ``max_minutes``), validating after each epoch."""
        start = time.monotonic()
        budget = self.config.max_minutes * 60 if self.config.max_minutes else math.inf
        while self.epoch < self.config.epochs:
            self._train_mode()
            sums: dict[str, list[float]] = {}
            iterator = self.batches.epoch(self.epoch, self.steps_per_epoch)
            bar = tqdm(iterator, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", disable=not self.progress, leave=False)
            out_of_time = False
            for _, _, batch in bar:
                if batch is None:
                    continue
                losses = self.train_step(batch)
                for key, value in (losses or {}).items():
                    sums.setdefault(key, []).append(value)
                if losses:
                    bar.set_postfix(loss=f"{losses['total']:.3f}")
                if time.monotonic() - start > budget:
                    out_of_time = True
                    break
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, "seconds": round(time.monotonic() - start, 1)}
            record.update({f"train_{k}": float(np.mean(v)) for k, v in sums.items()})
            record.update(self.forcing.as_record())
            self.forcing = ForcingCounts()
            if self.val_sets:
                metrics = evaluate_datasets(self.model, self.val_sets, bootstrap=0)
                score = score_of(metrics, self.trained_tasks)
                record["val_score"] = score
                record.update(_flat_metrics(metrics))
                if score is not None and (self.best_score is None or score > self.best_score):
                    self.best_score = score
                    self._checkpoint("best", with_optimizer=False)
            self.history.append(record)
            self._write_log()
            if self.writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        self.writer.add_scalar(key, value, self.epoch)
                self.writer.flush()
            self._checkpoint("last", with_optimizer=True)
            if out_of_time:
                log.info("time budget of %.1f min reached after epoch %d", self.config.max_minutes, self.epoch)
                break
        if not (self.out_dir / "best.safetensors").exists():
            self._checkpoint("best", with_optimizer=False)
        if self.val_sets and (self.config.select_gate_threshold or self.config.select_class_thresholds):
            self.select_operating_points()
        return self.history

    def select_operating_points(self) -> dict[str, Any]:
        """Choose the gate threshold and/or per-class thresholds of the ``best`` weights on the validation
        images and store them in that checkpoint's model config (and this model's), so inference,
        evaluation and teacher forcing use them."""
        best_path = self.out_dir / "best.safetensors"
        header, tensors = read_checkpoint(best_path)
        best = MultiCheXNet(self.model.config)
        load_weights(best, tensors, best_path)
        collected = collect(best, self.val_sets)
        config, chosen = self.model.config, {}
        if self.config.select_gate_threshold:
            try:
                choice = choose_threshold(np.asarray(collected.gate_probs), np.asarray(collected.gate_labels),
                                          self.config.select_gate_threshold, self.config.min_sensitivity)
            except ValueError as error:  # e.g. a phase whose validation images carry no gate labels
                log.info("gate threshold kept at %.3f: %s", config.gate.threshold, error)
            else:
                config = replace(config, gate=replace(config.gate, threshold=choice["threshold"]))
                chosen["gate_threshold"] = choice
                log.info("gate threshold %.3f (%s on %d validation images: sensitivity %.2f, specificity %.2f)", choice["threshold"],
                         choice["criterion"], choice["n_positive"] + choice["n_negative"], choice["sensitivity"], choice["specificity"])
        if self.config.select_class_thresholds and collected.probs:
            thresholds = per_class_thresholds(torch.cat(collected.probs).numpy(), torch.cat(collected.labels).numpy(),
                                              self.config.select_class_thresholds)
            config = replace(config, class_thresholds=thresholds)
            chosen["class_thresholds"] = {"criterion": self.config.select_class_thresholds, "values": dict(zip(config.class_names, thresholds))}
        if chosen:
            self.model.config = best.config = config
            extra = {k: v for k, v in header.items() if k not in {"format", "model"}}
            save_checkpoint(best_path, best, {**extra, **chosen})
        return chosen

    def _write_log(self) -> None:
        keys = sorted({k for record in self.history for k in record}, key=lambda k: (k != "epoch", k))
        with (self.out_dir / "log.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("tensorboard: true needs the `tensorboard` package (pip install tensorboard)") from error
    return SummaryWriter(str(out_dir / "tensorboard"))


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        "val_dice": metrics.get("segmentation", {}).get("dice", {}).get("value"),
        "val_macro_auroc": metrics.get("classification", {}).get("macro_auroc", {}).get("value"),
        "val_map50": metrics.get("detection", {}).get("map", {}).get("value"),
        "val_gate_auroc": metrics.get("gate", {}).get("auroc", {}).get("value"),
    }
