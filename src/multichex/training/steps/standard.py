"""One optimisation step of the masked multi-task loss: the heads the batch has labels for run (all at
once, or teacher forced), the few-label terms join, a non-finite loss skips the batch, else backward and
an optimiser and learning-rate step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from multichex.data.record import CXRBatch
from multichex.data.samplers import LoaderOptions
from multichex.losses.multitask import MultiTaskLoss
from multichex.models.multichexnet import MultiCheXNet
from multichex.training import distributed
from multichex.training.config import TrainConfig
from multichex.training.engine import Engine, is_compile_error, uncompile
from multichex.training.steps.few_labels import FewLabelHooks
from multichex.training.steps.forced import forced_forward
from multichex.training.steps.ranks import StepForward, agreed_tasks, join_unused_outputs, reduce_losses
from multichex.training.teacher_forcing import ForcingCounts

log = logging.getLogger(__name__)


class TrainingStep:
    """Takes one step on a batch: ``step(batch, epoch)`` returns the batch's losses, or ``None`` when the
    batch trains nothing or is skipped (``skipped_batches`` counts non-finite losses).

    ``forcing`` counts what teacher forcing fed the gated heads (reset by the caller each epoch). Under
    torchrun the forward runs inside DistributedDataParallel and every rank takes the same decisions, see
    :mod:`multichex.training.steps.ranks`.
    """

    def __init__(
        self, model: MultiCheXNet, loss: MultiTaskLoss, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, trained_tasks: set[str],
        few_labels: FewLabelHooks | None = None, is_distributed: bool = False, engine: Engine | None = None,
        on_optimizer_step: Callable[[], None] | None = None,
    ) -> None:
        """``engine``: device, precision and gradient accumulation (default: the CPU in fp32, one batch per
        step); ``on_optimizer_step``: called after every optimiser step (the weight average's update)."""
        self.model = model
        self.engine = engine or Engine(torch.device("cpu"), "fp32", None, LoaderOptions())
        self.on_optimizer_step = on_optimizer_step
        self.pending = 0  # batches whose gradients wait for the next optimiser step (accumulate_steps)
        self.compiled: list[torch.nn.Module] = []  # modules running compiled (see training.engine.compile_model)
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.trained_tasks = trained_tasks
        self.few_labels = few_labels
        self.distributed = is_distributed
        self.forcing = ForcingCounts()
        self.skipped_batches = 0
        self._placeholder = False  # the last forward's "total" is only the zero term of join_unused_outputs
        self._forward = self.forward_losses
        if is_distributed:
            # find_unused_parameters: a step trains only the heads its batch has labels for (the alternating
            # schedule, teacher forcing), so which parameters get gradients changes from step to step.
            device_ids = [self.engine.device.index] if self.engine.device.type == "cuda" else None  # one GPU per rank
            self._forward = torch.nn.parallel.DistributedDataParallel(StepForward(model, self.forward_losses), device_ids=device_ids,
                                                                      find_unused_parameters=True)

    @property
    def global_step(self) -> int:
        """Optimisation steps taken so far (the learning-rate schedule's position)."""
        return self.scheduler.last_epoch

    def tasks(self, batch: CXRBatch | None) -> list[str]:
        """The heads this step trains: those the batch has labels for (under torchrun: any rank's batch,
        and none when some rank's batch is ``None``, i.e. had no readable image)."""
        if not self.distributed:
            return self.loss.tasks_for(batch, self.trained_tasks)
        return agreed_tasks(self.loss.tasks_for(batch, self.trained_tasks) if batch is not None else None)

    def __call__(self, batch: CXRBatch | None, epoch: int, last_in_epoch: bool = False) -> dict[str, float] | None:
        """One training batch in epoch ``epoch`` (0-based): forward and backward on the engine's device, and an
        optimiser step once ``accumulate_steps`` batches have added their gradients. Returns the batch's
        losses (under torchrun: averaged over the ranks), which skip a batch together (no labels anywhere,
        an unreadable batch on some rank, a non-finite loss on some rank). ``last_in_epoch``: the epoch's last
        batch closes the accumulation cycle, so an epoch ends with every gradient applied."""
        tasks = self.tasks(batch)
        if not tasks and not (self.few_labels is not None and self.few_labels.wants(batch)):
            return None
        batch = batch.to(self.engine.device, non_blocking=self.engine.non_blocking)
        images = batch.images
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_of_cycle = last_in_epoch or self.pending + 1 >= self.engine.accumulate_steps
        # Under torchrun, gradients are averaged over the ranks only on the cycle's last batch.
        synchronised = contextlib.nullcontext() if last_of_cycle or not self.distributed else self._forward.no_sync()
        with synchronised:
            losses = self._compiled_forward(images, batch, tasks)
            placeholder = self._placeholder
            if self.distributed:
                nonfinite, report = reduce_losses(losses, placeholder)
                if "total" not in report:  # no rank has a loss term: nobody runs backward
                    return None
            else:
                if "total" not in losses:
                    return None
                nonfinite, report = not torch.isfinite(losses["total"]), None
            if nonfinite:
                self._skip(losses, batch, placeholder, epoch)
                return None
            total = losses["total"] / self.engine.accumulate_steps
            (self.engine.scaler.scale(total) if self.engine.scaler is not None else total).backward()
        self.pending += 1
        if last_of_cycle:
            self.optimizer_step()
        if self.few_labels is not None:  # the discriminator's own step, in fp32
            self.few_labels.after_step(self.model, images, batch)
        return report if report is not None else {k: float(v.detach()) for k, v in losses.items()}

    def finish_epoch(self) -> None:
        """Gradients still accumulated when an epoch ends early (time budget, unreadable last batch): applied in
        one process; dropped under torchrun, where they were never averaged over the ranks (``no_sync``)."""
        if self.pending and self.distributed:
            log.info("dropping the gradients of %d batch(es) not yet averaged over the ranks", self.pending)
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
        self.optimizer_step()

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients (unscaled first for fp16), advance the learning rate, clear them."""
        if self.pending == 0:
            return
        if self.engine.scaler is not None:
            self.engine.scaler.step(self.optimizer)
            self.engine.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        if self.on_optimizer_step is not None:
            self.on_optimizer_step()

    def _compiled_forward(self, images: torch.Tensor, batch: CXRBatch, tasks: list[str]) -> dict[str, torch.Tensor]:
        """The forward in the run's precision; if torch.compile fails on this model or machine, the run goes on
        in eager mode (said once, as a warning)."""
        try:
            with self.engine.autocast():
                return self._forward(images, batch, tasks)
        except Exception as error:
            if not self.compiled or not is_compile_error(error):
                raise
            log.warning("compile: torch.compile cannot compile this model here (%s); training goes on without it",
                        " ".join(str(error).split())[:200])
            uncompile(self.compiled)
            self.compiled = []
            with self.engine.autocast():
                return self._forward(images, batch, tasks)

    def _skip(self, losses: dict[str, torch.Tensor], batch: CXRBatch, placeholder: bool, epoch: int) -> None:
        """A non-finite loss: stop the run, or count and log the batch and drop its gradients."""
        values = {k: float(v.detach()) for k, v in losses.items()} if not placeholder else {}
        paths = [m["path"] for m in batch.meta][:3]
        where = ""
        if self.distributed:
            local = not placeholder and not bool(torch.isfinite(losses["total"]))
            where = f" (rank {distributed.rank()}{'' if local else ': finite here, non-finite on another rank'}; every rank skips it)"
        if self.config.on_nonfinite_loss == "stop":
            raise FloatingPointError(f"non-finite loss {values} on batch {paths}{where} (epoch {epoch + 1})")
        self.skipped_batches += 1
        dropped = f" with the {self.pending} batch(es) accumulated before it" if self.pending else ""
        log.warning("non-finite loss %s on batch %s%s; batch skipped%s", values, paths, where, dropped)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0

    def forward_losses(self, images: torch.Tensor, batch: CXRBatch, tasks: list[str]) -> dict[str, torch.Tensor]:
        """The forward pass of a step, losses included (under torchrun DDP calls this as its forward)."""
        forced = self.config.teacher_forcing
        head_rows: dict[str, torch.Tensor] = {}
        if forced is None or not set(tasks) & set(forced.heads):
            outputs = self.model(images, tasks)
            losses = self.loss(outputs, batch)
        else:
            rng = np.random.default_rng([self.config.seed, self.global_step])
            outputs, head_batches, head_rows = forced_forward(self.model, images, batch, tasks, forced, rng, self.forcing)
            losses = self.loss(outputs, batch, head_batches)
        if self.few_labels is not None:
            self.few_labels.add_terms(losses, self.model, images, batch, outputs, self.trained_tasks, self.global_step, head_rows.get("seg"))
        self._placeholder = join_unused_outputs(outputs, losses) if self.distributed else False
        return losses
