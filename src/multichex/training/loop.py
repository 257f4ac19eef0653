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
from multichex.models.decision import at_or_above
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.multichexnet import MultiCheXNet
from multichex.training.checkpoint import load_weights, read_checkpoint, restore_other_optimizer, restore_training_state, save_checkpoint
from multichex.models.config import TASKS
from multichex.training import distributed
from multichex.training.config import MODULES, TrainConfig
from multichex.training.semi_supervised import FewLabelObjectives, ObjectiveCounts
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


LOSS_KEYS = ("cls", "gate", "seg", "det", "total")


class _StepForward(torch.nn.Module):
    """What DistributedDataParallel wraps: its forward is a whole training forward (standard or teacher
    forced, losses included), so DDP sees every pass that needs gradient synchronisation and finds the
    parameters a step leaves unused from the losses it returns. ``model`` is the plain network."""

    def __init__(self, model: MultiCheXNet, forward) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self._forward(*args)


class Trainer:
    """Trains a :class:`MultiCheXNet` on per-source data sets, writing ``last``/``best`` checkpoints and a CSV log.

    Under ``torchrun`` (see ``docs/distributed.md``) every rank builds the same Trainer: each reads its
    shard of the data with ``batch_size`` images per step (a global batch of world × batch_size), gradients
    are averaged by DistributedDataParallel, BatchNorm uses the global batch's statistics, and rank 0
    alone validates and writes checkpoints, logs and tensorboard. ``self.model`` is always the plain
    network (checkpoints keep their keys).
    """

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
        self.distributed = distributed.init_from_env()
        seed_everything(config.seed, config.deterministic)  # the same on every rank: same initial weights, same RNG stream
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = model or MultiCheXNet(config.model)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.distributed:
            distributed.convert_sync_batchnorm(self.model)  # same parameter and buffer names: checkpoints unchanged
        self.train_sets = train_sets
        self.val_sets = val_sets or {}
        self.progress = progress
        self._freeze()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"nothing to train: trainable={config.trainable}")
        self.trained_tasks = {t for t in TASKS if any(p.requires_grad for p in getattr(self.model, t).parameters())}
        self.optimizer = make_optimizer(config, params)
        self.loss = MultiTaskLoss(self.model, config.loss_weights, config.dice_weight, config.giou_weight, config.seg_loss, config.seg_side_weights)
        self.objectives = None
        if config.semi_supervised is not None or config.adversarial is not None:
            if self.distributed:
                raise ValueError("semi_supervised / adversarial training run in one process (not under torchrun) for now")
            self.objectives = FewLabelObjectives(self.model, config.semi_supervised, config.adversarial, config.lr, config.seed)
            forced = config.teacher_forcing
            if forced is not None and "seg" in forced.heads and config.semi_supervised and config.semi_supervised.consistency_weight > 0:
                log.warning("teacher_forcing on seg feeds the segmentation head only images with a mask, so "
                            "semi_supervised.consistency_weight has no unlabelled image to compare with and adds nothing")
        if config.schedule == "single" and len(train_sets) != 1:
            raise ValueError(f"schedule 'single' takes one data set, got {sorted(train_sets)}")
        schedule = JointBatches if config.schedule == "joint" else AlternatingBatches
        self.batches = schedule(train_sets, config.batch_size, config.seed, config.num_workers, distributed.rank(), distributed.world_size())
        self.steps_per_epoch = config.steps_per_epoch or self.batches.default_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.epoch = 0
        self.best_score: float | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped_batches = 0
        self.writer = _tensorboard_writer(self.out_dir) if config.tensorboard and distributed.is_main() else None
        self.forcing = ForcingCounts()
        self._forward = self._forward_losses
        if self.distributed:
            # find_unused_parameters: a step trains only the heads its batch has labels for (the alternating
            # schedule, teacher forcing), so which parameters get gradients changes from step to step.
            self._forward = torch.nn.parallel.DistributedDataParallel(_StepForward(self.model, self._forward_losses), find_unused_parameters=True)

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
        """Continue from a ``last`` checkpoint: weights, optimizer, RNG, epoch, best score, history
        (under torchrun every rank loads the same file; rank 0's RNG state is every rank's, see __init__)."""
        path = Path(path) if path else self.out_dir / "last.safetensors"
        header, tensors = read_checkpoint(path)
        load_weights(self.model, tensors, path)
        restore_training_state(self.optimizer, header, tensors)
        if self.objectives is not None and self.objectives.disc_optimizer is not None:
            if not restore_other_optimizer(self.objectives.disc_optimizer, "disc", header, tensors):
                log.warning("%s has no discriminator optimiser state; its moments restart", path)
        state = header.get("trainer", {})
        self.epoch = int(state.get("epoch", 0))
        self.scheduler.last_epoch = int(state.get("global_step", self.epoch * self.steps_per_epoch))
        self.best_score = state.get("best_score")
        self.history = state.get("history", [])
        log.info("resumed %s at epoch %d", path, self.epoch)

    def _checkpoint(self, name: str, with_optimizer: bool) -> Path:
        if not distributed.is_main():  # rank 0 writes; the others hold the same weights
            return self.out_dir / f"{name}.safetensors"
        extra = {
            "train_config": self.config.to_dict(),
            "trainer": {"epoch": self.epoch, "global_step": self.scheduler.last_epoch, "best_score": self.best_score, "history": self.history},
        }
        others = {"disc": self.objectives.disc_optimizer} if with_optimizer and self.objectives and self.objectives.disc_optimizer else None
        return save_checkpoint(self.out_dir / f"{name}.safetensors", self.model, extra, self.optimizer if with_optimizer else None, others)

    def train_step(self, batch) -> dict[str, float] | None:
        """One optimisation step; returns the batch's losses (under torchrun: averaged over the ranks).

        Under torchrun every rank must take part in each forward and backward (they hold collectives:
        SyncBatchNorm, DDP's gradient all-reduce), so the ranks first agree on the step's tasks (those any
        rank's batch has labels for) and skip a step together (no labels anywhere, an unreadable batch on
        some rank, a non-finite loss on some rank).
        """
        tasks = self._step_tasks(batch)
        if not tasks and not (self.objectives is not None and self.objectives.wants(batch)):
            return None
        images = batch.images
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = self._forward(images, batch, tasks)
        placeholder = self._placeholder
        if self.distributed:
            nonfinite, report = self._reduce_losses(losses, placeholder)
            if "total" not in report:  # no rank has a loss term: nobody runs backward
                return None
        else:
            if "total" not in losses:
                return None
            nonfinite, report = not torch.isfinite(losses["total"]), None
        total = losses["total"]
        if nonfinite:
            values = {k: float(v.detach()) for k, v in losses.items()} if not placeholder else {}
            paths = [m["path"] for m in batch.meta][:3]
            where = ""
            if self.distributed:
                local = not placeholder and not bool(torch.isfinite(total))
                where = f" (rank {distributed.rank()}{'' if local else ': finite here, non-finite on another rank'}; every rank skips it)"
            if self.config.on_nonfinite_loss == "stop":
                raise FloatingPointError(f"non-finite loss {values} on batch {paths}{where} (epoch {self.epoch + 1})")
            self.skipped_batches += 1
            log.warning("non-finite loss %s on batch %s%s; batch skipped", values, paths, where)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.objectives is not None:
            self.objectives.discriminator_step(self.model, images, batch, self._outputs, self._seg_rows)
        return report if report is not None else {k: float(v.detach()) for k, v in losses.items()}

    def _step_tasks(self, batch) -> list[str]:
        """The heads this step trains: those the batch has labels for (under torchrun: any rank's batch,
        and none when some rank's batch is ``None``, i.e. had no readable image)."""
        if not self.distributed:
            return self.loss.tasks_for(batch, self.trained_tasks)
        local = self.loss.tasks_for(batch, self.trained_tasks) if batch is not None else []
        order = ("cls", "gate", "seg", "det")
        flags = distributed.any_rank([batch is None] + [t in local for t in order])
        if flags[0]:
            return []
        return [t for t, present in zip(order, flags[1:]) if present]

    def _forward_losses(self, images: torch.Tensor, batch, tasks: list[str]) -> dict[str, torch.Tensor]:
        """The forward pass of a step, losses included (under torchrun DDP calls this as its forward)."""
        forced = self.config.teacher_forcing
        head_rows: dict[str, torch.Tensor] = {}
        if forced is None or not set(tasks) & set(forced.heads):
            outputs = self.model(images, tasks)
            losses = self.loss(outputs, batch)
        else:
            outputs, head_batches, head_rows = self._forced_forward(images, batch, tasks)
            losses = self.loss(outputs, batch, head_batches)
        if self.objectives is not None:
            # A teacher-forced segmentation head ran on some rows only: its few-label terms use those rows.
            seg_rows = head_rows.get("seg")
            extra = self.objectives.terms(self.model, images, batch, outputs, self.trained_tasks, self.scheduler.last_epoch, seg_rows)
            if extra:
                losses.update(extra)
                losses["total"] = losses.get("total", 0.0) + sum(extra.values())
            self._outputs, self._seg_rows = outputs, seg_rows
        self._placeholder = False
        if self.distributed:
            # Every rank ran the same heads; an output this rank has no labels for still joins the loss, times
            # zero, so all ranks run the same backward graph (SyncBatchNorm's backward all-reduces must pair up)
            # and its parameters get zero gradient here (DDP averages in the other ranks' real gradients).
            unused = [out for key, out in outputs.items() if key not in losses and out.requires_grad]
            if unused:
                zero = sum(0.0 * out.sum() for out in unused)
                self._placeholder = "total" not in losses
                losses["total"] = zero if self._placeholder else losses["total"] + zero
        return losses

    _placeholder = False  # the last forward's "total" is only the zero term above (this rank had no labels)
    _seg_rows: torch.Tensor | None = None  # the rows the last forward's segmentation output covers (None: all)

    def _reduce_losses(self, losses: dict[str, torch.Tensor], placeholder: bool) -> tuple[bool, dict[str, float]]:
        """Whether any rank's loss is non-finite, and each loss averaged over the ranks that have it."""
        real = {} if placeholder else losses
        stats = torch.zeros(2 * len(LOSS_KEYS) + 1, dtype=torch.float64)
        for i, key in enumerate(LOSS_KEYS):
            if key in real:
                stats[2 * i], stats[2 * i + 1] = float(real[key].detach()), 1.0
        stats[-1] = float("total" in real and not bool(torch.isfinite(real["total"])))
        stats = distributed.all_reduce(stats)
        report = {key: float(stats[2 * i] / stats[2 * i + 1]) for i, key in enumerate(LOSS_KEYS) if stats[2 * i + 1] > 0}
        return bool(stats[-1] > 0), report

    def _forced_forward(self, images: torch.Tensor, batch, tasks: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
        """One encoder pass; the gated heads run only on the images teacher forcing selects (under torchrun
        a head runs on every rank, perhaps on no image, when it runs on any). Returns the outputs, each
        forced head's sub-batch and the rows (B bool) it ran on."""
        forced = self.config.teacher_forcing
        size = images.shape[-2:]
        features = self.model.encode(images)
        guide = self.model.guide(images) if "seg" in tasks else None
        outputs = self.model.run_heads(features, [t for t in tasks if t not in forced.heads], size, guide)
        gate_passed = self._gate_decision(features, size)
        rng = np.random.default_rng([self.config.seed, self.scheduler.last_epoch])
        chosen = {head: select_for_head(batch, head, gate_passed, forced, rng, self.forcing) for head in tasks if head in forced.heads}
        runs = distributed.any_rank([bool(c.any()) for c in chosen.values()])
        head_batches, head_rows = {}, {}
        for (head, rows_chosen), run in zip(chosen.items(), runs):
            if run:
                rows = torch.nonzero(rows_chosen).flatten()
                outputs.update(self.model.run_heads([f[rows] for f in features], [head], size, guide[rows] if guide is not None else None))
                head_batches[head] = batch.select(rows_chosen)
                head_rows[head] = rows_chosen
        return outputs, head_batches, head_rows

    def _gate_decision(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """B bool: what the positive-case gate passes, decided as at inference: the heads it reads (the gate
        module, or the classifier with ``gate.source: classifier``) run in eval mode (no dropout; BatchNorm
        uses its running statistics and leaves them unchanged), without gradient, and get their modes back."""
        tasks = self.model.gate_tasks()
        modes = [(module, module.training) for task in tasks for module in getattr(self.model, task).modules()]
        try:
            for task in tasks:
                getattr(self.model, task).eval()
            with torch.no_grad():
                outputs = self.model.run_heads([f.detach() for f in features], tasks, size)
                return at_or_above(self.model.gate_probability(outputs), self.model.config.gate.threshold)
        finally:
            for module, mode in modes:
                module.training = mode

    def fit(self) -> list[dict[str, Any]]:
        """Train for the configured epochs (or until ``max_minutes``), validating after each epoch.

        Under torchrun rank 0 alone validates and writes; the ranks meet after each epoch's writes and
        at the end (when ``best`` is final, so a following phase can read it)."""
        start = time.monotonic()
        budget = self.config.max_minutes * 60 if self.config.max_minutes else math.inf
        main = distributed.is_main()
        while self.epoch < self.config.epochs:
            self._train_mode()
            sums: dict[str, list[float]] = {}
            iterator = self.batches.epoch(self.epoch, self.steps_per_epoch)
            bar = tqdm(iterator, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                       disable=not (self.progress and main), leave=False)
            out_of_time = False
            for _, _, batch in bar:
                if batch is None and not self.distributed:  # under torchrun train_step makes every rank skip it
                    continue
                losses = self.train_step(batch)
                for key, value in (losses or {}).items():
                    sums.setdefault(key, []).append(value)
                if losses:
                    bar.set_postfix(loss=f"{losses['total']:.3f}")
                if budget < math.inf and distributed.any_rank([time.monotonic() - start > budget])[0]:
                    out_of_time = True
                    break
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, "seconds": round(time.monotonic() - start, 1)}
            record.update({f"train_{k}": float(np.mean(v)) for k, v in sums.items()})
            record.update(self._forcing_record())
            self.forcing = ForcingCounts()
            if self.objectives is not None:
                record.update(self.objectives.counts.values)
                self.objectives.counts = ObjectiveCounts()
            if self.val_sets and main:
                metrics = evaluate_datasets(self.model, self.val_sets, bootstrap=0, surface_metrics=False)
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
            # Rank 0's RNG state (the one its checkpoint holds, and that a resume gives every rank) becomes
            # every rank's, since its validation drew from it; this also waits for the writes above.
            distributed.share_rng_state()
            if out_of_time:
                log.info("time budget of %.1f min reached after epoch %d", self.config.max_minutes, self.epoch)
                break
        if main:
            if not (self.out_dir / "best.safetensors").exists():
                self._checkpoint("best", with_optimizer=False)
            if self.val_sets and (self.config.select_gate_threshold or self.config.select_class_thresholds):
                self.select_operating_points()
        distributed.barrier()
        return self.history

    def _forcing_record(self) -> dict[str, int]:
        """Teacher-forcing counts of the epoch (under torchrun: summed over the ranks)."""
        record = self.forcing.as_record()
        if not self.distributed:
            return record
        keys = [f"tf_{head}_{name}" for head in ("seg", "det") for name in ("forced", "gated", "gated_negative")]
        totals = distributed.all_reduce(torch.tensor([record.get(k, 0) for k in keys] + [k in record for k in keys], dtype=torch.float64))
        return {key: int(totals[i]) for i, key in enumerate(keys) if totals[len(keys) + i] > 0}

    def select_operating_points(self) -> dict[str, Any]:
        """Choose the gate threshold and/or per-class thresholds of the ``best`` weights on the validation
        images and store them in that checkpoint's model config (and this model's), so inference,
        evaluation and teacher forcing use them."""
        best_path = self.out_dir / "best.safetensors"
        header, tensors = read_checkpoint(best_path)
        best = MultiCheXNet(self.model.config)
        load_weights(best, tensors, best_path)
        collected = collect(best, self.val_sets, surface_metrics=False)
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
        if not distributed.is_main():
            return
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
