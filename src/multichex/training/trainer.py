"""The trainer: epochs of training steps, validation, ``last``/``best`` checkpoints, the epoch log and resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multichex.data.samplers import AlternatingBatches, JointBatches
from multichex.data.sources import CXRDataset
from multichex.device import describe
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.config import TASKS
from multichex.models.multichexnet import MultiCheXNet
from multichex.progress import is_terminal, progress_bar
from multichex.training import distributed
from multichex.training.checkpoint import load_weights, read_checkpoint, restore_other_optimizer, restore_training_state, save_checkpoint
from multichex.training.config import MODULES, TrainConfig
from multichex.training.engine import DataWait, WeightAverage, build_engine, compile_model
from multichex.training.semi_supervised import FewLabelObjectives, ObjectiveCounts
from multichex.training.steps import FewLabelHooks, TrainingStep
from multichex.training.steps.ranks import summed_forcing
from multichex.training.teacher_forcing import ForcingCounts
from multichex.training.validation import select_operating_points, selection_score, validate

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimiser (AdamW, Adam or SGD with momentum) over ``params``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Trains a :class:`MultiCheXNet` on per-source data sets, writing ``last``/``best`` checkpoints and a CSV log.

    Under ``torchrun`` (see ``docs/distributed.md``) every rank builds the same Trainer: each reads its
    shard of the data with ``batch_size`` images per step (a global batch of world × batch_size), gradients
    are averaged by DistributedDataParallel, BatchNorm uses the global batch's statistics, and rank 0
    alone validates and writes checkpoints, logs and tensorboard. ``self.model`` is always the plain
    network (checkpoints keep their keys).

    ``progress``: a bar per epoch on a terminal; when stderr is not a terminal, one line per epoch instead;
    without ``progress``, that line goes to the log (INFO).

    ``device`` (overrides ``config.device``): where the model, batches, losses and metrics live; the run's
    precision, loader processes, compilation, accumulation and weight average come from the config (see
    :mod:`multichex.training.engine`). Every epoch's log records the fraction of step time spent waiting
    for data (``data_wait``).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_sets: dict[str, CXRDataset],
        val_sets: dict[str, CXRDataset] | None = None,
        model: MultiCheXNet | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.distributed = distributed.init_from_env()
        self.engine = build_engine(config, device)
        seed_everything(config.seed, config.deterministic)  # the same on every rank: same initial weights, same RNG stream
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = (model or MultiCheXNet(config.model)).to(self.engine.device)  # built on the CPU: the same weights anywhere
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
        self.loss = MultiTaskLoss.for_model(self.model, config.loss_weights, config.dice_weight, config.giou_weight,
                                            config.seg_loss, config.seg_side_weights)
        self.objectives = self._few_label_objectives()
        if config.schedule == "single" and len(train_sets) != 1:
            raise ValueError(f"schedule 'single' takes one data set, got {sorted(train_sets)}")
        schedule = JointBatches if config.schedule == "joint" else AlternatingBatches
        self.batches = schedule(train_sets, config.batch_size, config.seed, self.engine.loader, distributed.rank(), distributed.world_size())
        self.steps_per_epoch = config.steps_per_epoch or self.batches.default_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.epoch = 0
        self.best_score: float | None = None
        self.history: list[dict[str, Any]] = []
        self.writer = _tensorboard_writer(self.out_dir) if config.tensorboard and distributed.is_main() else None
        hooks = FewLabelHooks(self.objectives) if self.objectives is not None else None
        self.average = WeightAverage(self.model, config.ema_decay) if config.ema_decay else None
        self.step = TrainingStep(self.model, self.loss, self.optimizer, self.scheduler, config, self.trained_tasks, hooks, self.distributed,
                                 self.engine, partial(self.average.update, self.model) if self.average else None)
        if config.compile:
            self.step.compiled = compile_model(self.model)
        if distributed.is_main():
            log.info("training on %s", describe(self.engine.device, self.engine.precision))

    @property
    def evaluated_model(self) -> MultiCheXNet:
        """What validation scores and ``best`` holds: the weight average with ``ema_decay``, else the model."""
        return self.average.module if self.average is not None else self.model  # type: ignore[return-value]

    def _few_label_objectives(self) -> FewLabelObjectives | None:
        """FixMatch / consistency / adversarial objectives, when the config switches any on."""
        config = self.config
        if config.semi_supervised is None and config.adversarial is None:
            return None
        if self.distributed:
            raise ValueError("semi_supervised / adversarial training run in one process (not under torchrun) for now")
        objectives = FewLabelObjectives(self.model, config.semi_supervised, config.adversarial, config.lr, config.seed)
        forced = config.teacher_forcing
        if forced is not None and "seg" in forced.heads and config.semi_supervised and config.semi_supervised.consistency_weight > 0:
            log.warning("teacher_forcing on seg feeds the segmentation head only images with a mask, so "
                        "semi_supervised.consistency_weight has no unlabelled image to compare with and adds nothing")
        return objectives

    @property
    def forcing(self) -> ForcingCounts:
        """What teacher forcing fed the gated heads this epoch."""
        return self.step.forcing

    @forcing.setter
    def forcing(self, counts: ForcingCounts) -> None:
        self.step.forcing = counts

    @property
    def skipped_batches(self) -> int:
        """Batches skipped for a non-finite loss."""
        return self.step.skipped_batches

    def train_step(self, batch, last_in_epoch: bool = False) -> dict[str, float] | None:
        """One optimisation step (see :class:`TrainingStep`); returns the batch's losses or ``None``."""
        return self.step(batch, self.epoch, last_in_epoch)

    def _lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at a global step: linear warm-up, then cosine decay to 1% (or constant)."""
        if self.config.lr_schedule == "constant":
            return 1.0
        warmup = max(1, self.config.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        total = max(warmup + 1, self.config.epochs * -(-self.steps_per_epoch // self.config.accumulate_steps))
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
        if self.average is not None and not self.average.restore(tensors):
            log.warning("%s has no weight average (ema.*); it restarts from the resumed weights", path)
        if self.engine.scaler is not None and "grad_scaler" in header:
            self.engine.scaler.load_state_dict(header["grad_scaler"])
        log.info("resumed %s at epoch %d", path, self.epoch)

    def _checkpoint(self, name: str, with_optimizer: bool) -> Path:
        if not distributed.is_main():  # rank 0 writes; the others hold the same weights
            return self.out_dir / f"{name}.safetensors"
        extra = {
            "train_config": self.config.to_dict(),
            "trainer": {"epoch": self.epoch, "global_step": self.scheduler.last_epoch, "best_score": self.best_score, "history": self.history},
            "engine": self.engine.record(),
        }
        others = {"disc": self.objectives.disc_optimizer} if with_optimizer and self.objectives and self.objectives.disc_optimizer else None
        path = self.out_dir / f"{name}.safetensors"
        if not with_optimizer:  # best / final: the weights that are scored (the average, with ema_decay)
            return save_checkpoint(path, self.evaluated_model, extra)
        if self.engine.scaler is not None:
            extra["grad_scaler"] = self.engine.scaler.state_dict()
        average = self.average.tensors() if self.average is not None else None
        return save_checkpoint(path, self.model, extra, self.optimizer, others, average)

    def fit(self) -> list[dict[str, Any]]:
        """Train for the configured epochs (or until ``max_minutes``), validating after each epoch.

        Under torchrun rank 0 alone validates and writes; the ranks meet after each epoch's writes and
        at the end (when ``best`` is final, so a following phase can read it)."""
        start = time.monotonic()
        budget = self.config.max_minutes * 60 if self.config.max_minutes else math.inf
        main = distributed.is_main()
        while self.epoch < self.config.epochs:
            sums, out_of_time, data_wait = self._train_epoch(start, budget, main)
            self.step.finish_epoch()  # gradients still accumulating (a time budget ended the epoch early)
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, "seconds": round(time.monotonic() - start, 1), "data_wait": round(data_wait, 4)}
            record.update({f"train_{k}": float(np.mean(v)) for k, v in sums.items()})
            record.update(self._forcing_record())
            self.forcing = ForcingCounts()
            if self.objectives is not None:
                record.update(self.objectives.counts.values)
                self.objectives.counts = ObjectiveCounts()
            if self.val_sets and main:
                _, columns = validate(self.evaluated_model, self.val_sets, self.trained_tasks, self.engine.precision)
                record.update(columns)
                score = selection_score(columns, self.config.best_metric, self.epoch)
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
            if main:
                self._report_epoch(record)
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

    def _train_epoch(self, start: float, budget: float, main: bool) -> tuple[dict[str, list[float]], bool, float]:
        """The steps of one epoch: each loss of each step, whether the time budget ran out, and the fraction of
        the epoch spent waiting for batches."""
        self._train_mode()
        sums: dict[str, list[float]] = {}
        wait = DataWait()
        iterator = wait.timed(self.batches.epoch(self.epoch, self.steps_per_epoch))
        # On a terminal a live bar; elsewhere no bar at all (the epoch's line comes from _report_epoch).
        bar = progress_bar(iterator, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                           enabled=self.progress and main, leave=False, every=None)
        out_of_time = False
        for step, _, batch in bar:
            if batch is None and not self.distributed:  # under torchrun train_step makes every rank skip it
                continue
            losses = self.train_step(batch, last_in_epoch=step == self.steps_per_epoch - 1)
            for key, value in (losses or {}).items():
                sums.setdefault(key, []).append(value)
            if losses:
                bar.set_postfix(loss=f"{losses['total']:.3f}")
            if budget < math.inf and distributed.any_rank([time.monotonic() - start > budget])[0]:
                out_of_time = True
                break
        bar.close()
        return sums, out_of_time, (wait.report(self.epoch + 1, self.engine.loader.num_workers, self.engine.device.type != "cpu")
                                 if main else wait.fraction)

    def _report_epoch(self, record: dict[str, Any]) -> None:
        """One line per epoch where no live bar shows progress: on stderr with ``progress`` (stderr is not a
        terminal), in the log without."""
        if self.progress and is_terminal():
            return
        line = epoch_line(record, self.config.epochs)
        if self.progress:
            print(line, file=sys.stderr, flush=True)
        else:
            log.info("%s", line)

    def _forcing_record(self) -> dict[str, int]:
        """Teacher-forcing counts of the epoch (under torchrun: summed over the ranks)."""
        record = self.forcing.as_record()
        return summed_forcing(record) if self.distributed else record

    def select_operating_points(self) -> dict[str, Any]:
        """Choose the gate threshold and/or per-class thresholds of the ``best`` weights on the validation
        images and store them in that checkpoint's model config (and this model's), so inference,
        evaluation and teacher forcing use them."""
        return select_operating_points(self.model, self.out_dir / "best.safetensors", self.val_sets, self.config, self.engine.precision)

    def _write_log(self) -> None:
        if not distributed.is_main():
            return
        keys = sorted({k for record in self.history for k in record}, key=lambda k: (k != "epoch", k))
        with (self.out_dir / "log.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10: loss 0.812, val score 0.604 (41 s)`` from an epoch's log record."""
    details = []
    if "train_total" in record:
        details.append(f"loss {record['train_total']:.3f}")
    if record.get("val_score") is not None:
        details.append(f"val score {record['val_score']:.3f}")
    return f"epoch {record['epoch']}/{epochs}: {', '.join(details) or 'no step taken'} ({record['seconds']:.0f} s)"


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("tensorboard: true needs the `tensorboard` package (pip install tensorboard)") from error
    return SummaryWriter(str(out_dir / "tensorboard"))
